"""Prometheus metrics of the ingress (the process's default registry), and the small HTTP
server for /metrics on INGRESS_METRICS_PORT, apart from the public port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from shared import runtime
from shared.http_server import quiet_unparseable_requests
from shared.settings import listen_error

REQUESTS = Counter(
    "ingress_webhook_requests_total",
    "Webhook requests by outcome (accepted, invalid_signature, malformed_event, "
    "body_too_large, broker_unavailable, ...).",
    ["outcome"],
)
CONFIRM_SECONDS = Histogram(
    "ingress_publish_confirm_seconds",
    "Time from publish to the broker's confirm.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
IN_FLIGHT = Gauge("ingress_webhook_requests_in_flight", "Webhook requests being handled now.")

# Every outcome starts at 0 instead of appearing at its first request: rate() needs two
# samples, so an alert on a series born with its first 503 would miss that 503.
OUTCOMES = (
    "accepted",
    "replay",  # 200, queued before: the same signed request again (Stripe re-signs retries)
    "missing_signature",
    "malformed_signature",
    "invalid_signature",
    "timestamp_out_of_tolerance",
    "malformed_event",
    "body_too_large",
    "read_timeout",
    "malformed_body",
    "unsupported_content_encoding",
    "client_disconnected",  # gone mid-upload: nobody to answer
    "expectation_failed",  # an Expect header other than 100-continue
    "broker_unavailable",
    "overloaded",
)
for _outcome in OUTCOMES:
    REQUESTS.labels(_outcome)
BROKER_UP = Gauge(
    "ingress_broker_connected", "1 while the broker connection and channel are usable."
)

CLIENT_LIMITED = Counter(
    "ingress_client_limited_total",
    "Checkout requests refused 429 because their client was over its limit, by route "
    "(create_checkout_session, checkout_success).",
    ["route"],
)
for _route in ("create_checkout_session", "checkout_success"):
    CLIENT_LIMITED.labels(_route)


async def start_server(host: str, port: int) -> web.AppRunner:
    """Serve /metrics on ``host``:``port`` (0: any free port), and nothing else."""
    quiet_unparseable_requests()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=runtime.HTTP_KEEPALIVE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:  # taken by another process, or not an address of ours
        await runner.cleanup()
        raise listen_error(
            "INGRESS_METRICS_PORT", host, port, exc, host_setting="INGRESS_METRICS_HOST"
        ) from None
    return runner
