"""Every command has help; a bad argument, setting, port or service is refused in one line."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from urllib.parse import urlsplit

import pytest

from shared.settings import BrokerSettings
from tests.conftest import free_port
from tests.processes import broker_env, run_fulfillment, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", "--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
        (["up", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
        (["demo", "--workers", "-1"], "argument --workers: must be at least 1, got -1"),
        (["dlq", "list", "--limit", "-1"], "argument --limit: must be at least 1, got -1"),
        (["dlq", "replay", "--all", "--rate", "0"], "argument --rate: must be above 0, got 0"),
        (["dlq", "replay", "evt_1", "--type", "x"], "not EVENT_ID... and --type"),
        (["dlq", "replay", "--type", "x", "--all"], "not --type and --all"),
        (["dlq", "purge", "evt_1", "--all", "--yes"], "not EVENT_ID... and --all"),
    ],
)
def test_a_bad_argument_is_refused_in_one_line_before_anything_starts(
    args: list[str], message: str
) -> None:
    env = {**os.environ, "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = run_fulfillment(*args, env=env, timeout_s=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", [["status"], ["dlq", "list"], ["dlq", "replay", "--all"]])
def test_tools_on_a_broker_without_the_topology_say_to_declare_it(
    worker_settings: WorkerSettings, command: list[str]
) -> None:
    env = {**os.environ, **worker_env(worker_settings), "BROKER_PREFIX": "never.declared"}
    result = run_fulfillment(*command, env=env, timeout_s=30)
    assert result.returncode == 2
    assert "queue never.declared." in result.stderr and "fulfillment topology" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("command", "setting"),
    [
        (["ingress"], "INGRESS_PORT"),
        (["worker"], "WORKER_METRICS_PORT"),
        # up checks before it starts them: a child that cannot listen was restarted forever
        (["up"], "INGRESS_PORT"),
        (["up"], "WORKER_METRICS_PORT"),
    ],
)
def test_a_port_another_program_holds_is_one_line_naming_the_setting(
    worker_settings: WorkerSettings, command: list[str], setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            **worker_env(worker_settings),
            "STRIPE_WEBHOOK_SECRETS": "whsec_test",
            "INGRESS_HOST": "127.0.0.1",
            "WORKER_METRICS_HOST": "127.0.0.1",
            "INGRESS_PORT": str(free_port()),
            "WORKER_METRICS_PORT": str(free_port()),
            setting: str(port),
        }
        result = run_fulfillment(*command, env=env, timeout_s=30)
    assert result.returncode == 2
    assert f"{setting}: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


async def test_a_server_that_answers_broken_amqp_is_not_taken_for_a_refused_virtual_host() -> None:
    """Only the broker closing the connection while it opens the virtual host means
    RABBITMQ_URL's vhost is wrong; any other bad frame (not RabbitMQ on that port, or a
    broken one) is a broker we cannot use, not a setting to fix."""
    from shared.errors import BrokerUnavailable, ConfigError
    from shared.settings import BrokerSettings
    from shared.topology import connect

    async def not_amqp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # the client's protocol header
        writer.write(b"\x01\x00\x00\x00\x00\x00\x04junk\xce")  # no frame-end where due
        await writer.drain()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(not_amqp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(BrokerUnavailable) as raised:
            await connect(BrokerSettings(url=f"amqp://guest:guest@127.0.0.1:{port}/"))
    finally:
        server.close()

    assert not isinstance(raised.value, ConfigError)
    assert "InvalidFrameError" in str(raised.value) and "virtual host" not in str(raised.value)


def own_ports() -> dict[str, str]:
    """Listen ports for `up` that nothing else holds (a `make run` on this machine holds the
    defaults, and `up` checks its ports before anything else)."""
    return {
        "INGRESS_PORT": str(free_port()),
        "WORKER_METRICS_PORT": str(free_port(2)),  # worker i gets the base + i - 1
        "STANDIN_PORT": str(free_port()),
    }


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("wrong-password", "refused the user name or password (ACCESS_REFUSED"),
        ("missing-vhost", "while opening its virtual host: does it exist"),
    ],
)
@pytest.mark.parametrize("command", [["topology"], ["status"], ["worker"], ["up"]])
def test_a_broker_that_refuses_the_url_says_so_and_does_not_say_start_it(
    broker_settings: BrokerSettings, database_url: str, command: list[str], where: str, says: str
) -> None:
    """Black-box trial: a wrong password was answered "is it running? (rabbitmq-server
    -detached)", which sends the operator to a broker that runs fine."""
    parts = urlsplit(broker_settings.url)
    if where == "wrong-password":
        url = parts._replace(
            netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}"
        )
    else:
        url = parts._replace(path=f"/no-such-vhost-{uuid.uuid4().hex[:8]}")
    env = {
        **os.environ,
        **broker_env(broker_settings),
        "RABBITMQ_URL": url.geturl(),
        "DATABASE_URL": database_url,
        **own_ports(),
    }
    if command == ["worker"]:
        env["STRIPE_API_KEY"] = "sk_test_x"  # (`up` without it runs the local stand-in)

    result = run_fulfillment(*command, env=env, timeout_s=60)

    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fulfillment {command[0]}: RABBITMQ_URL: the broker at ")
    assert says in last and "not-the-password" not in result.stderr
    assert "rabbitmq-server" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["migrate"], ["worker"], ["up"]])
