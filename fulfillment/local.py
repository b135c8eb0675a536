"""What ``fulfillment up`` stands in for on one machine, and runs in its own process.

Planned first (:func:`plan_local`, written into the children's environment) so that every
setting is checked before anything starts; started once the broker and the database are
ready (:func:`start_local`). Here the product imports ``devkit`` (as ``send`` does, to
sign a test event, and nowhere else): the Stripe stand-in, the demo and the mail sink, each
when the plan asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fulfillment.console import colour, say, show, table
from fulfillment.dlq import list_dead_letters
from shared.errors import ConfigError
from shared.http_server import quiet_unparseable_requests
from shared.settings import BrokerSettings, env_port, listen_error
from worker.settings import SmtpSettings

# Where the local mail sink listens: the port of the workers' default SMTP_URL.
MAIL_SINK_PORT = SmtpSettings.port

# The demo's queues are apart: under this BROKER_PREFIX (or after the one set, with a dot).
DEMO_PREFIX = "demo"

# The local webhook signing secret, kept under the working directory (git-ignored) so that
# it stays the same from one `up` to the next, as `stripe listen` keeps one per device.
SECRET_FILE = Path(".fulfillment") / "local-webhook-secret"


_SECRET = re.compile(r"whsec_\w+")  # one secret: no comma, which would make it two


def _make_secret(path: Path) -> str:
    """A new secret in a new file only this user may read (raises if the file exists)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    secret = "whsec_local" + secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret


