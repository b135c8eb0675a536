"""The worker's rows: a session's lock, its state and everything recorded for it.

All of the worker's SQL lives here (``db`` keeps the pool and the migrations runner).
``Store.locked`` hands out a ``LockedSession``: a pooled connection holding the session's
advisory lock, on which the flow reads the state and records the order, each effect and,
last, the event handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from shared.backoff import compute_backoff
from shared.envelope import EventEnvelope
from shared.errors import TransientError
from shared.logging import get_logger
from shared.topology import Topology
from shared.vocabulary import Outcome
from worker import db
from worker.order import LineItem, Order

log = get_logger(__name__)

Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# How long to keep trying to record an effect that was done before giving up (and
# letting the message be retried, which repeats the effect).
RECORD_RETRY_S = 20.0


class SessionState(StrEnum):
    """A session's ``checkout_sessions.state``."""

    NEW = "new"
    AWAITING_PAYMENT = "awaiting_payment"
    FULFILLED = "fulfilled"
    PAYMENT_FAILED = "payment_failed"


class SessionLockLost(TransientError):
    """Raised when the connection holding a session's lock failed mid-way; retry the event."""


class Store:
    """The worker's rows, on its pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def settled_before(
        self, session_id: str, event: EventEnvelope, outcome: Outcome, steps: Sequence[str]
    ) -> bool:
        """True (and the event recorded as handled with ``outcome``) when the session is
        fulfilled with every one of ``steps`` recorded. One round trip; no lock, as nothing
        else is written."""
        async with self._pool.acquire() as conn:
            recorded = await conn.fetchval(
                _SETTLED_SQL,
                event.id,
                event.type,
                session_id,
                outcome,
                list(steps),
            )
        return bool(recorded)

    async def record_delay_queues(self, topology: Topology) -> None:
        """Which delay queues exist besides those of the schedule `status` runs with."""
        # one row per queue: a schedule may repeat a delay ("10,10,60")
        delay_of = dict(zip(topology.retry_queues, topology.retry_delays_s, strict=True))
        await self._pool.execute(_RECORD_DELAY_QUEUES_SQL, list(delay_of), list(delay_of.values()))

    async def reconcile_figures(self) -> list[asyncpg.Record]:
        """What `fulfillment reconcile` recorded per account ('' the platform's): sessions
        ever found without a fulfillment, and its last run's time and finding."""
        return await self._pool.fetch(
            "SELECT account, missing_total, last_missing, "
            "extract(epoch FROM last_run_at)::float8 AS last_run FROM reconcile_accounts"
        )

    async def record_event(self, event: EventEnvelope, session_id: str, outcome: Outcome) -> None:
        """Remember that the event was handled, for one that needed no lock."""
        async with self._pool.acquire() as conn:
            await conn.execute(_RECORD_EVENT_SQL, event.id, event.type, session_id, outcome)

    @contextlib.asynccontextmanager
    async def locked(self, session_id: str) -> AsyncIterator[LockedSession]:
        """A connection holding the session's advisory lock: one worker at a time per session.

        A session-level lock (not a transaction's) so that each step can be committed as
        soon as it is done while the lock is still held. If the worker dies, PostgreSQL
        drops the lock with the connection. ``finish`` releases it with its last write.
        """
        async with self._pool.acquire() as conn:
            held = LockedSession(self._pool, conn, session_id)
            try:
                await conn.execute(_LOCK, session_id)
                yield held
                if not held.released:
                    await conn.execute(_UNLOCK, session_id)
                    held.released = True
            except BaseException:
                if not held.released:
                    await held.release_in_doubt()
                raise


class LockedSession:
    """A pooled connection holding one session's advisory lock, and what is written under it."""

    def __init__(self, pool: asyncpg.Pool, conn: Conn, session_id: str) -> None:
        self._pool = pool
        self.conn = conn
        self.session_id = session_id
        self.released = False

    async def read_state(self) -> tuple[SessionState | None, frozenset[str]]:
        """The session's state (None if never seen) and the steps already recorded."""
        row = await self.conn.fetchrow(_READ_STATE_SQL, self.session_id)
        if row is None:
            return None, frozenset()
        return SessionState(row["state"]), frozenset(row["steps"])

    async def set_state(self, order: Order, event_id: str, state: SessionState) -> None:
        await self.conn.execute(
            _UPSERT_STATE,
            order.session_id,
            state,
            order.payment_status,
            order.customer_email,
            event_id,
        )

    async def record_fulfillment(self, order: Order, event_id: str) -> None:
        """The session's state, its fulfillments row and line items: one statement, so one
        round trip and atomic (the foreign keys are checked at its end)."""
        await self.conn.execute(
            _RECORD_FULFILLMENT_SQL,
            order.session_id,
            SessionState.FULFILLED,
            order.payment_status,
            order.customer_email,
            event_id,
            _json(FulfillmentRow.of(order, event_id)),
            _json([LineItemRow.of(item) for item in order.items]),
        )

    async def record_step(self, step: str, detail: str) -> None:
        """Record a done effect, insisting through a database blip, since failing here means
        the message is retried and the effect done again."""
        session_id = self.session_id
        deadline = time.monotonic() + RECORD_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            budget = max(0.5, deadline - time.monotonic())
            try:
                if _alive(self.conn):
                    # the lock is still held on it (a timeout or a cancelled statement
                    # leaves the session alone): record there and carry on
                    await self.conn.execute(
                        _RECORD_STEP_SQL, session_id, step, detail, timeout=budget
                    )
                    return
                # The connection holding the lock is gone, and the lock with it. The insert
                # needs no lock (it is idempotent): a fresh connection, bounded, since every
                # other handler may be in here too.
                async with self._pool.acquire(timeout=budget) as fresh:
                    await fresh.execute(_RECORD_STEP_SQL, session_id, step, detail, timeout=budget)
                break
            except Exception as exc:
                if not db.is_transient(exc) or time.monotonic() > deadline:
                    raise
                log.warning("recording an effect failed; retrying", step=step, error=str(exc)[:200])
                await asyncio.sleep(compute_backoff(attempt, base_s=0.2, max_s=2.0))
        # Recorded, but the session's lock went with its connection: doing the next effect
        # now could race another worker. Retry the event instead; it takes the lock again
        # and resumes after this step.
        raise SessionLockLost(f"the session lock's connection failed after {step} was done")

    async def finish(self, event: EventEnvelope, outcome: Outcome) -> None:
        """Remember that the event was handled (for backfill and audit) and release the
        session's lock, in one round trip; the insert runs first (the unlock reads its result)."""
        await self.conn.execute(
            _FINISH_SQL,
            event.id,
            event.type,
            self.session_id,
            outcome,
        )
        self.released = True

    async def release_in_doubt(self) -> None:
        """Free the lock after a failure, whose own error must not replace the real one.

        The pool does not reset connections on release (db.create_pool), so a connection
        that may still hold the lock (the unlock failed, or we were cancelled while the lock
        was being granted) is closed: the server then frees everything it held. A connection
        that died already (a database restart) dropped the lock with it.
        """
        try:
            await asyncio.wait_for(self.conn.execute(_UNLOCK, self.session_id), timeout=5)
            self.released = True
        except BaseException as exc:  # any doubt: close it
            # (a connection the server dropped is already detached from its proxy)
            with contextlib.suppress(Exception):
                self.conn.terminate()
            if isinstance(exc, asyncio.CancelledError):
                raise  # a stop() meanwhile must not be lost


@dataclass(frozen=True, slots=True)
class FulfillmentRow:
    """An order's row in ``fulfillments``: one field per column written, named as it."""

    checkout_session_id: str
    customer_id: str | None
    customer_email: str | None
    customer_name: str | None
    amount_total: int
    currency: str
    payment_status: str
    livemode: bool
    event_id: str
    stripe_account: str | None
    amount_subtotal: int
    amount_discount: int
    amount_shipping: int
    amount_tax: int
    mode: str
    subscription_id: str | None

    @classmethod
    def of(cls, order: Order, event_id: str) -> FulfillmentRow:
        return cls(
            checkout_session_id=order.session_id,
            customer_id=order.customer_id,
            customer_email=order.customer_email,
            customer_name=order.customer_name,
            amount_total=order.amount_total,
            currency=order.currency,
            payment_status=order.payment_status,
            livemode=order.livemode,
            event_id=event_id,
            stripe_account=order.account,
            amount_subtotal=order.amount_subtotal,
            amount_discount=order.amount_discount,
            amount_shipping=order.amount_shipping,
            amount_tax=order.amount_tax,
            mode=order.mode,
            subscription_id=order.subscription,
        )


@dataclass(frozen=True, slots=True)
class LineItemRow:
    """A line item's row in ``fulfillment_line_items`` (beside its session id), by column."""

    line_item_id: str
    description: str | None
    price_id: str | None
    quantity: int | None
    unit_amount: int | None
    amount_total: int
    currency: str
    amount_subtotal: int

    @classmethod
    def of(cls, item: LineItem) -> LineItemRow:
        return cls(
            line_item_id=item.id,
            description=item.description,
            price_id=item.price_id,
            quantity=item.quantity,
            unit_amount=item.unit_amount,
            amount_total=item.amount_total,
            currency=item.currency,
            amount_subtotal=item.amount_subtotal,
        )


def _columns(row_type: type[FulfillmentRow | LineItemRow], qualifier: str = "") -> str:
    """The row type's columns for SQL, each prefixed with ``qualifier``."""
    return ", ".join(qualifier + f.name for f in fields(row_type))


def _json(rows: FulfillmentRow | list[LineItemRow]) -> str:
    """Rows as jsonb_populate_record(set) reads them: objects keyed by column.

    Not ASCII-escaped: a string asyncpg cannot encode as UTF-8 fails here as it would as text.
    """
    if isinstance(rows, list):
        return json.dumps([_by_column(row) for row in rows], ensure_ascii=False)
    return json.dumps(_by_column(rows), ensure_ascii=False)


def _by_column(row: FulfillmentRow | LineItemRow) -> dict[str, object]:
    return {f.name: getattr(row, f.name) for f in fields(row)}


def _alive(conn: Conn) -> bool:
    """Whether the connection is still open (a dropped one is detached from its proxy)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


_RECORD_DELAY_QUEUES_SQL = """INSERT INTO delay_queues (name, delay_s)
               SELECT * FROM unnest($1::text[], $2::float8[])
               ON CONFLICT (name) DO UPDATE SET last_declared_at = now()"""

_LOCK = "SELECT pg_advisory_lock(hashtextextended($1, 0))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"

_READ_STATE_SQL = """SELECT s.state,
                  array(SELECT f.step FROM fulfillment_steps f
                        WHERE f.checkout_session_id = s.checkout_session_id) AS steps
           FROM checkout_sessions s WHERE s.checkout_session_id = $1"""

_RECORD_STEP_SQL = (
    "INSERT INTO fulfillment_steps (checkout_session_id, step, detail) "
    "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
)

# The session's state: $1 session id, $2 state, $3 payment_status, $4 customer_email,
# $5 the event that set it. Alone (set_state) or as the first step of record_fulfillment.
_UPSERT_STATE = """INSERT INTO checkout_sessions
           (checkout_session_id, state, payment_status, customer_email, last_event_id)
       VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (checkout_session_id) DO UPDATE SET state = EXCLUDED.state,
           payment_status = EXCLUDED.payment_status, last_event_id = EXCLUDED.last_event_id,
           updated_at = now()"""

# An event handled: $1 event id, $2 type, $3 session id, $4 outcome; {source} says whether.
# The first handling's outcome stays (a duplicate's "already_fulfilled" must not hide the
# event that fulfilled); the latest is kept beside it, with a count.
_UPSERT_PROCESSED = """INSERT INTO processed_events
               (event_id, event_type, checkout_session_id, outcome, last_outcome)
           SELECT $1, $2, $3, $4, $4 FROM {source}
           ON CONFLICT (event_id) DO UPDATE SET last_outcome = EXCLUDED.outcome,
               last_processed_at = now(), times_handled = processed_events.times_handled + 1
           RETURNING 1"""

# The state as _UPSERT_STATE has it ($1-$5), then the fulfillments row ($6) and its line
# items ($7), each as JSON keyed by column; the rows' columns are the fields of their type.
_RECORD_FULFILLMENT_SQL = f"""WITH s AS ({_UPSERT_STATE} RETURNING checkout_session_id
           ), f AS (
               INSERT INTO fulfillments ({_columns(FulfillmentRow)})
               SELECT {_columns(FulfillmentRow, "r.")} FROM s,
                   jsonb_populate_record(NULL::fulfillments, $6::jsonb) AS r
               RETURNING checkout_session_id
           )
           INSERT INTO fulfillment_line_items (checkout_session_id, {_columns(LineItemRow)})
           SELECT f.checkout_session_id, {_columns(LineItemRow, "i.")} FROM f,
               jsonb_populate_recordset(NULL::fulfillment_line_items, $7::jsonb) AS i"""

# Only when the session is fulfilled with every effect recorded ($5): see settled_before.
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