def test_a_database_that_refuses_the_login_says_so_and_does_not_say_start_it(
    broker_settings: BrokerSettings, database_url: str, command: list[str]
) -> None:
    """New-user trial: with no role of that name (the default URL names no user, so the
    login name is taken) the answer was "is it running? start it", twice, for a server
    that runs fine."""
    parts = urlsplit(database_url)
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    url = parts._replace(netloc=f"{role}:secret-pw@{parts.hostname}:{parts.port}").geturl()
    env = {**os.environ, **broker_env(broker_settings), **own_ports(), "DATABASE_URL": url}
    if command == ["worker"]:
        env["STRIPE_API_KEY"] = "sk_test_x"

    result = run_fulfillment(*command, env=env, timeout_s=60)

    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fulfillment {command[0]}: DATABASE_URL: PostgreSQL at ")
    assert f'refused the login (role "{role}" does not exist)' in last
    assert "secret-pw" not in result.stderr and "pg_ctlcluster" not in result.stderr


def test_up_says_which_service_is_unreachable_and_how_to_start_it(
    broker_settings: BrokerSettings,
) -> None:
    env = {
        **os.environ,
        **broker_env(broker_settings),
        **own_ports(),
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    }
    result = run_fulfillment("up", env=env)
    assert result.returncode != 0
    assert "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:" in result.stderr
    # RabbitMQ runs, on another port: not "start it", but "is the port wrong?"
    port = result.stderr.split("127.0.0.1:")[1].split("/")[0]
    assert f"nothing is listening on 127.0.0.1:{port}" in result.stderr
    assert "is RabbitMQ there, or is the port wrong?" in result.stderr

    env = {
        **os.environ,
        **broker_env(broker_settings),
        **own_ports(),
        "DATABASE_URL": f"postgresql://127.0.0.1:{free_port()}/x",
    }
    result = run_fulfillment("up", env=env)
    assert result.returncode != 0
    assert "PostgreSQL" in result.stderr and "pg_ctlcluster" in result.stderr


