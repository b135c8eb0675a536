"""Real services for the tests: RabbitMQ (and later PostgreSQL), unique names per test.

Where a service comes from, in order: its URL variable (RABBITMQ_URL); a testcontainers
container when a Docker engine answers; the default local address if something listens
there. Without any, tests that need it are skipped locally and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn, serve
from shared import runtime
from shared.broker import event_message
from shared.envelope import EventEnvelope
from shared.settings import BrokerSettings
from shared.stripe_client import StripeSettings
from shared.topology import Topology
from worker.consumer import Worker
from worker.settings import SmtpSettings, WorkerSettings

if TYPE_CHECKING:
    from tests.pipeline import Pipeline

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# the ``logs`` fixture: what in-process services logged, as JSON lines
pytest_plugins = ["tests.captured_logs"]

# Every ingress the tests start (alone or under `up`) serves /metrics on a free port unless
# a test says which: on the fixed default, runs side by side on one machine would clash.
os.environ.setdefault("INGRESS_METRICS_PORT", "0")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """In-process async tests run on the loop the project's processes run on (uvloop)."""
    factory = runtime.loop_factory()
    return {"asyncio": asyncio.new_event_loop} if factory is None else {"uvloop": factory}


def _listening(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "localhost", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _unavailable(what: str) -> None:
    message = f"{what} is not available (set its URL, run Docker, or start it locally)"
    if IN_CI:
        pytest.fail(message + " — required under CI=true")
    pytest.skip(message)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    url = os.environ.get("RABBITMQ_URL")
    if url:
        if not _listening(url, 5672):
            _unavailable(f"RabbitMQ at {url}")
        yield url
        return
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    url = "amqp://guest:guest@127.0.0.1:5672/"
    if not _listening(url, 5672):
        _unavailable("RabbitMQ")
    yield url


@pytest.fixture
def prefix() -> str:
    """Broker names unique to this test, so tests never see each other's messages."""
    return f"test.{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def broker_settings(rabbitmq_url: str, prefix: str) -> AsyncIterator[BrokerSettings]:
    """This test's broker settings; whatever was declared under them is deleted afterwards
    (by the fixtures, or by the processes the test ran)."""
    settings = BrokerSettings(
        url=rabbitmq_url,
        prefix=prefix,
        publish_timeout_s=2.0,
        retry_delays_s=(0.5, 1.0),
        delivery_limit=3,
    )
    yield settings
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        # deleting what does not exist is a no-op for RabbitMQ
        await Topology.from_settings(settings).delete(await connection.channel())


@pytest.fixture
async def amqp(rabbitmq_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(rabbitmq_url)
    async with connection:
        yield connection


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    ch = await amqp.channel()
    yield ch
    with contextlib.suppress(Exception):
        await ch.close()


@pytest.fixture
async def topology(broker_settings: BrokerSettings, rabbitmq_url: str) -> AsyncIterator[Topology]:
    """The whole topology declared under this test's prefix, deleted afterwards."""
    topo = Topology.from_settings(broker_settings)
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        await topo.declare(await connection.channel())
    yield topo  # deleted by broker_settings


async def drain(channel: AbstractChannel, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in ``queue`` (acknowledged, so the queue ends empty)."""
    q = await channel.get_queue(queue, ensure=True)
    messages = []
    while (message := await q.get(fail=False, no_ack=True)) is not None:
        messages.append(message)
    return messages


async def depth(channel: AbstractChannel, queue: str) -> int:
    """Ready messages in ``queue`` now. Asked on the underlying channel: aio-pika's robust
    channel answers a passive ``declare_queue`` of a queue it declared before with that
    first answer, a count that never changes (a poll for a new depth never ends)."""
    declared = await (await channel.get_underlay_channel()).queue_declare(queue, passive=True)
    return int(declared.message_count or 0)


async def depth_is(channel: AbstractChannel, queue: str, count: int) -> bool:
    return await depth(channel, queue) == count


async def depths(channel: AbstractChannel, topo: Topology) -> dict[str, int]:
    """Ready-message counts of every queue in the topology."""
    return {name: await depth(channel, name) for name in topo.all_queues}


async def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


def free_port(count: int = 1) -> int:
    """A free port, or the first of ``count`` consecutive free ones (``up`` gives worker i
    the metrics port base + i - 1; a neighbour taken by some client made a worker fail)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count - 1 > 65535:
            continue
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A server URL (database part ignored): DATABASE_URL, a container, or the local server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        if not _listening(url, 5432):
            _unavailable(f"PostgreSQL at {url}")
        yield url
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    if not _listening(url, 5432):
        _unavailable("PostgreSQL")
    yield url


def database_url_named(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return parts._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    from worker.db import migrate

    name = f"fulfillment_test_{uuid.uuid4().hex[:8]}"
    url = database_url_named(postgres_url, name)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(drop_database(postgres_url, name))


@pytest.fixture
async def unmigrated_database_url(postgres_url: str) -> AsyncIterator[str]:
    """The URL of a database nobody created yet (for migrate's own tests), dropped after."""
    name = f"fulfillment_test_{uuid.uuid4().hex[:8]}"
    yield database_url_named(postgres_url, name)
    await drop_database(postgres_url, name)


async def drop_database(postgres_url: str, name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(database_url_named(postgres_url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# --- worker fixtures: SMTP sink, Stripe stand-in, workers in process -------------------


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink(free_port())
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def standin() -> StripeStandIn:
    return StripeStandIn(seed=1)


@pytest.fixture
async def stripe_base(standin: StripeStandIn) -> AsyncIterator[str]:
    async with serve(standin) as base:
        yield base


@pytest.fixture
def worker_settings(
    broker_settings: BrokerSettings, database_url: str, smtp: SmtpSink, stripe_base: str
) -> WorkerSettings:
    return WorkerSettings(
        stripe=StripeSettings(
            api_key="sk_test_" + uuid.uuid4().hex, api_base=stripe_base, timeout_s=3
        ),
        broker=broker_settings,
        database_url=database_url,
        smtp=SmtpSettings(
            host="127.0.0.1",
            port=smtp.port,
            connect_timeout_s=2,
            timeout_s=2,
            cooldown_s=0.2,  # below the first delay queue's 0.5 s, as the default is below 10 s
            sender="Shop <orders@shop.test>",
        ),
        concurrency=8,
        metrics_port=0,
        grace_s=5,
        quick_retries=2,
        stripe_not_found_retries=0,  # an unknown session dead-lettered at once (the rule's
        # own tests: test_retries_and_dead_letters.py)
        worker_id="test-worker",
    )


StartWorker = Callable[[WorkerSettings], Awaitable[Worker]]


class Publish(Protocol):
    """The ``publish`` fixture: an event document (or raw bytes) onto the events exchange."""

    def __call__(
        self, doc: dict[str, Any] | bytes, routing_key: str | None = None
    ) -> Awaitable[None]: ...


@pytest.fixture
async def start_worker(topology: Topology) -> AsyncIterator[StartWorker]:
    workers: list[Worker] = []

    async def start(settings: WorkerSettings) -> Worker:
        worker = Worker(settings)
        await worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.stop(grace_s=2)


@pytest.fixture
async def outbound(
    topology: Topology, channel: AbstractChannel, rabbitmq_url: str
) -> AsyncIterator[str]:
    """A queue bound to every outbound message (order.fulfilled, payment.failed)."""
    queue = await channel.declare_queue(f"{topology.prefix}.outbound-capture", auto_delete=False)
    await queue.bind(topology.out_exchange, routing_key="#")
    yield queue.name
    connection = await aio_pika.connect(rabbitmq_url)  # the test's channel may be gone
    async with connection:
        await (await connection.channel()).queue_delete(queue.name)


@pytest.fixture
async def publish(topology: Topology, amqp: AbstractRobustConnection) -> Publish:
    """Publish a Stripe event document where the ingress would (Topology.route); bytes (a
    body that may be no event) as a checkout.session.completed, unless ``routing_key``."""
    ch = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    events = await ch.get_exchange(topology.events_exchange)

    async def to(message: aio_pika.Message, event_type: str) -> None:
        exchange_name, key = topology.route(event_type)
        await (events if exchange_name else ch.default_exchange).publish(message, key)

    async def send(doc: dict[str, Any] | bytes, routing_key: str | None = None) -> None:
        if isinstance(doc, bytes):
            message = aio_pika.Message(
                doc,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=uuid.uuid4().hex,
                content_type="application/json",
            )
            await to(message, routing_key or "checkout.session.completed")
            return
        raw = json.dumps(doc).encode()
        envelope = EventEnvelope.parse(raw)
        await to(event_message(raw, envelope, source="test"), routing_key or envelope.type)

    return send


@pytest.fixture
def pipeline(
    standin: StripeStandIn,
    stripe_base: str,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
    topology: Topology,
    database_url: str,
    outbound: str,
) -> Pipeline:
    """The fixtures above as one, with the steps worker tests repeat (tests/pipeline.py)."""
    from tests.pipeline import Pipeline  # it imports this module's helpers

    return Pipeline(
        standin=standin,
        stripe_base=stripe_base,
        smtp=smtp,
        settings=worker_settings,
        start_worker=start_worker,
        publish=publish,
        channel=channel,
        topology=topology,
        database_url=database_url,
        outbound=outbound,
    )


def counted(metric: str, **labels: str) -> float:
    """A counter's current value in this process's registry (in-process services)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def bind_refusing_queue(channel: AbstractChannel, topology: Topology, key: str) -> Any:
    """A full queue bound to the events exchange for ``key`` that refuses every message:
    the broker then nacks each publish routed to it (the exclusive queue goes with the
    channel)."""
    full = await channel.declare_queue(
        f"{topology.prefix}.full",
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await full.bind(topology.events_exchange, key)
    return full


async def db_fetch(database_url: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# --- checkout: the stand-in's hosted checkout delivering webhooks to an in-process ingress ---


@pytest.fixture
async def checkout_stack(
    standin: StripeStandIn,
    stripe_base: str,
    worker_settings: WorkerSettings,
    topology: Topology,
) -> AsyncIterator[dict[str, Any]]:
    """An ingress with the Checkout routes, a customer and a price in the stand-in, and the
    stand-in's hosted page delivering signed webhooks to that ingress."""
    from aiohttp.test_utils import TestServer

    from devkit.stripe import HostedCheckout
    from ingress.app import create_app
    from ingress.checkout import CheckoutSettings
    from ingress.settings import IngressSettings

    secret = "whsec_" + uuid.uuid4().hex
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    hosted = HostedCheckout(standin, webhook_url=f"{public}/webhooks/stripe", webhook_secret=secret)
    customer = standin.add_customer(email="grace@example.com", name="Grace Hopper")
    price = hosted.add_price("Notebook", 1500)
    checkout = CheckoutSettings(
        stripe=worker_settings.stripe, price=price["id"], quantity=2, customer=customer["id"],
        public_url=public,
    )  # fmt: skip
    settings = IngressSettings(webhook_secrets=(secret,), broker=worker_settings.broker)
    server = TestServer(create_app(settings, checkout=checkout), host="127.0.0.1", port=port)
    await server.start_server()
    yield {"base": public, "hosted": hosted, "customer": customer, "price": price,
           "checkout": checkout, "settings": settings}  # fmt: skip
    await hosted.close()
    await server.close()
