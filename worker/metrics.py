"""Prometheus metrics of the worker, and the small HTTP server for /metrics, /healthz and
/readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import runtime
from shared.http_server import quiet_unparseable_requests
from shared.logging import get_logger
from shared.settings import listen_error
from shared.vocabulary import OUTBOUND_TYPES
from worker.retry import DeadLetterReason

log = get_logger(__name__)

PROCESSED = Counter(
    "worker_messages_total",
    "Messages handled, by event type and outcome (fulfilled, already_fulfilled, "
    "awaiting_payment, payment_failed, not_an_order, ignored, retry, dead_letter, requeued, "
    "abandoned).",
    ["event_type", "outcome"],
)
DURATION = Histogram(
    "worker_handle_seconds",
    "Time to handle one message, from delivery to ack.",
    ["event_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("worker_retries_total", "Messages sent to a delay queue.", ["event_type"])
DEAD_LETTERS = Counter(
    "worker_dead_letters_total", "Messages dead-lettered by the worker.", ["event_type", "reason"]
)
UNDELIVERABLE_EMAILS = Counter(
    "worker_emails_undeliverable_total",
    "Customer emails the mail server refused for good (recorded as failed; the order goes on).",
    ["purpose"],
)
IN_FLIGHT = Gauge("worker_messages_in_flight", "Messages being handled now.")
EMAILS_IN_DOUBT = Counter(
    "worker_emails_in_doubt_total",
    "Customer emails the relay got whole but did not confirm (no reply to the message's end "
    "within SMTP_DATA_TIMEOUT_S, or the connection lost): maybe taken; sent again through "
    "the delay queue, same Message-ID.",
    ["purpose"],
)
BROKER_BLOCKED = Gauge(
    "worker_broker_blocked",
    "1 while the broker blocks this worker's publishes (connection.blocked: a memory or "
    "disk alarm) and outbound messages wait for connection.unblocked.",
)
SMTP_RELAY_DOWN = Gauge(
    "worker_smtp_relay_down",
    "1 while the mail relay does not take connections or greet in time (emails deferred to "
    "the delay queues without trying, one connection tried every SMTP_COOLDOWN_S).",
)
UNCONFIRMED = Counter(
    "worker_outbound_unconfirmed_total",
    "Outbound messages the broker did not confirm within PUBLISH_TIMEOUT_S: they may have "
    "gone out, and are published again (same fulfillment-id) when the event is retried.",
    ["type"],
)

UNROUTED = Counter(
    "worker_outbound_unrouted_total",
    "Outbound messages no queue was bound for: the broker returned them, so no subscriber got "
    "them (recorded as such in fulfillment_steps; bind the subscriber's queue first).",
    ["type"],
)


class ReconcileFigures(Collector):
    """What `fulfillment reconcile` found, per account, as last read from its table: a run is
    a short process (a CronJob, `up`'s schedule) that no scrape would catch, so it keeps its
    figures in PostgreSQL and every worker exports them (the same values: take the max)."""

    def __init__(self) -> None:
        self.rows: Sequence[Any] = ()

    def collect(self) -> Iterator[Metric]:
        missing = CounterMetricFamily(
            "reconcile_sessions_missing",
            "Paid Checkout Sessions `fulfillment reconcile` found without a fulfillment (each "
            "counted once, when first queued): orders whose events were lost or late.",
            labels=["account"],
        )
        last = GaugeMetricFamily(
            "reconcile_last_run_sessions_missing",
            "Paid sessions without a fulfillment that the account's last reconcile run found.",
            labels=["account"],
        )
        at = GaugeMetricFamily(
            "reconcile_last_run_timestamp_seconds",
            "When the account's last reconcile run finished (Unix time).",
            labels=["account"],
        )
        by_account = {row["account"]: row for row in self.rows}
        if PLATFORM not in by_account:
            missing.add_metric(["platform"], 0)  # from 0 before the first run, for increase()
        for key, row in sorted(by_account.items()):
            account = [key if key != PLATFORM else "platform"]
            missing.add_metric(account, row["missing_total"])
            if row["last_run"] is not None:
                last.add_metric(account, row["last_missing"])
                at.add_metric(account, row["last_run"])
        yield from (missing, last, at)


PLATFORM = ""  # the platform's own account in reconcile's table
RECONCILE = ReconcileFigures()
REGISTRY.register(RECONCILE)
# How often a worker reads them: within any Prometheus scrape interval, and one small query.
RECONCILE_READ_EVERY_S = 30.0


async def read_reconcile(read: Callable[[], Awaitable[Sequence[Any]]]) -> None:
    """Refresh ``RECONCILE``; a failed read keeps the last figures (the database's trouble
    shows in the worker's own failures)."""
    try:
        RECONCILE.rows = await read()
    except Exception as exc:
        log.debug("reconcile figures not read", error=f"{type(exc).__name__}: {exc}")


async def follow_reconcile(read: Callable[[], Awaitable[Sequence[Any]]]) -> None:
    """``read_reconcile`` every RECONCILE_READ_EVERY_S, until cancelled."""
    while True:
        await asyncio.sleep(RECONCILE_READ_EVERY_S)
        await read_reconcile(read)


def start_at_zero(event_types: tuple[str, ...], email_purposes: tuple[str, ...]) -> None:
    """Create the series alerts watch, at 0, before their first event: rate() needs two
    samples, so a series born with its first dead letter would not fire an alert on it."""
    for event_type in event_types:
        RETRIES.labels(event_type)
        for reason in DeadLetterReason:
            DEAD_LETTERS.labels(event_type, reason)
    for purpose in email_purposes:
        UNDELIVERABLE_EMAILS.labels(purpose)
        EMAILS_IN_DOUBT.labels(purpose)
    for kind in OUTBOUND_TYPES:
        UNROUTED.labels(kind)


async def start_server(
    host: str, port: int, unready: Callable[[], Awaitable[str | None]] | None = None
) -> web.AppRunner:
    """Serve /metrics, /healthz and /readyz (ready when ``unready`` gives no reason); port 0
    picks a free one."""
    quiet_unparseable_requests()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reason = "starting" if unready is None else await unready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=runtime.HTTP_KEEPALIVE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:  # taken by another process, or not an address of ours
        await runner.cleanup()
        raise listen_error(
            "WORKER_METRICS_PORT", host, port, exc, host_setting="WORKER_METRICS_HOST"
        ) from None
    return runner