@pytest.mark.parametrize(
    ("command", "setting", "message"),
    [
        (["ingress"], {"INGRESS_PORT": "99999"}, "INGRESS_PORT must be at most 65535, got 99999"),
        # the host is what is wrong, so it is the host's setting that is named
        (["ingress"], {"INGRESS_HOST": "999.1.1.1"}, "INGRESS_HOST: cannot listen on 999.1.1.1"),
        (["up"], {"INGRESS_HOST": "999.1.1.1"}, "INGRESS_HOST: cannot listen on 999.1.1.1"),
        (
            ["worker"],
            {"WORKER_METRICS_HOST": "192.0.2.1", "WORKER_METRICS_PORT": "0"},
            "WORKER_METRICS_HOST: cannot listen on 192.0.2.1",
        ),
        (
            ["worker"],
            {"WORKER_METRICS_PORT": "70000"},
            "WORKER_METRICS_PORT must be at most 65535, got 70000",
        ),
        (
            ["up", "--workers", "2"],
            {"WORKER_METRICS_PORT": "65535"},
            "WORKER_METRICS_PORT 65535 leaves no room for 2 workers",
        ),
        (
            ["up", "--workers", "3"],
            {"INGRESS_PORT": "9102", "WORKER_METRICS_PORT": "9100"},
            "INGRESS_PORT 9102 is one of the workers' metrics ports "
            "(WORKER_METRICS_PORT 9100 to 9102)",
        ),
        # up checks its children's settings itself: a child refusing one at its start would
        # be restarted forever while the ingress queued events no worker took
        (["up"], {"STRIPE_API_KEY": "pk_test_x"}, "STRIPE_API_KEY must start with sk_ or rk_"),
        (["up"], {"INGRESS_MAX_BODY_BYTES": "abc"}, "INGRESS_MAX_BODY_BYTES"),
        (["up"], {"SMTP_URL": "http://mail"}, "SMTP_URL"),
        (["up"], {"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
        (
            ["up"],
            {"STRIPE_WEBHOOK_SECRETS": ""},
            "STRIPE_API_KEY is set but STRIPE_WEBHOOK_SECRETS is not",
        ),
        (  # new-user trial: accepted, then every Checkout page was Stripe's "unrecognized URL"
            ["up"],
            {"CHECKOUT_PRICE": "price_x", "STRIPE_API_KEY": "", "STRIPE_WEBHOOK_SECRETS": ""},
            "CHECKOUT_PRICE is set but STRIPE_API_KEY is not",
        ),
    ],
)
def test_a_bad_setting_stops_the_command_before_it_starts_anything(
    command: list[str], setting: dict[str, str], message: str
) -> None:
    result = _start_refused(command, setting)
    assert message in result.stderr


def test_up_names_two_settings_on_one_port_even_when_that_port_is_taken() -> None:
    # The stand-in (no Stripe key: a local run) on worker-2's metrics port: wrong on any
    # machine, so said as such, not as "in use" because something here listens on it.
    base = free_port(3)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", base + 2))
        taken.listen()
        result = _start_refused(
            ["up", "--workers", "2"],
            {
                "STRIPE_API_KEY": "",
                "STRIPE_WEBHOOK_SECRETS": "",
                "INGRESS_PORT": str(base),
                "WORKER_METRICS_PORT": str(base + 1),
                "STANDIN_PORT": str(base + 2),
            },
        )
    assert f"STANDIN_PORT {base + 2} is also WORKER_METRICS_PORT's port" in result.stderr


def _start_refused(command: list[str], setting: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command with a bad setting: exit 2 with a one-line reason, before any broker
    connection (none listens at this URL: a start-up that got that far would say so)."""
    env = {
        **os.environ,
        "STRIPE_WEBHOOK_SECRETS": "whsec_test",
        "STRIPE_API_KEY": "sk_test_x",
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        **setting,
    }
    result = run_fulfillment(*command, env=env, timeout_s=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "RabbitMQ" not in result.stderr
    return result


@pytest.mark.parametrize(
    "command",
    [
        ["up"],
        ["ingress"],
        ["worker"],
        ["migrate"],
        ["topology"],
        ["status"],
        ["dlq", "list"],
        ["dlq", "show"],
        ["dlq", "replay"],
        ["dlq", "purge"],
        ["backfill"],
    ],
)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = run_fulfillment(*command, "--help", timeout_s=30)
    assert result.returncode == 0
    assert "example:" in result.stdout and "fulfillment " in result.stdout
