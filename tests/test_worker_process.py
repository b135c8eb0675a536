"""Worker processes: several at once, killed at any instant, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fulfillment.dlq import list_dead_letters
from shared.topology import Topology
from tests.conftest import depth, depth_is, free_port, wait_for
from tests.pipeline import COMPLETED, SUCCEEDED, Pipeline
from tests.processes import RoleProcess, fresh_metrics, worker_env
from tests.tcp_proxy import TcpProxy
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)

Spawn = Callable[..., Awaitable[RoleProcess]]  # env overrides -> a consuming worker process


@pytest.fixture
async def spawn(worker_settings: WorkerSettings) -> AsyncIterator[Spawn]:
    processes: list[RoleProcess] = []

    async def start(**env: str) -> RoleProcess:
        process = RoleProcess(["worker"], {**worker_env(worker_settings), **env})
        processes.append(process)
        return await process.start("worker consuming")

    yield start
    for process in processes:
        await process.stop()


async def test_twenty_duplicates_over_two_worker_processes_fulfill_once(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    sid = pipeline.standin.add_session()["id"]
    workers = [await spawn(), await spawn()]
    assert [w.events("worker consuming")[0]["event_loop"] for w in workers] == ["uvloop"] * 2
    completed = pipeline.event(COMPLETED, sid)

    await asyncio.gather(
        *(pipeline.publish(completed) for _ in range(20)),
        pipeline.publish(pipeline.event(SUCCEEDED, sid)),
    )

    async def all_handled() -> bool:
        return sum(len(w.events("event handled")) for w in workers) == 21

    await wait_for(all_handled, timeout_s=30)
    assert all(w.events("event handled") for w in workers), "both processes took a share"
    assert len(await pipeline.fulfillments(sid)) == 1
    assert len(pipeline.mails_for(sid)) == 1
    assert len(await pipeline.outbound_messages()) == 1
    outcomes = [e["outcome"] for w in workers for e in w.events("event handled")]
    assert outcomes.count("fulfilled") == 1
    assert outcomes.count("already_fulfilled") == 20
    # one line per outcome, carrying what each effect did
    [fulfilled] = [e for w in workers for e in w.events("event handled") if e["effects"]]
    assert fulfilled["outcome"] == "fulfilled" and fulfilled["checkout_session_id"] == sid
    assert fulfilled["effects"] == {
        "confirmation_email": f"sent <order.{sid}@shop.test>",
        "order_fulfilled_message": f"published order.fulfilled:{sid}",
    }


async def test_a_paid_order_without_line_items_is_fulfilled_and_warned_about(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    """Checkout always sells something; an empty item list is Stripe's odd answer, and the
    order is recorded once, so an operator is told (the order itself goes on)."""
    standin = pipeline.standin
    empty = standin.add_session(line_items=[("T-shirt", 1, 1500)])["id"]
    standin.line_items[empty].clear()
    normal = standin.add_session()["id"]
    worker = await spawn()

    await pipeline.send(COMPLETED, empty)
    await pipeline.send(COMPLETED, normal)

    async def handled() -> bool:
        return len(worker.events("event handled")) == 2

    await wait_for(handled, timeout_s=30)
    [warning] = worker.events("paid order without line items")
    assert (warning["level"], warning["checkout_session_id"]) == ("warning", empty)
    assert warning["amount_total"] == 1500
    assert len(await pipeline.fulfillments(empty)) == 1


async def test_every_effect_done_is_on_an_outcome_line_even_when_its_attempt_failed_after(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    """The broker goes away while the email (the last effect, after order.fulfilled) is
    sent: both effects are done and recorded, but the message's ack is lost and the
    redelivery finds nothing to do. Each effect is named on exactly one outcome line, with
    outcome fulfilled; the email was on none before."""
    proxy = TcpProxy.in_front_of(pipeline.settings.broker.url)
    await proxy.start()
    proxied = proxy.url()
    try:
        sid = pipeline.standin.add_session()["id"]
        pipeline.smtp.after_data = proxy.cutter()  # before the server's 250 to the email
        worker = await spawn(RABBITMQ_URL=proxied, WORKER_QUICK_RETRIES="10")
        await pipeline.send(COMPLETED, sid)
        await pipeline.mails(1, timeout_s=15)
        await proxy.restore()

        def effects_logged() -> list[str]:
            return [
                step
                for line in worker.events("event handled")
                for step in (line.get("effects") or {})
            ]

        async def both_logged() -> bool:
            return len(effects_logged()) >= 2

        await wait_for(both_logged, timeout_s=30)
        await asyncio.sleep(0.5)
        assert sorted(effects_logged()) == ["confirmation_email", "order_fulfilled_message"]
        # a message that did part of the fulfillment is "fulfilled", even when its last
        # attempt found the rest done (it said "already_fulfilled")
        lines = [e for e in worker.events("event handled") if e.get("effects")]
        assert {line["outcome"] for line in lines} == {"fulfilled"}
        assert len(pipeline.mails_for(sid)) == 1
        [out] = await pipeline.outbound_messages()
        assert out.headers["fulfillment-id"] == f"order.fulfilled:{sid}"
    finally:
        await proxy.close()


async def test_an_attempt_that_failed_after_an_effect_names_it_on_its_retry_line(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    """order.fulfilled went out, then the email was deferred: the retry line says what was
    done before the failure, and the attempt that sends the email names only the email."""
    pipeline.smtp.deferred_recipients.add("later@example.com")
    sid = pipeline.standin.add_session(customer_email="later@example.com")["id"]
    worker = await spawn()

    await pipeline.send(COMPLETED, sid)
    await wait_for(lambda: worker.events("retry scheduled"), timeout_s=15)
    pipeline.smtp.deferred_recipients.clear()
    await pipeline.mails(1, timeout_s=15)
    await wait_for(lambda: worker.events("event handled"), timeout_s=15)

    first_retry = worker.events("retry scheduled")[0]
    assert first_retry["effects"] == {"order_fulfilled_message": f"published order.fulfilled:{sid}"}
    [handled] = worker.events("event handled")
    assert list(handled["effects"]) == ["confirmation_email"]
    assert handled["effects"]["confirmation_email"] == f"sent <order.{sid}@shop.test>"
    assert len(await pipeline.outbound_messages()) == 1


async def test_a_worker_killed_between_the_row_and_the_email_is_finished_by_another_once(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    smtp = pipeline.smtp
    sid = pipeline.standin.add_session()["id"]
    smtp.rcpt_delay_s = 5.0  # the first worker is stuck mid-SMTP, after the row is committed
    first = await spawn()

    await pipeline.send(COMPLETED, sid)
    await pipeline.fulfilled(sid)
    await asyncio.sleep(0.3)
    first.signal(signal.SIGKILL)
    await first.wait()
    assert smtp.for_session(sid) == []

    smtp.rcpt_delay_s = 0.0
    second = await spawn()
    await pipeline.mails(1, timeout_s=20)
    await second.wait_for_log("event handled")
    await asyncio.sleep(0.5)

    assert len(await pipeline.fulfillments(sid)) == 1
    assert len(smtp.for_session(sid)) == 1
    assert len(await pipeline.outbound_messages()) == 1
    steps = await pipeline.rows(
        "SELECT step FROM fulfillment_steps WHERE checkout_session_id = $1", sid
    )
    assert sorted(r["step"] for r in steps) == ["confirmation_email", "order_fulfilled_message"]


async def test_sigterm_finishes_in_flight_messages_and_exits_0_with_none_redelivered(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    standin = pipeline.standin
    sids = [standin.add_session()["id"] for _ in range(5)]
    standin.latency_s = 1.0
    worker = await spawn()

    for sid in sids:
        await pipeline.send(COMPLETED, sid)
    await wait_for(lambda: standin.request_count >= 5)  # all five in flight at Stripe
    worker.signal(signal.SIGTERM)

    assert await worker.wait(20) == 0
    assert len(worker.events("event handled")) == 5
    for sid in sids:
        assert len(await pipeline.fulfillments(sid)) == 1
    assert await depth(pipeline.channel, pipeline.topology.work_queue) == 0
    assert standin.request_count == 5  # nothing was handled twice
    assert worker.events("worker stopped")


async def test_a_message_that_kills_its_worker_every_time_is_dead_lettered_by_the_delivery_limit(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    standin, channel, topology = pipeline.standin, pipeline.channel, pipeline.topology
    sid = standin.add_session()["id"]
    standin.latency_s = 30.0  # the worker is always mid-message when it dies
    await pipeline.send(COMPLETED, sid)

    deliveries = 0
    for _ in range(topology.delivery_limit + 3):
        if await depth(channel, topology.dead_queue):
            break
        seen = standin.request_count
        worker = await spawn()
        try:
            await wait_for(lambda seen=seen: standin.request_count > seen, timeout_s=10)
        except AssertionError:
            await worker.stop()
            continue
        deliveries += 1
        worker.signal(signal.SIGKILL)
        await worker.wait()
        await asyncio.sleep(0.3)

    assert deliveries == topology.delivery_limit + 1
    await wait_for(lambda: depth(channel, topology.dead_queue), timeout_s=10)
    # Looking at it changes nothing: the DLQ's own x-delivery-count grows with every look
    # (a get, then a requeue), so it must not be read as the attempts (outside-in trial).
    for _ in range(3):
        [letter] = await list_dead_letters(pipeline.settings.broker)
        assert letter.attempts == topology.delivery_limit + 1
        assert letter.error_type == "broker:delivery_limit"
    [dead] = await wait_for(pipeline.dead_letters, timeout_s=10)
    deaths = dead.headers["x-death"]
    assert deaths[0]["reason"] == "delivery_limit"
    assert await pipeline.fulfillments(sid) == []


async def test_sigterm_while_the_broker_does_not_answer_the_start_exits_0_at_once(
    worker_settings: WorkerSettings, rabbitmq_url: str
) -> None:
    """A worker still starting (here: a broker that accepts the connection and then says
    nothing) stops on SIGTERM at once and cleanly; it waited out the 10 s connect timeout
    and exited with the start's error."""
    proxy = TcpProxy.in_front_of(rabbitmq_url)
    await proxy.start()
    proxy.freeze()
    worker = RoleProcess(["worker"], {**worker_env(worker_settings), "RABBITMQ_URL": proxy.url()})
    try:
        await worker.start()
        await asyncio.sleep(1.5)  # metrics up, migrations checked, now in the AMQP handshake
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout_s=5) == 0
    finally:
        await worker.stop()
        proxy.thaw()
        await proxy.close()
    assert worker.events("worker stopping before it started consuming")
    assert not worker.events("worker consuming")


