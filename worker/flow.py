"""Fulfillment, as Stripe's Checkout guide asks: keyed on the session, safe to run many times.

``fulfill(session_id)`` may run for every event of a session, concurrently on many workers,
after crashes at any instant. Per session:

1. Retrieve the session from Stripe with its line items (the event may be stale).
2. Take the session's advisory lock in PostgreSQL: one worker at a time per session.
3. In one transaction: the ``fulfillments`` row and its line items, if not there yet.
4. Each external effect in turn (``order.fulfilled`` message, confirmation email): skip it
   if recorded, else do it and record it (committed at once). Only an effect whose outcome
   is unknown is repeated (a crash between doing and recording it, an outbound message the
   broker did not confirm in time), with the same deterministic id for receivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

import asyncpg
import stripe
from aio_pika.abc import AbstractExchange
from asyncpg.pool import PoolConnectionProxy

from shared.backoff import compute_backoff
from shared.envelope import EventEnvelope
from shared.errors import PermanentError, TransientError
from shared.logging import get_logger
from shared.vocabulary import (
    PAYMENT_SUCCEEDED,
    SESSION_COMPLETED,
)
from worker import db, mail, metrics
from worker.order import Order
from worker.outbound import Outbound
from worker.settings import SmtpSettings
from worker.stripe_reader import StripeReader

log = get_logger(__name__)

Effect = Callable[[Order], Awaitable[str]]
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# The effects of a fulfillment, in order; each is recorded under its name once done. The
# message the rest of the business acts on (shipping, access) goes first: a courtesy email
# held up by an SMTP outage or a recipient's deferral must not hold it up for hours.
FULFILLED_STEPS = ("order_fulfilled_message", "confirmation_email")

# How long to keep trying to record an effect that was done before giving up (and
# letting the message be retried, which repeats the effect).
RECORD_RETRY_S = 20.0


class SessionLockLost(TransientError):
    """Raised when the connection holding a session's lock failed mid-way; retry the event."""


@dataclass
class Held:
    """A pooled connection holding one session's advisory lock."""

    conn: Conn
    session_id: str
    released: bool = False


@dataclass(frozen=True)
class Outcome:
    """What handling one event did, for the log line and metrics."""

    name: str  # fulfilled | already_fulfilled | awaiting_payment | payment_failed | ...


# The external effects done while handling one message, as (step, detail) in order, kept
# by the caller across its in-process retries: the outcome line lists them all, also those
# of an attempt that failed afterwards.
EffectsLog: TypeAlias = list[tuple[str, str]]


