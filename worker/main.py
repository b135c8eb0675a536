"""``fulfillment worker``: consume until SIGTERM/SIGINT, then drain within the grace period."""

from __future__ import annotations

import asyncio
import contextlib

from shared import runtime
from shared.logging import configure_logging, get_logger, register_secrets
from worker import metrics
from worker.consumer import Worker
from worker.settings import WorkerSettings


async def serve(settings: WorkerSettings) -> None:
    log = get_logger(__name__)
    stop = runtime.stop_requested()
    worker = Worker(settings)
    runner = await metrics.start_server(
        settings.metrics_host, settings.metrics_port, unready=worker.unready
    )
    figures: asyncio.Task[None] | None = None
    try:
        # A signal while starting (a broker or database slow to answer) stops the start:
        # nothing is consumed yet, so there is nothing to finish, and the exit is clean.
        # A failed start raises its error here: a non-zero exit.
        await runtime.unless_stopped(worker.start(), stop)
        if not worker.consuming:
            log.info("worker stopping before it started consuming")
            return
        assert worker.store is not None
        await metrics.read_reconcile(worker.store.reconcile_figures)  # on the first scrape
        figures = asyncio.create_task(metrics.follow_reconcile(worker.store.reconcile_figures))
        # the port bound, also when WORKER_METRICS_PORT=0 asked for any free one
        log.info("worker metrics listening", port=runner.addresses[0][1])
        await stop.wait()
        log.info("worker stopping", in_flight=worker.in_flight)
    finally:
        if figures is not None:
            figures.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await figures
        await worker.stop()
        await runner.cleanup()


def run(concurrency: int | None = None) -> None:
    configure_logging("worker")
    settings = WorkerSettings.from_env(concurrency=concurrency)
    register_secrets([settings.stripe.api_key])
    if settings.smtp.password:
        register_secrets([settings.smtp.password])
    if (
        settings.smtp.allow_plaintext_auth
        and settings.smtp.credentials
        and not settings.smtp.use_tls
    ):
        get_logger(__name__).warning(
            "SMTP_ALLOW_PLAINTEXT_AUTH is on: the SMTP password goes in clear text to a relay "
            "that offers no STARTTLS; use it only for a relay on this host",
            smtp_host=settings.smtp.host,
        )
    runtime.run_service(serve(settings))
