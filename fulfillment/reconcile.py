"""``fulfillment reconcile``: paid Checkout Sessions without a fulfillment, queued for one.

Stripe's list of Checkout Sessions is the source of truth, whatever became of a session's
events (lost downstream after a 2xx, never generated, older than Stripe's retries, an
endpoint disabled or not subscribed). Every ``complete`` session created in the window
that is ``paid`` or ``no_payment_required`` and has no ``fulfillments`` row gets a
``fulfillment.requested``, the message the success page publishes: the workers' idempotent
path fulfills it once, however many webhooks and requests arrive for it. Unpaid sessions
are left to their events.

A cursor per account in PostgreSQL lets a run without ``--since`` start where the last one
left off, less an overlap for sessions that were still open when it listed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import stripe
from aio_pika.abc import AbstractChannel, AbstractConnection

from fulfillment.stripe_lists import list_every_page
from shared.broker import event_message, publish_confirmed
from shared.envelope import EventEnvelope
from shared.errors import ConfigError, FulfillmentError
from shared.logging import get_logger
from shared.settings import BrokerSettings, Env, default_of, env_float
from shared.stripe_client import StripeSettings
from shared.topology import Topology, connect
from shared.vocabulary import CHECKOUT_SESSION_ID, FULFILLMENT_REQUESTED
from worker.db import create_pool

log = get_logger(__name__)

# The window of a run with neither --since nor a cursor: as long as Stripe retries a webhook.
DEFAULT_SINCE = timedelta(days=3)
# A session queued less than this ago is not queued again: its request may still be waiting
# in the queue behind a backlog, and a copy per run would only lengthen it.
REQUEUE_AFTER = timedelta(hours=1)
PAID = frozenset({"paid", "no_payment_required"})
# What a run reads of each listed session.
SESSION_FIELDS = ("id", "status", "created", "payment_status", "mode", "livemode")
SOURCE = "fulfillment-reconcile"
PLATFORM = ""  # the platform's own account, in reconcile's tables


@dataclass(frozen=True)
class ReconcileSettings:
    """When ``up`` reconciles, and which sessions a run leaves out or lists again."""

    interval_s: float = 600.0
    # Stripe's longest-lived Checkout Session (expires_at at most 24 h after creation): one
    # created longer ago than this had completed or expired when a run listed it.
    overlap_s: float = 86400.0
    # Sessions created this recently are left to their webhooks, which are usually on their
    # way: listing them would count orders in flight as missing.
    grace_s: float = 300.0

    @classmethod
    def from_env(cls, env: Env | None = None) -> ReconcileSettings:
        env = os.environ if env is None else env
        settings = cls(
            interval_s=env_float(
                env, "RECONCILE_INTERVAL_S", default_of(cls, "interval_s"), minimum=0
            ),
            overlap_s=env_float(
                env, "RECONCILE_OVERLAP_S", default_of(cls, "overlap_s"), minimum=0
            ),
            grace_s=env_float(env, "RECONCILE_GRACE_S", default_of(cls, "grace_s"), minimum=0),
        )
        if settings.overlap_s < settings.grace_s:
            raise ConfigError(
                f"RECONCILE_OVERLAP_S ({settings.overlap_s:g}) must be at least "
                f"RECONCILE_GRACE_S ({settings.grace_s:g}): a run would resume past sessions "
                "it left to their webhooks"
            )
        return settings


@dataclass
class AccountResult:
    """One account's part of a run: its window and what was found in it."""

    account: str | None  # None: the platform's own sessions
    since: int
    until: int
    from_cursor: bool
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # missing, but queued less than an hour ago

    def summary(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "since": iso(self.since),
            "until": iso(self.until),
            "from_cursor": self.from_cursor,
            "checked": self.checked,
            "missing": len(self.missing),
            "queued": len(self.queued),
            "sessions": self.missing,
            "recently_queued": self.held,
        }


