"""PostgreSQL going away under the worker: the session lock, recording effects, no repeats."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from tests.captured_logs import Logs
from tests.conftest import database_url_named, db_fetch, drop_database, wait_for
from tests.pipeline import Pipeline, fulfillment_steps
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


async def test_a_connection_lost_inside_the_session_lock_surfaces_as_the_original_error(
    worker_settings: WorkerSettings, database_url: str
) -> None:
    """Regression (chaos run, PostgreSQL restart): the unlock on a broken connection raised
    its own error, which replaced the real one (here an SMTP outage, to be retried)."""
    import asyncpg

    from shared.errors import TransientError
    from worker import db
    from worker.store import Store

    pool = await db.create_pool(database_url, max_size=2)  # the worker's own: no reset
    store = Store(pool)
    admin = await asyncpg.connect(database_url)
    original = TransientError("SMTP unavailable")
    try:
        with pytest.raises(TransientError) as caught:
            async with store.locked("cs_test_lock_regression") as held:
                pid = await held.conn.fetchval("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.2)  # the database restarts while we talk to SMTP
                raise original
        assert caught.value is original
        # and the lock is free again for the next worker
        async with store.locked("cs_test_lock_regression") as held:
            assert await held.conn.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
        await pool.close()


async def test_a_handler_cancelled_inside_the_session_lock_leaves_the_session_free(
    worker_settings: WorkerSettings, database_url: str
) -> None:
    """The worker's pool does not reset connections on release, so the lock must be freed
    by the fulfiller itself when a handler is cancelled (shutdown after the grace period)."""
    import asyncpg

    from worker import db
    from worker.store import Store

    sid = "cs_test_cancelled_inside_lock"
    try_lock = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
    pool = await db.create_pool(database_url, max_size=1)
    store = Store(pool)
    admin = await asyncpg.connect(database_url)
    inside = asyncio.Event()

    async def handler() -> None:
        async with store.locked(sid):
            inside.set()
            await asyncio.sleep(30)  # an effect in progress

    try:
        task = asyncio.create_task(handler())
        await asyncio.wait_for(inside.wait(), 5)
        assert await admin.fetchval(try_lock, sid) is False  # held by the handler
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await admin.fetchval(try_lock, sid) is True  # free for the next worker
    finally:
        await admin.close()
        await pool.close()


def test_a_connection_broken_mid_protocol_counts_as_transient() -> None:
    """Regression (chaos run, PostgreSQL restart): asyncpg reports a connection the server
    dropped mid-protocol as InternalClientError; it was dead-lettered as a handler bug."""
    import asyncpg

    from worker.retry import is_transient

    assert is_transient(
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )
    )


async def test_a_database_blip_right_after_the_email_does_not_send_it_again(
    pipeline: Pipeline,
) -> None:
    """Regression (chaos run): when recording a sent email failed because PostgreSQL went
    away, the message was retried and the email sent again; now recording insists."""
    import asyncpg

    async def drop_every_database_connection() -> None:
        conn = await asyncpg.connect(pipeline.database_url)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await conn.close()

    pipeline.smtp.after_data = drop_every_database_connection
    worker = await pipeline.start()

    sid = await pipeline.complete()

    await wait_for(lambda: pipeline.both_steps(sid), timeout_s=20)
    await pipeline.settle(worker)
    assert len(pipeline.mails_for(sid)) == 1


async def test_recording_an_effect_after_the_locks_connection_died_stops_the_event(
    worker_settings: WorkerSettings, database_url: str
) -> None:
    """The effect is recorded on a fresh connection, but the lock went with the old one:
    doing the next effect unlocked could race another worker, so the event is retried."""
    import asyncpg

    from worker import db
    from worker.store import _UPSERT_STATE, SessionLockLost, Store

    sid = "cs_test_lock_lost_mid_way"
    pool = await db.create_pool(database_url, max_size=2)
    store = Store(pool)
    admin = await asyncpg.connect(database_url)
    await admin.execute(_UPSERT_STATE, sid, "fulfilled", "paid", None, "evt_lock_lost")
    try:
        with pytest.raises(SessionLockLost):
            async with store.locked(sid) as held:
                pid = await held.conn.fetchval("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.2)
                await held.record_step("order_fulfilled_message", "done")
        assert await fulfillment_steps(database_url, sid) == {"order_fulfilled_message": "done"}
    finally:
        await admin.close()
        await pool.close()


@pytest.fixture
async def own_database(postgres_url: str) -> AsyncIterator[str]:
    """A migrated database of this test's own, which it may refuse connections to."""
    from worker.db import migrate

    name = f"fulfillment_test_{uuid.uuid4().hex[:8]}_refusing"
    url = database_url_named(postgres_url, name)
    await migrate(url)
    yield url
    await drop_database(postgres_url, name)


