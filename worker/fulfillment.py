"""Fulfillment, as Stripe's Checkout guide asks: keyed on the session, safe to run many times.

``fulfill(session_id)`` may run for every event of a session, concurrently on many workers,
after crashes at any instant. Per session:

1. Retrieve the session from Stripe with its line items (the event may be stale).
2. Take the session's advisory lock in PostgreSQL: one worker at a time per session.
3. In one transaction: the ``fulfillments`` row and its line items, if not there yet.
4. Each external effect in turn (confirmation email, ``order.fulfilled`` message): skip it
   if recorded, else do it and record it (committed at once). A crash between doing and
   recording repeats only that effect, with the same deterministic id for receivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import aio_pika
import asyncpg
import stripe
from aio_pika.abc import AbstractExchange
from asyncpg.pool import PoolConnectionProxy

from shared.backoff import compute_backoff
from shared.broker import JSON, publish_confirmed
from shared.envelope import EventEnvelope
from shared.errors import PermanentError, TransientError
from shared.logging import get_logger
from shared.stripe_client import classify
from worker import db, mail, metrics
from worker.order import Order
from worker.settings import SmtpSettings

log = get_logger(__name__)

HEADER_DEDUPE_ID = "fulfillment-id"

Effect = Callable[[Order], Awaitable[str]]
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# How long to keep trying to record an effect that was done before giving up (and
# letting the message be retried, which repeats the effect).
RECORD_RETRY_S = 20.0


class SessionLockLost(TransientError):
    """Raised when the connection holding a session's lock failed mid-way; retry the event."""


@dataclass(frozen=True)
class Outcome:
    """What handling one event did, for the log line and metrics."""

    name: str  # fulfilled | already_fulfilled | awaiting_payment | payment_failed | ...
    effects_done: tuple[str, ...] = ()


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
    ) -> None:
        self._pool = pool
        self._stripe = stripe_client
        self._out = out_exchange
        self._smtp = smtp
        self._publish_timeout_s = publish_timeout_s

    async def retrieve(self, session_id: str) -> Order:
        """The session with all its line items, straight from Stripe."""
        sessions = self._stripe.v1.checkout.sessions
        try:
            session = await sessions.retrieve_async(session_id, params={"expand": ["line_items"]})
            doc = session.to_dict()
            line_items = doc.get("line_items") or {}
            if line_items.get("has_more"):
                # the expansion holds the first page only; fetch them all
                items = []
                listing = await sessions.line_items.list_async(session_id, params={"limit": 100})
                async for item in listing.auto_paging_iter():
                    items.append(item.to_dict())
                doc["line_items"] = {"object": "list", "data": items, "has_more": False}
        except stripe.StripeError as exc:
            raise classify(exc) from exc
        return Order.from_session(doc)

    async def fulfill(self, session_id: str, event: EventEnvelope) -> Outcome:
        """Fulfill a paid (or free) session once; record an unpaid one as awaiting payment."""
        order = await self.retrieve(session_id)
        if order.payment_status not in ("paid", "no_payment_required", "unpaid"):
            raise PermanentError(f"unexpected payment_status {order.payment_status!r}")
        async with self._locked(session_id) as conn:
            state, steps = await _read_state(conn, session_id)
            if order.payment_status == "unpaid":
                if state in (None, "new"):
                    await _set_state(conn, order, event.id, "awaiting_payment")
                outcome = Outcome("awaiting_payment")
            else:
                created = state != "fulfilled"
                if created:
                    await _record_fulfillment(conn, order, event.id)
                done = await self._run_effects(
                    conn,
                    order,
                    steps,
                    (
                        ("confirmation_email", self._send_confirmation),
                        ("order_fulfilled_message", self._publish_fulfilled),
                    ),
                )
                outcome = Outcome("fulfilled" if created else "already_fulfilled", done)
            await _record_processed(conn, event, session_id, outcome.name)
        return outcome

    async def payment_failed(self, session_id: str, event: EventEnvelope) -> Outcome:
        """Tell the customer once, record it; never for a session already fulfilled."""
        order = await self.retrieve(session_id)
        if order.payment_status != "unpaid":
            # Stripe's current word wins over a stale event: a paid session is fulfilled.
            return await self.fulfill(session_id, event)
        async with self._locked(session_id) as conn:
            state, steps = await _read_state(conn, session_id)
            if state == "fulfilled":
                outcome = Outcome("ignored_fulfilled")
            else:
                if state != "payment_failed":
                    await _set_state(conn, order, event.id, "payment_failed")
                done = await self._run_effects(
                    conn,
                    order,
                    steps,
                    (
                        ("payment_failed_email", self._send_failure),
                        ("payment_failed_message", self._publish_failed),
                    ),
                )
                outcome = Outcome("payment_failed", done)
            await _record_processed(conn, event, session_id, outcome.name)
        return outcome

    @contextlib.asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[Conn]:
        """A connection holding the session's advisory lock: one worker at a time per session.

        A session-level lock (not a transaction's) so that each step can be committed as
        soon as it is done while the lock is still held. If the worker dies, PostgreSQL
        drops the lock with the connection.
        """
        lock = "SELECT pg_advisory_lock(hashtextextended($1, 0))"
        unlock = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"
        async with self._pool.acquire() as conn:
            await conn.execute(lock, session_id)
            try:
                yield conn
            except BaseException:
                # The connection may be what failed (a database restart): the unlock's own
                # error must not replace the real one. A dead connection drops the lock, and
                # asyncpg's pool runs pg_advisory_unlock_all() when it takes the connection
                # back, also when we are cancelled here.
                with contextlib.suppress(Exception):
                    await conn.execute(unlock, session_id)
                raise
            await conn.execute(unlock, session_id)

    async def _run_effects(
        self,
        conn: Conn,
        order: Order,
        already_done: frozenset[str],
        effects: tuple[tuple[str, Effect], ...],
    ) -> tuple[str, ...]:
        """Do each effect not yet recorded, recording it (committed) right after."""
        done = []
        for step, effect in effects:
            if step in already_done:
                continue
            detail = await effect(order)
            await self._record_step(conn, order.session_id, step, detail)
            done.append(step)
            log.info("effect done", checkout_session_id=order.session_id, step=step, detail=detail)
        return tuple(done)

    async def _record_step(self, conn: Conn, session_id: str, step: str, detail: str) -> None:
        """Record a done effect, insisting through a database blip: failing here means the
        message is retried and the effect done again (the chaos run counted those)."""
        sql = (
            "INSERT INTO fulfillment_steps (checkout_session_id, step, detail) "
            "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        )
        try:
            await conn.execute(sql, session_id, step, detail)
            return
        except db.TRANSIENT_ERRORS as exc:
            log.warning("recording an effect failed; retrying", step=step, error=str(exc))
        deadline = time.monotonic() + RECORD_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            try:
                # a fresh connection: the one holding the session lock may be gone, and
                # the insert needs no lock (it is idempotent)
                async with self._pool.acquire() as fresh:
                    await fresh.execute(sql, session_id, step, detail)
                break
            except db.TRANSIENT_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(compute_backoff(attempt, base_s=0.2, max_s=2.0))
        # Recorded, but the session's lock may have gone with its connection: doing the next
        # effect now could race another worker. Retry the event instead; it takes the lock
        # again and resumes after this step.
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
            await mail.send(message, self._smtp)
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

    async def _publish_fulfilled(self, order: Order) -> str:
        body = {
            "items": [
                {
                    "id": i.id,
                    "description": i.description,
                    "price": i.price_id,
                    "quantity": i.quantity,
                    "amount_total": i.amount_total,
                    "currency": i.currency,
                }
                for i in order.items
            ],
            "customer": order.customer_id,
            "customer_email": order.customer_email,
        }
        return await self._publish("order.fulfilled", order, body)

    async def _publish_failed(self, order: Order) -> str:
        return await self._publish(
            "payment.failed", order, {"customer_email": order.customer_email}
        )

    async def _publish(self, kind: str, order: Order, extra: dict[str, Any]) -> str:
        dedupe_id = f"{kind}:{order.session_id}"
        body = {
            "id": dedupe_id,
            "type": kind,
            "checkout_session_id": order.session_id,
            "amount_total": order.amount_total,
            "currency": order.currency,
            "livemode": order.livemode,
            "created": int(time.time()),
            **extra,
        }
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            type=kind,
            app_id="fulfillment-worker",
            headers={HEADER_DEDUPE_ID: dedupe_id, "checkout-session-id": order.session_id},
        )
        # Subscribers bind their own queues; with none bound the broker drops it (pub/sub).
        await publish_confirmed(
            self._out, message, kind, timeout_s=self._publish_timeout_s, mandatory=False
        )
        return f"published {dedupe_id}"


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


