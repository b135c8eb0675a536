"""The suite's disruptive tests break only throwaway services of their own.

`make test` runs on machines where other programs (a `make run`, another project) use the
same PostgreSQL and RabbitMQ. This test runs every test marked ``disruptive`` while a
canary client holds a connection to each of the machine's services, and checks that
neither connection was dropped and that the PostgreSQL cluster was not restarted.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.conftest import IN_CI, database_url_named

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(900)


async def test_the_disruptive_tests_leave_the_machines_postgresql_and_rabbitmq_alone(
    rabbitmq_url: str, postgres_url: str
) -> None:
    database = await asyncpg.connect(database_url_named(postgres_url, "postgres"))
    broker = await aio_pika.connect(rabbitmq_url)  # not robust: a drop must show
    try:
        backend = await database.fetchval("SELECT pg_backend_pid()")
        started = await database.fetchval("SELECT pg_postmaster_start_time()")
        channel = await broker.channel()
        canary = await channel.declare_queue(exclusive=True)  # goes with the connection

        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pytest", "-m", "disruptive", "-p", "no:cacheprovider",
            "-q", "-rs", "tests",
            cwd=ROOT, env=os.environ.copy(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await run.communicate()  # the loop keeps the broker's heartbeats going
        text = output.decode(errors="replace")

        # the same server process and session: never dropped, never restarted
        assert await database.fetchval("SELECT pg_backend_pid()") == backend
        assert await database.fetchval("SELECT pg_postmaster_start_time()") == started
        assert not broker.is_closed and not channel.is_closed
        declared = await (await channel.get_underlay_channel()).queue_declare(
            canary.name, passive=True
        )
        assert declared.queue == canary.name
    finally:
        await broker.close()
        await database.close()

    assert run.returncode == 0, text[-5000:]
    passed = re.search(r"(\d+) passed", text)
    if passed is None and not IN_CI and "skipped" in text:
        pytest.skip(f"the disruptive tests were skipped here: {text[-600:]}")
    assert passed is not None and int(passed.group(1)) >= 1, text[-3000:]
    assert "skipped" not in text, text[-3000:]