async def refuse_connections(postgres_url: str, url: str, refuse: bool) -> None:
    """ALLOW_CONNECTIONS off (and every session of it ended), as during a failover or
    maintenance; or on again."""
    import asyncpg

    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(database_url_named(postgres_url, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not refuse).lower()}')
        if refuse:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
    finally:
        await admin.close()


@pytest.mark.timeout(120)
async def test_a_database_refusing_connections_is_waited_out_never_dead_lettered(
    logs: Logs, pipeline: Pipeline, own_database: str, postgres_url: str
) -> None:
    """The issue's trial: for 15 s the database refuses connections (SQLSTATE 55000, then
    57P01 for the sessions ended). Every paid session arriving meanwhile was dead-lettered
    as permanent, with a traceback each; now each is retried through the delay queues and
    fulfilled once the database is back."""
    async with pipeline.retrying_every(1, 2, 4, 8, 8) as settings:
        worker = await pipeline.start(replace(settings, database_url=own_database))
        before = [await pipeline.complete() for _ in range(5)]
        await wait_for(lambda: all_fulfilled(own_database, before), timeout_s=20)

        await refuse_connections(postgres_url, own_database, refuse=True)
        during = []
        try:
            for _ in range(15):
                during.append(await pipeline.complete())
                await asyncio.sleep(1.0)
        finally:
            await refuse_connections(postgres_url, own_database, refuse=False)

        await wait_for(lambda: all_fulfilled(own_database, during), timeout_s=40)
        await pipeline.settle(worker)
    assert await pipeline.dead_letters() == []
    for sid in before + during:
        assert len(pipeline.mails_for(sid)) == 1
    retried = logs.events("retry scheduled")
    assert retried, "the fault was not met"
    assert {line["error_type"] for line in retried} <= {
        "ObjectNotInPrerequisiteStateError",
        "AdminShutdownError",
        "ConnectionDoesNotExistError",
        "CannotConnectNowError",
        "InterfaceError",
    }, retried
    logs.assert_no_traceback()


async def all_fulfilled(database_url: str, sessions: list[str]) -> bool:
    rows = await db_fetch(
        database_url,
        "SELECT count(*) AS n FROM fulfillment_steps WHERE checkout_session_id = ANY($1)",
        sessions,
    )
    return bool(rows[0]["n"] == 2 * len(sessions))


def test_a_database_that_cannot_serve_now_is_transient_whatever_asyncpg_calls_it() -> None:
    """By SQLSTATE: classes 08, 53 and 57P0x, and 55000, are an unavailable database."""
    import asyncpg

    from worker.retry import is_transient

    for state in ("08006", "08001", "53300", "53100", "57P01", "57P03", "57P04", "55000"):
        error = asyncpg.PostgresError.new({"C": state, "M": "unavailable"})
        assert is_transient(error), state
    for state in ("23505", "42P01", "22P02", "55006"):
        error = asyncpg.PostgresError.new({"C": state, "M": "a verdict"})
        assert not is_transient(error), state
