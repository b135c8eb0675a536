"""Optional Checkout routes: a page with a Checkout button for an existing customer,
session creation, and the success page that also asks for fulfillment.

Enabled when CHECKOUT_PRICE is set. Following Stripe's fulfillment guide, the landing page
does not trust its query string: it retrieves the session, and it publishes a
``fulfillment.requested`` message so the workers fulfill through the same idempotent path
as the webhook (whichever comes first fulfills; the other finds it done).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import stripe
from aiohttp import web

from ingress.keys import PUBLISHER
from shared.envelope import EventEnvelope
from shared.errors import BrokerUnavailable, ConfigError
from shared.logging import get_logger
from shared.money import format_amount
from shared.settings import Env, default_of, env_int, env_str, env_url
from shared.stripe_client import StripeSettings, make_client
from shared.vocabulary import CHECKOUT_SESSION_ID, FULFILLMENT_REQUESTED

log = get_logger(__name__)


@dataclass(frozen=True)
class CheckoutSettings:
    """What the Checkout routes need: the price sold, to whom, and where we live."""

    stripe: StripeSettings
    price: str
    quantity: int = 1
    customer: str | None = None
    public_url: str = "http://localhost:8080"

    @classmethod
    def from_env(cls, env: Env | None = None) -> CheckoutSettings | None:
        """None unless CHECKOUT_PRICE is set (the routes are optional)."""
        env = os.environ if env is None else env
        price = env_str(env, "CHECKOUT_PRICE", "")
        if not price:
            return None
        if not price.startswith("price_"):
            raise ConfigError("CHECKOUT_PRICE must be a Price id (price_…)")
        customer = env_str(env, "CHECKOUT_CUSTOMER", "") or None
        if customer is not None and not customer.startswith("cus_"):
            raise ConfigError("CHECKOUT_CUSTOMER must be a Customer id (cus_…)")
        return cls(
            stripe=StripeSettings.from_env(env),
            price=price,
            quantity=env_int(env, "CHECKOUT_QUANTITY", default_of(cls, "quantity"), minimum=1),
            customer=customer,
            public_url=env_url(
                env, "PUBLIC_URL", default_of(cls, "public_url"), schemes=("http", "https")
            ).rstrip("/"),
        )


CHECKOUT = web.AppKey("checkout", CheckoutSettings)
STRIPE = web.AppKey("stripe", stripe.StripeClient)


@dataclass
class Offer:
    """What the page sells, in words; the price's id until Stripe has said more."""

    text: str


OFFER = web.AppKey("offer", Offer)


async def read_offer(client: stripe.StripeClient, settings: CheckoutSettings) -> str:
    """The product's name and price (``T-shirt at 20.00 USD``), read from Stripe; the price
    id as before when Stripe cannot say."""
    try:
        price = await client.v1.prices.retrieve_async(
            settings.price, params={"expand": ["product"]}
        )
    except stripe.StripeError as exc:
        log.warning(
            "checkout price not read", price=settings.price, error=str(exc.user_message or exc)
        )
        return f"the product priced {settings.price}"
    product = price.product
    name = getattr(product, "name", None) or price.nickname or settings.price
    if price.unit_amount is None:  # a price per tier or per unit of usage
        return str(name)
    return f"{name} at {format_amount(price.unit_amount, price.currency)}"


def page(title: str, body: str, status: int = 200) -> web.Response:
    text = f"""<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto}}</style></head>
<body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    return web.Response(text=text, status=status, content_type="text/html")


async def index(request: web.Request) -> web.Response:
    settings = request.app[CHECKOUT]
    who = "your saved card" if settings.customer else "a card"
    offer = request.app[OFFER].text
    return page(
        "Checkout",
        f"""<p>{settings.quantity} x {html.escape(offer)},
