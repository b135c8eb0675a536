"""``fulfillment``: one console script; each subcommand's code lives in its role's package."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from fulfillment import commands
from fulfillment.reconcile_command import account_id, duration
from fulfillment.sendable import KINDS
from shared.errors import FulfillmentError
from shared.setting_names import CHECKED_MARK, unknown_settings
from shared.vocabulary import CHECKOUT_SESSION_ID

EPILOG = """examples:
  fulfillment up --workers 2          # migrate, declare, run the ingress and 2 workers
  fulfillment send checkout.session.completed  # a signed test event to the ingress
  fulfillment demo                    # the same with Stripe stood in, and sample orders
  fulfillment ingress                 # serve POST /webhooks/stripe on $INGRESS_PORT
  fulfillment worker --concurrency 64 # consume the fulfillment queue
  fulfillment status --watch          # queue depths, consumers, dead letters
  fulfillment dlq list --type checkout.session.completed
  fulfillment dlq replay --all --dry-run
  fulfillment backfill --since 2026-11-01
  fulfillment checkout-link --customer cus_NffrFeUfNV2Hib
  fulfillment reconcile --dry-run     # paid Checkout Sessions with no fulfillment
"""

Handler = Callable[[argparse.Namespace], int]


def version() -> str:
    from importlib import metadata  # only when asked: it takes longer than the rest of the CLI

    try:
        return metadata.version("stripe-checkout-fulfillment")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        print(f"fulfillment {version()}")  # on stdout, as argparse's own --version
        parser.exit(0)


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line on stderr (then exit 2), as every
    other error of this command is, and an unknown choice gets the nearest one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        names = [str(choice) for choice in choices]
        what = str(action.metavar or action.dest).lower()
        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f" (one of: {', '.join(names)})"
        raise argparse.ArgumentError(None, f"unknown {what} {value!r}{hint}")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _above_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _session_id(text: str) -> str:
    if not CHECKOUT_SESSION_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a Checkout Session id (cs_test_… or cs_live_…): {text!r}"
        )
    return text


_UNROUTED_HELP = (
    "instead of dead letters, the handled events no queue took "
    "(stripe.events.unrouted.handled: sent while the work queue was missing)"
)


def build_parser() -> Parser:
    parser = Parser(
        prog="fulfillment",
        description="Stripe Checkout fulfillment over RabbitMQ.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: argparse._SubParsersAction[Parser],
        name: str,
        handler: Handler | None,
        help_: str,
        example: str,
    ) -> Parser:
        p = parent.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # what its errors and warnings start with: `fulfillment dlq list: …`
        p.set_defaults(prog=p.prog)
        if handler is not None:
            p.set_defaults(handler=handler)
        return p

    p = add(sub, "up", commands.up, "Migrate, declare the topology, run the ingress and N workers.",
            "fulfillment up --workers 2")  # fmt: skip
    p.add_argument("--workers", type=_at_least_one, default=2, metavar="N",
                   help="worker processes (2)")  # fmt: skip
    p.add_argument("--demo", action="store_true", help="the same as `fulfillment demo`")
    p.add_argument("--keep-running", action="store_true", help="with --demo: stay up after it")
    p = add(sub, "send", commands.send,
            "Sign an event of TYPE as Stripe would and post it to the ingress "
            "(seeding a fitting session in the local Stripe stand-in).",
            "fulfillment send checkout.session.completed")  # fmt: skip
    p.add_argument("type", metavar="TYPE", choices=sorted(KINDS), help=", ".join(sorted(KINDS)))
    p.add_argument("--session", metavar="cs_…", type=_session_id,
                   help="an existing Checkout Session (default: a new one, seeded)")  # fmt: skip
    p.add_argument("--url", help="the webhook route (default: INGRESS_HOST/INGRESS_PORT's, "
                   "on localhost)")  # fmt: skip
    p = add(sub, "demo", commands.demo,
            "Run the stack with a local Stripe stand-in and a realistic mix of orders.",
            "fulfillment demo --keep-running")  # fmt: skip
    p.add_argument("--workers", type=_at_least_one, default=2, metavar="N",
                   help="worker processes (2)")  # fmt: skip
    p.add_argument("--keep-running", action="store_true",
                   help="stay up after the demo (try the Checkout pages)")  # fmt: skip
    add(sub, "ingress", commands.ingress, "Run the Stripe webhook HTTP ingress.",
        "STRIPE_WEBHOOK_SECRETS=whsec_... fulfillment ingress")  # fmt: skip
    p = add(sub, "worker", commands.worker, "Run a fulfillment worker (competing consumer).",
            "STRIPE_API_KEY=sk_test_... fulfillment worker --concurrency 64")  # fmt: skip
    p.add_argument("--concurrency", type=_at_least_one, default=None, metavar="N",
                   help="messages in flight (prefetch); $WORKER_CONCURRENCY or 32")  # fmt: skip
    add(sub, "migrate", commands.migrate,
        "Create or upgrade the database schema (safe concurrently).",
        "DATABASE_URL=postgresql://localhost/fulfillment fulfillment migrate")  # fmt: skip
    add(sub, "topology", commands.topology,
        "Declare the broker's exchanges and queues (idempotent).",
        "RABBITMQ_URL=amqp://guest:guest@localhost:5672/ fulfillment topology")  # fmt: skip
    p = add(sub, "status", commands.status,
            "Queue depths, consumers, dead letters, recent fulfillments.",
            "fulfillment status --watch 5")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", type=_above_zero, nargs="?", const=2.0, metavar="SECONDS",
                   help="show it again every SECONDS (2) until Ctrl-C")  # fmt: skip

    dlq = add(sub, "dlq", None, "Inspect, replay or purge dead-lettered events.",
              "fulfillment dlq list")  # fmt: skip
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    p = add(dsub, "list", commands.dlq_list,
            "List dead letters, oldest failure first (none removed).",
            "fulfillment dlq list --type checkout.session.completed --limit 20")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--type", help="only this event type")
    p.add_argument("--limit", type=_at_least_one, metavar="N", help="at most N")
    p.add_argument("--unrouted", action="store_true", help=_UNROUTED_HELP)
    p = add(dsub, "show", commands.dlq_show, "Show one dead letter's headers and body.",
            "fulfillment dlq show evt_1PgcB2B7WZ01zgkW")  # fmt: skip
    p.add_argument("event_id", metavar="EVENT_ID")
    p = add(dsub, "replay", commands.dlq_replay,
            "Move dead letters back to the work queue with a fresh attempt count.",
            "fulfillment dlq replay --type checkout.session.completed --rate 50")  # fmt: skip
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--type", help="every dead letter of this event type")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    p.add_argument("--rate", type=_above_zero, metavar="N", help="at most N replays per second")
    p.add_argument("--unrouted", action="store_true", help=_UNROUTED_HELP)
    p = add(dsub, "purge", commands.dlq_purge, "Delete dead letters for good (asks unless --yes).",
            "fulfillment dlq purge evt_1PgcB2B7WZ01zgkW --yes")  # fmt: skip
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--yes", action="store_true", help="do not ask")

    p = add(sub, "checkout-link", commands.checkout_link,
            "Print a signed link to the Checkout page, on PUBLIC_URL, for one customer.",
            "fulfillment checkout-link --customer cus_NffrFeUfNV2Hib --expires-in 30m")  # fmt: skip
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", metavar="CUS_ID", help="an existing customer (cus_…)")
    who.add_argument("--email", metavar="ADDRESS", help="a new customer's email, prefilled")
    p.add_argument("--expires-in", type=commands.duration, default=timedelta(minutes=30),
                   metavar="DURATION", help="how long the link works (30m)")  # fmt: skip

    p = add(sub, "backfill", commands.backfill,
            "Enqueue Stripe events of the handled types that were not processed.",
            "fulfillment backfill --since 2026-11-20 --until 2026-11-21 --dry-run")  # fmt: skip
    p.add_argument("--since", type=commands.date, required=True,
                   help="start date (UTC unless given)")  # fmt: skip
    p.add_argument("--until", type=commands.date, help="end date, exclusive")
    p.add_argument("--all", action="store_true",
                   help="also events Stripe delivered (default: only undelivered)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list what would be enqueued")

    p = add(sub, "reconcile", commands.reconcile,
            "Queue a fulfillment for every paid Checkout Session that has none.",
            "fulfillment reconcile --since 7d --dry-run --json")  # fmt: skip
    p.add_argument("--since", type=duration, metavar="DURATION",
                   help="sessions created this long ago or later, e.g. 12h or 7d (default: "
                        "from where the last run left off, else 3d)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="say what it would queue; change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--account", dest="accounts", action="append", type=account_id,
                   metavar="ACCT",
                   help="a connected account's sessions too (repeatable)")  # fmt: skip
    return parser


def warn_about_unknown_settings(prog: str) -> None:
    """Once per command: `up` marks its children's environment, so they do not repeat it."""
    if os.environ.get(CHECKED_MARK):
        return
    for note in unknown_settings(os.environ):
        print(f"{prog}: warning: {note}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warn_about_unknown_settings(args.prog)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # here, where a reader gone away is caught below, not at exit
    except FulfillmentError as exc:
        # one line, whatever the message holds (Stripe's own messages span several)
        print(f"{args.prog}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`dlq list | head`): nothing more to say, and no traceback
        # when the interpreter flushes stdout on its way out
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process ended by SIGPIPE
    return code
