"""``fulfillment status``: queue depths, consumers, recent fulfillments, oldest dead letter."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from fulfillment.dlq import age_s, dead_letters, existing_queue
from shared.settings import BrokerSettings, redact_url
from shared.topology import Topology, connect

# status reads at most this many dead letters to find the oldest.
STATUS_SCAN_LIMIT = 10_000


async def collect(broker: BrokerSettings, database_url: str) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-able document."""
    topology = Topology.from_settings(broker)
    report: dict[str, Any] = {"broker": broker.display_url, "queues": {}}
    connection = await connect(broker)
    async with connection:
        channel = await connection.channel()
        for name in topology.all_queues:
            declared = await existing_queue(channel, name, broker)
            report["queues"][name] = {
                "messages": declared.message_count or 0,
                "consumers": declared.consumer_count or 0,
            }
        oldest = None
        scanned = 0
        if report["queues"][topology.dead_queue]["messages"]:
            # read them all: a queue's head is not its oldest letter (see fulfillment/dlq.py)
            async with dead_letters(broker, at_most=STATUS_SCAN_LIMIT) as (_, _, held):
                ages = [age for dl, _ in held if (age := age_s(dl)) is not None]
                scanned = len(held)
            oldest = max(ages, default=None)
        report["oldest_dead_letter_age_s"] = round(oldest, 1) if oldest is not None else None
        # not all read (over the limit, or held by another reader): the oldest of those read
        report["dead_letters_scanned"] = scanned
        report["oldest_dead_letter_partial"] = (
            scanned < report["queues"][topology.dead_queue]["messages"] and oldest is not None
        )
    report["consumers"] = report["queues"][topology.work_queue]["consumers"]
    report["database"] = redact_url(database_url)
    try:
        conn = await asyncpg.connect(database_url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        report["fulfillments_last_hour"] = None
        report["database_error"] = f"{type(exc).__name__}: {exc}"
    else:
        try:
            report["fulfillments_last_hour"] = await conn.fetchval(
                "SELECT count(*) FROM fulfillments WHERE created_at > now() - interval '1 hour'"
            )
            report["awaiting_payment"] = await conn.fetchval(
                "SELECT count(*) FROM checkout_sessions WHERE state = 'awaiting_payment'"
            )
        except asyncpg.UndefinedTableError:
            report["fulfillments_last_hour"] = None
            report["database_error"] = "schema missing: run `fulfillment migrate`"
        finally:
            await conn.close()
    report["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


def render(report: dict[str, Any]) -> str:
    # a queue's ready messages: what its consumers hold unacked is not counted (the
    # broker's management API knows that; AMQP does not say)
    lines = [f"broker {report['broker']}", "", f"{'QUEUE':48} {'READY':>9} {'CONSUMERS':>9}"]
    for name, q in report["queues"].items():
        lines.append(f"{name:48} {q['messages']:>9} {q['consumers']:>9}")
    age = report["oldest_dead_letter_age_s"]
    recent = report.get("fulfillments_last_hour")
    partial = f" (at least: {report.get('dead_letters_scanned', 0):,} of them read)"
    lines += [
        "",
        f"oldest dead letter: {_duration(age) + ' old' if age is not None else 'none'}"
        + (partial if report.get("oldest_dead_letter_partial") else ""),
        f"fulfillments in the last hour: {'unknown' if recent is None else recent}"
        + (f"  ({report['database_error']})" if report.get("database_error") else ""),
    ]
    if report.get("awaiting_payment") is not None:
        lines.append(f"sessions awaiting a delayed payment: {report['awaiting_payment']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
