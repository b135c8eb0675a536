"""``fulfillment send TYPE``: one signed event to the ingress, as ``stripe trigger`` sends one;
and the local signing secret ``up`` keeps from one start to the next."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from fulfillment.local import SECRET_FILE
from ingress.app import create_app
from ingress.settings import IngressSettings
from shared.topology import Topology
from tests.conftest import db_fetch, free_port, wait_for
from tests.processes import RoleProcess, broker_env, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)

SECRET = "whsec_" + "5e11d" * 6


@pytest.fixture
async def pipeline(
    worker_settings: WorkerSettings, start_worker: Any, topology: Topology
) -> AsyncIterator[str]:
    """An ingress (signing secret SECRET) and a worker, against the stand-in; the
    ingress's port."""
    port = free_port()
    settings = IngressSettings(webhook_secrets=(SECRET,), broker=worker_settings.broker)
    server = TestServer(create_app(settings), host="127.0.0.1", port=port)
    await server.start_server()
    await start_worker(worker_settings)
    yield str(port)
    await server.close()


def send_env(worker_settings: WorkerSettings, port: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        **broker_env(worker_settings.broker),
        "STRIPE_WEBHOOK_SECRETS": SECRET,
        "STRIPE_API_BASE": worker_settings.stripe.api_base,
        "INGRESS_PORT": port,
        **extra,
    }
    env.pop("STRIPE_API_KEY", None)
    return env


async def send(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``fulfillment send ARGS`` as typed in ``cwd``."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fulfillment", "send", *args],
        env=env, capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


async def fulfilled_once(database_url: str, smtp: SmtpSink, session_id: str) -> None:
    """One order row and one confirmation email for the session, and no second of either."""

    async def rows() -> int:
        found = await db_fetch(
            database_url, "SELECT 1 FROM fulfillments WHERE checkout_session_id = $1", session_id
        )
        return len(found)

    await wait_for(rows, timeout_s=15)
    await asyncio.to_thread(smtp.wait, 1)
    await asyncio.sleep(0.5)  # a second effect, were there one, would be here by now
    assert await rows() == 1
    assert len(smtp.for_session(session_id)) == 1


async def test_send_completed_seeds_a_paid_session_posts_it_signed_and_it_is_fulfilled_once(
    pipeline: str,
    worker_settings: WorkerSettings,
    standin: StripeStandIn,
    smtp: SmtpSink,
    database_url: str,
) -> None:
    result = await send("checkout.session.completed", env=send_env(worker_settings, pipeline))

    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    session_id = re.search(r" for (cs_test_\w+) \(seeded in the stand-in at ", first)
    assert session_id is not None, first
    assert first.startswith("checkout.session.completed evt_")
    # the ingress the settings describe, on this machine, and its answer
    assert second == (
        f'POST http://localhost:{pipeline}/webhooks/stripe -> 200 {{"received":true}}'
    )
    assert standin.sessions[session_id.group(1)]["payment_status"] == "paid"
    await fulfilled_once(database_url, smtp, session_id.group(1))


async def test_send_with_session_posts_an_event_for_that_session_and_it_is_fulfilled_once(
    pipeline: str,
    worker_settings: WorkerSettings,
    standin: StripeStandIn,
    smtp: SmtpSink,
    database_url: str,
) -> None:
    session_id = standin.add_session(customer_email="ada@example.com")["id"]
    env = send_env(worker_settings, "1")  # the port comes from --url

    result = await send(
        "checkout.session.completed",
        "--session",
        session_id,
        "--url",
        f"http://127.0.0.1:{pipeline}/webhooks/stripe",
        env=env,
    )

    assert result.returncode == 0, result.stderr
    assert f" for {session_id}\n" in result.stdout and "seeded" not in result.stdout
    assert "-> 200" in result.stdout
    assert len(standin.sessions) == 1  # nothing seeded
    await fulfilled_once(database_url, smtp, session_id)


@pytest.mark.parametrize(
    ("event_type", "payment_status"),
    [
        ("checkout.session.async_payment_failed", "unpaid"),
        ("checkout.session.async_payment_succeeded", "paid"),
        ("checkout.session.expired", "unpaid"),
    ],
)
async def test_send_seeds_the_session_each_type_is_sent_for(
    event_type: str,
    payment_status: str,
    pipeline: str,
    worker_settings: WorkerSettings,
    standin: StripeStandIn,
) -> None:
    result = await send(event_type, env=send_env(worker_settings, pipeline))

    assert result.returncode == 0, result.stderr
    assert "-> 200" in result.stdout
    [session] = standin.sessions.values()
    assert session["payment_status"] == payment_status


