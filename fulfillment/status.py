"""``fulfillment status``: queue depths, consumers, recent fulfillments, oldest dead letter;
unacked messages and rates from RabbitMQ's management API where it answers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import aiormq
import asyncpg

from fulfillment.dlq import dead_letters, declared_queue, existing_queue, failed_at
from shared.logging import mask_secrets
from shared.settings import BrokerSettings, Env, env_url, redact_url
from shared.topology import Topology, connect

# The management plugin's port; AMQP does not tell unacked messages or rates.
MANAGEMENT_PORT = 15672
MANAGEMENT_TIMEOUT_S = 3.0

# status reads at most this many dead letters to find the oldest.
STATUS_SCAN_LIMIT = 10_000


def management_url(env: Env, broker: BrokerSettings) -> str:
    """RABBITMQ_MANAGEMENT_URL, else the broker's host on the plugin's port, with its user
    and password."""
    parts = urlsplit(broker.url.split(",")[0])
    user = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    default = f"http://{user}{host}:{MANAGEMENT_PORT}/"
    return env_url(env, "RABBITMQ_MANAGEMENT_URL", default, schemes=("http", "https"))


@dataclass
class DeadLetterScan:
    """What reading the DLQ found: its depth then, how many letters were read, and when the
    oldest failed. ``status --watch`` reads the letters again only when the depth changed,
    since reading holds them (a replay or purge meanwhile would not see them)."""

    depth: int = -1
    scanned: int = 0
    oldest_at: float | None = None


async def collect(
    broker: BrokerSettings,
    database_url: str,
    management: str | None = None,
    last_scan: DeadLetterScan | None = None,
) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-able document; ``last_scan`` (updated here)
    spares reading the dead letters again while their number stays the same."""
    topology = Topology.from_settings(broker)
    report: dict[str, Any] = {
        "broker": broker.display_url,
        "dead_queue": topology.dead_queue,
        "queues": {},
    }
    from_database = await _from_database(database_url, topology)
    other_delay_queues = from_database.pop("other_delay_queues")
    connection = await connect(broker)
    async with connection:
        for name in topology.all_queues:
            # a delay queue is declared by the first worker with this RETRY_DELAYS_S: maybe
            # none yet; every other queue by `fulfillment topology`, or it is an error
            if name in topology.retry_queues:
                found = await declared_queue(connection, name)
            else:
                found = await existing_queue(connection, name, broker)
            report["queues"][name] = (
                _depth(found)
                if found is not None
                else {"messages": None, "consumers": None, "missing": True}
            )
        for name in other_delay_queues:
            # another RETRY_DELAYS_S's, which its workers recorded (gone if deleted since)
            if (found := await declared_queue(connection, name)) is not None:
                report["queues"][name] = {**_depth(found), "other_schedule": True}
        depth = report["queues"][topology.dead_queue]["messages"]
        scan = last_scan if last_scan is not None else DeadLetterScan()
        if depth != scan.depth:
            scan.depth, scan.scanned, scan.oldest_at = depth, 0, None
            if depth:
                # read them all: a queue's head is not its oldest letter (see fulfillment/dlq.py)
                async with dead_letters(broker, at_most=STATUS_SCAN_LIMIT) as (_, _, held):
                    failed = [failed_at(dl) for dl, _ in held if dl.last_failed_at is not None]
                    scan.scanned = len(held)
                scan.oldest_at = min(failed, default=None)
        oldest = None if scan.oldest_at is None else time.time() - scan.oldest_at
        report["oldest_dead_letter_age_s"] = round(oldest, 1) if oldest is not None else None
        # not all read (over the limit, or held by another reader): the oldest of those read
        report["dead_letters_scanned"] = scan.scanned
        report["oldest_dead_letter_partial"] = scan.scanned < depth and oldest is not None
    report["consumers"] = report["queues"][topology.work_queue]["consumers"]
    if management is not None:
        report.update(await _from_management(management, broker, list(report["queues"])))
    report.update(from_database)
    report["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


async def _from_management(url: str, broker: BrokerSettings, names: list[str]) -> dict[str, Any]:
    """Unacked messages and rates (per second: published in, acknowledged out) of each
    queue, or why the management API could not say."""
    parts = urlsplit(url)
    vhost = unquote(urlsplit(broker.url.split(",")[0]).path[1:]) or "/"
    auth = aiohttp.BasicAuth(unquote(parts.username or "guest"), unquote(parts.password or ""))
    netloc = parts.netloc.rsplit("@", 1)[-1]
    api = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/api/queues/{quote(vhost, safe='')}"
    columns = "name,messages_unacknowledged,message_stats.publish_details.rate," + (
        "message_stats.ack_details.rate"
    )
    where = f"{parts.hostname}:{parts.port or MANAGEMENT_PORT}"
    try:
        timeout = aiohttp.ClientTimeout(total=MANAGEMENT_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout, auth=auth) as http,
            http.get(api, params={"columns": columns}) as answer,
        ):
            if answer.status != 200:
                return {"management_error": f"{where} answered {answer.status}"}
            found = await answer.json()
    except aiohttp.ClientConnectorError:
        return {"management_error": f"nothing answers on {where}"}
    except TimeoutError:
        return {"management_error": f"{where} did not answer within {MANAGEMENT_TIMEOUT_S:g}s"}
    except (aiohttp.ClientError, ValueError) as exc:
        return {"management_error": f"{where} answered no list of queues ({type(exc).__name__})"}
    by_name = {q.get("name"): q for q in found if isinstance(q, dict)}
    rates: dict[str, Any] = {}
    for name in names:
        queue = by_name.get(name)
        if queue is None:
            continue
        stats = queue.get("message_stats") or {}
        rates[name] = {
            "unacked": queue.get("messages_unacknowledged", 0),
            "in_per_s": round(float((stats.get("publish_details") or {}).get("rate", 0.0)), 1),
            "out_per_s": round(float((stats.get("ack_details") or {}).get("rate", 0.0)), 1),
        }
    return {"management": redact_url(url), "rates": rates}