async def test_a_fresh_worker_exports_the_series_its_alerts_watch_at_zero(
    worker_settings: WorkerSettings, topology: Topology
) -> None:
    """rate() needs two samples: a dead-letter series created by the first dead letter
    never fired WorkerDeadLetterRate for it (outside-in review with Prometheus)."""
    port = free_port()
    env = {**worker_env(worker_settings), "WORKER_METRICS_PORT": str(port)}
    text = await fresh_metrics(["worker"], env, "worker consuming", port)
    for event_type in ("checkout.session.completed", "checkout.session.async_payment_failed"):
        for reason in ("permanent", "retries_exhausted"):
            series = f'worker_dead_letters_total{{event_type="{event_type}",reason="{reason}"}}'
            assert f"{series} 0.0" in text
    assert 'worker_emails_undeliverable_total{purpose="confirmation_email"} 0.0' in text


def test_a_step_done_twice_for_one_message_shows_both_on_its_outcome_line() -> None:
    from worker.consumer import _effects_for_log

    shown = _effects_for_log(
        [
            ("confirmation_email", "sent <order.cs_1@shop.test>"),
            ("confirmation_email", "sent <order.cs_1@shop.test>"),
            ("order_fulfilled_message", "published order.fulfilled:cs_1"),
        ]
    )
    assert shown == {
        "confirmation_email": "sent <order.cs_1@shop.test>; again: sent <order.cs_1@shop.test>",
        "order_fulfilled_message": "published order.fulfilled:cs_1",
    }


