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
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import runtime
from shared.backoff import compute_backoff
from shared.errors import ConfigError, FulfillmentError
from shared.settings import MAX_PORT, BrokerSettings, env_float, env_port, listen_error
from shared.topology import declare_on_broker
from worker.db import migrate
from worker.settings import SmtpSettings

RABBITMQ_HINT = "start it: rabbitmq-server -detached"


def say(line: str) -> None:
    print(f"up       | {line}", flush=True)


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
        return True
    return False


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
            # importing its modules was a KeyboardInterrupt traceback and an exit 1
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        self._pump_task = asyncio.create_task(self._pump(self.process))

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        prefix = f"{self.name:<8} | "
        while line := await process.stdout.readline():
            sys.stdout.write(prefix + line.decode(errors="replace"))
            sys.stdout.flush()

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


@dataclass
class LocalStack:
    """What ``up`` runs in its own process besides the children: stand-ins, and their closers."""

    closers: list[Callable[[], Any]] = field(default_factory=list)
    standin: Any = None  # the StripeStandIn, when Stripe is stood in for

    async def close(self) -> None:
        """Every closer, the last started first, each bounded: one that fails or hangs (a
        broker that stopped answering) does not keep the others open or ``up`` running."""
        for close in reversed(self.closers):
            try:
                result = close()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, timeout=5)
            except Exception as exc:
                say(f"closing a local stand-in failed: {type(exc).__name__}: {exc}")


# Where the local mail sink listens: the port of the workers' default SMTP_URL.
MAIL_SINK_PORT = SmtpSettings.port


@dataclass
class LocalPlan:
    """What ``up`` stands in for, decided (and written into the children's environment)
    before anything starts, so that every setting can be checked first."""

    standin_port: int | None = None  # the Stripe API stand-in's, when Stripe is stood in for
    mail_sink: bool = False  # on MAIL_SINK_PORT
    notes: list[str] = field(default_factory=list)  # said once things start


def _plan_local(env: dict[str, str], *, force_standin: bool = False) -> LocalPlan:
    """Fill in local stand-ins for Stripe and a mail relay where none is configured."""
    plan = LocalPlan()
    has_secret, has_key = bool(env.get("STRIPE_WEBHOOK_SECRETS")), bool(env.get("STRIPE_API_KEY"))
    if has_key and not has_secret and not force_standin:
        # real Stripe would get a 400 for every webhook (signed with a secret we lack)
        raise ConfigError(
            "STRIPE_API_KEY is set but STRIPE_WEBHOOK_SECRETS is not: set the endpoint's "
            "signing secret too, or neither for a local run"
        )
    if has_secret and not has_key and not force_standin:
        # real events name sessions the local stand-in never heard of
        raise ConfigError(
            "STRIPE_WEBHOOK_SECRETS is set but STRIPE_API_KEY is not: set a key too, or "
            "neither for a local run"
        )
    if env.get("CHECKOUT_PRICE") and not has_key and not force_standin:
        # the stand-in knows no price of the user's, and sells only in the demo
        raise ConfigError(
            "CHECKOUT_PRICE is set but STRIPE_API_KEY is not: the Checkout pages need Stripe "
            "(the local stand-in sells only in `fulfillment up --demo`)"
        )
    if not has_secret:
        env["STRIPE_WEBHOOK_SECRETS"] = "whsec_local" + secrets.token_hex(16)
        plan.notes.append(
            f"no STRIPE_WEBHOOK_SECRETS: sign test events with {env['STRIPE_WEBHOOK_SECRETS']}"
        )
    if force_standin or not has_key:
        from devkit.stripe import ADMIN

        plan.standin_port = env_port(env, "STANDIN_PORT", 12111)
        env["STRIPE_API_KEY"] = "sk_test_local_standin"
        env["STRIPE_API_BASE"] = f"http://127.0.0.1:{plan.standin_port}"
        plan.notes.append(
            f"Stripe: the local stand-in at {env['STRIPE_API_BASE']} answers the API"
            f" (seed sessions with POST {ADMIN}/sessions)"
        )
    if not env.get("SMTP_URL") and not _listening("127.0.0.1", MAIL_SINK_PORT):
        plan.mail_sink = True
        env["SMTP_URL"] = f"smtp://127.0.0.1:{MAIL_SINK_PORT}"
        plan.notes.append(
            f"no SMTP_URL and nothing on localhost:{MAIL_SINK_PORT}: a local mail sink "
            "prints each email"
        )
    elif not env.get("SMTP_URL"):
        plan.notes.append(
            f"mail: to what already listens on localhost:{MAIL_SINK_PORT} (SMTP_URL's default)"
        )
    return plan


@dataclass(frozen=True)
class Checked:
    """What ``up`` itself needs of the children's settings."""

    ingress_host: str
    metrics_host: str
    broker: BrokerSettings
    database_url: str


def _check_settings(env: dict[str, str], metrics_port: int) -> Checked:
    """Every child's settings, read as the child will: a bad value stops ``up`` before
    anything starts, instead of a child that exits at once and is restarted forever."""
    from ingress.checkout import CheckoutSettings
    from ingress.settings import IngressSettings
    from worker.settings import WorkerSettings

    ingress = IngressSettings.from_env(env)
    CheckoutSettings.from_env(env)
    worker = WorkerSettings.from_env({**env, "WORKER_METRICS_PORT": str(metrics_port)})
    return Checked(ingress.host, worker.metrics_host, worker.broker, worker.database_url)


