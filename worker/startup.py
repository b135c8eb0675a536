"""What a worker does before it takes messages, one named step each; ``Worker.start`` runs them
in order: metrics at zero, the database, the Stripe client, the broker, the topology, the
fulfiller."""

from __future__ import annotations

import aio_pika
import asyncpg
import stripe
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, AbstractRobustQueue
from aio_pika.connection import make_url

from shared.settings import BrokerSettings
from shared.stripe_client import AIOHTTPClient, make_client
from shared.topology import Topology, connect_error
from shared.vocabulary import FULFILL_TYPES, PAYMENT_FAILED_TYPES
from worker import db, mail, metrics
from worker.flow import Fulfiller
from worker.outbound import Outbound
from worker.settings import WorkerSettings
from worker.store import Store
from worker.stripe_reader import StripeReader

# How often aio-pika's recovery loop may act: reconnecting after the broker connection
# dropped, and declaring the work queue again after the broker cancelled the consumer
# because the queue was deleted (its default, 5 s, is a long pause in consuming).
RECOVERY_INTERVAL_S = 1.0


def start_metrics_at_zero() -> None:
    """The series alerts watch, for every event type and email the worker handles."""
    metrics.start_at_zero(
        tuple(sorted(FULFILL_TYPES | PAYMENT_FAILED_TYPES)),
        (mail.confirmation_email.__name__, mail.payment_failed_email.__name__),
    )


async def open_database(settings: WorkerSettings) -> asyncpg.Pool:
    """Migrate (safe while other workers do too), then a pool sized for the concurrency."""
    await db.migrate(settings.database_url)
    return await db.create_pool(settings.database_url, max_size=min(settings.concurrency, 32))


def stripe_client(settings: WorkerSettings) -> tuple[AIOHTTPClient, stripe.StripeClient]:
    """The HTTP client (closed by the worker on stop) and the Stripe client on it."""
    http = AIOHTTPClient(timeout=settings.stripe.timeout_s)
    return http, make_client(settings.stripe, http_client=http)


def broker_connection(settings: BrokerSettings) -> AbstractRobustConnection:
    """A robust connection, not yet connected: the worker keeps it before connecting, since
    cancelling a first connect (a SIGTERM while the broker does not answer) leaves
    aio-pika's reconnect loop running until the connection is closed, which stop() does."""
    return aio_pika.RobustConnection(make_url(settings.url), reconnect_interval=RECOVERY_INTERVAL_S)


async def connect(connection: AbstractRobustConnection, settings: BrokerSettings) -> None:
    """Connect, or raise the error that names the broker and what to fix."""
    try:
        await connection.connect(timeout=10)
    except Exception as exc:
        raise connect_error(settings, exc) from None


async def open_channel(
    connection: AbstractRobustConnection, *, prefetch: int
) -> AbstractRobustChannel:
    """A channel with publisher confirms, returned messages raised, ``prefetch`` unacked."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=prefetch)
    return channel


async def declare(
    channel: AbstractRobustChannel, topology: Topology, store: Store
) -> AbstractRobustQueue:
    """Declare the topology, record its delay queues for `status` to find; the work queue to
    consume from (declared again by aio-pika if the broker cancels the consumer because the
    queue was deleted: see ``worker.queue_watch``)."""
    events = await topology.declare(channel)
    await store.record_delay_queues(topology)
    work = await topology.declare_work_queue(channel, events)
    assert isinstance(work, AbstractRobustQueue)
    return work


async def fulfiller(
    settings: WorkerSettings,
    store: Store,
    client: stripe.StripeClient,
    channel: AbstractRobustChannel,
    topology: Topology,
) -> Fulfiller:
    """The fulfiller with its parts: the store, the Stripe reader, the outbound exchange."""
    out = await channel.get_exchange(topology.out_exchange)
    return Fulfiller(
        store,
        StripeReader(client, live_key=settings.stripe.live_key),
        Outbound(out, publish_timeout_s=settings.broker.publish_timeout_s, channel=channel),
        settings.smtp,
    )