@dataclass
class ReconcileResult:
    dry_run: bool
    accounts: list[AccountResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints: the totals, then each account's part."""
        return {
            "checked": sum(a.checked for a in self.accounts),
            "missing": sum(len(a.missing) for a in self.accounts),
            "queued": sum(len(a.queued) for a in self.accounts),
            "sessions": [sid for a in self.accounts for sid in a.missing],
            "recently_queued": [sid for a in self.accounts for sid in a.held],
            "dry_run": self.dry_run,
            "accounts": [a.summary() for a in self.accounts],
        }


async def reconcile(
    stripe_settings: StripeSettings,
    broker: BrokerSettings,
    database_url: str,
    settings: ReconcileSettings,
    *,
    since: timedelta | None = None,
    accounts: Sequence[str] = (),
    dry_run: bool = False,
) -> ReconcileResult:
    """Queue a fulfillment for each paid session without one: the platform's, then each
    connected account's. ``since``: the window, instead of the cursor (or the default)."""
    now = int(time.time())
    if since is not None and since.total_seconds() <= settings.grace_s:
        raise FulfillmentError(
            f"--since {_duration(since)} lists nothing: sessions created in the last "
            f"{settings.grace_s:g} s (RECONCILE_GRACE_S) are left to their webhooks"
        )
    result = ReconcileResult(dry_run=dry_run)
    pool = await create_pool(database_url, max_size=2)
    requests = _Requests(broker)
    try:
        for account in (None, *dict.fromkeys(accounts)):
            run = _AccountRun(pool, requests, stripe_settings, settings, account, now)
            result.accounts.append(await run.reconcile(since, dry_run))
    except asyncpg.UndefinedTableError as exc:
        raise FulfillmentError(f"PostgreSQL: {exc}: run `fulfillment migrate` first") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise FulfillmentError(f"PostgreSQL: {type(exc).__name__}: {exc}") from None
    finally:
        await requests.close()
        await pool.close()
    return result


class _AccountRun:
    """Reconciling one account's sessions (the platform's: ``account`` None)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        requests: _Requests,
        stripe_settings: StripeSettings,
        settings: ReconcileSettings,
        account: str | None,
        now: int,
    ) -> None:
        self.pool, self.requests = pool, requests
        self.stripe_settings, self.settings = stripe_settings, settings
        self.account, self.key, self.now = account, account or PLATFORM, now

    async def reconcile(self, since: timedelta | None, dry_run: bool) -> AccountResult:
        result = await self._window(since)
        sessions = await list_complete_sessions(
            self.stripe_settings, self.account, result.since, result.until
        )
        result.checked = len(sessions)
        # a setup-mode session (a saved card) is no_payment_required but sold nothing
        paid = [s for s in sessions if s.get("payment_status") in PAID and s.get("mode") != "setup"]
        fulfilled = await self._column(
            "SELECT checkout_session_id FROM fulfillments WHERE checkout_session_id = ANY($1)",
            [s["id"] for s in paid],
        )
        missing = [s for s in paid if s["id"] not in fulfilled]
        result.missing = [s["id"] for s in missing]
        held = await self._column(
            "SELECT checkout_session_id FROM reconciled_sessions "
            "WHERE checkout_session_id = ANY($1) AND last_queued_at > now() - $2::interval",
            result.missing,
            REQUEUE_AFTER,
        )
        result.held = [sid for sid in result.missing if sid in held]
        if dry_run:
            return result
        await self.pool.execute(
            "INSERT INTO reconcile_accounts (account) VALUES ($1) ON CONFLICT DO NOTHING", self.key
        )
        for session in missing:
            if session["id"] not in held:
                await self._queue(session)
                result.queued.append(session["id"])
        await self._finish(result)
        return result

    async def _window(self, since: timedelta | None) -> AccountResult:
        """The sessions' creation times to list: ``since``, else from the cursor, else the
        default; up to the grace period before now."""
        until = self.now - int(self.settings.grace_s)
        if since is not None:
            return AccountResult(self.account, self.now - int(since.total_seconds()), until, False)
        resume_from = await self.pool.fetchval(
            "SELECT resume_from FROM reconcile_accounts WHERE account = $1", self.key
        )
        if resume_from is not None:
            return AccountResult(self.account, int(resume_from.timestamp()), until, True)
        return AccountResult(
            self.account, self.now - int(DEFAULT_SINCE.total_seconds()), until, False
        )

    async def _column(self, sql: str, *args: Any) -> set[str]:
        return {row[0] for row in await self.pool.fetch(sql, *args)}

    async def _queue(self, session: dict[str, Any]) -> None:
        """Request the session's fulfillment, then remember it (confirmed first: a request
        the broker did not take is requested again by the next run)."""
        sid = session["id"]
        await self.requests.send(request_for(session, self.account, self.now))
        async with self.pool.acquire() as conn, conn.transaction():
            first = await conn.fetchval(
                """INSERT INTO reconciled_sessions (checkout_session_id, account) VALUES ($1, $2)
                   ON CONFLICT (checkout_session_id) DO UPDATE
                   SET last_queued_at = now(), times_queued = reconciled_sessions.times_queued + 1
                   RETURNING times_queued = 1""",
                sid,
                self.key,
            )
            if first:  # counted once, however often it is queued again
                await conn.execute(
                    "UPDATE reconcile_accounts SET missing_total = missing_total + 1 "
                    "WHERE account = $1",
                    self.key,
                )
        log.info("fulfillment requested", checkout_session_id=sid, account=self.account)

    async def _finish(self, result: AccountResult) -> None:
        """The run's figures, and the cursor moved on: to the newest point before which
        every session had completed or expired when listed, never past where this run's
        window began, and only by a run whose window reached back to the cursor."""
        resume_from = max(result.since, self.now - int(self.settings.overlap_s))
        await self.pool.execute(
            """UPDATE reconcile_accounts SET
                   resume_from = CASE WHEN resume_from IS NULL OR $2 <= resume_from
                                      THEN GREATEST(resume_from, $3) ELSE resume_from END,
                   last_run_at = now(), last_checked = $4, last_missing = $5
               WHERE account = $1""",
            self.key,
            _datetime(result.since),
            _datetime(resume_from),
            result.checked,
            len(result.missing),
        )
        # a warning when an order had to be requested: something upstream lost its events
        (log.warning if result.queued else log.info)(
            "reconcile finished",
            account=self.account,
            checked=result.checked,
            missing=len(result.missing),
            queued=len(result.queued),
            sessions=result.missing[:20] or None,
            since=iso(result.since),
            from_cursor=result.from_cursor,
        )


async def list_complete_sessions(
    settings: StripeSettings, account: str | None, since: int, until: int
) -> list[dict[str, Any]]:
    """Every complete session created from ``since`` to ``until`` (Unix times, both
    included), oldest first; a connected account's on its behalf."""
    params = {"status": "complete", "created": {"gte": since, "lte": until}}
    page = partial(_sessions_page, account=account)
    listed = await list_every_page(
        settings, page, params, noun="Checkout Sessions", fields=SESSION_FIELDS
    )
    # Stripe filters on its side; checked here too, so that an API (or a stand-in) that
    # ignored a filter cannot make us request fulfillment of an open or unknown session.
    kept = {
        s["id"]: s
        for s in listed
        if s.get("status") == "complete"
        and isinstance(s.get("created"), int)
        and since <= s["created"] <= until
        and isinstance(s.get("id"), str)
        and CHECKOUT_SESSION_ID.fullmatch(s["id"])
    }
    if len(kept) < len(listed):
        log.warning(
            "the sessions API answered sessions outside the filter; left out",
            count=len(listed) - len(kept),
        )
    return sorted(kept.values(), key=lambda s: (s["created"], s["id"]))


