"""The small things a newcomer meets in the first hour: --version, "did you mean" for a
command, one error prefix, errors that point at the real cause (a wrong port, a second
`up`), links that can be opened, and a worker's /readyz."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from importlib import metadata
from typing import Any

import aiohttp
import pytest

from shared.errors import BrokerUnavailable
from shared.settings import BrokerSettings
from shared.topology import Topology, connect_error
from tests.conftest import free_port, wait_for
from tests.processes import RoleProcess, broker_env, run_fulfillment, worker_env
from worker import metrics
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)


def test_version_prints_the_installed_version() -> None:
    result = run_fulfillment("--version")

    assert result.returncode == 0
    assert result.stdout == f"fulfillment {metadata.version('stripe-checkout-fulfillment')}\n"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["stats"], "fulfillment: unknown command 'stats'; did you mean status?"),
        (["dlq", "lst"], "fulfillment dlq: unknown action 'lst'; did you mean list?"),
        (["frobnicate"], "fulfillment: unknown command 'frobnicate' (one of: up, send, demo,"),
    ],
)
def test_a_mistyped_command_gets_the_nearest_one(args: list[str], said: str) -> None:
    result = run_fulfillment(*args)

    assert result.returncode == 2
    assert result.stderr.startswith(said) and len(result.stderr.splitlines()) == 1


def test_a_closed_port_that_is_not_rabbitmqs_says_so_instead_of_start_it() -> None:
    port = free_port()
    env = {**os.environ, "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{port}/"}

    result = run_fulfillment("dlq", "list", env=env)

    assert result.returncode == 2
    assert result.stderr == (
        f"fulfillment dlq list: RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:{port}/: "
        f"nothing is listening on 127.0.0.1:{port} — is RabbitMQ there, or is the port wrong?\n"
    )


def test_a_refused_connection_on_rabbitmqs_own_port_says_how_to_start_it() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")

    error = connect_error(BrokerSettings(url="amqp://guest:guest@localhost/"), refused)

    assert isinstance(error, BrokerUnavailable)
    assert "is it running? (rabbitmq-server -detached)" in str(error)
    assert "is the port wrong" not in str(error)


def test_a_url_of_the_wrong_kind_is_named_without_a_broken_article() -> None:
    result = run_fulfillment("topology", env={**os.environ, "RABBITMQ_URL": "http://broker/"})

    assert result.returncode == 2
    assert result.stderr == (
        "fulfillment topology: RABBITMQ_URL must be a URL starting amqp:// or amqps:// with a "
        "host, got 'http://broker/'\n"
    )


def test_up_names_postgresql_once_when_it_cannot_reach_it(
    broker_settings: BrokerSettings,
) -> None:
    port = free_port()
    env = {
        **os.environ,
        **broker_env(broker_settings),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x",
        "STRIPE_WEBHOOK_SECRETS": "whsec_test",
        "STRIPE_API_KEY": "sk_test_x",
        "INGRESS_PORT": str(free_port()),
        "WORKER_METRICS_PORT": str(free_port(2)),
    }

    result = run_fulfillment("up", env=env)

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"fulfillment up: cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:{port}/x"
    )
    assert line.count("PostgreSQL") == 1


def test_the_banner_links_to_localhost_for_servers_listening_on_every_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fulfillment.up import _check_settings, _children

    env = {"STRIPE_WEBHOOK_SECRETS": "whsec_test", "STRIPE_API_KEY": "sk_test_x"}

    _children(env, _check_settings(env, 9300), 1, 8080, 9300)

    out = capsys.readouterr().out
    assert "POST http://localhost:8080/webhooks/stripe" in out
    assert "worker-1: metrics, healthz and readyz on http://localhost:9300/metrics" in out
    assert "0.0.0.0" not in out


async def test_a_second_up_says_another_up_seems_to_be_running(
    worker_settings: WorkerSettings, topology: Topology
) -> None:
    env = {
        **worker_env(worker_settings),
        "STRIPE_WEBHOOK_SECRETS": "whsec_test",
        "INGRESS_PORT": str(free_port()),
        "WORKER_METRICS_PORT": str(free_port()),
    }
    first = RoleProcess(["up", "--workers", "1"], env)
    try:
        await first.start()
        await wait_for(lambda: any("worker consuming" in x for x in first.lines), 30)

        second = await asyncio.to_thread(
            run_fulfillment, "up", "--workers", "1", env={**os.environ, **first.env}
        )
        first.signal(signal.SIGTERM)
        assert await first.wait(30) == 0
    finally:
        await first.stop()

    assert second.returncode == 2
    [line] = second.stderr.splitlines()
    assert line.startswith(
        "fulfillment up: another `fulfillment up` seems to be running: one of its servers "
        f"answers on localhost:{env['INGRESS_PORT']} (INGRESS_PORT)"
    )


async def test_a_workers_readyz_says_ready_while_it_consumes_and_why_not_when_it_cannot(
    worker_settings: WorkerSettings, start_worker: Any
) -> None:
    worker = await start_worker(worker_settings)
    runner = await metrics.start_server("127.0.0.1", 0, unready=worker.unready)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/readyz"

    async def readyz() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(url) as answer:
            return answer.status, await answer.json()

    try:
        ready = await readyz()
        await worker._pool.close()  # the database pool gone: no work can be recorded
        no_database = await readyz()
        await worker._channel.close()
        no_channel = await readyz()
        await worker.stop(grace_s=1)
        stopped = await readyz()
    finally:
        await runner.cleanup()

    assert ready == (200, {"status": "ready"})
    assert no_database[0] == 503 and no_database[1]["reason"].startswith("database unusable")
    assert no_channel == (
        503,
        {"status": "not ready", "reason": "broker channel closed (reconnecting)"},
    )
    assert stopped == (503, {"status": "not ready", "reason": "not consuming"})
