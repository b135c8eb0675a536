"""The consumer: competing consumers on the work queue, retries through delay queues, DLQ.

Per message: parse, dispatch by event type, a few quick in-process retries for transient
errors (tenacity), then one of three outcomes, each confirmed by the broker before the
original is acked:

* done → ack;
* transient failure → a copy to the next delay queue (it dead-letters back to the work
  queue when its TTL runs out), with the attempt count in our own header;
* permanent failure, or retries exhausted → a copy to the DLQ saying why.

A worker killed mid-message acks nothing, so the broker redelivers; a message that kills
workers every time is stopped by the quorum queue's delivery limit and dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import asyncpg
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from shared import runtime
from shared.backoff import compute_backoff
from shared.broker import bare_copy, copy_message, publish_confirmed, utc_now_iso
from shared.envelope import EventEnvelope
from shared.errors import BrokerUnavailable, PermanentError
from shared.logging import get_logger
from shared.stripe_client import AIOHTTPClient
from shared.topology import Topology
from shared.vocabulary import (
    FULFILL_TYPES,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    PAYMENT_FAILED_TYPES,
    SESSION_EXPIRED,
    Outcome,
)
from worker import db, metrics, retry, startup
from worker.delivery import Delivery, parse
from worker.flow import EffectsLog, Fulfiller
from worker.queue_watch import ConsumerWatch
from worker.settings import WorkerSettings
from worker.store import Store

log = get_logger(__name__)


class Worker:
    """One worker process's consumer; start, then stop on a signal."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings.broker)
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._watch: ConsumerWatch | None = None
        self._consumer_tag: str | None = None
        self._pool: asyncpg.Pool | None = None
        self.store: Store | None = None  # once started
        self._http: AIOHTTPClient | None = None
        self._fulfiller: Fulfiller | None = None
        self._retrying = retry.quick_retries(settings.quick_retries)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def consuming(self) -> bool:
        """Whether the worker takes messages (started, and not stopped)."""
        return self._consumer_tag is not None

    async def unready(self, timeout_s: float = 2.0) -> str | None:
        """Why the worker cannot take work now, or None: it must be consuming, its broker
        channel open (not reconnecting), and its database pool must answer."""
        if not self.consuming:
            return "not consuming"
        if self._channel is None or self._channel.is_closed:
            return "broker channel closed (reconnecting)"
        assert self._pool is not None
        try:
            await asyncio.wait_for(self._pool.fetchval("SELECT 1"), timeout_s)
        except db.TRANSIENT_ERRORS as exc:  # TimeoutError among them
            return f"database unusable ({type(exc).__name__})"
        return None

    async def start(self) -> None:
        """Migrate, connect, declare, and start consuming."""
        s = self.settings
        startup.start_metrics_at_zero()
        self._pool = await startup.open_database(s)
        self._http, client = startup.stripe_client(s)
        self._connection = startup.broker_connection(s.broker)  # kept: stop() closes it
        await startup.connect(self._connection, s.broker)
        self._channel = await startup.open_channel(self._connection, prefetch=s.concurrency)
        self.store = store = Store(self._pool)
        queue = await startup.declare(self._channel, self.topology, store)
        self._fulfiller = await startup.fulfiller(s, store, client, self._channel, self.topology)
        self._watch = ConsumerWatch(self._connection, self._channel, queue, self._on_message)
        self._consumer_tag = await self._watch.start(lambda: self.in_flight < s.concurrency)
        log.info(
            "worker consuming",
            queue=self.topology.work_queue,
            concurrency=s.concurrency,
            worker_id=s.worker_id,
            event_loop=runtime.loop_name(),
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking messages, let in-flight ones finish within the grace period, close."""
        grace_s = self.settings.grace_s if grace_s is None else grace_s
        if self._watch is not None and self._consumer_tag is not None:
            await self._watch.stop()  # bounded: the broker may be away
            self._consumer_tag = None
        if self._in_flight:
            log.info("worker draining", in_flight=len(self._in_flight), grace_s=grace_s)
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in pending:
                task.cancel()  # unacked: the broker redelivers it to another worker
            if pending:
                log.warning(
                    "grace period over; in-flight messages left for redelivery", count=len(pending)
                )
                await asyncio.wait(pending, timeout=5)
        for closer in (self._fulfiller, self._connection, self._pool):
            if closer is not None:
                # bounded: a broker or database that is away must not keep us from exiting
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closer.close(), timeout=5)
        if self._http is not None:
            await self._http.close_async()  # type: ignore[no-untyped-call]
        log.info("worker stopped", worker_id=self.settings.worker_id)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # The work runs in a task of the worker's own, not in the channel's: when the broker
        # connection drops, aio-pika cancels the channel's tasks, and cancelling a handler
        # between an effect and its record would repeat the effect on redelivery. So the
        # work finishes (only its ack is lost: the redelivery is a no-op); only stop()
        # cancels it, once the grace period is over.
        work = asyncio.create_task(self._process(message))
        self._in_flight.add(work)
        metrics.IN_FLIGHT.inc()

        def finished(task: asyncio.Task[None]) -> None:
            metrics.IN_FLIGHT.dec()
            self._in_flight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("message handling crashed", exc_info=task.exception())

        work.add_done_callback(finished)
        with contextlib.suppress(Exception):  # logged by finished()
            await asyncio.shield(work)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        """Handle one message; whatever goes wrong, it ends acked or nacked (a message left
        unsettled would hold a place of the prefetch until the connection closed)."""
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("message handling crashed; dead-lettered by the broker")
            if not message.processed:
                with contextlib.suppress(Exception):
                    # to the work queue's own dead-lettering (at least once, to the DLQ)
                    await asyncio.shield(message.nack(requeue=False))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        headers = message.headers or {}
        event_type = _label(headers.get(HEADER_EVENT_TYPE) or message.routing_key)
        bound = log.bind(
            event_id=_text(headers.get(HEADER_EVENT_ID)),
            event_type=event_type,
            redelivered=bool(message.redelivered),
        )
        effects: EffectsLog = []  # across the in-process retries below
        try:
            delivery = parse(message)
            bound = bound.bind(checkout_session_id=delivery.session_id, attempt=delivery.attempt)
            outcome: Outcome = await self._retrying(self._dispatch, delivery, effects)
        except asyncio.CancelledError:
            # only stop() cancels, once the grace period is over: unacked, so the broker
            # gives it to another worker. Its outcome line says so, naming the event.
            metrics.PROCESSED.labels(event_type, Outcome.ABANDONED).inc()
            bound.warning(
                "event left for redelivery",
                outcome=Outcome.ABANDONED,
                effects=_effects_for_log(effects) or None,
                duration_ms=_ms_since(started),
            )
            raise
        except Exception as exc:
            attempt = retry.attempt_of(headers)
            if effects:
                bound = bound.bind(effects=_effects_for_log(effects))
            outcome = await asyncio.shield(
                self._fail(message, exc, attempt, event_type, bound, started)
            )
        else:
            await asyncio.shield(_settle(message.ack(), bound))
            bound.info(
                "event handled",
                outcome=outcome,
                effects=_effects_for_log(effects) or None,
                duration_ms=_ms_since(started),
            )
        metrics.PROCESSED.labels(event_type, outcome).inc()
        metrics.DURATION.labels(event_type).observe(time.perf_counter() - started)

    async def _dispatch(self, delivery: Delivery, effects: EffectsLog) -> Outcome:
        fulfiller = self._fulfiller
        assert fulfiller is not None and self._pool is not None
        event = delivery.event
        handler: Callable[[str, EventEnvelope, EffectsLog], Awaitable[Outcome]] | None = None
        if event.type in FULFILL_TYPES:
            handler = fulfiller.fulfill
        elif event.type in PAYMENT_FAILED_TYPES:
            handler = fulfiller.payment_failed
        if handler is None or delivery.session_id is None:
            return Outcome.IGNORED
        return await handler(delivery.session_id, event, effects)

    async def _fail(
        self,
        message: AbstractIncomingMessage,
        exc: BaseException,
        attempt: int,
        event_type: str,
        bound: structlog.typing.FilteringBoundLogger,
        started: float,
    ) -> Outcome:
        """Carry out the retry policy's decision: its copy published (confirmed) to a delay
        queue or the DLQ, then the original acked; the original is left to the broker when
        that cannot be done.

        ``started``: when handling began (perf_counter), for the outcome line's duration."""
        received = message.headers or {}
        decision = retry.decide(
            exc,
            attempt,
            self.topology,
            received=received,
            worker_id=self.settings.worker_id,
            now=utc_now_iso(),
            not_found_retries=self.settings.stripe_not_found_retries,
        )
        assert self._channel is not None
        try:
            message.channel  # noqa: B018 - raises if the channel it came on is gone
        except aiormq.exceptions.ChannelInvalidStateError:
            # The connection dropped while we worked: the broker redelivers the original,
            # so a copy now would be a second one.
            bound.warning("failed message left for redelivery; its channel is gone")
            return Outcome.REQUEUED
        try:
            await publish_confirmed(
                self._channel.default_exchange,
                copy_message(message, decision.headers),
                decision.queue,
                timeout_s=self.settings.broker.publish_timeout_s,
            )
        except BrokerUnavailable as publish_error:
            # Nothing was moved: leave the original to the broker (redelivered later). Not at
            # once: each redelivery counts against the delivery limit, and the broker that
            # could not take the copy (an alarm, a slow disk) is unlikely to take it next.
            pause_s = compute_backoff(attempt, base_s=1.0, max_s=10.0)
            bound.warning(
                "failed message not moved; left for redelivery",
                error=str(publish_error),
                requeue_in_s=round(pause_s, 1),
                duration_ms=_ms_since(started),
            )
            await asyncio.sleep(pause_s)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return Outcome.REQUEUED
        except Exception as copy_error:
            # The copy could not be made or sent as it came (a header the broker's tables
            # cannot hold, from a crafted message): dead-lettered without its own headers.
            bound.warning("failed message's copy not sent; dead-lettering it cleaned",
                          error=f"{type(copy_error).__name__}: {copy_error}")  # fmt: skip
            return await self._dead_letter_cleaned(message, exc, attempt, event_type, bound)
        await _settle(message.ack(), bound)
        _report(decision, exc, attempt, event_type, bound, started)
        return decision.outcome

    async def _dead_letter_cleaned(
        self,
        message: AbstractIncomingMessage,
        exc: BaseException,
        attempt: int,
        event_type: str,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> Outcome:
        """To the DLQ with only the headers we know, each of its type, and why; failing
        that, nacked to the work queue's own dead-lettering."""
        assert self._channel is not None
        received = message.headers or {}
        headers = {
            **retry.cleaned_headers(received),
            **retry.failure_headers(
                exc, attempt, received={}, worker_id=self.settings.worker_id, now=utc_now_iso()
            ),
        }
        try:
            await publish_confirmed(
                self._channel.default_exchange,
                bare_copy(message, headers),
                self.topology.dead_queue,
                timeout_s=self.settings.broker.publish_timeout_s,
            )
        except Exception as dead_error:
            bound.error(
                "failed message not dead-lettered by us; nacked to the broker's dead-lettering",
                error=f"{type(dead_error).__name__}: {dead_error}",
            )
            with contextlib.suppress(Exception):
                await message.nack(requeue=False)
            metrics.DEAD_LETTERS.labels(event_type, retry.DeadLetterReason.PERMANENT).inc()
            return Outcome.DEAD_LETTER
        await _settle(message.ack(), bound)
        metrics.DEAD_LETTERS.labels(event_type, retry.DeadLetterReason.PERMANENT).inc()
        bound.error(
            "dead-lettered",
            outcome=Outcome.DEAD_LETTER,
            attempt=attempt,
            reason=retry.DeadLetterReason.PERMANENT,
            error_type=type(exc).__name__,
            error=str(exc),
            headers_cleaned=True,
        )
        return Outcome.DEAD_LETTER


def _report(
    decision: retry.Decision,
    exc: BaseException,
    attempt: int,
    event_type: str,
    bound: structlog.typing.FilteringBoundLogger,
    started: float,
) -> None:
    """The metrics and the outcome line of a failed message moved as decided."""
    if decision.outcome is Outcome.RETRY:
        metrics.RETRIES.labels(event_type).inc()
        bound.warning(
            "retry scheduled",
            outcome=decision.outcome,
            attempt=attempt,
            retry_in_s=decision.delay_s,
            error_type=type(exc).__name__,
            error=str(exc),
            duration_ms=_ms_since(started),
        )
    else:
        metrics.DEAD_LETTERS.labels(event_type, decision.reason).inc()
        bound.error(
            "dead-lettered",
            outcome=decision.outcome,
            attempt=attempt,
            reason=decision.reason,
            error_type=type(exc).__name__,
            error=str(exc),
            duration_ms=_ms_since(started),
            # a traceback for what is neither kind of expected failure: a bug
            exc_info=None if retry.is_transient(exc) or isinstance(exc, PermanentError) else exc,
        )


# Event types a metric is labelled with; any other (a crafted header) counts as "other",
# so that no message can add series without end.
_LABELLED_TYPES = FULFILL_TYPES | PAYMENT_FAILED_TYPES | {SESSION_EXPIRED}
_MAX_HEADER_TEXT = 255


def _label(value: Any) -> str:
    return value if isinstance(value, str) and value in _LABELLED_TYPES else "other"


def _text(value: Any) -> str | None:
    """A header shown in log lines: text, cut short; anything else as its type."""
    if value is None or isinstance(value, str):
        return value[:_MAX_HEADER_TEXT] if value else None
    return f"<{type(value).__name__}>"


def _effects_for_log(effects: EffectsLog) -> dict[str, str]:
    """{step: detail}; a step done twice for one message (its record failed, so a retry
    did it again) shows both details, in order, rather than hiding the repeat."""
    shown: dict[str, str] = {}
    for step, detail in effects:
        shown[step] = f"{shown[step]}; again: {detail}" if step in shown else detail
    return shown


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


async def _settle(ack: Awaitable[Any], bound: structlog.typing.FilteringBoundLogger) -> None:
    """Ack, tolerating a connection lost meanwhile: the broker then redelivers the message,
    and the handlers are idempotent, so the work is not lost and not doubled."""
    try:
        await ack
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        bound.warning("ack failed, the broker will redeliver", error=f"{type(exc).__name__}: {exc}")