paid with {who} on Stripe Checkout.</p>
<form action="/create-checkout-session" method="POST">
<button id="checkout" type="submit">Checkout</button></form>""",
    )


async def create_checkout_session(request: web.Request) -> web.StreamResponse:
    settings = request.app[CHECKOUT]
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [{"price": settings.price, "quantity": settings.quantity}],
        # Stripe fills in the id; the success page needs it to look the session up
        "success_url": f"{settings.public_url}/checkout/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{settings.public_url}/",
    }
    if settings.customer:
        # an existing customer: Checkout prefills their details and, per Stripe's rules,
        # their saved card (see docs/http.md)
        params["customer"] = settings.customer
    try:
        session = await request.app[STRIPE].v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
    except stripe.StripeError as exc:
        log.warning("checkout session not created", error=str(exc.user_message or exc))
        return page(
            "Checkout is unavailable",
            f"<p>Stripe said: {html.escape(str(exc.user_message or exc))}</p>"
            '<p><a href="/">Back</a></p>',
            status=502 if (exc.http_status or 500) >= 500 else 400,
        )
    log.info("checkout session created", checkout_session_id=session.id)
    raise web.HTTPSeeOther(location=str(session.url))


async def success(request: web.Request) -> web.Response:
    session_id = request.query.get("session_id", "")
    if not CHECKOUT_SESSION_ID.fullmatch(session_id):
        return page("Unknown order", "<p>That is not a Checkout Session id.</p>", status=400)
    try:
        session = await request.app[STRIPE].v1.checkout.sessions.retrieve_async(session_id)
    except stripe.StripeError as exc:
        if exc.http_status == 404:
            return page("Unknown order", "<p>No such Checkout Session.</p>", status=404)
        return page("Try again shortly", "<p>We could not reach Stripe.</p>", status=502)
    if session.mode == "setup":
        # a Checkout that only saved a card (another flow sharing this page): no order
        return page(
            "Saved",
            "<p>Your payment method was saved. Nothing was ordered or charged.</p>"
            f"<p>Reference: <code>{html.escape(session_id)}</code></p>",
        )
    requested = await _request_fulfillment(request, session_id, bool(session.livemode))
    paid = session.payment_status in ("paid", "no_payment_required")
    status = (
        "Your payment went through and your order is being fulfilled; "
        "a confirmation email is on its way."
        if paid
        else "Your payment is processing; we will email you as soon as it succeeds."
    )
    note = "" if requested else "<p>(Fulfillment will follow from Stripe's notification.)</p>"
    return page(
        "Thank you!",
        f'<p id="status" data-payment-status="{html.escape(str(session.payment_status))}">'
        f"{status}</p><p>Order reference: <code>{html.escape(session_id)}</code></p>{note}",
    )


async def _request_fulfillment(request: web.Request, session_id: str, livemode: bool) -> bool:
    doc = {
        "id": f"req_{uuid.uuid4().hex}",
        "object": "event",
        "type": FULFILLMENT_REQUESTED,
        "created": int(time.time()),
        "livemode": livemode,
        "api_version": None,
        "data": {"object": {"id": session_id, "object": "checkout.session"}},
    }
    raw = json.dumps(doc).encode()
    try:
        await request.app[PUBLISHER].publish(raw, EventEnvelope.from_dict(doc))
    except BrokerUnavailable as exc:
        # the webhook still fulfills; the page must not fail because of this
        log.warning(
            "fulfillment request not queued", checkout_session_id=session_id, error=str(exc)
        )
        return False
    return True


def install(app: web.Application, settings: CheckoutSettings) -> None:
    app[CHECKOUT] = settings

    async def stripe_client(app: web.Application) -> AsyncIterator[None]:
        http = stripe.AIOHTTPClient(timeout=settings.stripe.timeout_s)
        app[STRIPE] = make_client(settings.stripe, http_client=http)
        # read once, in the background: the webhook route must not wait on Stripe to start
        app[OFFER] = offer = Offer(f"the product priced {settings.price}")

        async def read() -> None:
            offer.text = await read_offer(app[STRIPE], settings)

        reading = asyncio.create_task(read())
        yield
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await http.close_async()  # type: ignore[no-untyped-call]

    app.cleanup_ctx.append(stripe_client)
    app.router.add_get("/", index)
    app.router.add_post("/create-checkout-session", create_checkout_session)
    app.router.add_get("/checkout/success", success)
