"""``fulfillment up``: the whole pipeline on one machine, for development and small installs.

Checks RabbitMQ and PostgreSQL (and says how to start whichever is missing), migrates,
declares the topology, then runs one ingress and N worker processes, their log lines
prefixed, restarting any that dies, until Ctrl-C or SIGTERM stops them all cleanly.

With no Stripe credentials it stands in for Stripe locally: a throwaway webhook secret is
printed (sign test events with it), and without STRIPE_API_KEY the local Stripe API
stand-in answers the workers. Without SMTP_URL and nothing listening on localhost:1025, a
local mail sink prints each email it receives.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import sys
import urllib.request
from dataclasses import dataclass
from typing import Any

from fulfillment.console import let_go, link_host, prefix, say, write
from fulfillment.local import MAIL_SINK_PORT, LocalPlan, plan_local, start_local
from fulfillment.schedule import Schedule
from shared import runtime
from shared.backoff import compute_backoff
from shared.errors import ConfigError, FulfillmentError
from shared.setting_names import CHECKED_MARK
from shared.settings import MAX_PORT, BrokerSettings, env_float, env_port, listen_error
from shared.topology import declare_on_broker
from worker.db import migrate

if sys.platform == "linux":
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork
    _PR_SET_PDEATHSIG = 1

    _UP_PID = os.getpid()

    def _die_with_parent() -> None:
        """In a child, before exec: SIGTERM (a clean stop) when ``up`` dies, even by
        SIGKILL, instead of serving on as an orphan that a new ``up`` then shares its
        port with (SO_REUSEPORT)."""
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != _UP_PID:  # up died before that took effect: go at once
            os._exit(1)

else:  # elsewhere (macOS, for development) children outlive a killed ``up``

    def _die_with_parent() -> None:
        pass


class Child:
    """One supervised process with a name; its output lines are prefixed with the name."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name, self.args, self.env = name, args, env
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._pump_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fulfillment", *self.args,
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            # Signals come from us, not from the terminal: a Ctrl-C reaching a child still
            # importing its modules would end it in a KeyboardInterrupt traceback, exit 1
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        self._pump_task = asyncio.create_task(self._pump(self.process))

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        name = prefix(self.name)
        while line := await process.stdout.readline():
            write(name + line.decode(errors="replace").rstrip("\n") + "\n")

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Restart the process whenever it exits, until ``stopping`` is set."""
        while True:
            assert self.process is not None
            exited = asyncio.ensure_future(self.process.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            exited.cancel()
            if stopping.is_set():
                return
            self.restarts += 1
            delay = compute_backoff(self.restarts, base_s=0.5, max_s=10)
            say(f"{self.name} exited with {self.process.returncode}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)
            if stopping.is_set():
                return
            await self.start()

    async def stop(self, timeout_s: float, now: asyncio.Event) -> int:
        """SIGTERM, wait for a clean exit, kill after ``timeout_s`` or once ``now`` is set;
        the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        exited = asyncio.ensure_future(self.process.wait())
        forced = asyncio.ensure_future(now.wait())
        await asyncio.wait({exited, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not exited.done():
            self.process.kill()
        code = await exited
        if self._pump_task is not None:
            await self._pump_task
        return code


@dataclass(frozen=True)
class Checked:
    """What ``up`` itself needs of the children's settings."""

    ingress_host: str
    metrics_host: str
    broker: BrokerSettings
    database_url: str
    ingress_metrics_host: str
    ingress_metrics_port: int


def _check_settings(env: dict[str, str], metrics_port: int) -> Checked:
    """Every child's settings, read as the child will: a bad value stops ``up`` before
    anything starts, instead of a child that exits at once and is restarted forever."""
    from ingress.checkout import CheckoutSettings
    from ingress.settings import IngressSettings
    from worker.settings import WorkerSettings

    ingress = IngressSettings.from_env(env)
    CheckoutSettings.from_env(env)
    worker = WorkerSettings.from_env({**env, "WORKER_METRICS_PORT": str(metrics_port)})
    return Checked(
        ingress.host,
        worker.metrics_host,
        worker.broker,
        worker.database_url,
        ingress.metrics_host,
        ingress.metrics_port,
    )


async def _preflight(broker: BrokerSettings, database_url: str) -> bool:
    """RabbitMQ and PostgreSQL reachable, schema migrated, topology declared; else say why."""
    try:
        await declare_on_broker(broker)
    except ConfigError:
        raise  # it answered and refused us, or its queues differ: a setting to fix (exit 2)
    except FulfillmentError as exc:  # says where it looked, and what to check
        print(f"fulfillment up: {exc}", file=sys.stderr)
        return False
    try:
        applied = await migrate(database_url)
    except ConfigError:
        raise  # it answered and refused the login: a setting to fix (exit 2)
    except FulfillmentError as exc:  # names PostgreSQL, and says how to start it
        print(f"fulfillment up: {exc}", file=sys.stderr)
        return False
    say(f"database ready ({len(applied)} migration(s) applied); broker topology declared")
    return True


def _ports(env: dict[str, str], workers: int) -> tuple[int, int]:
    """The ingress's port and the first worker's metrics port (worker N: + N - 1)."""
    port = env_port(env, "INGRESS_PORT", 8080)
    metrics_port = env_port(env, "WORKER_METRICS_PORT", 9100)
    if metrics_port and metrics_port + workers - 1 > MAX_PORT:
        raise ConfigError(
            f"WORKER_METRICS_PORT {metrics_port} leaves no room for {workers} workers "
            f"(worker N listens on WORKER_METRICS_PORT + N - 1, at most {MAX_PORT})"
        )
    if metrics_port and port and metrics_port <= port < metrics_port + workers:
        raise ConfigError(
            f"INGRESS_PORT {port} is one of the workers' metrics ports "
            f"(WORKER_METRICS_PORT {metrics_port} to {metrics_port + workers - 1})"
        )
    return port, metrics_port


@dataclass(frozen=True)
class Listener:
    """A port something started by ``up`` listens on."""

    setting: str
    host: str
    port: int
    reuse_port: bool = False  # the ingress: several may share a port
    host_setting: str | None = None  # the setting the host came from, if any

    def cannot_listen(self, exc: OSError) -> ConfigError:
        return listen_error(self.setting, self.host, self.port, exc, host_setting=self.host_setting)


def _listeners(
    checked: Checked, workers: int, port: int, metrics_port: int, plan: LocalPlan
) -> list[Listener]:
    wanted = [
        Listener(
            "INGRESS_PORT", checked.ingress_host, port, reuse_port=True, host_setting="INGRESS_HOST"
        )
    ]
    wanted.append(
        Listener(
            "INGRESS_METRICS_PORT",
            checked.ingress_metrics_host,
            checked.ingress_metrics_port,
            host_setting="INGRESS_METRICS_HOST",
        )
    )
    if metrics_port:
        wanted += [Listener("WORKER_METRICS_PORT", checked.metrics_host, metrics_port + i,
                            host_setting="WORKER_METRICS_HOST")
                   for i in range(workers)]  # fmt: skip
    if plan.standin_port:
        wanted.append(Listener("STANDIN_PORT", "127.0.0.1", plan.standin_port))
    if plan.mail_sink:
        wanted.append(Listener("the local mail sink's port", "127.0.0.1", MAIL_SINK_PORT))
    return [listener for listener in wanted if listener.port]  # 0: any free port


def _check_ports_free(listeners: list[Listener]) -> None:
    """No two listeners on one port, and each port can be bound now: a child that cannot
    listen exits at once, and restarting it would go on forever while the rest look fine."""
    seen: dict[int, str] = {}
    for listener in listeners:  # first the settings' own clash, wrong on any machine
        if listener.port in seen:
            raise ConfigError(
                f"{listener.setting} {listener.port} is also {seen[listener.port]}'s port"
            )
        seen[listener.port] = listener.setting
    for listener in listeners:  # then what this machine has listening already
        if listener.reuse_port and _ours_answers(listener):
            # the ingress's port can be shared (SO_REUSEPORT): ours would serve beside it
            raise _another_up(listener)
        _probe(listener)


def _ours_answers(listener: Listener) -> bool:
    """Whether a server of ours (an ingress, or a worker's metrics server) answers there."""
    url = f"http://{link_host(listener.host)}:{listener.port}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with direct.open(url, timeout=1) as answer:
            return bool(json.load(answer) == {"status": "ok"})
    except (OSError, ValueError):
        return False


def _another_up(listener: Listener) -> ConfigError:
    return ConfigError(
        f"another `fulfillment up` seems to be running: one of its servers answers on "
        f"{link_host(listener.host)}:{listener.port} ({listener.setting}); stop it first, or "
        "give this one other ports (INGRESS_PORT, WORKER_METRICS_PORT, STANDIN_PORT)"
    )


def _probe(listener: Listener) -> None:
    """Bind every address the host resolves to, as asyncio's create_server does."""
    try:
        addresses = socket.getaddrinfo(
            listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise listener.cannot_listen(exc) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if listener.reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and _ours_answers(listener):
                    raise _another_up(listener) from None
                raise listener.cannot_listen(exc) from None


def _children(
    env: dict[str, str], checked: Checked, workers: int, port: int, metrics_port: int
) -> list[Child]:
    children = [Child("ingress", ["ingress"], env)]
    ingress_metrics = (
        f"http://{link_host(checked.ingress_metrics_host)}:{checked.ingress_metrics_port}/metrics"
        if checked.ingress_metrics_port
        else "a free port (its `ingress metrics listening` line names it)"
    )
    say(
        f"ingress: POST http://{link_host(checked.ingress_host)}:{port}/webhooks/stripe "
        f"(healthz, readyz); metrics on {ingress_metrics}"
    )
    for i in range(1, workers + 1):
        worker_port = metrics_port + i - 1 if metrics_port else 0
        children.append(
            Child(f"worker-{i}", ["worker"], {**env, "WORKER_METRICS_PORT": str(worker_port)})
        )
        where = (
            f"http://{link_host(checked.metrics_host)}:{worker_port}/metrics"
            if worker_port
            else "a free port (its `worker metrics listening` line names it)"
        )
        say(f"worker-{i}: metrics, healthz and readyz on {where}")
    return children


# Signals closer together than this are one request to stop: GNU timeout, for one, signals
# the command and then its whole process group. A person's second Ctrl-C comes later.
SAME_REQUEST_S = 0.5


async def up(workers: int, *, demo: bool = False, keep_running: bool = False) -> int:
    """Run the pipeline until a signal; 0 when everything stopped cleanly.

    With ``demo`` Stripe is always the local stand-in, the Checkout pages are on, and a
    mix of signed events goes through the ingress; unless ``keep_running``, it stops
    after the summary.
    """
    # Ctrl-C or SIGTERM from the start: while the broker and database are checked too
    # (asyncio's own Ctrl-C handling would cancel whatever runs then, and a retry could
    # swallow that cancellation)
    stopping = runtime.stop_requested()
    env = dict(os.environ)
    env[CHECKED_MARK] = "1"  # the children do not repeat what `fulfillment up` warned about
    if sys.stdout.isatty():
        env.setdefault("LOG_FORMAT", "console")
    # a bad value stops us before anything starts
    port, metrics_port = _ports(env, workers)
    plan = plan_local(env, demo=demo)
    checked = _check_settings(env, metrics_port)
    schedule = Schedule.from_env(env)  # reconcile, unless RECONCILE_INTERVAL_S is 0
    _check_ports_free(_listeners(checked, workers, port, metrics_port, plan))
    ready = await runtime.unless_stopped(_preflight(checked.broker, checked.database_url), stopping)
    if not ready:
        return 1 if ready is False else _stopped_before_start(stopping, demo)
    stack = await start_local(plan, env, checked.broker)
    if stopping.is_set():
        await stack.close()
        return _stopped_before_start(stopping, demo)
    children = _children(env, checked, workers, port, metrics_port)
    say("Ctrl-C stops everything")

    for child in children:
        await child.start()
    tasks: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(child.supervise(stopping)) for child in children
    ]
    if schedule is not None:
        tasks.append(asyncio.ensure_future(schedule.run(stopping)))
    played: asyncio.Future[bool | None] | None = None
    if stack.scenario is not None:
        # cut short at once by a stop signal: nothing more is sent or drawn after Ctrl-C
        scenario = stack.scenario.run(stopping, keep_running=keep_running)
        played = asyncio.ensure_future(runtime.unless_stopped(scenario, stopping))
        tasks.append(played)
    await asyncio.gather(*tasks)

    let_go()  # a table kept in place stays as last drawn; what follows goes below it
    say("stopping: the ingress answers what it holds, workers finish theirs")
    say("(Ctrl-C again kills them now: the broker redelivers what a worker had not finished)")
    kill_now = runtime.stop_requested(ignore_for_s=SAME_REQUEST_S)  # a second request
    grace_s = env_float(env, "WORKER_GRACE_S", 30.0, minimum=0) + 15
    codes = await asyncio.gather(*(child.stop(grace_s, kill_now) for child in children))
    await stack.close()
    unclean = [(c, code) for c, code in zip(children, codes, strict=True) if code not in CLEAN]
    for child, code in unclean:
        say(f"{child.name} exited with {code}")
    say("stopped")
    if played is not None and not played.result():
        return stopping.exit_code  # the demo did not finish: 130 after a Ctrl-C
    return 1 if unclean else 0


# A child's exit codes that mean it stopped cleanly: 0, or ended by a stop signal itself,
# which only happens before it installed its handlers (still starting, holding nothing):
# our SIGTERM, or a terminal's SIGINT that reached it between its fork and its own session.
CLEAN = (0, -signal.SIGTERM, -signal.SIGINT)


def _stopped_before_start(stopping: runtime.StopRequest, demo: bool) -> int:
    say("stopped before anything started")
    return stopping.exit_code if demo else 0  # a demo stopped is a demo not shown