def _depth(declared: aiormq.spec.Queue.DeclareOk) -> dict[str, Any]:
    return {"messages": declared.message_count or 0, "consumers": declared.consumer_count or 0}


async def _from_database(database_url: str, topology: Topology) -> dict[str, Any]:
    """The database's part of the report, and the delay queues of other schedules."""
    found: dict[str, Any] = {"database": redact_url(database_url), "other_delay_queues": []}
    try:
        conn = await asyncpg.connect(database_url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.ClientConfigurationError, TimeoutError) as exc:
        found["fulfillments_last_hour"] = None
        found["database_error"] = mask_secrets(f"{type(exc).__name__}: {exc}")
        return found
    try:
        found["fulfillments_last_hour"] = await conn.fetchval(
            "SELECT count(*) FROM fulfillments WHERE created_at > now() - interval '1 hour'"
        )
        found["awaiting_payment"] = await conn.fetchval(
            "SELECT count(*) FROM checkout_sessions WHERE state = 'awaiting_payment'"
        )
        found["other_delay_queues"] = await _other_delay_queues(conn, topology)
    except asyncpg.UndefinedTableError:
        found["fulfillments_last_hour"] = None
        found["database_error"] = "schema missing: run `fulfillment migrate`"
    finally:
        await conn.close()
    return found


BOLD_RED, RESET = "\x1b[1;31m", "\x1b[0m"


def render(report: dict[str, Any], *, colour: bool = False) -> str:
    """The report as a table; with ``colour``, a DLQ holding letters stands out."""
    # READY is what waits; UNACKED what consumers hold now; IN/OUT per second, published and
    # acknowledged (the last two need the management API: AMQP does not say)
    rates = report.get("rates") or {}
    head = f"{'QUEUE':48} {'READY':>9} {'CONSUMERS':>9} {'UNACKED':>9} {'IN/s':>7} {'OUT/s':>7}"
    lines = [f"broker {report['broker']}", "", head]
    for name, q in report["queues"].items():
        if q.get("missing"):
            lines.append(f"{name:48} {'-':>9} {'-':>9} {'-':>9} {'-':>7} {'-':>7}"
                         "  not declared yet (no worker with it)")  # fmt: skip
            continue
        other = "  another RETRY_DELAYS_S's" if q.get("other_schedule") else ""
        r = rates.get(name, {})
        line = (
            f"{name:48} {q['messages']:>9} {q['consumers']:>9} {r.get('unacked', '-'):>9} "
            f"{r.get('in_per_s', '-'):>7} {r.get('out_per_s', '-'):>7}{other}"
        )
        if colour and name == report.get("dead_queue") and q["messages"]:
            line = f"{BOLD_RED}{line}{RESET}"
        lines.append(line)
    if report.get("management_error"):
        lines.append(
            f"(UNACKED, IN/s and OUT/s come from RabbitMQ's management API: "
            f"{report['management_error']}; `rabbitmq-plugins enable rabbitmq_management`)"
        )
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


async def _other_delay_queues(conn: asyncpg.Connection, topology: Topology) -> list[str]:
    """Delay queues of this prefix that workers with another RETRY_DELAYS_S declared."""
    try:
        rows = await conn.fetch(
            "SELECT name FROM delay_queues WHERE starts_with(name, $1) "
            "AND NOT name = ANY($2) ORDER BY delay_s, name",
            topology.retry_queue_prefix,
            list(topology.retry_queues),
        )
    except asyncpg.PostgresError:
        # a schema from before workers recorded them (`fulfillment migrate`), or a role that
        # may not read the table: the queues of this schedule are still shown
        return []
    return [r["name"] for r in rows]
