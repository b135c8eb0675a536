"""The work queue deleted under traffic: no 200 for an event that reached no queue.

Handled types are published straight to the work queue (Topology.route): with the queue gone
the broker returns them and the ingress answers 503 (Stripe sends them again), declaring the
queue again; a worker whose consumer the broker cancelled consumes again, saying so once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from devkit import signing as sh
from ingress.app import create_app
from ingress.settings import IngressSettings
from shared.topology import Topology, handled, topic_matches
from shared.vocabulary import HEADER_EVENT_ID
from tests.captured_logs import Logs
from tests.conftest import depth, drain, wait_for
from tests.pipeline import COMPLETED, Pipeline
from tests.processes import acli
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)

SECRET = sh.new_secret()
WEBHOOK = "/webhooks/stripe"

Post = Callable[[dict[str, Any]], Awaitable[int]]


@pytest.fixture
async def webhooks(worker_settings: WorkerSettings) -> AsyncIterator[Post]:
    """An ingress in process on the test's broker names; posting a signed event gives its
    status. Each post is signed anew, as each of Stripe's deliveries of an event is."""
    settings = IngressSettings(webhook_secrets=(SECRET,), broker=worker_settings.broker)
    server = TestServer(create_app(settings, connect_wait_s=5.0), port=0)
    await server.start_server()
    session = aiohttp.ClientSession()
    url = str(server.make_url(WEBHOOK))

    async def post(doc: dict[str, Any]) -> int:
        raw = sh.body(doc)
        headers = {"Stripe-Signature": sh.signature_header(raw, SECRET)}
        async with session.post(url, data=raw, headers=headers) as response:
            if response.status == 503:
                assert int(response.headers["Retry-After"]) > 0
            return response.status

    yield post
    await session.close()
    await server.close()


async def queue_exists(pipeline: Pipeline, name: str) -> bool:
    try:
        await depth(pipeline.channel, name)
    except Exception:
        return False
    return True


# --- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("checkout.session.*", "checkout.session.completed", True),
        ("checkout.session.*", "checkout.session", False),
        ("checkout.session.*", "checkout.session.completed.extra", False),
        ("fulfillment.requested", "fulfillment.requested", True),
        ("#", "anything.at.all", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
    ],
)
def test_routing_keys_match_bindings_as_a_topic_exchange_matches_them(
    pattern: str, key: str, matches: bool
) -> None:
    assert topic_matches(pattern, key) is matches


def test_handled_types_go_straight_to_the_work_queue_and_the_rest_to_the_events_exchange() -> None:
    topo = Topology("p", (10.0,), 10)
    for event_type in (COMPLETED, "checkout.session.expired", "fulfillment.requested"):
        assert handled(event_type)
        assert topo.route(event_type) == ("", "p.fulfillment")
    assert not handled("customer.created")
    assert topo.route("customer.created") == ("p.stripe.events", "customer.created")


# --- the ingress ------------------------------------------------------------------------------


async def test_a_handled_event_while_the_work_queue_is_missing_gets_503_and_the_queue_returns(
    pipeline: Pipeline, webhooks: Post
) -> None:
    """No worker runs, so only the ingress can declare the queue again; Stripe's next
    delivery of the same event is then queued."""
    topology = pipeline.topology
    sid = pipeline.standin.add_session()["id"]
    event = pipeline.event(COMPLETED, sid)
    assert await webhooks(pipeline.event(COMPLETED, sid)) == 200  # the ingress is connected
    await drain(pipeline.channel, topology.work_queue)
    await pipeline.channel.queue_delete(topology.work_queue)

    assert await webhooks(event) == 503
    await wait_for(lambda: queue_exists(pipeline, topology.work_queue), timeout_s=5)
    assert await webhooks(event) == 200

    [queued] = await drain(pipeline.channel, topology.work_queue)
    assert queued.headers[HEADER_EVENT_ID] == event["id"]
    for name in (topology.unrouted_queue, topology.unrouted_handled_queue):
        assert await depth(pipeline.channel, name) == 0


async def test_every_webhook_answered_200_is_fulfilled_though_the_work_queue_is_deleted_twice(
    logs: Logs, pipeline: Pipeline, webhooks: Post
) -> None:
    """The issue's trial: 80 webhooks at 20/s, the work queue deleted twice 1.5 s apart,
    workers running. Before, every webhook got 200 and most of those sent meanwhile lay in
    the unrouted queue, never fulfilled. Now each is either queued (200) or refused (503)
    and sent again, as Stripe does, until queued; all are fulfilled, none by a backfill."""
    topology = pipeline.topology
    await pipeline.start()
    await pipeline.start()
    sessions = [pipeline.standin.add_session()["id"] for _ in range(80)]
    statuses: dict[str, list[int]] = {sid: [] for sid in sessions}

    async def deliver(sid: str) -> None:
        event = pipeline.event(COMPLETED, sid)
        while True:
            status = await webhooks(event)
            statuses[sid].append(status)
            if status == 200:
                return
            assert status == 503, status
            await asyncio.sleep(0.5)  # Stripe's retry, much sooner

    async def delete_twice() -> None:
        await asyncio.sleep(1.0)
        await pipeline.channel.queue_delete(topology.work_queue)
        await asyncio.sleep(1.5)
        await pipeline.channel.queue_delete(topology.work_queue)

    deleting = asyncio.create_task(delete_twice())
    deliveries = []
    for sid in sessions:
        deliveries.append(asyncio.create_task(deliver(sid)))
        await asyncio.sleep(0.05)
    await asyncio.gather(deleting, *deliveries)

    async def all_fulfilled() -> bool:
        rows = await pipeline.rows(
            "SELECT count(*) AS n FROM fulfillment_steps WHERE checkout_session_id = ANY($1)",
            sessions,
        )
        return bool(rows[0]["n"] == 2 * len(sessions))

    await wait_for(all_fulfilled, timeout_s=30)
    for sid in sessions:
        assert len(await pipeline.fulfillments(sid)) == 1
        assert len(pipeline.mails_for(sid)) == 1
    for name in (topology.unrouted_queue, topology.unrouted_handled_queue, topology.dead_queue):
        assert await depth(pipeline.channel, name) == 0
    refused = sum(s.count(503) for s in statuses.values())
    print(f"webhooks refused with 503 (then sent again): {refused}")
    logs.assert_no_traceback()


