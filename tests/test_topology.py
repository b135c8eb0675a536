"""The broker topology against a real RabbitMQ: names, routing, delays and dead-lettering."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from shared.settings import BrokerSettings
from shared.topology import Topology
from tests.conftest import depth, depths, drain, wait_for


def _message(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def _publish_event(channel: AbstractChannel, topo: Topology, key: str, body: bytes) -> None:
    exchange = await channel.get_exchange(topo.events_exchange, ensure=True)
    await exchange.publish(_message(body), routing_key=key)


# --- names ------------------------------------------------------------------------------------


def test_retry_queue_for_picks_the_delay_of_each_attempt_and_caps_at_the_last() -> None:
    topo = Topology("p", (0.5, 1.0, 60.0), delivery_limit=5)
    first, second, last = topo.retry_queues

    assert topo.retry_queue_for(1) == (first, 0.5)
    assert topo.retry_queue_for(2) == (second, 1.0)
    assert topo.retry_queue_for(3) == (last, 60.0)
    assert topo.retry_queue_for(4) == (last, 60.0)
    assert topo.retry_queue_for(1000) == (last, 60.0)
    assert topo.retry_queue_for(0) == (first, 0.5)
    assert topo.retry_queue_for(-1) == (first, 0.5)


def test_a_retry_after_longer_than_the_attempts_delay_picks_a_longer_delay_queue() -> None:
    topo = Topology("p", (0.5, 1.0, 60.0), delivery_limit=5)
    first, second, last = topo.retry_queues

    assert topo.retry_queue_for(1, at_least_s=0.5) == (first, 0.5)
    assert topo.retry_queue_for(1, at_least_s=0.8) == (second, 1.0)
    assert topo.retry_queue_for(1, at_least_s=30) == (last, 60.0)
    assert topo.retry_queue_for(1, at_least_s=3600) == (last, 60.0)  # the longest there is
    assert topo.retry_queue_for(3, at_least_s=0.8) == (last, 60.0)  # never a shorter one

    unsorted = Topology("p", (600.0, 60.0, 3600.0), delivery_limit=5)
    ten_min, one_min, hour = unsorted.retry_queues
    assert unsorted.retry_queue_for(2, at_least_s=30) == (one_min, 60.0)  # its own
    assert unsorted.retry_queue_for(2, at_least_s=100) == (ten_min, 600.0)
    assert unsorted.retry_queue_for(2, at_least_s=7200) == (hour, 3600.0)
    assert unsorted.retry_queue_for(1, at_least_s=100) == (ten_min, 600.0)  # its own


def test_retry_queues_are_named_by_their_delay() -> None:
    topo = Topology("p", (0.5, 1.0, 10.0, 60.0, 600.0, 3600.0, 21600.0, 90.0), 10)

    assert topo.retry_queues == (
        "p.fulfillment.retry.500ms",
        "p.fulfillment.retry.1s",
        "p.fulfillment.retry.10s",
        "p.fulfillment.retry.1m",
        "p.fulfillment.retry.10m",
        "p.fulfillment.retry.1h",
        "p.fulfillment.retry.6h",
        "p.fulfillment.retry.90s",
    )


def test_without_a_prefix_names_are_the_bare_names() -> None:
    topo = Topology("", (10.0,), 10)

    assert topo.work_queue == "fulfillment"
    assert topo.events_exchange == "stripe.events"
    assert topo.retry_queues == ("fulfillment.retry.10s",)


async def test_every_declared_name_starts_with_the_test_prefix(
    topology: Topology, prefix: str, channel: AbstractChannel
) -> None:
    exchanges = (
        topology.events_exchange,
        topology.unrouted_exchange,
        topology.unrouted_handled_exchange,
        topology.out_exchange,
    )
    names = [*topology.all_queues, *exchanges]

    assert len(topology.all_queues) == len(set(topology.all_queues)) == 7
    for name in names:
        assert name.startswith(f"{prefix}.")
    for name in topology.all_queues:
        await channel.get_queue(name, ensure=True)
    for name in exchanges:
        await channel.get_exchange(name, ensure=True)


# --- declaring --------------------------------------------------------------------------------


async def test_declaring_twice_is_idempotent_and_keeps_queues_and_their_messages(
    topology: Topology, channel: AbstractChannel
) -> None:
    await _publish_event(channel, topology, "checkout.session.completed", b"kept")
    await wait_for(lambda: depth(channel, topology.work_queue))
    before = await depths(channel, topology)

    events = await topology.declare(channel)
    await topology.declare(channel)

    assert events.name == topology.events_exchange
    assert not channel.is_closed
    assert await depths(channel, topology) == before
    assert [m.body for m in await drain(channel, topology.work_queue)] == [b"kept"]


async def test_a_checkout_session_event_is_routed_to_the_work_queue(
    topology: Topology, channel: AbstractChannel
) -> None:
    await _publish_event(channel, topology, "checkout.session.completed", b"session")

    await wait_for(lambda: depth(channel, topology.work_queue))
    messages = await drain(channel, topology.work_queue)
    assert [m.body for m in messages] == [b"session"]
    assert messages[0].routing_key == "checkout.session.completed"
    assert await depths(channel, topology) == dict.fromkeys(topology.all_queues, 0)


async def test_an_event_type_no_worker_handles_lands_in_the_unrouted_queue(
    topology: Topology, channel: AbstractChannel
) -> None:
    await _publish_event(channel, topology, "customer.created", b"customer")

    await wait_for(lambda: depth(channel, topology.unrouted_queue))
    messages = await drain(channel, topology.unrouted_queue)
    assert [m.body for m in messages] == [b"customer"]
    assert messages[0].routing_key == "customer.created"
    assert await depths(channel, topology) == dict.fromkeys(topology.all_queues, 0)


async def test_a_message_in_the_first_retry_queue_returns_to_the_work_queue_after_its_delay(
    topology: Topology, channel: AbstractChannel
) -> None:
    queue, delay_s = topology.retry_queue_for(1)
    assert delay_s == 0.5
    loop = asyncio.get_running_loop()
    started = loop.time()

    await channel.default_exchange.publish(_message(b"retry me"), routing_key=queue)

    await wait_for(lambda: depth(channel, topology.work_queue), timeout_s=15)
    assert loop.time() - started >= delay_s - 0.05
    messages = await drain(channel, topology.work_queue)
    assert [m.body for m in messages] == [b"retry me"]
    assert await depths(channel, topology) == dict.fromkeys(topology.all_queues, 0)


async def test_a_message_in_the_last_retry_queue_also_returns_to_the_work_queue(
    topology: Topology, channel: AbstractChannel
) -> None:
    queue, delay_s = topology.retry_queue_for(99)
    assert (queue, delay_s) == (topology.retry_queues[-1], 1.0)

    await channel.default_exchange.publish(_message(b"last"), routing_key=queue)

    await wait_for(lambda: depth(channel, topology.work_queue), timeout_s=15)
    assert [m.body for m in await drain(channel, topology.work_queue)] == [b"last"]


# --- the delivery limit -----------------------------------------------------------------------


@pytest.fixture
async def limited(broker_settings: BrokerSettings, rabbitmq_url: str) -> AsyncIterator[Topology]:
    """A topology with delivery_limit=2 under its own fresh prefix, deleted afterwards."""
    settings = replace(broker_settings, prefix=f"test.{uuid.uuid4().hex[:10]}", delivery_limit=2)
    topo = Topology.from_settings(settings)
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        await topo.declare(await connection.channel())
    yield topo
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        await topo.delete(await connection.channel())


async def test_a_message_rejected_more_than_the_delivery_limit_is_dead_lettered(
    limited: Topology, channel: AbstractChannel
) -> None:
    assert limited.delivery_limit == 2
    await _publish_event(channel, limited, "checkout.session.completed", b"poison")
    work = await channel.get_queue(limited.work_queue, ensure=True)

    deliveries = 0
    for _ in range(limited.delivery_limit + 5):
        message = await wait_for(lambda: work.get(fail=False, no_ack=False), timeout_s=5)
        deliveries += 1
        assert message.body == b"poison"
        await message.reject(requeue=True)
        if deliveries > limited.delivery_limit:
            break

    await wait_for(lambda: depth(channel, limited.dead_queue), timeout_s=10)
    assert deliveries == limited.delivery_limit + 1
    assert await work.get(fail=False, no_ack=True) is None
    dead = await drain(channel, limited.dead_queue)
    assert [m.body for m in dead] == [b"poison"]
    assert await depths(channel, limited) == dict.fromkeys(limited.all_queues, 0)


async def test_a_message_rejected_up_to_the_delivery_limit_is_still_delivered_again(
    limited: Topology, channel: AbstractChannel
) -> None:
    await _publish_event(channel, limited, "checkout.session.completed", b"flaky")
    work = await channel.get_queue(limited.work_queue, ensure=True)

    for _ in range(limited.delivery_limit):
        message = await wait_for(lambda: work.get(fail=False, no_ack=False), timeout_s=5)
        await message.reject(requeue=True)
    message = await wait_for(lambda: work.get(fail=False, no_ack=False), timeout_s=5)
    await message.ack()

    assert message.body == b"flaky"
    assert await depth(channel, limited.dead_queue) == 0


async def test_declaring_with_other_queue_arguments_names_the_settings_to_align(
    topology: Topology, rabbitmq_url: str
) -> None:
    from shared.errors import ConfigError

    other = replace(topology, delivery_limit=topology.delivery_limit + 1)
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        with pytest.raises(ConfigError, match="DELIVERY_LIMIT"):
            await other.declare(await connection.channel())


async def test_the_broker_holds_the_queue_arguments_the_guarantees_rest_on(
    topology: Topology, rabbitmq_url: str
) -> None:
    """Redeclared with the arguments written out here, each queue is accepted only if the
    broker holds exactly these (else PRECONDITION_FAILED): at-least-once dead-lettering
    with reject-publish overflow, the work queue's delivery limit, and no delivery limit
    that could drop a letter waiting for people (RabbitMQ 4 defaults every quorum queue
    to 20, and every `dlq list` is a delivery)."""
    from shared.topology import KEPT_DELIVERY_LIMIT

    def at_least_once_to(target: str) -> dict[str, Any]:
        return {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    quorum = {"x-queue-type": "quorum"}
    expected: dict[str, dict[str, Any]] = {
        topology.work_queue: {
            **quorum,
            "x-delivery-limit": topology.delivery_limit,
            **at_least_once_to(topology.dead_queue),
        },
        topology.dead_queue: {**quorum, "x-delivery-limit": KEPT_DELIVERY_LIMIT},
        topology.unrouted_queue: {**quorum, "x-delivery-limit": KEPT_DELIVERY_LIMIT},
        topology.unrouted_handled_queue: {**quorum, "x-delivery-limit": KEPT_DELIVERY_LIMIT},
        **{
            name: {
                **quorum,
                "x-message-ttl": int(delay_s * 1000),
                **at_least_once_to(topology.work_queue),
            }
            for name, delay_s in zip(topology.retry_queues, topology.retry_delays_s, strict=True)
        },
    }
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        for name, arguments in expected.items():
            await channel.declare_queue(name, durable=True, arguments=arguments)


async def test_a_broker_that_never_answers_is_named_with_how_long_it_was_waited_for(
    broker_settings: BrokerSettings, rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout's own message is empty: the reason said "(TimeoutError: )" (outside-in trial)."""
    from shared import topology
    from shared.errors import BrokerUnavailable
    from tests.tcp_proxy import TcpProxy

    monkeypatch.setattr(topology, "CONNECT_TIMEOUT_S", 0.5)
    proxy = TcpProxy.in_front_of(rabbitmq_url)
    await proxy.start()
    proxy.freeze()
    try:
        with pytest.raises(BrokerUnavailable, match=r"TimeoutError: no answer within 0.5s"):
            await topology.connect(replace(broker_settings, url=proxy.url()))
    finally:
        await proxy.close()
