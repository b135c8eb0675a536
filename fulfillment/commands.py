"""What each ``fulfillment`` command does once its arguments are parsed: each calls into
the role package whose work it is, and returns the exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TextIO

from shared import runtime
from shared.errors import FulfillmentError
from shared.vocabulary import STRIPE_HANDLED_TYPES

if TYPE_CHECKING:
    from shared.settings import BrokerSettings


def _setup(component: str) -> None:
    from shared.logging import configure_logging

    configure_logging(component)


def _broker() -> BrokerSettings:
    from shared.settings import BrokerSettings

    return BrokerSettings.from_env()


def _say(args: argparse.Namespace, line: str) -> None:
    """A line on stderr, in the command's own name, as its errors are."""
    print(f"{args.prog}: {line}", file=sys.stderr)


def up(args: argparse.Namespace) -> int:
    from fulfillment.up import up

    _setup("up")
    return runtime.run(up(args.workers, demo=args.demo, keep_running=args.keep_running))


def demo(args: argparse.Namespace) -> int:
    args.demo = True
    return up(args)


def ingress(args: argparse.Namespace) -> int:
    from ingress.main import run

    run()
    return 0


def worker(args: argparse.Namespace) -> int:
    from worker.main import run

    run(concurrency=args.concurrency)
    return 0


def migrate(args: argparse.Namespace) -> int:
    from worker.db import migrate
    from worker.settings import database_url_from_env

    _setup("migrate")
    applied = runtime.run(migrate(database_url_from_env(os.environ)))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


def topology(args: argparse.Namespace) -> int:
    from shared.topology import declare_on_broker

    _setup("topology")
    print(runtime.run(declare_on_broker(_broker())).describe())
    return 0


def colour(stream: TextIO) -> bool:
    """Whether to colour what goes to ``stream``: a terminal, unless NO_COLOR is set."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def status(args: argparse.Namespace) -> int:
    from fulfillment.status import DeadLetterScan, collect, management_url
    from worker.settings import database_url_from_env

    _setup("status")
    broker = _broker()
    sources = (broker, database_url_from_env(os.environ), management_url(os.environ, broker))
    if args.watch:
        scan = DeadLetterScan()  # read again only when their number changes
        return runtime.run(_watch(args, lambda: collect(*sources, last_scan=scan)))
    report = runtime.run(collect(*sources))
    _show_status(args, report)
    if report.get("database_error"):
        # the broker's part is shown; the command did not do all it is for
        _say(args, f"database: {report['database_error']}")
        return 1
    return 0


def _show_status(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from fulfillment.status import render

    print(json.dumps(report, indent=2) if args.json else render(report, colour=colour(sys.stdout)))


async def _watch(
    args: argparse.Namespace, collect: Callable[[], Coroutine[Any, Any, dict[str, Any]]]
) -> int:
    """The status again every ``--watch`` seconds, in place on a terminal, until Ctrl-C."""
    clear = sys.stdout.isatty() and not args.json
    # Ctrl-C ends the watch at once, whatever a look is waiting for (a broker going away)
    stopping = runtime.stop_requested()

    async def pause() -> bool:
        """Wait until the next look; True once asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), args.watch)
        return stopping.is_set()

    first = True
    while True:
        try:
            report = await runtime.unless_stopped(collect(), stopping)
        except FulfillmentError as exc:
            if first:
                raise  # a setting to fix, or nothing there: as without --watch
            # the broker went away while watching: say so, and look again
            _say(args, f"{time.strftime('%H:%M:%S')} {exc}")
            if await pause():
                return stopping.exit_code
            continue
        if report is None:
            return stopping.exit_code
        first = False
        if clear:
            print("\x1b[H\x1b[2J", end="")  # home, then clear the screen
        if args.json:
            print(json.dumps(report))  # a document a line
        else:
            _show_status(args, report)
            print(f"\n{report['at']}, every {args.watch:g}s (Ctrl-C stops)")
            if not clear:
                print()
        sys.stdout.flush()
        if await pause():
            return stopping.exit_code


def send(args: argparse.Namespace) -> int:
    from fulfillment.send import send

    sent = runtime.run(send(os.environ, args.type, session_id=args.session, url=args.url))
    where = f" (seeded in the stand-in at {sent.seeded_in})" if sent.seeded_in else ""
    print(f"{args.type} {sent.event_id} for {sent.session_id}{where}")
    print(f"POST {sent.url} -> {sent.status} {' '.join(sent.answer.split())}")
    return 0 if 200 <= sent.status < 300 else 1


# --- dlq -------------------------------------------------------------------------------


def _one_selection(given: dict[str, object]) -> None:
    """Refuse a command told to select dead letters in more than one way at once."""
    chosen = [name for name, value in given.items() if value]
    if len(chosen) > 1:
        raise FulfillmentError(f"give one of {', '.join(given)}, not {' and '.join(chosen)}")