# --- the worker -------------------------------------------------------------------------------


async def test_a_worker_whose_queue_is_deleted_declares_it_again_and_says_so_once(
    logs: Logs, pipeline: Pipeline
) -> None:
    topology = pipeline.topology
    await pipeline.start()
    await pipeline.channel.queue_delete(topology.work_queue)

    async def consuming_again() -> bool:
        return bool(logs.events("work queue consumer cancelled"))

    await wait_for(consuming_again, timeout_s=10)
    # bound again as it was: what another publisher sends to stripe.events reaches it
    sid = pipeline.standin.add_session()["id"]
    exchange = await pipeline.channel.get_exchange(topology.events_exchange)
    await exchange.publish(foreign(pipeline.event(COMPLETED, sid)), routing_key=COMPLETED)
    await pipeline.fulfilled(sid)
    [line] = logs.events("work queue consumer cancelled")
    assert line["level"] == "warning" and line["queue"] == topology.work_queue
    logs.assert_no_traceback()


async def test_a_worker_consumes_again_when_its_queue_is_declared_again_at_once_under_traffic(
    logs: Logs, pipeline: Pipeline
) -> None:
    """Declared again within milliseconds of its deletion, while the worker held messages,
    RabbitMQ may leave the worker's consumer registered yet never deliver to it, nor tell
    it: the worker notices messages waiting while it has room and receives nothing."""
    topology = pipeline.topology
    await pipeline.start()
    sessions = [pipeline.standin.add_session()["id"] for _ in range(30)]

    async def sent(sid: str) -> bool:
        # (RabbitMQ 3.10 may close a publisher's connection, INTERNAL_ERROR, meanwhile)
        try:
            await pipeline.send(COMPLETED, sid)
        except Exception:
            return False
        return True

    async def send_all() -> None:
        for sid in sessions:
            await sent(sid)
            await asyncio.sleep(0.05)

    sending = asyncio.create_task(send_all())
    await asyncio.sleep(0.5)
    await pipeline.channel.queue_delete(topology.work_queue)
    await topology.declare(pipeline.channel)
    await sending
    late = pipeline.standin.add_session()["id"]
    await wait_for(lambda: sent(late), timeout_s=10, interval_s=0.5)

    await pipeline.fulfilled(late, timeout_s=20)
    said = logs.events("work queue consumer")
    assert len(said) == 1 and said[0]["level"] == "warning", said
    print(said[0]["event"])
    logs.assert_no_traceback()


def foreign(doc: dict[str, Any]) -> aio_pika.Message:
    """An event as another publisher might send it: the body, nothing else."""
    return aio_pika.Message(sh.body(doc), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


# --- another publisher's events while the queue is missing --------------------------------------


async def test_handled_events_another_publisher_left_unrouted_are_kept_apart_and_replayable(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    """A publisher that sends handled types to stripe.events (not through Topology.route)
    while the work queue is missing: the alternate exchange keeps them as before, and a copy
    of the handled ones goes to stripe.events.unrouted.handled, which an alert watches and
    `dlq replay --unrouted` empties into the work queue."""
    topology = pipeline.topology
    await pipeline.channel.queue_delete(topology.work_queue)
    exchange = await pipeline.channel.get_exchange(topology.events_exchange)
    sid = pipeline.standin.add_session()["id"]
    lost = pipeline.event(COMPLETED, sid)
    other = sh.event("customer.created", sh.fixture_object("customer"))
    await exchange.publish(foreign(lost), routing_key=COMPLETED)
    await exchange.publish(foreign(other), routing_key="customer.created")

    await wait_for(lambda: depth(pipeline.channel, topology.unrouted_handled_queue))
    assert await depth(pipeline.channel, topology.unrouted_handled_queue) == 1
    assert await depth(pipeline.channel, topology.unrouted_queue) == 2

    worker = await pipeline.start()  # declares the work queue again
    listed = await acli(worker_settings, "dlq", "list", "--unrouted", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [letter["event_id"] for letter in json.loads(listed.stdout)] == [lost["id"]]
    replayed = await acli(worker_settings, "dlq", "replay", "--unrouted", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout

    await pipeline.fulfilled(sid)
    await pipeline.settle(worker)
    assert await depth(pipeline.channel, topology.unrouted_handled_queue) == 0
    assert len(pipeline.mails_for(sid)) == 1