async def test_a_message_still_in_flight_when_the_grace_period_ends_is_named_and_redelivered(
    pipeline: Pipeline, spawn: Spawn
) -> None:
    standin = pipeline.standin
    sid = standin.add_session()["id"]
    standin.latency_s = 30.0  # Stripe does not answer within the grace period
    worker = await spawn(WORKER_GRACE_S="1")
    event = await pipeline.send(COMPLETED, sid)
    await wait_for(lambda: standin.request_count >= 1)

    worker.signal(signal.SIGTERM)

    assert await worker.wait(20) == 0
    [line] = worker.events("event left for redelivery")
    assert (line["event_id"], line["checkout_session_id"], line["outcome"]) == (
        event["id"],
        sid,
        "abandoned",
    )
    assert line["attempt"] == 1 and line["duration_ms"] >= 1000
    assert await wait_for(lambda: depth_is(pipeline.channel, pipeline.topology.work_queue, 1))


async def test_a_worker_on_any_free_metrics_port_says_which_one_it_got(spawn: Spawn) -> None:
    """New-user trial: with WORKER_METRICS_PORT=0 the log said port 0, so nobody could find
    the worker's /metrics and /healthz."""
    import aiohttp

    worker = await spawn(WORKER_METRICS_PORT="0")
    line = await worker.wait_for_log("worker metrics listening")

    assert line["port"] > 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{line['port']}/healthz") as response:
            assert response.status == 200
