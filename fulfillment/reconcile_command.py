"""``fulfillment reconcile``'s command line: its argument types, and what it prints.

Light to import (the command line builds its parser from it); the run itself is in
:mod:`fulfillment.reconcile`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from shared import runtime
from shared.vocabulary import ACCOUNT_ID

if TYPE_CHECKING:
    from fulfillment.reconcile import ReconcileResult

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """``90m``, ``12h``, ``3d``, ``2w`` or combined (``1d12h``): a span back from now."""
    wanted = text.strip().lower()
    parts = re.findall(r"(\d+)([smhdw])", wanted)
    if not parts or "".join(n + u for n, u in parts) != wanted:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 90m, 12h, 3d or 2w)")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if not seconds:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {text!r}")
    if seconds > time.time():
        raise argparse.ArgumentTypeError(f"reaches back before 1970: {text!r}")
    return timedelta(seconds=seconds)


def account_id(text: str) -> str:
    if not ACCOUNT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a connected account id (acct_…): {text!r}")
    return text


def command(args: argparse.Namespace) -> int:
    """Run it with the environment's settings; print the result (``--json``: one object)."""
    from fulfillment.reconcile import ReconcileSettings, reconcile
    from shared.settings import BrokerSettings
    from shared.stripe_client import StripeSettings
    from worker.settings import database_url_from_env

    result = runtime.run(
        reconcile(
            StripeSettings.from_env(),
            BrokerSettings.from_env(),
            database_url_from_env(os.environ),
            ReconcileSettings.from_env(),
            since=args.since,
            accounts=args.accounts or (),
            dry_run=args.dry_run,
        )
    )
    print(json.dumps(result.summary(), indent=2) if args.json else render(result))
    return 0


def render(result: ReconcileResult) -> str:
    """A line per account, then the ids of its paid sessions without a fulfillment."""
    from fulfillment.reconcile import iso

    lines = []
    for a in result.accounts:
        cursor = " (from the cursor)" if a.from_cursor else ""
        line = (
            f"{a.account or 'platform'}: {a.checked} complete session(s) created "
            f"{iso(a.since)} to {iso(a.until)}{cursor}; {len(a.missing)} paid without "
            "a fulfillment"
        )
        if a.missing:
            todo = len(a.missing) - len(a.held)
            line += f": would queue {todo}" if result.dry_run else f": queued {len(a.queued)}"
            if a.held:
                line += f", {len(a.held)} queued by a run less than an hour ago"
        lines.append(line)
        lines += [f"  {sid}" for sid in a.missing]
    return "\n".join(lines)