class Fulfiller:
    """Handlers for the Checkout events; every method is idempotent per session."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        stripe_client: stripe.StripeClient,
        out_exchange: AbstractExchange,
        smtp: SmtpSettings,
        *,
        publish_timeout_s: float,
        live_key: bool | None = None,
    ) -> None:
        """``live_key``: whether STRIPE_API_KEY is a live-mode key (None: not known)."""
        self._pool = pool
        self._stripe = StripeReader(stripe_client, live_key=live_key)
        self._outbound = Outbound(out_exchange, publish_timeout_s=publish_timeout_s)
        self._smtp = smtp
        self._mailer = mail.Mailer(smtp)

    async def close(self) -> None:
        await self._mailer.close()

    async def fulfill(
        self, session_id: str, event: EventEnvelope, effects_log: EffectsLog
    ) -> Outcome:
        """Fulfill a paid (or free) session once; record an unpaid one as awaiting payment.

        Each external effect done is appended to ``effects_log`` as soon as it is done: the
        caller keeps one across its in-process retries of the message."""
        # `completed` is a session's first event nearly always (Stripe sends it once;
        # duplicates are rare), so checking first would cost every order a round trip to
        # save a rare API call. Every other event usually follows a fulfillment.
        if event.type != SESSION_COMPLETED and await self._settled_before(
            session_id, event, "already_fulfilled"
        ):
            return Outcome("already_fulfilled")
        order = await self._stripe.retrieve_for(session_id, event)
        if order.payment_status not in ("paid", "no_payment_required", "unpaid"):
            raise PermanentError(f"unexpected payment_status {order.payment_status!r}")
        if order.mode == "setup":
            # A setup-mode Checkout only saved a payment method for later: nothing was sold,
            # so there is no order to record, confirm or announce, though its payment_status
            # (no_payment_required) reads like a free order's. Recorded as handled.
            async with self._pool.acquire() as conn:
                await conn.execute(
                    _RECORD_EVENT_SQL, event.id, event.type, session_id, "not_an_order"
                )
            return Outcome("not_an_order")
        async with self._locked(session_id) as held:
            conn = held.conn
            state, steps = await _read_state(conn, session_id)
            # (a fulfilled session stays one: an "unpaid" read racing the payment is stale,
            # and the effects still owed go on below)
            if order.payment_status == "unpaid" and state != "fulfilled":
                if event.type == PAYMENT_SUCCEEDED:
                    # The event says the payment went through, and no later event will
                    # come to fulfill it: shelved as "awaiting payment", the order would be
                    # lost in silence. Retried until Stripe agrees, else dead-lettered.
                    raise TransientError(
                        f"Stripe still says session {session_id} is unpaid, though this "
                        "event says its delayed payment succeeded"
                    )
                if state in (None, "new"):
                    await _set_state(conn, order, event.id, "awaiting_payment")
                outcome = Outcome("awaiting_payment")
            else:
                created = state != "fulfilled"
                if created:
                    if not order.items:
                        # Checkout sells at least one item; Stripe's answer is odd, and the
                        # order is recorded once: said where an operator will see it
                        log.warning(
                            "paid order without line items",
                            checkout_session_id=session_id,
                            amount_total=order.amount_total,
                        )
                    await _record_fulfillment(conn, order, event.id)
                await self._run_effects(
                    conn,
                    order,
                    steps,
                    effects_log,
                    tuple(
                        zip(
                            FULFILLED_STEPS,
                            (
                                partial(self._outbound.order_fulfilled, event),
                                self._send_confirmation,
                            ),
                            strict=True,
                        )
                    ),
                )
                # "fulfilled" when this message did any of it: the row, the effects an
                # earlier delivery left undone (SMTP was down, the worker was killed), or
                # all of it in an attempt that failed only afterwards (its record or lock);
                # the log may also hold a failed-payment attempt's steps, hence the filter
                did = created or any(step in FULFILLED_STEPS for step, _ in effects_log)
                outcome = Outcome("fulfilled" if did else "already_fulfilled")
            await _finish(held, event, outcome.name)
        return outcome

    async def payment_failed(
        self, session_id: str, event: EventEnvelope, effects_log: EffectsLog
    ) -> Outcome:
        """Tell the customer once, record it; never for a session already fulfilled."""
        if await self._settled_before(session_id, event, "ignored_fulfilled"):
            return Outcome("ignored_fulfilled")
        order = await self._stripe.retrieve_for(session_id, event)
        if order.payment_status != "unpaid":
            # Stripe's current word wins over a stale event: a paid session is fulfilled.
            return await self.fulfill(session_id, event, effects_log)
        async with self._locked(session_id) as held:
            conn = held.conn
            state, steps = await _read_state(conn, session_id)
            if state == "fulfilled":
                outcome = Outcome("ignored_fulfilled")
            else:
                if state != "payment_failed":
                    await _set_state(conn, order, event.id, "payment_failed")
                await self._run_effects(
                    conn,
                    order,
                    steps,
                    effects_log,
                    (  # the message first, as for a fulfillment
                        ("payment_failed_message", partial(self._outbound.payment_failed, event)),
                        ("payment_failed_email", self._send_failure),
                    ),
                )
                outcome = Outcome("payment_failed")
            await _finish(held, event, outcome.name)
        return outcome

    async def _settled_before(self, session_id: str, event: EventEnvelope, outcome: str) -> bool:
        """True (and the event recorded as handled) when the session is fulfilled with every
        effect recorded: nothing Stripe could say now changes that, so the API call is
        skipped. A session's later events (async_payment_succeeded, the landing page's
        fulfillment.requested, a stale failure) would otherwise spend Stripe's rate limit
        (100 reads/s in live mode by default). One round trip; no lock, as nothing is done."""
        async with self._pool.acquire() as conn:
            recorded = await conn.fetchval(
                _SETTLED_SQL,
                event.id,
                event.type,
                session_id,
                outcome,
                list(FULFILLED_STEPS),
            )
        return bool(recorded)

    @contextlib.asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[Held]:
        """A connection holding the session's advisory lock: one worker at a time per session.

        A session-level lock (not a transaction's) so that each step can be committed as
        soon as it is done while the lock is still held. If the worker dies, PostgreSQL
        drops the lock with the connection. ``_finish`` releases it with its last write.
        """
        lock = "SELECT pg_advisory_lock(hashtextextended($1, 0))"
        async with self._pool.acquire() as conn:
            held = Held(conn, session_id)
            try:
                await conn.execute(lock, session_id)
                yield held
                if not held.released:
                    await conn.execute(_UNLOCK, session_id)
                    held.released = True
            except BaseException:
                if not held.released:
                    await _release_in_doubt(held)
                raise

    async def _run_effects(
        self,
        conn: Conn,
        order: Order,
        already_done: frozenset[str],
        effects_log: EffectsLog,
        effects: tuple[tuple[str, Effect], ...],
    ) -> None:
        """Do each effect not yet recorded, recording it (committed) right after; each done
        one goes into ``effects_log`` at once."""
        for step, effect in effects:
            if step in already_done:
                continue
            detail = await effect(order)
            effects_log.append((step, detail))  # done, even if recording it fails
            await self._record_step(conn, order.session_id, step, detail)
            # DEBUG: the outcome line lists every effect with its detail (one line per
            # message); this one is for tracing a handler that died mid-way
            log.debug("effect done", checkout_session_id=order.session_id, step=step, detail=detail)

    async def _record_step(self, conn: Conn, session_id: str, step: str, detail: str) -> None:
        """Record a done effect, insisting through a database blip: failing here means the
        message is retried and the effect done again (the chaos run counted those)."""
        sql = (
            "INSERT INTO fulfillment_steps (checkout_session_id, step, detail) "
            "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        )
        deadline = time.monotonic() + RECORD_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            budget = max(0.5, deadline - time.monotonic())
            try:
                if _alive(conn):
                    # the lock is still held on it (a timeout or a cancelled statement
                    # leaves the session alone): record there and carry on
                    await conn.execute(sql, session_id, step, detail, timeout=budget)
                    return
                # The connection holding the lock is gone, and the lock with it. The insert
                # needs no lock (it is idempotent): a fresh connection, bounded, since every
                # other handler may be in here too.
                async with self._pool.acquire(timeout=budget) as fresh:
                    await fresh.execute(sql, session_id, step, detail, timeout=budget)
                break
            except db.TRANSIENT_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("recording an effect failed; retrying", step=step, error=str(exc)[:200])
                await asyncio.sleep(compute_backoff(attempt, base_s=0.2, max_s=2.0))
        # Recorded, but the session's lock went with its connection: doing the next effect
        # now could race another worker. Retry the event instead; it takes the lock again
        # and resumes after this step.
        raise SessionLockLost(f"the session lock's connection failed after {step} was done")

    async def _send_confirmation(self, order: Order) -> str:
        return await self._send(order, mail.confirmation_email)

    async def _send_failure(self, order: Order) -> str:
        return await self._send(order, mail.payment_failed_email)

    async def _send(self, order: Order, build: Callable[[Order, str], Any]) -> str:
        if not order.customer_email:
            return "skipped: the session has no customer email"
        try:
            message = build(order, self._smtp.sender)
            await self._mailer.send(message)
        except mail.Undeliverable as exc:
            # The order stands (the row is committed, the customer paid): record the email
            # as failed and go on to the outbound message, rather than dead-lettering an
            # event whose replay could never succeed. Counted, logged and kept in
            # fulfillment_steps for support to follow up.
            metrics.UNDELIVERABLE_EMAILS.labels(build.__name__).inc()
            log.warning(
                "email undeliverable; recorded as failed",
                checkout_session_id=order.session_id,
                error=str(exc),
            )
            return f"failed: {exc}"[:1000]
        return f"sent {message['Message-ID']}"


_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"


async def _release_in_doubt(held: Held) -> None:
    """Free the lock after a failure, whose own error must not replace the real one.

    The pool does not reset connections on release (db.create_pool), so a connection
    that may still hold the lock (the unlock failed, or we were cancelled while the lock
    was being granted) is closed: the server then frees everything it held. A connection
    that died already (a database restart) dropped the lock with it.
    """
    try:
        await asyncio.wait_for(held.conn.execute(_UNLOCK, held.session_id), timeout=5)
        held.released = True
    except BaseException as exc:  # any doubt: close it
        # (a connection the server dropped is already detached from its proxy)
        with contextlib.suppress(Exception):
            held.conn.terminate()
        if isinstance(exc, asyncio.CancelledError):
            raise  # a stop() meanwhile must not be lost


def _alive(conn: Conn) -> bool:
    """Whether the connection is still open (a dropped one is detached from its proxy)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def _read_state(conn: Conn, session_id: str) -> tuple[str | None, frozenset[str]]:
    """The session's state (None if never seen) and the steps already recorded."""
    row = await conn.fetchrow(
        """SELECT s.state,
                  array(SELECT f.step FROM fulfillment_steps f
                        WHERE f.checkout_session_id = s.checkout_session_id) AS steps
           FROM checkout_sessions s WHERE s.checkout_session_id = $1""",
        session_id,
    )
    if row is None:
        return None, frozenset()
    return row["state"], frozenset(row["steps"])


# The session's state: $1 session id, $2 state, $3 payment_status, $4 customer_email,
# $5 the event that set it. Alone (_set_state) or as the first step of _record_fulfillment.
_UPSERT_STATE = """INSERT INTO checkout_sessions
           (checkout_session_id, state, payment_status, customer_email, last_event_id)
       VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (checkout_session_id) DO UPDATE SET state = EXCLUDED.state,
           payment_status = EXCLUDED.payment_status, last_event_id = EXCLUDED.last_event_id,
           updated_at = now()"""


async def _set_state(conn: Conn, order: Order, event_id: str, state: str) -> None:
    await conn.execute(
        _UPSERT_STATE, order.session_id, state, order.payment_status, order.customer_email, event_id
    )


async def _record_fulfillment(conn: Conn, order: Order, event_id: str) -> None:
    """The session's state, its fulfillments row and line items: one statement, so one
    round trip and atomic (the foreign keys are checked at its end)."""
    items = order.items
    await conn.execute(
        _RECORD_FULFILLMENT_SQL,
        order.session_id,
        "fulfilled",
        order.payment_status,
        order.customer_email,
        event_id,
        order.customer_id,
        order.customer_name,
        order.amount_total,
        order.currency,
        order.livemode,
        order.account,
        [i.id for i in items],
        [i.description for i in items],
        [i.price_id for i in items],
        [i.quantity for i in items],
        [i.unit_amount for i in items],
        [i.amount_total for i in items],
        [i.currency for i in items],
        order.amount_subtotal,
        order.amount_discount,
        order.amount_shipping,
        order.amount_tax,
        order.mode,
        order.subscription,
        [i.amount_subtotal for i in items],
    )


# An event handled: $1 event id, $2 type, $3 session id, $4 outcome; {source} says whether.
# The first handling's outcome stays (a duplicate's "already_fulfilled" must not hide the
# event that fulfilled); the latest is kept beside it, with a count.
_UPSERT_PROCESSED = """INSERT INTO processed_events
               (event_id, event_type, checkout_session_id, outcome, last_outcome)
           SELECT $1, $2, $3, $4, $4 FROM {source}
           ON CONFLICT (event_id) DO UPDATE SET last_outcome = EXCLUDED.outcome,
               last_processed_at = now(), times_handled = processed_events.times_handled + 1
           RETURNING 1"""

_RECORD_FULFILLMENT_SQL = f"""WITH s AS ({_UPSERT_STATE} RETURNING checkout_session_id
           ), f AS (
               INSERT INTO fulfillments (checkout_session_id, customer_id, customer_email,
                   customer_name, amount_total, currency, payment_status, livemode, event_id,
                   stripe_account, amount_subtotal, amount_discount, amount_shipping,
                   amount_tax, mode, subscription_id)
               SELECT checkout_session_id, $6, $4, $7, $8, $9, $3, $10, $5, $11,
                   $19, $20, $21, $22, $23, $24 FROM s
               RETURNING checkout_session_id
           )
           INSERT INTO fulfillment_line_items (checkout_session_id, line_item_id, description,
               price_id, quantity, unit_amount, amount_total, currency, amount_subtotal)
           SELECT f.checkout_session_id, i.* FROM f,
               unnest($12::text[], $13::text[], $14::text[], $15::bigint[], $16::bigint[],
                      $17::bigint[], $18::text[], $25::bigint[]) AS i"""

# Only when the session is fulfilled with every effect recorded ($5): see _settled_before.
_SETTLED_SQL = f"""WITH done AS (
                       SELECT 1 FROM checkout_sessions s
                       WHERE s.checkout_session_id = $3 AND s.state = 'fulfilled'
                         AND array(SELECT f.step FROM fulfillment_steps f
                                   WHERE f.checkout_session_id = $3) @> $5::text[]
                   ), p AS ({_UPSERT_PROCESSED.format(source="done")})
                   SELECT count(*) FROM p"""

_RECORD_EVENT_SQL = _UPSERT_PROCESSED.format(source="(VALUES (1)) AS always")

_FINISH_SQL = f"""WITH p AS ({_RECORD_EVENT_SQL})
           SELECT pg_advisory_unlock(hashtextextended($3, 0))
           FROM (SELECT count(*) FROM p) AS done"""


async def _finish(held: Held, event: EventEnvelope, outcome: str) -> None:
    """Remember that the event was handled (for backfill and audit) and release the
    session's lock, in one round trip; the insert runs first (the unlock reads its result)."""
    await held.conn.execute(
        _FINISH_SQL,
        event.id,
        event.type,
        held.session_id,
        outcome,
    )
    held.released = True
