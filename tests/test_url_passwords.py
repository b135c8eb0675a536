"""A password given in a URL's query string (``?password=``, ``sslpassword=``, ...) is masked
wherever a URL is shown, as one in ``user:password@`` always was."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from shared.logging import mask_secrets
from shared.settings import redact_url
from tests.conftest import free_port
from tests.processes import RoleProcess, run_fulfillment, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)

PASSWORD = "hunter2-in-the-query"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://u@db/x?password={PASSWORD}", "postgresql://u@db/x?password=***"),
        (
            f"postgresql://u:{PASSWORD}@db/x?sslmode=require&sslpassword={PASSWORD}&a=1",
            "postgresql://u:***@db/x?sslmode=require&sslpassword=***&a=1",
        ),
        (f"postgresql://db/x?PWD={PASSWORD}#f", "postgresql://db/x?PWD=***#f"),
        (f"postgresql://db/x?pass%77ord={PASSWORD}", "postgresql://db/x?pass%77ord=***"),
        (f"amqp://g@rabbit/?pass={PASSWORD}", "amqp://g@rabbit/?pass=***"),
        ("postgresql://db/x?sslmode=require", "postgresql://db/x?sslmode=require"),
        (f"db/x?password={PASSWORD}", "<URL without scheme>"),
    ],
)
def test_redact_url_masks_passwords_in_the_query_too(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "text",
    [
        f"cannot connect to postgresql://u@db/x?password={PASSWORD}&sslmode=require",
        f"DSN host=db password={PASSWORD} dbname=x",
        f"{{'url': 'postgresql://db/x?sslpassword={PASSWORD}'}}",
    ],
)
def test_log_lines_mask_a_password_parameter(text: str) -> None:
    masked = mask_secrets(text)
    assert PASSWORD not in masked and "=***" in masked


def with_password(database_url: str) -> str:
    return f"{database_url}?password={PASSWORD}&application_name=status"


async def test_status_json_never_prints_a_password_from_the_query(
    worker_settings: WorkerSettings, topology: Any
) -> None:
    env = {**os.environ, **worker_env(worker_settings)}
    env["DATABASE_URL"] = with_password(worker_settings.database_url)

    result = await asyncio.to_thread(run_fulfillment, "status", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert '"database": "postgresql://' in result.stdout and "password=***" in result.stdout


@pytest.mark.parametrize(
    ("command", "query", "says"),
    [
        (["migrate"], f"password={PASSWORD}", "cannot reach PostgreSQL"),
        (["migrate"], f"password={PASSWORD}&sslmode=bogus", "is not usable"),
        (["status"], f"password={PASSWORD}&sslmode=bogus", "sslmode"),
    ],
)
async def test_connection_errors_never_print_a_password_from_the_query(
    worker_settings: WorkerSettings, topology: Any, command: list[str], query: str, says: str
) -> None:
    env = {**os.environ, **worker_env(worker_settings)}
    env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x?{query}"

    result = await asyncio.to_thread(run_fulfillment, *command, env=env, timeout_s=30)

    assert result.returncode != 0
    assert PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert says in result.stderr


async def test_a_worker_that_cannot_reach_the_database_logs_no_password(
    worker_settings: WorkerSettings,
) -> None:
    env = {**worker_env(worker_settings)}
    env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x?password={PASSWORD}"
    worker = RoleProcess(["worker"], env)
    try:
        await worker.start()
        code = await worker.wait(30)
    finally:
        await worker.stop()
    output = "\n".join(worker.lines)
    assert code != 0 and "cannot reach PostgreSQL" in output
    assert PASSWORD not in output and "password=***" in output
