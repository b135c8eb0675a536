"""Prometheus metrics of the worker, and the small HTTP server for /metrics, /healthz and
/readyz."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from shared import runtime
from shared.http_server import quiet_unparseable_requests
from shared.settings import listen_error
from shared.vocabulary import OUTBOUND_TYPES
from worker.retry import DeadLetterReason

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


def start_at_zero(event_types: tuple[str, ...], email_purposes: tuple[str, ...]) -> None:
    """Create the series alerts watch, at 0, before their first event: rate() needs two
    samples, so a series born with its first dead letter would not fire an alert on it."""
    for event_type in event_types:
        RETRIES.labels(event_type)
        for reason in DeadLetterReason:
            DEAD_LETTERS.labels(event_type, reason)
    for purpose in email_purposes:
        UNDELIVERABLE_EMAILS.labels(purpose)
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