async def _set_state(conn: Conn, order: Order, event_id: str, state: str) -> None:
    await conn.execute(
        """INSERT INTO checkout_sessions
               (checkout_session_id, state, payment_status, customer_email, last_event_id)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (checkout_session_id) DO UPDATE SET state = EXCLUDED.state,
               payment_status = EXCLUDED.payment_status, last_event_id = EXCLUDED.last_event_id,
               updated_at = now()""",
        order.session_id,
        state,
        order.payment_status,
        order.customer_email,
        event_id,
    )


async def _record_fulfillment(conn: Conn, order: Order, event_id: str) -> None:
    """The session's state, its fulfillments row and line items, in one transaction."""
    async with conn.transaction():
        await _set_state(conn, order, event_id, "fulfilled")
        await conn.execute(
            """INSERT INTO fulfillments (checkout_session_id, customer_id, customer_email,
                   customer_name, amount_total, currency, payment_status, livemode, event_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            order.session_id,
            order.customer_id,
            order.customer_email,
            order.customer_name,
            order.amount_total,
            order.currency,
            order.payment_status,
            order.livemode,
            event_id,
        )
        if order.items:
            await conn.executemany(
                """INSERT INTO fulfillment_line_items (checkout_session_id, line_item_id,
                       description, price_id, quantity, unit_amount, amount_total, currency)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                [
                    (
                        order.session_id,
                        i.id,
                        i.description,
                        i.price_id,
                        i.quantity,
                        i.unit_amount,
                        i.amount_total,
                        i.currency,
                    )
                    for i in order.items
                ],
            )


async def _record_processed(
    conn: Conn, event: EventEnvelope, session_id: str, outcome: str
) -> None:
    """Remember that an event was handled (for backfill and audit)."""
    await conn.execute(
        "INSERT INTO processed_events (event_id, event_type, checkout_session_id, outcome) "
        "VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (event_id) DO UPDATE SET outcome = EXCLUDED.outcome, processed_at = now()",
        event.id,
        event.type,
        session_id,
        outcome,
    )
