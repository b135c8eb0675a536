"""The worker's database layer against a real PostgreSQL: migrations and the pool."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from worker import db


async def test_migrate_creates_the_database_and_waits_for_another_process_migrating(
    unmigrated_database_url: str,
) -> None:
    """Several workers start at once: each migrates under one advisory lock, so one of them
    applies every migration and the others, once it is done, find nothing left to apply."""
    url = unmigrated_database_url
    assert await db.create_database_if_missing(url) is True
    holder = await asyncpg.connect(url)  # another process, migrating
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", db.MIGRATION_LOCK_ID)
        migrating = asyncio.create_task(db.migrate(url))
        await asyncio.sleep(1.0)
        assert not migrating.done(), "migrate went ahead while another process held the lock"
        assert await holder.fetchval("SELECT to_regclass('schema_migrations')") is None
        await holder.execute("SELECT pg_advisory_unlock($1)", db.MIGRATION_LOCK_ID)
        applied = await asyncio.wait_for(migrating, 30)
    finally:
        await holder.close()
    assert applied == [name for _, name, _ in db.migrations()]
    assert await db.migrate(url) == []  # and nothing twice
    assert await db.create_database_if_missing(url) is False


async def test_a_statement_on_the_pool_past_the_command_timeout_fails_not_waits(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No statement waits forever (a lock a stuck session holds): it fails with a
    TimeoutError, which the worker retries as transient."""
    monkeypatch.setattr(db, "COMMAND_TIMEOUT_S", 0.5)
    pool = await db.create_pool(database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(5)"), 4)
            assert time.monotonic() - started < 2, "the statement ran past the command timeout"
    finally:
        pool.terminate()


async def test_pool_sessions_ask_the_server_for_tcp_keepalives(database_url: str) -> None:
    """So that the server notices a worker host gone without a word (and frees the session
    locks its connections held) in about a minute, not the kernel's two hours."""
    pool = await db.create_pool(database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            settings = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "tcp_keepalives_idle",
                    "tcp_keepalives_interval",
                    "tcp_keepalives_count",
                )
            }
    finally:
        await pool.close()
    assert settings == {
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }
