"""The ingress application assembled: its routes, middlewares and flow control, and the
health and readiness views (the webhook itself is ingress/webhook.py, the Checkout routes
ingress/checkout_page.py and ingress/success.py; /metrics is served on a port of its own,
ingress/metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import stripe
from aiohttp import web

from ingress import checkout, checkout_page, success
from ingress.checkout import CheckoutSettings
from ingress.clients import ClientAddress, parse_trusted
from ingress.guards import BodyBudget, Drain, ReplayGuard
from ingress.keys import BUDGET, DRAIN, PUBLISHER, REPLAYS, SETTINGS
from ingress.limits import ClientBuckets
from ingress.pages import nosniff
from ingress.publisher import EventPublisher
from ingress.settings import IngressSettings
from ingress.webhook import error_response, expect_continue, receive_webhook
from shared.stripe_client import make_client

# Below a readiness probe's usual timeout (Kubernetes: 1 s by default, 2 s in ops/k8s).
READYZ_PROBE_TIMEOUT_S = 0.8


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    publisher = request.app[PUBLISHER]
    if request.app[DRAIN].stopping:
        reason = "stopping"
    elif not publisher.connected:
        reason = "broker unavailable"
    elif publisher.stalled and not await publisher.probe(READYZ_PROBE_TIMEOUT_S):
        reason = "broker not confirming publishes"
    else:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


@web.middleware
async def drained(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request is counted in flight (a stopping ingress lets each finish: a webhook,
    a Checkout page waiting on Stripe); once stopping, each answer closes its connection."""
    drain = request.app[DRAIN]
    drain.enter()
    try:
        response = await handler(request)
    finally:
        drain.leave()
    if drain.stopping:
        response.force_close()  # no next request on this connection: we are going
    return response


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Routing errors (404, 405) as JSON like every other error of this API."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "POST")
        return response


def create_app(
    settings: IngressSettings,
    *,
    connect_wait_s: float = 5.0,
    checkout: CheckoutSettings | None = None,
) -> web.Application:
    """The ingress application; the broker connection lives as long as the app.

    With ``checkout`` it also serves the optional Checkout pages (ingress/checkout.py).
    """
    app = web.Application(
        middlewares=[drained, json_errors], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[BUDGET] = BodyBudget(settings.max_buffered_bytes)
    # twice the tolerance: a signature may be up to that far ahead of now, and stays
    # acceptable until that far behind
    app[REPLAYS] = ReplayGuard(window_s=2 * settings.tolerance_s)
    app[DRAIN] = Drain()
    app.on_response_prepare.append(nosniff)

    async def broker(app: web.Application) -> AsyncIterator[None]:
        publisher = EventPublisher(settings.broker)
        app[PUBLISHER] = publisher
        await publisher.start(wait_s=connect_wait_s)
        yield
        await publisher.close()

    app.cleanup_ctx.append(broker)
    app.router.add_post("/webhooks/stripe", receive_webhook, expect_handler=expect_continue)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if checkout is not None:
        install_checkout(app, checkout)
    return app


def install_checkout(app: web.Application, settings: CheckoutSettings) -> None:
    """The Checkout routes, their per-client limits and their Stripe client."""
    app[checkout.CHECKOUT] = settings
    app[checkout.CLIENTS] = ClientAddress(parse_trusted(app[SETTINGS].forwarded_allow_ips))
    app[checkout.CREATE_LIMIT] = ClientBuckets(settings.create_per_min, settings.create_burst)
    app[checkout.LOOKUP_LIMIT] = ClientBuckets(settings.lookup_per_min, settings.lookup_burst)

    app[checkout_page.OFFER] = offer = checkout_page.Offer(f"the product priced {settings.price}")

    async def stripe_client(app: web.Application) -> AsyncIterator[None]:
        http = stripe.AIOHTTPClient(timeout=settings.stripe.timeout_s)
        app[checkout.STRIPE] = client = make_client(settings.stripe, http_client=http)

        async def read() -> None:
            offer.text = await checkout_page.read_offer(client, settings.price)

        # read once, in the background: the webhook route must not wait on Stripe to start
        reading = asyncio.create_task(read())
        yield
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await http.close_async()  # type: ignore[no-untyped-call]

    app.cleanup_ctx.append(stripe_client)
    app.router.add_get("/", checkout_page.index)
    app.router.add_post("/create-checkout-session", checkout_page.create_checkout_session)
    success.install(app)
