"""The ingress's broker connection: kept up in the background, failing fast while it is down."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from ingress import metrics
from shared.backoff import compute_backoff
from shared.broker import event_message, publish_confirmed
from shared.envelope import EventEnvelope
from shared.errors import BrokerUnavailable, ConfirmTimeout, Unroutable
from shared.logging import get_logger
from shared.settings import BrokerSettings
from shared.topology import Topology

log = get_logger(__name__)

RECONNECT_MAX_S = 1.0  # "back within 5 s" needs short gaps between connection attempts
CLOSE_TIMEOUT_S = 2.0
# When the work queue is found missing, the topology is declared again this long after:
# RabbitMQ may never tell the consumers of a queue declared again at once that theirs was
# deleted (they stay registered and get nothing). Webhooks meanwhile are answered 503.
REDECLARE_DELAY_S = 1.0


class EventPublisher:
    """Publishes verified events with confirms; reconnects by itself after broker outages.

    While disconnected, ``publish`` raises BrokerUnavailable at once instead of waiting:
    Stripe retries a 503, and a 200 must only ever mean the broker confirmed the message.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self._settings = settings
        self._topology = Topology.from_settings(settings)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._redeclaring: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_attempt_over = asyncio.Event()  # connected, or failed to
        self.stalled = False  # see ``probe``
        self._probing: asyncio.Lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._usable() is not None

    def _usable(self) -> tuple[AbstractExchange, AbstractChannel] | None:
        """The events exchange and its channel while the channel is open; else None."""
        exchange, channel = self._exchange, self._channel
        if exchange is None or channel is None or channel.is_closed:
            return None
        return exchange, channel

    async def probe(self, timeout_s: float) -> bool:
        """Whether the broker confirms a publish now, found out with a persistent message
        to the readiness queue: a quorum queue, as the work queue, so its confirm waits on
        the same replicated write (a broker that confirms what goes nowhere may still be
        unable to take webhooks: a cluster without a majority).

        ``stalled`` (a publish got no confirm in time, and none has been confirmed since:
        the broker is hung or blocks publishers, though the connection looks fine) is
        cleared by any confirm, a webhook's or this one's, and by a new connection. One
        probe at a time; callers meanwhile share its answer."""
        if self._probing.locked():
            async with self._probing:
                return not self.stalled
        async with self._probing:
            usable = self._usable()
            if usable is None:
                return False
            _, channel = usable
            message = aio_pika.Message(
                b"", message_id=uuid.uuid4().hex, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            try:
                await publish_confirmed(
                    channel.default_exchange,
                    message,
                    self._topology.readiness_queue,
                    timeout_s=timeout_s,
                )
            except BrokerUnavailable:
                return False
            self.stalled = False
            return True

    async def start(self, *, wait_s: float = 0.0) -> None:
        """Start the connection loop; wait up to ``wait_s`` for the first attempt to connect
        to succeed or fail (a broker that refuses at once is not waited for: the ingress
        then listens, answering 503, rather than not at all)."""
        self._task = asyncio.create_task(self._maintain(), name="broker-connection")
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_attempt_over.wait(), wait_s)

    async def close(self) -> None:
        """Stop the connection loop; bounded, so shutdown never hangs on a sick broker."""
        if self._redeclaring is not None:
            self._redeclaring.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT_S * 2)

    async def publish(
        self, raw: bytes, event: EventEnvelope, *, message_id: str | None = None
    ) -> None:
        """Publish one event and return once the broker confirmed it; else BrokerUnavailable
        (Unroutable for a handled type while the work queue is missing: see Topology.route).
        ``message_id``: see shared.broker.event_message."""
        usable = self._usable()
        if usable is None:
            raise BrokerUnavailable("not connected to the broker")
        events, channel = usable
        exchange_name, routing_key = self._topology.route(event.type)
        exchange = events if exchange_name else channel.default_exchange
        message = event_message(raw, event, source="fulfillment-ingress", message_id=message_id)
        started = time.perf_counter()
        try:
            await publish_confirmed(
                exchange, message, routing_key, timeout_s=self._settings.publish_timeout_s
            )
        except Unroutable:
            if exchange_name:
                raise  # the events exchange's alternate exchange is gone: nothing to restore
            self._declare_again()
            raise Unroutable(
                f"the work queue {routing_key} does not exist (deleted?); it is being declared "
                "again"
            ) from None
        except ConfirmTimeout:
            if not self.stalled:
                log.warning("broker not confirming publishes", broker=self._settings.display_url)
            self.stalled = True
            raise
        self.stalled = False
        metrics.CONFIRM_SECONDS.observe(time.perf_counter() - started)

    def _declare_again(self) -> None:
        """Declare the topology again in the background, the work queue being gone, one
        declaration at a time (the workers declare it again too, once the broker tells them,
        but maybe none is running)."""
        connection = self._connection
        if connection is None or (self._redeclaring is not None and not self._redeclaring.done()):
            return
        self._redeclaring = asyncio.create_task(self._redeclare(connection), name="redeclare")

    async def _redeclare(self, connection: AbstractConnection) -> None:
        await asyncio.sleep(REDECLARE_DELAY_S)
        # on a channel of its own: a failed declaration closes its channel, and the
        # publishing one must stay open
        try:
            async with asyncio.timeout(max(self._settings.publish_timeout_s, 2.0)):
                channel = await connection.channel()
                try:
                    await self._topology.declare(channel)
                finally:
                    if not channel.is_closed:
                        await channel.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "work queue missing; declaring it again failed",
                queue=self._topology.work_queue,
                error=f"{type(exc).__name__}: {str(exc) or 'no answer in time'}",
            )
            return
        log.warning(
            "work queue was missing; declared it again (webhooks meanwhile answered 503)",
            queue=self._topology.work_queue,
        )

    async def _maintain(self) -> None:
        failures = 0
        while True:
            connection: AbstractConnection | None = None
            try:
                connection = await aio_pika.connect(
                    self._settings.url, timeout=max(self._settings.publish_timeout_s, 2.0)
                )
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await self._topology.declare(channel)
                self._connection, self._channel, self._exchange = connection, channel, exchange
                self.stalled = False  # a new connection: not known to be stalled
                self._first_attempt_over.set()
                metrics.BROKER_UP.set(1)
                log.info("broker connected", broker=self._settings.display_url)
                failures = 0
                await _first_closed(connection, channel)
                log.warning("broker connection lost", broker=self._settings.display_url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning(
                    "broker unavailable",
                    broker=self._settings.display_url,
                    # a timeout's own message is empty
                    error=f"{type(exc).__name__}: {str(exc) or 'no answer in time'}",
                    attempt=failures,
                )
            finally:
                self._first_attempt_over.set()
                self._connection = self._channel = self._exchange = None
                metrics.BROKER_UP.set(0)
                if connection is not None and not connection.is_closed:
                    # bounded: a broker that stopped answering never sends Close-Ok, and a
                    # SIGTERMed ingress must still exit
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)
            await asyncio.sleep(
                compute_backoff(max(failures, 1), base_s=0.1, max_s=RECONNECT_MAX_S)
            )


async def _first_closed(connection: AbstractConnection, channel: AbstractChannel) -> None:
    waiters = {
        asyncio.ensure_future(connection.closed()),
        asyncio.ensure_future(channel.closed()),
    }
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
