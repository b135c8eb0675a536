"""A broker that blocks publishers (a memory alarm) under the worker: each order.fulfilled
published once, everything fulfilled once the alarm clears.

The alarm is set on a RabbitMQ node of the test's own (devkit.services), never on the
machine's broker, which others use.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import aio_pika
import pytest

from devkit.services import PrivateRabbit, ServiceUnavailable, private_rabbitmq
from devkit.stripe import StripeStandIn
from shared.settings import BrokerSettings
from shared.topology import Topology
from tests.captured_logs import Logs
from tests.conftest import drain, wait_for
from tests.pipeline import COMPLETED, both_steps, session_event
from worker.consumer import Worker
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbit]:
    try:
        with private_rabbitmq(prefix="fx-alarm") as node:
            yield node
    except ServiceUnavailable as exc:
        pytest.skip(f"no RabbitMQ node of our own here: {exc}")


@pytest.fixture
async def private_broker(rabbit: PrivateRabbit) -> AsyncIterator[BrokerSettings]:
    settings = BrokerSettings(
        url=rabbit.url,
        prefix=f"test.{uuid.uuid4().hex[:10]}",
        publish_timeout_s=1.0,
        retry_delays_s=(1.0, 2.0, 4.0, 8.0),
        delivery_limit=3,
    )
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        await Topology.from_settings(settings).declare(await connection.channel())
    yield settings


async def memory_alarm(rabbit: PrivateRabbit, on: bool) -> None:
    """The node's memory watermark below what it uses (it then blocks every publisher), or
    back to RabbitMQ's default."""
    watermark = "0.0001" if on else "0.4"
    await asyncio.to_thread(rabbit.nodes[0].ctl, "set_vm_memory_high_watermark", watermark)


async def test_a_memory_alarm_makes_outbound_messages_wait_not_go_out_twice(
    logs: Logs,
    rabbit: PrivateRabbit,
    private_broker: BrokerSettings,
    worker_settings: WorkerSettings,
    standin: StripeStandIn,
    database_url: str,
) -> None:
    """The issue's trial: while the broker blocked publishers, order.fulfilled was published
    up to 4 times for 9 of 120 sessions (each confirm timed out after PUBLISH_TIMEOUT_S, the
    retry published it again, and every copy went out once the alarm cleared). Now the
    worker waits for connection.unblocked: one copy per fulfillment-id."""
    topology = Topology.from_settings(private_broker)
    connection = await aio_pika.connect(rabbit.url)
    worker = Worker(replace(worker_settings, broker=private_broker))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        capture = await channel.declare_queue(f"{topology.prefix}.outbound-capture")
        await capture.bind(topology.out_exchange, routing_key="#")
        standin.latency_s = 0.5  # the worker is mid-way through many when the alarm comes
        sessions = [standin.add_session()["id"] for _ in range(30)]
        for sid in sessions:
            event = session_event(standin, COMPLETED, sid)
            body = aio_pika.Message(
                json.dumps(event).encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"stripe-event-id": event["id"], "stripe-event-type": COMPLETED},
            )
            await channel.default_exchange.publish(body, topology.work_queue)
        await worker.start()
        try:
            await asyncio.sleep(0.7)
            await memory_alarm(rabbit, on=True)
            await asyncio.sleep(6.0)  # several PUBLISH_TIMEOUT_S
            await memory_alarm(rabbit, on=False)

            for sid in sessions:
                await wait_for(lambda sid=sid: both_steps(database_url, sid), timeout_s=60)
        finally:
            await memory_alarm(rabbit, on=False)
            await worker.stop(grace_s=5)
        copies = Counter(m.headers["fulfillment-id"] for m in await drain(channel, capture.name))
    assert set(copies) == {f"order.fulfilled:{sid}" for sid in sessions}
    assert max(copies.values()) == 1, [k for k, n in copies.items() if n > 1]
    [blocked] = logs.events("broker blocks publishers")
    assert blocked["level"] == "warning"
    logs.assert_no_traceback()
