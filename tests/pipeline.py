"""The worker pipeline as one typed fixture (``pipeline``, built in conftest.py).

A worker test drives the same things together: the Stripe stand-in over HTTP, the SMTP
sink, workers started in process, a publisher of event documents as the ingress sends
them, the test's broker names and its database. :class:`Pipeline` bundles them, with
the steps those tests repeat, so that a test reads as the behaviour it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from email.message import EmailMessage
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from devkit import signing as sh
from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from shared.topology import Topology
from tests.conftest import Publish, StartWorker, db_fetch, depth, drain, wait_for
from worker.consumer import Worker
from worker.settings import WorkerSettings

COMPLETED = "checkout.session.completed"
SUCCEEDED = "checkout.session.async_payment_succeeded"
FAILED = "checkout.session.async_payment_failed"


def session_event(
    standin: StripeStandIn, event_type: str, session_id: str, **kw: Any
) -> dict[str, Any]:
    """An event around the stand-in's current view of the session, as Stripe would send."""
    session = {k: v for k, v in standin.sessions[session_id].items() if k != "line_items"}
    return sh.event(event_type, session, **kw)


async def fulfillment_rows(database_url: str, session_id: str) -> list[asyncpg.Record]:
    return await db_fetch(
        database_url, "SELECT * FROM fulfillments WHERE checkout_session_id = $1", session_id
    )


async def stored_items(database_url: str, session_id: str) -> list[tuple[Any, ...]]:
    """The session's line items as recorded: (description, quantity, amount_total), by name."""
    rows = await db_fetch(
        database_url,
        "SELECT description, quantity, amount_total FROM fulfillment_line_items "
        "WHERE checkout_session_id = $1 ORDER BY description",
        session_id,
    )
    return [tuple(r) for r in rows]


async def fulfillment_steps(database_url: str, session_id: str) -> dict[str, str]:
    rows = await db_fetch(
        database_url,
        "SELECT step, detail FROM fulfillment_steps WHERE checkout_session_id = $1",
        session_id,
    )
    return {r["step"]: r["detail"] for r in rows}


async def both_steps(database_url: str, session_id: str) -> dict[str, str] | None:
    """The session's recorded steps once both effects are recorded, else None."""
    steps = await fulfillment_steps(database_url, session_id)
    return steps if len(steps) == 2 else None