async def _start_local(plan: LocalPlan, broker: BrokerSettings) -> LocalStack:
    """Start what the plan stands in for."""
    stack = LocalStack()
    if plan.standin_port is not None:
        from aiohttp import web

        from devkit.stripe import StripeStandIn

        stack.standin = StripeStandIn()
        runner = web.AppRunner(stack.standin.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", plan.standin_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise listen_error("STANDIN_PORT", "127.0.0.1", plan.standin_port, exc) from None
        stack.closers.append(runner.cleanup)
        # standing in for Stripe, so a local run: a subscriber to the outbound messages too,
        # printing each (nothing else is bound to them here, and the broker returns what no
        # queue is bound for)
        try:
            stack.closers.append(await _print_outbound(broker))
        except BaseException:
            await stack.close()
            raise
        plan.notes.append("outbound messages: a local subscriber prints each one")
    if plan.mail_sink:
        from devkit.mailsink import start_mail_sink

        server = await start_mail_sink(
            "127.0.0.1", MAIL_SINK_PORT, lambda line: print(f"mail     | {line}")
        )
        stack.closers.append(server.close)
    for note in plan.notes:
        say(note)
    return stack


async def _print_outbound(broker: BrokerSettings) -> Callable[[], Any]:
    """A queue bound to every outbound message, printing each; returns its closer. Named
    and durable, so a broker restart or a reconnect finds it still bound (an exclusive one
    went with the connection, and what the workers published meanwhile was returned);
    the broker deletes it a minute after ``up`` stopped using it."""
    import aio_pika

    from shared.topology import Topology
    from shared.vocabulary import HEADER_DEDUPE_ID

    topology = Topology.from_settings(broker)
    connection = await aio_pika.connect_robust(broker.url)
    channel = await connection.channel()
    queue = await channel.declare_queue(
        topology.named("up.outbound"), durable=True, arguments={"x-expires": 60_000}
    )
    await queue.bind(topology.out_exchange, routing_key="#")

    async def show(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            dedupe_id = str((message.headers or {}).get(HEADER_DEDUPE_ID))
            print(f"out      | {message.type} fulfillment-id={dedupe_id}")

    await queue.consume(show)
    return connection.close


async def _preflight(broker: BrokerSettings, database_url: str) -> bool:
    """RabbitMQ and PostgreSQL reachable, schema migrated, topology declared; else say why."""
    try:
        await declare_on_broker(broker)
    except ConfigError:
        raise  # it answered and refused us, or its queues differ: a setting to fix (exit 2)
    except FulfillmentError:
        print(
            f"fulfillment up: RabbitMQ is not reachable at {broker.display_url}; {RABBITMQ_HINT}",
            file=sys.stderr,
        )
        return False
    try:
        applied = await migrate(database_url)
    except ConfigError:
        raise  # it answered and refused the login: a setting to fix (exit 2)
    except FulfillmentError as exc:  # says how to start it
        print(f"fulfillment up: PostgreSQL: {exc}", file=sys.stderr)
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
        _probe(listener)


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
                raise listener.cannot_listen(exc) from None


def _children(
    env: dict[str, str], checked: Checked, workers: int, port: int, metrics_port: int
) -> list[Child]:
    children = [Child("ingress", ["ingress"], env)]
    say(
        f"ingress: POST http://{checked.ingress_host}:{port}/webhooks/stripe "
        "(healthz, readyz, metrics)"
    )
    for i in range(1, workers + 1):
        worker_port = metrics_port + i - 1 if metrics_port else 0
        children.append(
            Child(f"worker-{i}", ["worker"], {**env, "WORKER_METRICS_PORT": str(worker_port)})
        )
        where = (
            f"http://{checked.metrics_host}:{worker_port}/metrics"
            if worker_port
            else "a free port (its `worker metrics listening` line names it)"
        )
        say(f"worker-{i}: metrics and healthz on {where}")
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
    # (asyncio's own Ctrl-C handling cancelled whatever ran then, and a retry swallowed it)
    stopping = runtime.stop_requested()
    env = dict(os.environ)
    if sys.stdout.isatty():
        env.setdefault("LOG_FORMAT", "console")
    # a bad value stops us before anything starts
    port, metrics_port = _ports(env, workers)
    plan = _plan_local(env, force_standin=demo)
    checked = _check_settings(env, metrics_port)
    _check_ports_free(_listeners(checked, workers, port, metrics_port, plan))
    ready = await runtime.unless_stopped(_preflight(checked.broker, checked.database_url), stopping)
    if not ready:
        return 1 if ready is False else _stopped_before_start()
    stack = await _start_local(plan, checked.broker)
    scenario = None
    if demo:
        from fulfillment.demo import Demo

        scenario = Demo(env, stack.standin)
        stack.closers.append(scenario.close)
    if stopping.is_set():
        await stack.close()
        return _stopped_before_start()
    children = _children(env, checked, workers, port, metrics_port)
    say("Ctrl-C stops everything")

    for child in children:
        await child.start()
    tasks = [asyncio.ensure_future(child.supervise(stopping)) for child in children]
    if scenario is not None:
        tasks.append(asyncio.ensure_future(scenario.run(stopping, keep_running=keep_running)))
    await asyncio.gather(*tasks)

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
    return 1 if unclean else 0


# A child's exit codes that mean it stopped cleanly: 0, or ended by a stop signal itself,
# which only happens before it installed its handlers (still starting, holding nothing):
# our SIGTERM, or a terminal's SIGINT that reached it between its fork and its own session.
CLEAN = (0, -signal.SIGTERM, -signal.SIGINT)


def _stopped_before_start() -> int:
    say("stopped before anything started")
    return 0
