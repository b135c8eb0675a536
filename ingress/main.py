"""``fulfillment ingress``: serve the webhook ingress until SIGTERM/SIGINT."""

from __future__ import annotations

from aiohttp import web

from ingress.app import create_app
from ingress.settings import IngressSettings
from shared.logging import configure_logging, get_logger, register_secrets


def run(settings: IngressSettings | None = None) -> None:
    """Serve until a signal; in-flight requests finish (200 confirmed or 503) before exit."""
    configure_logging("ingress")
    settings = settings or IngressSettings.from_env()
    register_secrets(settings.webhook_secrets)
    log = get_logger(__name__)
    log.info(
        "ingress starting",
        host=settings.host,
        port=settings.port,
        broker=settings.broker.display_url,
        secrets=len(settings.webhook_secrets),
        tolerance_s=settings.tolerance_s,
    )
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=None,
        # aiohttp waits this long for in-flight handlers after it stops listening;
        # each ends within the publish timeout, so this is only a backstop.
        shutdown_timeout=settings.broker.publish_timeout_s + settings.read_timeout_s + 5,
        reuse_port=True,
    )
    log.info("ingress stopped")
