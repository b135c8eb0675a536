"""``fulfillment ingress``: serve the webhook ingress until SIGTERM/SIGINT."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingress import metrics
from ingress.app import create_app
from ingress.checkout import CheckoutSettings
from ingress.keys import DRAIN
from ingress.settings import IngressSettings
from shared import runtime
from shared.http_server import quiet_unparseable_requests
from shared.logging import configure_logging, get_logger, register_secrets
from shared.settings import listen_error

# How aiohttp's request handler treats bodies (also what the tests run the app with).
SERVER_ARGS: dict[str, Any] = {
    # Stripe signs the bytes it sends and never compresses them: verify and publish those
    # bytes as they came, and spend no CPU inflating a body (1 MB of gzip inflates to 1 GB).
    "auto_decompress": False,
    # After a refusal that leaves the body unread (413, 408, no signature), aiohttp goes on
    # reading and discarding it for this long before it closes (10 s by default): a stalled
    # or endless upload would keep its connection that long after the read timeout.
    "lingering_time": 1.0,
    # idle (or header-trickling) connections: see runtime.HTTP_KEEPALIVE_S
    "keepalive_timeout": runtime.HTTP_KEEPALIVE_S,
}


# What aiohttp's own shutdown gives the requests left once the webhooks have drained (it
# applies it twice per connection: for the handler to end, then after cancelling it).
SHUTDOWN_AFTER_DRAIN_S = 2.0


def run(settings: IngressSettings | None = None) -> None:
    """Serve until a signal; in-flight requests finish (200 confirmed or 503) before exit."""
    configure_logging("ingress")
    quiet_unparseable_requests()
    settings = settings or IngressSettings.from_env()
    register_secrets(settings.webhook_secrets)
    checkout = CheckoutSettings.from_env()
    if checkout is not None:
        register_secrets([checkout.stripe.api_key])
        if checkout.link_secret:
            register_secrets([checkout.link_secret])
    runtime.run_service(_serve(settings, checkout))
    get_logger(__name__).info("ingress stopped")


async def _serve(settings: IngressSettings, checkout: CheckoutSettings | None) -> None:
    """aiohttp's run_app, except that a second signal (Ctrl-C reaches every process of the
    group, then `fulfillment up` sends SIGTERM) does not cut the drain short: run_app raises
    GracefulExit again mid-shutdown, dropping requests in flight and exiting 1."""
    log = get_logger(__name__)
    log.info(
        "ingress starting",
        host=settings.host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        broker=settings.broker.display_url,
        secrets=len(settings.webhook_secrets),
        tolerance_s=settings.tolerance_s,
        event_loop=runtime.loop_name(),
    )
    app = create_app(settings, checkout=checkout)
    # Our drain waits for the webhooks, each done within its body's read timeout and the
    # publish timeout (cut after that, as a backstop); what aiohttp's shutdown then waits
    # for (other routes' requests) gets a short while.
    drain_s = settings.broker.publish_timeout_s + settings.read_timeout_s + 5
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_AFTER_DRAIN_S, **SERVER_ARGS
    )
    stopping = runtime.stop_requested()
    # Handlers first: setup waits up to 5 s for a first broker connection, and a signal
    # then must still stop us cleanly (exit 0), not kill us with the default action.
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        if not stopping.is_set():
            site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True)
            try:
                await site.start()
            except OSError as exc:  # taken by another program (not an ingress: reuse_port)
                raise listen_error(
                    "INGRESS_PORT", settings.host, settings.port, exc, host_setting="INGRESS_HOST"
                ) from None
            metrics_runner = await metrics.start_server(
                settings.metrics_host, settings.metrics_port
            )
            # the port bound, also when INGRESS_METRICS_PORT=0 asked for any free one
            log.info("ingress metrics listening", port=metrics_runner.addresses[0][1])
            await stopping.wait()
            log.info("ingress stopping", in_flight=app[DRAIN].in_flight)
            await site.stop()  # no new connections; those open still finish their request
            if not await app[DRAIN].wait(drain_s):
                log.warning("requests still in flight at the drain's end; cut")
        else:
            log.info("ingress stopping", in_flight=0)
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