async def settle(
    worker: Worker, topology: Topology, channel: AbstractChannel, seconds: float = 0.5
) -> None:
    """Wait until the work queue is empty and nothing is in flight for a while."""
    quiet_since = None
    loop = asyncio.get_running_loop()
    while True:
        q = await (await channel.get_underlay_channel()).queue_declare(
            topology.work_queue, passive=True
        )
        busy = q.message_count or worker.in_flight
        now = loop.time()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= seconds:
            return
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Pipeline:
    """The stand-in, the mail sink, workers, a publisher, broker names and the database."""

    standin: StripeStandIn
    stripe_base: str  # the stand-in's URL, which the worker settings' Stripe client uses
    smtp: SmtpSink
    settings: WorkerSettings
    start_worker: StartWorker
    publish: Publish
    channel: AbstractChannel
    topology: Topology
    database_url: str
    outbound: str  # a queue bound to every outbound message (order.fulfilled, payment.failed)

    # --- driving it ---

    async def start(self, settings: WorkerSettings | None = None) -> Worker:
        """A consuming worker, on the pipeline's settings unless told; stopped at teardown."""
        return await self.start_worker(self.settings if settings is None else settings)

    def event(self, event_type: str, session_id: str, **kw: Any) -> dict[str, Any]:
        """The session's event as Stripe would send it now."""
        return session_event(self.standin, event_type, session_id, **kw)

    async def send(self, event_type: str, session_id: str) -> dict[str, Any]:
        """Publish the session's event as Stripe would send it now; the event."""
        event = self.event(event_type, session_id)
        await self.publish(event)
        return event

    async def complete(self, **session: Any) -> str:
        """Seed a session in the stand-in (paid, unless ``session`` says otherwise) and
        publish its checkout.session.completed; the session's id."""
        session_id: str = self.standin.add_session(**session)["id"]
        await self.send(COMPLETED, session_id)
        return session_id

    async def dead_letter_unknown_sessions(self, n: int) -> list[dict[str, Any]]:
        """n events for sessions Stripe does not know, dead-lettered at once by a worker
        started for them and stopped after; the events."""
        events = [
            sh.event(COMPLETED, sh.checkout_session(f"cs_test_unknown_{i}_{time.time_ns()}"))
            for i in range(n)
        ]
        worker = await self.start()
        for event in events:
            await self.publish(event)

        async def all_dead() -> bool:
            return await depth(self.channel, self.topology.dead_queue) >= n

        await wait_for(all_dead)
        await worker.stop(grace_s=2)
        return events

    @contextlib.asynccontextmanager
    async def retrying_every(self, *delays_s: float) -> AsyncIterator[WorkerSettings]:
        """The pipeline's worker settings with this retry schedule (a fault longer than the
        default's 1.5 s); the delay queues its workers declare are deleted afterwards."""
        broker = replace(self.settings.broker, retry_delays_s=delays_s)
        try:
            yield replace(self.settings, broker=broker)
        finally:
            extra = set(Topology.from_settings(broker).retry_queues)
            for name in extra - set(self.topology.retry_queues):
                await self.channel.queue_delete(name)

    async def settle(self, worker: Worker, seconds: float = 0.5) -> None:
        """Wait until the work queue is empty and nothing is in flight for a while."""
        await settle(worker, self.topology, self.channel, seconds)

    # --- what came of it ---

    async def rows(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """What ``sql`` reads from the test's database now."""
        return await db_fetch(self.database_url, sql, *args)

    async def fulfillments(self, session_id: str) -> list[asyncpg.Record]:
        """The session's rows in ``fulfillments`` now (one once fulfilled)."""
        return await fulfillment_rows(self.database_url, session_id)

    async def fulfilled(self, session_id: str, timeout_s: float = 10.0) -> list[asyncpg.Record]:
        """The session's rows in ``fulfillments``, once there are any."""
        rows: list[asyncpg.Record] = await wait_for(
            lambda: self.fulfillments(session_id), timeout_s=timeout_s
        )
        return rows

    async def items(self, session_id: str) -> list[tuple[Any, ...]]:
        """The session's line items as recorded: (description, quantity, amount_total)."""
        return await stored_items(self.database_url, session_id)

    async def steps(self, session_id: str) -> dict[str, str]:
        """The session's recorded effects: step name to detail."""
        return await fulfillment_steps(self.database_url, session_id)

    async def both_steps(self, session_id: str) -> dict[str, str] | None:
        """The session's recorded effects once both are recorded, else None."""
        return await both_steps(self.database_url, session_id)

    async def state(self, session_id: str) -> str | None:
        """The session's state in ``checkout_sessions``, None before it has a row."""
        rows = await self.rows(
            "SELECT state FROM checkout_sessions WHERE checkout_session_id = $1", session_id
        )
        return rows[0]["state"] if rows else None

    async def mails(self, count: int = 1, timeout_s: float = 10.0) -> list[EmailMessage]:
        """Every mail the sink has received, once it has at least ``count``."""
        return await asyncio.to_thread(self.smtp.wait, count, timeout_s)

    def mails_for(self, session_id: str) -> list[EmailMessage]:
        """The mails received so far about the session."""
        return self.smtp.for_session(session_id)

    async def outbound_messages(self) -> list[AbstractIncomingMessage]:
        """The outbound messages published since the last call (taken from the capture)."""
        return await drain(self.channel, self.outbound)

    async def queued(self) -> list[AbstractIncomingMessage]:
        """The messages in the work queue now (taken from it)."""
        return await drain(self.channel, self.topology.work_queue)

    async def dead_letters(self) -> list[AbstractIncomingMessage]:
        """The messages in the dead-letter queue now (taken from it)."""
        return await drain(self.channel, self.topology.dead_queue)

    async def order_went_on(self, worker: Worker) -> None:
        """Whatever became of the email: the order was announced once, nothing dead-lettered."""
        await self.settle(worker)
        assert [m.routing_key for m in await self.outbound_messages()] == ["order.fulfilled"]
        assert await self.dead_letters() == []
