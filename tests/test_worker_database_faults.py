"""PostgreSQL going away under the worker: the session lock, recording effects, no repeats."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import wait_for
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