def local_secret(*, create: bool) -> tuple[str | None, Path]:
    """The local signing secret and its file; made (readable by this user only) when there
    is none and ``create``, else None."""
    path = Path.cwd() / SECRET_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        if not create:
            return None, path
        try:
            return _make_secret(path), path
        except FileExistsError:  # another `up` made it a moment ago: theirs it is
            return local_secret(create=False)
        except OSError as exc:
            raise ConfigError(
                f"cannot keep a local webhook secret in {path} ({exc.strerror}): run from a "
                "directory you may write to, or set STRIPE_WEBHOOK_SECRETS"
            ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the local webhook secret in {path}: {exc}") from None
    if not _SECRET.fullmatch(secret):
        raise ConfigError(
            f"{path} does not hold a whsec_… secret: delete it, and `fulfillment up` makes a "
            "new one"
        )
    return secret, path


class Scenario(Protocol):
    """Something ``up`` runs beside its children until it is done or ``stopping`` is set."""

    async def run(self, stopping: asyncio.Event, *, keep_running: bool) -> bool:
        """Play it out (True), unless ``up`` cancels it first."""


@dataclass
class LocalStack:
    """What ``up`` runs in its own process besides the children: stand-ins, and their closers."""

    closers: list[Callable[[], Any]] = field(default_factory=list)
    scenario: Scenario | None = None  # the demo, when ``up`` runs one

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


@dataclass
class LocalPlan:
    """What ``up`` stands in for, decided (and written into the children's environment)
    before anything starts, so that every setting can be checked first."""

    local_secret: Path | None = None  # the file of the secret used when none is set
    standin_for_secret: bool = False  # STRIPE_WEBHOOK_SECRETS without a key: stand in for the API
    standin_port: int | None = None  # the Stripe API stand-in's, when Stripe is stood in for
    mail_sink: bool = False  # on MAIL_SINK_PORT
    mail_to_default: bool = False  # no SMTP_URL, but something already listens there
    demo: bool = False


def plan_local(env: dict[str, str], *, demo: bool = False) -> LocalPlan:
    """Fill in local stand-ins for Stripe and a mail relay where none is configured; with
    ``demo`` Stripe is always stood in for."""
    plan = LocalPlan(demo=demo)
    has_secret, has_key = bool(env.get("STRIPE_WEBHOOK_SECRETS")), bool(env.get("STRIPE_API_KEY"))
    if has_key and not has_secret and not demo:
        # real Stripe would get a 400 for every webhook (signed with a secret we lack)
        raise ConfigError(
            "STRIPE_API_KEY is set but STRIPE_WEBHOOK_SECRETS is not: set the endpoint's "
            "signing secret too, or neither for a local run"
        )
    if has_secret and not has_key and not demo:
        plan.standin_for_secret = True  # a local run with a secret of the user's choosing
    if env.get("CHECKOUT_PRICE") and not has_key and not demo:
        # the stand-in knows no price of the user's, and sells only in the demo
        raise ConfigError(
            "CHECKOUT_PRICE is set but STRIPE_API_KEY is not: the Checkout pages need Stripe "
            "(the local stand-in sells only in `fulfillment up --demo`)"
        )
    if not has_secret:
        secret, plan.local_secret = local_secret(create=True)
        assert secret is not None
        env["STRIPE_WEBHOOK_SECRETS"] = secret
    if demo:
        # queues of its own: the DLQ on-call watches does not get the demo's dead letter, and
        # no worker of the same broker and prefix (real Stripe behind it) takes its events
        prefix = env.get("BROKER_PREFIX", "").strip()
        env["BROKER_PREFIX"] = f"{prefix}.{DEMO_PREFIX}" if prefix else DEMO_PREFIX
    if demo or not has_key:
        plan.standin_port = env_port(env, "STANDIN_PORT", 12111)
        env["STRIPE_API_KEY"] = "sk_test_local_standin"
        env["STRIPE_API_BASE"] = f"http://127.0.0.1:{plan.standin_port}"
        # the stand-in knows its sessions at once: its 404 is final (the demo's dead letter
        # then shows at once, not after two delay queues)
        env.setdefault("STRIPE_NOT_FOUND_RETRIES", "0")
    if not env.get("SMTP_URL") and not _listening("127.0.0.1", MAIL_SINK_PORT):
        plan.mail_sink = True
        env["SMTP_URL"] = f"smtp://127.0.0.1:{MAIL_SINK_PORT}"
    elif not env.get("SMTP_URL"):
        plan.mail_to_default = True
    return plan


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
        return True
    return False


async def start_local(plan: LocalPlan, env: dict[str, str], broker: BrokerSettings) -> LocalStack:
    """Start what the plan stands in for, then say what was filled in and where."""
    stack = LocalStack()
    notes = []
    if plan.local_secret:
        notes.append(
            f"no STRIPE_WEBHOOK_SECRETS: sign test events with {env['STRIPE_WEBHOOK_SECRETS']} "
            f"(kept in {plan.local_secret}; `fulfillment send` signs with it)"
        )
    if plan.standin_for_secret:
        notes.append(
            "STRIPE_WEBHOOK_SECRETS without STRIPE_API_KEY: the local stand-in answers the API "
            "(it knows only the sessions seeded in it; set STRIPE_API_KEY for real Stripe's)"
        )
    if plan.standin_port is not None:
        notes.append(await _stand_in_for_stripe(stack, plan.standin_port, plan.demo, env, broker))
    if plan.mail_sink:
        from devkit.mailsink import start_mail_sink

        server = await start_mail_sink("127.0.0.1", MAIL_SINK_PORT, lambda line: show("mail", line))
        stack.closers.append(server.close)
        notes.append(
            f"no SMTP_URL and nothing on localhost:{MAIL_SINK_PORT}: a local mail sink "
            "prints each email"
        )
    elif plan.mail_to_default:
        notes.append(
            f"mail: to what already listens on localhost:{MAIL_SINK_PORT} (SMTP_URL's default)"
        )
    if plan.standin_port is not None:
        notes.append("outbound messages: a local subscriber prints each one")
    if plan.demo:
        prefix = env["BROKER_PREFIX"]
        notes.append(
            f"the demo's queues are its own (BROKER_PREFIX={prefix}): see its dead letter with "
            f"`BROKER_PREFIX={prefix} fulfillment dlq list`"
        )
    for note in notes:
        say(note)
    return stack


async def _stand_in_for_stripe(
    stack: LocalStack, port: int, demo: bool, env: dict[str, str], broker: BrokerSettings
) -> str:
    """The Stripe API stand-in on ``port``, a subscriber printing the outbound messages, and
    the demo if asked for, their closers on ``stack``; what to say about it."""
    from aiohttp import web

    from devkit.stripe import ADMIN, StripeStandIn

    quiet_unparseable_requests()  # the stand-in is an aiohttp server of this process
    standin = StripeStandIn()
    runner = web.AppRunner(standin.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except OSError as exc:
        await runner.cleanup()
        raise listen_error("STANDIN_PORT", "127.0.0.1", port, exc) from None
    stack.closers.append(runner.cleanup)
    # standing in for Stripe, so a local run: a subscriber to the outbound messages too,
    # printing each (nothing else is bound to them here, and the broker returns what no
    # queue is bound for)
    try:
        stack.closers.append(await _print_outbound(broker))
    except BaseException:
        await stack.close()
        raise
    if demo:
        from devkit.demo import Demo

        async def dead_letter_ids() -> list[str]:
            return [letter.event_id for letter in await list_dead_letters(broker)]

        scenario = Demo(
            env,
            standin,
            say=say,
            table=table("demo"),
            dead_letter_ids=dead_letter_ids,
            colour=colour(),
        )
        stack.closers.append(scenario.close)
        stack.scenario = scenario
    return (
        f"Stripe: the local stand-in at {env['STRIPE_API_BASE']} answers the API"
        f" (seed sessions with POST {ADMIN}/sessions)"
    )


async def _print_outbound(broker: BrokerSettings) -> Callable[[], Any]:
    """A queue bound to every outbound message, printing each; returns its closer. Named
    and durable, so a broker restart or a reconnect finds it still bound (an exclusive one
    would go with the connection, and the broker would return what the workers published
    meanwhile); the broker deletes it a minute after ``up`` stopped using it."""
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

    async def show_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            dedupe_id = str((message.headers or {}).get(HEADER_DEDUPE_ID))
            show("out", f"{message.type} fulfillment-id={dedupe_id}")

    await queue.consume(show_message)
    return connection.close
