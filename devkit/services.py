"""Throwaway PostgreSQL clusters and RabbitMQ nodes, for runs that break infrastructure.

The chaos run and the fault tests restart databases and stop broker nodes. They do it to
instances of their own, made here in a temporary directory, so that the machine's own
PostgreSQL and RabbitMQ (and whatever else uses them) are never touched: a PostgreSQL
cluster made with ``initdb``, as pytest-postgresql does, and RabbitMQ nodes started beside
the default one, each with its own node name, ports and directories (joined into a cluster
when asked for several).

Both need the servers' programs installed (Debian: postgresql, rabbitmq-server). As root,
PostgreSQL runs as the ``postgres`` user and RabbitMQ drops to ``rabbitmq`` by itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ServiceUnavailable(RuntimeError):
    """Raised when this machine cannot run a throwaway instance (programs or rights missing)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_service_user(user: str) -> list[str]:
    """Run a server's command as its own user when we are root (both refuse to run as root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--"]
    return []


# --- PostgreSQL ---------------------------------------------------------------------------


def _pg_bindir() -> Path:
    # Debian keeps the real programs per version; what is on PATH may be its wrapper
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "pg_ctl").exists():
            return root
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise ServiceUnavailable("PostgreSQL's programs (initdb, pg_ctl) are not installed")


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of its own: trust authentication, user ``postgres``, on a free
    port of 127.0.0.1, its data in a temporary directory removed by ``close``."""

    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fx-pg-")))

    def __post_init__(self) -> None:
        self._bin = _pg_bindir()
        self._user = _as_service_user("postgres")
        if self._user:
            shutil.chown(self.root, "postgres")
        data = self.root / "data"
        self._run(
            "initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        self.data = data

    @property
    def url(self) -> str:
        """The server's URL (database ``postgres``)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        # stdout not captured: a server pg_ctl starts inherits it and would hold the pipe
        result = subprocess.run(
            [*self._user, str(self._bin / program), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceUnavailable(f"{program} failed: {result.stderr.strip()[-500:]}")

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args)

    def _options(self) -> tuple[str, ...]:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        return ("-o", options, "-l", str(self.root / "log"), "-w", "-t", "60")

    def start(self) -> None:
        self._ctl(*self._options(), "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop (every client connection dropped) and start again."""
        self._ctl(*self._options(), "-m", "fast", "restart")

    def close(self) -> None:
        with contextlib.suppress(ServiceUnavailable, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


# --- RabbitMQ -----------------------------------------------------------------------------


@dataclass
class RabbitNode:
    """One RabbitMQ node beside the machine's own: its own name, ports and directories."""

    name: str  # e.g. fx-a-1f2e@localhost
    port: int
    dist_port: int
    root: Path
    management_port: int | None = None  # the management plugin's HTTP API, when enabled

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str | None:
        if self.management_port is None:
            return None
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
        }

    def ctl(self, *args: str, timeout_s: float = 120) -> str:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            capture_output=True, text=True, timeout=timeout_s, env=self.env(),
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"rabbitmqctl {' '.join(args)} on {self.name} failed: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result.stdout

    def start(self) -> None:
        """Start the node (its Erlang VM and the rabbit application) and wait until it runs."""
        (self.root / "pid").unlink(missing_ok=True)
        result = subprocess.run(
            ["rabbitmq-server", "-detached"],
            capture_output=True, text=True, timeout=60, env=self.env(),
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceUnavailable(f"rabbitmq-server failed: {result.stderr.strip()[-500:]}")
        self.ctl("wait", str(self.root / "pid"), "--timeout", "90", timeout_s=120)

    def stop(self) -> None:
        """Stop the whole node, as a machine going away would (clients are disconnected)."""
        self.ctl("stop")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "90")


def _prepare(name: str, *, management: bool = False) -> RabbitNode:
    if not shutil.which("rabbitmq-server") or not shutil.which("rabbitmqctl"):
        raise ServiceUnavailable("RabbitMQ's programs (rabbitmq-server, rabbitmqctl) are missing")
    if os.geteuid() != 0:
        # Debian's rabbitmq-server runs only as root (which drops to rabbitmq) or as rabbitmq
        raise ServiceUnavailable("starting a RabbitMQ node of our own needs root here")
    root = Path(tempfile.mkdtemp(prefix=f"fx-rmq-{name.split('@')[0]}-"))
    port = free_port()
    node = RabbitNode(
        name=name,
        port=port,
        dist_port=free_port(),
        root=root,
        management_port=free_port() if management else None,
    )
    (root / "mnesia").mkdir()
    (root / "log").mkdir()
    # loopback_users = none: guest may connect from 127.0.0.1 only anyway (the listener)
    config = f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"
    if management:
        # statistics every second (5 by default), so that rates show up in a short test
        config += (
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {node.management_port}\n"
            "collect_statistics_interval = 1000\n"
        )
    (root / "rabbitmq.conf").write_text(config)
    (root / "enabled_plugins").write_text("[rabbitmq_management].\n" if management else "[].\n")
    for path in (root, *root.rglob("*")):
        shutil.chown(path, "rabbitmq", "rabbitmq")
    return node


@dataclass
class PrivateRabbit:
    """One or more RabbitMQ nodes of our own; with several, a cluster (all joined to the first)."""

    nodes: list[RabbitNode]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """RABBITMQ_URL for the whole cluster: every node's URL, comma-separated."""
        return ",".join(self.urls)

    def node_named(self, name: str) -> RabbitNode:
        for node in self.nodes:
            if node.name == name or node.name.split("@")[0] == name:
                return node
        raise KeyError(name)

    def close(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(ServiceUnavailable, subprocess.TimeoutExpired):
                node.stop()
        for node in self.nodes:
            _wait_gone(node)
            shutil.rmtree(node.root, ignore_errors=True)


def _wait_gone(node: RabbitNode, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    pid_file = node.root / "pid"
    while time.monotonic() < deadline:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


@contextlib.contextmanager
def private_rabbitmq(
    size: int = 1, *, prefix: str = "fx", management: bool = False
) -> Iterator[PrivateRabbit]:
    """``size`` nodes started (and clustered), stopped and removed on exit; with
    ``management`` each serves the management plugin's HTTP API too."""
    token = os.urandom(3).hex()
    names: Sequence[str] = [f"{prefix}-{chr(ord('a') + i)}-{token}@localhost" for i in range(size)]
    rabbit = PrivateRabbit([])
    try:
        for name in names:
            node = _prepare(name, management=management)
            rabbit.nodes.append(node)
            node.start()
        first = rabbit.nodes[0]
        for node in rabbit.nodes[1:]:
            node.stop_app()
            node.ctl("join_cluster", first.name)
            node.start_app()
        yield rabbit
    finally:
        rabbit.close()