async def _sessions_page(
    client: stripe.StripeClient, params: dict[str, Any], *, account: str | None
) -> Any:
    """One page of ``GET /v1/checkout/sessions``."""
    options: Any = {"stripe_account": account} if account else {}
    return await client.v1.checkout.sessions.list_async(params=params, options=options)  # type: ignore[arg-type]


def request_for(session: dict[str, Any], account: str | None, now: int) -> dict[str, Any]:
    """The ``fulfillment.requested`` event for a session; its id says where it came from
    (``processed_events``, ``fulfillments.event_id``) and is the same on every run."""
    doc: dict[str, Any] = {
        "id": f"reconcile:{session['id']}",
        "object": "event",
        "type": FULFILLMENT_REQUESTED,
        "created": now,
        "livemode": session.get("livemode") is True,
        "api_version": None,
        "data": {"object": {"id": session["id"], "object": "checkout.session"}},
    }
    if account is not None:
        doc["account"] = account  # read on the connected account's behalf
    return doc


async def publish_request(
    channel: AbstractChannel, topology: Topology, doc: dict[str, Any], *, timeout_s: float
) -> None:
    """Publish one request, confirmed, where the ingress publishes events
    (Topology.route: straight to the work queue, so a missing one is an error, not a
    request parked where no worker looks)."""
    raw = json.dumps(doc).encode()
    envelope = EventEnvelope.from_dict(doc)
    exchange_name, routing_key = topology.route(envelope.type)
    exchange = (
        await channel.get_exchange(exchange_name, ensure=False)
        if exchange_name
        else channel.default_exchange
    )
    message = event_message(raw, envelope, source=SOURCE)
    await publish_confirmed(exchange, message, routing_key, timeout_s=timeout_s)


class _Requests:
    """The broker connection requests go out on, opened for the first one: a run that
    finds nothing missing needs no broker."""

    def __init__(self, broker: BrokerSettings) -> None:
        self.broker = broker
        self.topology = Topology.from_settings(broker)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def send(self, doc: dict[str, Any]) -> None:
        if self._channel is None:
            self._connection = await connect(self.broker)
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            await self.topology.declare(channel)
            self._channel = channel
        await publish_request(
            self._channel, self.topology, doc, timeout_s=self.broker.publish_timeout_s
        )

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # bounded: the broker may be away
                await asyncio.wait_for(self._connection.close(), timeout=5)


def _datetime(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def iso(unix: int) -> str:
    return _datetime(unix).isoformat().replace("+00:00", "Z")


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
