"""``fulfillment``: one console script; each subcommand's code lives in its role's package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, NoReturn

from fulfillment.reconcile_command import account_id, duration
from shared import runtime
from shared.errors import FulfillmentError

if TYPE_CHECKING:
    from shared.settings import BrokerSettings

EPILOG = """examples:
  fulfillment up --workers 2          # migrate, declare, run the ingress and 2 workers
  fulfillment demo                    # the same with Stripe stood in, and sample orders
  fulfillment ingress                 # serve POST /webhooks/stripe on $INGRESS_PORT
  fulfillment worker --concurrency 64 # consume the fulfillment queue
  fulfillment status                  # queue depths, consumers, dead letters
  fulfillment dlq list --type checkout.session.completed
  fulfillment dlq replay --all --dry-run
  fulfillment backfill --since 2026-11-01
  fulfillment reconcile --dry-run     # paid Checkout Sessions with no fulfillment
"""

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line on stderr (then exit 2), as every
    other error of this command is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


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


def _one_selection(given: dict[str, object]) -> None:
    """Refuse a command told to select dead letters in more than one way at once."""
    chosen = [name for name, value in given.items() if value]
    if len(chosen) > 1:
        raise FulfillmentError(f"give one of {', '.join(given)}, not {' and '.join(chosen)}")


def _not_found(asked: Sequence[str], found: Sequence[str]) -> int:
    """Say which of the event ids asked for are not dead letters; the exit code."""
    missing = [event_id for event_id in asked if event_id not in set(found)]
    if missing:
        print(
            f"not in the DLQ: {' '.join(missing)} (a `status` or `dlq` command running at the "
            "same time holds the letters it reads until it ends: if one was, try again)",
            file=sys.stderr,
        )
    return 1 if missing else 0


def _setup(component: str) -> None:
    from shared.logging import configure_logging

    configure_logging(component)


def _broker() -> BrokerSettings:
    from shared.settings import BrokerSettings

    return BrokerSettings.from_env()


def _up(args: argparse.Namespace) -> int:
    from fulfillment.up import up

    _setup("up")
    return runtime.run(up(args.workers, demo=args.demo, keep_running=args.keep_running))


def _demo(args: argparse.Namespace) -> int:
    args.demo = True
    return _up(args)


def _ingress(args: argparse.Namespace) -> int:
    from ingress.main import run

    run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.main import run

    run(concurrency=args.concurrency)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from worker.db import migrate
    from worker.settings import database_url_from_env

    _setup("migrate")
    applied = runtime.run(migrate(database_url_from_env(os.environ)))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


def _topology(args: argparse.Namespace) -> int:
    from shared.topology import declare_on_broker

    _setup("topology")
    print(runtime.run(declare_on_broker(_broker())).describe())
    return 0


def _status(args: argparse.Namespace) -> int:
    from fulfillment.status import collect, render
    from worker.settings import database_url_from_env

    _setup("status")
    report = runtime.run(collect(_broker(), database_url_from_env(os.environ)))
    print(json.dumps(report, indent=2) if args.json else render(report))
    if report.get("database_error"):
        # the broker's part is shown; the command did not do all it is for
        print(f"fulfillment status: database: {report['database_error']}", file=sys.stderr)
        return 1
    return 0


def _dlq_list(args: argparse.Namespace) -> int:
    from fulfillment.dlq import list_dead_letters, print_table

    _setup("dlq")
    letters = runtime.run(list_dead_letters(_broker(), event_type=args.type, limit=args.limit))
    if args.json:
        print(json.dumps([dl.summary() for dl in letters], indent=2))
    else:
        print_table(letters)
    return 0


def _dlq_show(args: argparse.Namespace) -> int:
    from fulfillment.dlq import show_dead_letter

    _setup("dlq")
    dl = runtime.run(show_dead_letter(_broker(), args.event_id))
    if dl is None:  # as replay and purge say it of an id not found: exit 1
        return _not_found([args.event_id], [])
    print(json.dumps(dl.summary(), indent=2))
    print("\nheaders:")
    print(json.dumps(dl.headers, indent=2, default=str, sort_keys=True))
    print("\nbody:")
    try:
        print(json.dumps(json.loads(dl.body), indent=2))
    except (ValueError, UnicodeDecodeError):
        print(dl.body.decode("utf-8", "replace"))
    return 0


def _progress(verb: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{verb} {done}/{total}", end="" if done < total else "\n", file=sys.stderr)
        elif done == total or done % 100 == 0:
            print(f"{verb} {done}/{total}", file=sys.stderr)

    return report


def _dlq_replay(args: argparse.Namespace) -> int:
    from fulfillment.dlq import replay

    _setup("dlq")
    if not (args.event_ids or args.type or args.all):
        raise FulfillmentError("say what to replay: EVENT_ID..., --type T or --all")
    _one_selection({"EVENT_ID...": args.event_ids, "--type": args.type, "--all": args.all})
    result = runtime.run(
        replay(
            _broker(),
            args.event_ids,
            event_type=args.type,
            everything=args.all,
            dry_run=args.dry_run,
            rate_per_s=args.rate,
            progress=_progress("replayed"),
        )
    )
    if args.dry_run:
        print(f"dry run: {result.matched} dead letter(s) would be replayed")
        for event_id in result.event_ids:
            print(f"  {event_id}")
        return _not_found(args.event_ids, result.event_ids)
    print(f"replayed {result.replayed} of {result.matched} matching dead letter(s)", end="")
    print(f"; {result.failed} failed and stayed in the DLQ" if result.failed else "")
    missing = _not_found(args.event_ids, result.event_ids)
    return 1 if result.failed or missing else 0


def _dlq_purge(args: argparse.Namespace) -> int:
    from fulfillment.dlq import purge

    _setup("dlq")
    if not (args.event_ids or args.all):
        raise FulfillmentError("say what to purge: EVENT_ID... or --all")
    _one_selection({"EVENT_ID...": args.event_ids, "--all": args.all})
    what = "ALL dead letters" if args.all else f"{len(args.event_ids)} dead letter(s)"
    if not args.yes:
        if not sys.stdin.isatty():
            raise FulfillmentError(f"refusing to purge {what} without --yes")
        answer = input(f"Permanently delete {what}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    removed = runtime.run(purge(_broker(), args.event_ids, everything=args.all))
    print(f"purged {len(removed)} dead letter(s)")
    for dl in removed:
        print(f"  {dl.event_id} {dl.event_type} ({dl.error_type})")
    return _not_found(args.event_ids, [dl.event_id for dl in removed])


# Stripe's /v1/events returns the last 30 days of events only.
STRIPE_EVENT_RETENTION = timedelta(days=30)


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date: {text!r} (use 2026-11-27 or ISO 8601)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _backfill(args: argparse.Namespace) -> int:
    from fulfillment.backfill import backfill
    from shared.stripe_client import StripeSettings
    from worker.settings import database_url_from_env

    _setup("backfill")
    now = datetime.now(UTC)
    if args.since >= now:
        raise FulfillmentError(f"--since {args.since.isoformat()} is in the future")
    if args.until is not None and args.until <= args.since:
        raise FulfillmentError(
            f"--until {args.until.isoformat()} is not after --since {args.since.isoformat()} "
            "(--until is exclusive): the window is empty"
        )
    if args.since < now - STRIPE_EVENT_RETENTION:
        print(
            f"note: Stripe lists events of the last {STRIPE_EVENT_RETENTION.days} days only; "
            "older ones cannot be backfilled (replay them from the DLQ, or recover from your "
            "own records)",
            file=sys.stderr,
        )
    result = runtime.run(
        backfill(
            StripeSettings.from_env(),
            _broker(),
            database_url_from_env(os.environ),
            since=args.since,
            until=args.until,
            everything=args.all,
            dry_run=args.dry_run,
            progress=_progress("enqueued"),
        )
    )
    print(
        f"listed {result.listed} event(s): {result.already_processed} already processed, "
        f"{result.already_enqueued} already enqueued by a backfill, "
        f"{'would enqueue' if args.dry_run else 'enqueued'} "
        f"{len(result.event_ids) if args.dry_run else result.enqueued}"
    )
    if args.dry_run:
        for event_id in result.event_ids:
            print(f"  {event_id}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from fulfillment.reconcile_command import command

    _setup("reconcile")
    return command(args)


def build_parser() -> Parser:
    parser = Parser(
        prog="fulfillment",
        description="Stripe Checkout fulfillment over RabbitMQ.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        if handler is not None:
            p.set_defaults(handler=handler)
        return p

    p = add(sub, "up", _up, "Migrate, declare the topology, run the ingress and N workers.",
            "fulfillment up --workers 2")  # fmt: skip
    p.add_argument("--workers", type=_at_least_one, default=2, metavar="N",
                   help="worker processes (2)")  # fmt: skip
    p.add_argument("--demo", action="store_true", help="the same as `fulfillment demo`")
    p.add_argument("--keep-running", action="store_true", help="with --demo: stay up after it")
    p = add(sub, "demo", _demo,
            "Run the stack with a local Stripe stand-in and a realistic mix of orders.",
            "fulfillment demo --keep-running")  # fmt: skip
    p.add_argument("--workers", type=_at_least_one, default=2, metavar="N",
                   help="worker processes (2)")  # fmt: skip
    p.add_argument("--keep-running", action="store_true",
                   help="stay up after the demo (try the Checkout pages)")  # fmt: skip
    add(sub, "ingress", _ingress, "Run the Stripe webhook HTTP ingress.",
        "STRIPE_WEBHOOK_SECRETS=whsec_... fulfillment ingress")  # fmt: skip
    p = add(sub, "worker", _worker, "Run a fulfillment worker (competing consumer).",
            "STRIPE_API_KEY=sk_test_... fulfillment worker --concurrency 64")  # fmt: skip
    p.add_argument("--concurrency", type=_at_least_one, default=None, metavar="N",
                   help="messages in flight (prefetch); $WORKER_CONCURRENCY or 32")  # fmt: skip
    add(sub, "migrate", _migrate, "Create or upgrade the database schema (safe concurrently).",
        "DATABASE_URL=postgresql://localhost/fulfillment fulfillment migrate")  # fmt: skip
    add(sub, "topology", _topology, "Declare the broker's exchanges and queues (idempotent).",
        "RABBITMQ_URL=amqp://guest:guest@localhost:5672/ fulfillment topology")  # fmt: skip
    p = add(sub, "status", _status, "Queue depths, consumers, dead letters, recent fulfillments.",
            "fulfillment status --json")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")

    dlq = add(sub, "dlq", None, "Inspect, replay or purge dead-lettered events.",
              "fulfillment dlq list")  # fmt: skip
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    p = add(dsub, "list", _dlq_list, "List dead letters, oldest failure first (none removed).",
            "fulfillment dlq list --type checkout.session.completed --limit 20")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--type", help="only this event type")
    p.add_argument("--limit", type=_at_least_one, metavar="N", help="at most N")
    p = add(dsub, "show", _dlq_show, "Show one dead letter's headers and body.",
            "fulfillment dlq show evt_1PgcB2B7WZ01zgkW")  # fmt: skip
    p.add_argument("event_id", metavar="EVENT_ID")
    p = add(dsub, "replay", _dlq_replay,
            "Move dead letters back to the work queue with a fresh attempt count.",
            "fulfillment dlq replay --type checkout.session.completed --rate 50")  # fmt: skip
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--type", help="every dead letter of this event type")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    p.add_argument("--rate", type=_above_zero, metavar="N", help="at most N replays per second")
    p = add(dsub, "purge", _dlq_purge, "Delete dead letters for good (asks unless --yes).",
            "fulfillment dlq purge evt_1PgcB2B7WZ01zgkW --yes")  # fmt: skip
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--yes", action="store_true", help="do not ask")

    p = add(sub, "backfill", _backfill,
            "Enqueue Stripe events of the handled types that were not processed.",
            "fulfillment backfill --since 2026-11-20 --until 2026-11-21 --dry-run")  # fmt: skip
    p.add_argument("--since", type=_date, required=True, help="start date (UTC unless given)")
    p.add_argument("--until", type=_date, help="end date, exclusive")
    p.add_argument("--all", action="store_true",
                   help="also events Stripe delivered (default: only undelivered)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list what would be enqueued")

    p = add(sub, "reconcile", _reconcile,
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # here, where a reader gone away is caught below, not at exit
    except FulfillmentError as exc:
        # one line, whatever the message holds (Stripe's own messages span several)
        print(f"fulfillment {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`dlq list | head`): nothing more to say, and no traceback
        # when the interpreter flushes stdout on its way out
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process ended by SIGPIPE
    return code