def _not_found(args: argparse.Namespace, asked: Sequence[str], found: Sequence[str]) -> int:
    """Say which of the event ids asked for are not dead letters; the exit code."""
    missing = [event_id for event_id in asked if event_id not in set(found)]
    if missing:
        _say(
            args,
            f"not in the DLQ: {' '.join(missing)} (a `status` or `dlq` command running at the "
            "same time holds the letters it reads until it ends: if one was, try again)",
        )
    return 1 if missing else 0


def _matched_none(args: argparse.Namespace, types: Counter[str]) -> int:
    """A --type that picked no dead letter says so, and what there is, and exits 1 (as grep
    does, and as an event id not in the DLQ does): a typo must not read as all clear."""
    if not types:
        _say(args, f"no dead letters (none of type {args.type}, nor of any other)")
        return 1
    held = ", ".join(f"{name} ({count})" for name, count in types.most_common())
    close = difflib.get_close_matches(args.type, [*types, *STRIPE_HANDLED_TYPES], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    _say(args, f"no dead letter of type {args.type}{hint}; the DLQ holds: {held}")
    return 1


def dlq_list(args: argparse.Namespace) -> int:
    from fulfillment.dlq import print_table, select_dead_letters

    _setup("dlq")
    selection = runtime.run(
        select_dead_letters(
            _broker(), event_type=args.type, limit=args.limit, unrouted=args.unrouted
        )
    )
    if args.json:
        print(json.dumps([dl.summary() for dl in selection.letters], indent=2))
    if args.type and not selection.letters:
        return _matched_none(args, selection.types)
    if not args.json:
        print_table(selection.letters)
    return 0


def dlq_show(args: argparse.Namespace) -> int:
    from fulfillment.dlq import show_dead_letter, shown

    _setup("dlq")
    dl = runtime.run(show_dead_letter(_broker(), args.event_id))
    if dl is None:  # as replay and purge say it of an id not found: exit 1
        return _not_found(args, [args.event_id], [])
    print(json.dumps(dl.summary(), indent=2))
    # JSON escapes control characters; a header of another type (bytes) is shown by repr
    print("\nheaders:")
    print(json.dumps(dl.headers, indent=2, default=lambda v: shown(str(v)), sort_keys=True))
    print("\nbody:")
    try:
        print(json.dumps(json.loads(dl.body), indent=2))
    except (ValueError, UnicodeDecodeError, RecursionError):
        print(shown(dl.body.decode("utf-8", "replace")))
    return 0


def _progress(verb: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{verb} {done}/{total}", end="" if done < total else "\n", file=sys.stderr)
        elif done == total or done % 100 == 0:
            print(f"{verb} {done}/{total}", file=sys.stderr)

    return report


def dlq_replay(args: argparse.Namespace) -> int:
    from fulfillment.dlq import print_table, replay

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
            unrouted=args.unrouted,
        )
    )
    if args.type and not result.matched:
        return _matched_none(args, result.types)
    if args.dry_run:
        print(f"dry run: {result.matched} dead letter(s) would be replayed:")
        if result.letters:
            print_table(result.letters)
        return _not_found(args, args.event_ids, result.event_ids)
    print(f"replayed {result.replayed} of {result.matched} matching dead letter(s)", end="")
    print(f"; {result.failed} failed and stayed in the DLQ" if result.failed else "")
    missing = _not_found(args, args.event_ids, result.event_ids)
    return 1 if result.failed or missing else 0


def dlq_purge(args: argparse.Namespace) -> int:
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
    return _not_found(args, args.event_ids, [dl.event_id for dl in removed])


# --- backfill --------------------------------------------------------------------------

# Stripe's /v1/events returns the last 30 days of events only.
STRIPE_EVENT_RETENTION = timedelta(days=30)


def date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date: {text!r} (use 2026-11-27 or ISO 8601)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def backfill(args: argparse.Namespace) -> int:
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
        _say(
            args,
            f"note: Stripe lists events of the last {STRIPE_EVENT_RETENTION.days} days only; "
            "older ones cannot be backfilled (replay them from the DLQ, or recover from your "
            "own records)",
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


def duration(text: str) -> timedelta:
    from fulfillment.checkout_link import parse_duration

    return parse_duration(text)


def checkout_link(args: argparse.Namespace) -> int:
    from fulfillment.checkout_link import checkout_link

    print(checkout_link(customer=args.customer, email=args.email, expires_in=args.expires_in))
    return 0


def reconcile(args: argparse.Namespace) -> int:
    from fulfillment.reconcile_command import command

    _setup("reconcile")
    return command(args)