async def test_send_signs_with_the_local_secret_up_keeps_when_none_is_set(
    pipeline: str, worker_settings: WorkerSettings, tmp_path: Path
) -> None:
    (tmp_path / SECRET_FILE).parent.mkdir()
    (tmp_path / SECRET_FILE).write_text(SECRET + "\n")
    env = send_env(worker_settings, pipeline)
    env.pop("STRIPE_WEBHOOK_SECRETS")

    result = await send("checkout.session.completed", env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "-> 200" in result.stdout


async def test_send_with_another_secret_prints_the_ingress_refusal_and_exits_1(
    pipeline: str, worker_settings: WorkerSettings
) -> None:
    env = send_env(worker_settings, pipeline, STRIPE_WEBHOOK_SECRETS="whsec_not_the_one")

    result = await send("checkout.session.completed", env=env)

    assert result.returncode == 1
    assert "-> 400 " in result.stdout and "signature" in result.stdout


async def test_send_without_a_stand_in_or_a_session_or_a_secret_says_what_is_missing(
    tmp_path: Path,
) -> None:
    no_standin = {**os.environ, "STRIPE_WEBHOOK_SECRETS": SECRET,
                  "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"}  # fmt: skip
    result = await send("checkout.session.completed", env=no_standin)
    assert result.returncode == 2
    assert "no local Stripe stand-in answers" in result.stderr and "--session" in result.stderr

    no_secret = {k: v for k, v in os.environ.items() if k != "STRIPE_WEBHOOK_SECRETS"}
    result = await send("checkout.session.completed", env=no_secret, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("fulfillment send: no secret to sign with")

    result = await send("checkout.session.complete", env=no_standin)
    assert result.returncode == 2
    assert "did you mean checkout.session.completed?" in result.stderr


async def test_two_up_starts_print_the_same_local_secret_and_keep_it_private(
    worker_settings: WorkerSettings, smtp: SmtpSink, topology: Topology, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **worker_env(worker_settings),
        "INGRESS_PORT": str(free_port()),
        "INGRESS_HOST": "127.0.0.1",
        "STANDIN_PORT": str(free_port()),
        "WORKER_METRICS_PORT": str(free_port()),
        "WORKER_CONCURENCY": "64",  # misspelt: named once, not again by each child
    }
    for name in ("STRIPE_API_KEY", "STRIPE_API_BASE", "STRIPE_WEBHOOK_SECRETS"):
        env.pop(name, None)

    secrets, outputs = [], []
    for _ in range(2):
        up = RoleProcess(["up", "--workers", "1"], env, cwd=str(tmp_path))
        try:
            await up.start()
            await wait_for(lambda up=up: any("worker consuming" in x for x in up.lines), 30)
            up.signal(signal.SIGTERM)
            assert await up.wait(30) == 0
        finally:
            await up.stop()
        output = "\n".join(up.lines)
        found = re.search(r"sign test events with (whsec_\w+) \(kept in (\S+);", output)
        assert found is not None, output[-3000:]
        secrets.append(found.group(1))
        outputs.append(output)
        assert found.group(2) == str(tmp_path / SECRET_FILE)

    assert secrets[0] == secrets[1]
    assert (tmp_path / SECRET_FILE).read_text().strip() == secrets[0]
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
    assert all(x.count("WORKER_CONCURENCY is not a setting") == 1 for x in outputs)
    gitignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text()
    assert f"{SECRET_FILE.parent}/" in gitignore.splitlines()


async def test_up_with_only_a_webhook_secret_runs_locally_with_the_stand_in(
    worker_settings: WorkerSettings, smtp: SmtpSink, topology: Topology, tmp_path: Path
) -> None:
    port, standin_port = free_port(), free_port()
    env = {
        **worker_env(worker_settings),
        "INGRESS_PORT": str(port),
        "INGRESS_HOST": "127.0.0.1",
        "STANDIN_PORT": str(standin_port),
        "WORKER_METRICS_PORT": str(free_port()),
        "STRIPE_WEBHOOK_SECRETS": SECRET,
    }
    env.pop("STRIPE_API_KEY")
    env.pop("STRIPE_API_BASE")
    up = RoleProcess(["up", "--workers", "1"], env, cwd=str(tmp_path))
    try:
        await up.start()
        await wait_for(lambda: any("worker consuming" in x for x in up.lines), 30)
        # and `send` finds up's stand-in on STANDIN_PORT by itself
        sent = await send(
            "checkout.session.completed",
            env={**os.environ, **env, "STRIPE_API_BASE": ""},
            cwd=tmp_path,
        )
        up.signal(signal.SIGTERM)
        code = await up.wait(30)
    finally:
        await up.stop()

    output = "\n".join(up.lines)
    assert code == 0, output[-3000:]
    assert "STRIPE_WEBHOOK_SECRETS without STRIPE_API_KEY: the local stand-in answers" in output
    assert sent.returncode == 0, sent.stderr
    assert f"seeded in the stand-in at http://127.0.0.1:{standin_port})" in sent.stdout
    assert "-> 200" in sent.stdout
    session_id = re.search(r" for (cs_test_\w+) ", sent.stdout)
    assert session_id is not None
    await wait_for(lambda: smtp.for_session(session_id.group(1)), timeout_s=15)


def test_up_refuses_a_local_secret_file_that_holds_no_single_secret(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).parent.mkdir()
    (tmp_path / SECRET_FILE).write_text("whsec_a,whsec_b\n")  # two, as the variable reads
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env["RABBITMQ_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/"

    result = subprocess.run(
        [sys.executable, "-m", "fulfillment", "up"],
        env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 2
    assert result.stderr == (
        f"fulfillment up: {tmp_path / SECRET_FILE} does not hold a whsec_… secret: delete it, "
        "and `fulfillment up` makes a new one\n"
    )
