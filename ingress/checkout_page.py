"""GET / and POST /create-checkout-session: the page with the Checkout button, and the
session it creates, for a guest or for the existing customer a signed link names.

The link is checked on the page and again when the session is created: the form carries
its parameters, and a stranger's form is no more trusted than a stranger's URL.
"""

from __future__ import annotations

import asyncio
import html
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import stripe
from aiohttp import web
from multidict import MultiDict, MultiMapping

from ingress.checkout import (
    CHECKOUT,
    CREATE_LIMIT,
    STRIPE,
    client_of,
    over_limit,
    refusal_logged,
)
from ingress.keys import SETTINGS
from ingress.links import CLAIMS, SIGNATURE, InvalidLink, LinkClaims, verify_checkout_link
from ingress.pages import page
from shared.logging import get_logger
from shared.money import format_amount

log = get_logger(__name__)

FORM = "application/x-www-form-urlencoded"
# The Checkout form holds a link's few parameters: far less than this.
FORM_MAX_BYTES = 8192
_FORM_MAX_FIELDS = 64


@dataclass
class Offer:
    """What the page sells, in words; the price's id until Stripe has said more."""

    text: str


OFFER = web.AppKey("offer", Offer)


async def read_offer(client: stripe.StripeClient, price_id: str) -> str:
    """The product's name and price (``T-shirt at 20.00 USD``), read from Stripe; the price
    id as before when Stripe cannot say."""
    try:
        price = await client.v1.prices.retrieve_async(price_id, params={"expand": ["product"]})
    except stripe.StripeError as exc:
        log.warning("checkout price not read", price=price_id, error=str(exc.user_message or exc))
        return f"the product priced {price_id}"
    product = price.product
    name = getattr(product, "name", None) or price.nickname or price_id
    if price.unit_amount is None:  # a price per tier or per unit of usage
        return str(name)
    return f"{name} at {format_amount(price.unit_amount, price.currency)}"


async def read_form(request: web.Request) -> MultiDict[str] | web.Response:
    """The browser's form (urlencoded: a multipart body would be spooled to disk first),
    small and sent in time; else the page saying what is wrong."""
    if request.content_type != FORM or not request.body_exists:
        return MultiDict()
    length = request.content_length
    if length is None or length > FORM_MAX_BYTES:
        return page("Bad request", "<p>That is not the Checkout form.</p>", status=413)
    try:
        async with asyncio.timeout(request.app[SETTINGS].read_timeout_s):
            body = await request.read()
        fields = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=_FORM_MAX_FIELDS)
    except TimeoutError:
        return page("Bad request", "<p>The form did not arrive in time.</p>", status=408)
    except ValueError:  # not UTF-8, or too many fields
        return page("Bad request", "<p>That is not the Checkout form.</p>", status=400)
    return MultiDict(fields)


def link_params(params: MultiMapping[Any]) -> list[tuple[str, str]] | None:
    """All of a request's parameters when they make a link (a signature or any claim is
    among them: the others are then covered too); None for a request without a link."""
    if not any(name == SIGNATURE or name in CLAIMS for name in params):
        return None
    return [(name, str(value)) for name, value in params.items()]


def checked_link(request: web.Request, pairs: list[tuple[str, str]]) -> LinkClaims | web.Response:
    """The link's claims, or the 403 page for a link changed, expired or not ours."""
    secret = request.app[CHECKOUT].link_secret
    try:
        if secret is None:
            raise InvalidLink("signed links are not enabled (CHECKOUT_LINK_SECRET)")
        return verify_checkout_link(secret, pairs)
    except InvalidLink as exc:
        left_out = refusal_logged(f"link:{exc.reason}")
        if left_out is not None:
            log.warning(
                "checkout link refused",
                reason=exc.reason,
                detail=str(exc),
                client=client_of(request),
                similar_not_logged=left_out or None,
            )
        expired = exc.reason == "expired"
        return page(
            "This link has expired" if expired else "This link is not valid",
            "<p>Ask the shop for a new checkout link.</p>"
            if expired
            else "<p>It may have been changed or cut short. Ask the shop for a new one.</p>",
            status=403,
        )


async def index(request: web.Request) -> web.Response:
    settings = request.app[CHECKOUT]
    pairs = link_params(request.query)
    claims = None if pairs is None else checked_link(request, pairs)
    if isinstance(claims, web.Response):
        return claims
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in pairs or ()
    )
    if claims is not None and claims.customer_email:
        who = f"a card, for {html.escape(claims.customer_email)}"
    elif (claims is not None and claims.customer) or (claims is None and settings.customer):
        who = "your saved card"
    else:
        who = "a card"
    return page(
        "Checkout",
        f"""<p>{settings.quantity} x {html.escape(request.app[OFFER].text)},
paid with {who} on Stripe Checkout.</p>
<form action="/create-checkout-session" method="POST">{hidden}
<button id="checkout" type="submit">Checkout</button></form>""",
    )


async def create_checkout_session(request: web.Request) -> web.StreamResponse:
    limited = over_limit(request, request.app[CREATE_LIMIT], "create_checkout_session")
    if limited is not None:
        return limited
    settings = request.app[CHECKOUT]
    form = await read_form(request)
    if isinstance(form, web.Response):
        return form
    pairs = link_params(form)
    claims = None if pairs is None else checked_link(request, pairs)
    if isinstance(claims, web.Response):
        return claims
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [{"price": settings.price, "quantity": settings.quantity}],
        # Stripe fills in the id; the success page needs it to look the session up
        "success_url": f"{settings.public_url}/checkout/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{settings.public_url}/",
    }
    if claims is not None:
        # an existing customer: Checkout prefills their details and, per Stripe's rules,
        # their saved card (see docs/http.md); or a new one's email
        if claims.customer:
            params["customer"] = claims.customer
        elif claims.customer_email:
            params["customer_email"] = claims.customer_email
    elif settings.customer:
        params["customer"] = settings.customer  # test keys only (refused with a live one)
    try:
        session = await request.app[STRIPE].v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
    except stripe.StripeError as exc:
        # Stripe's text is for us (it may name the account, a key's last digits, a
        # customer): the visitor gets a plain apology
        log.warning(
            "checkout session not created",
            error=f"{type(exc).__name__}: {exc.user_message or exc}",
            stripe_status=exc.http_status,
            stripe_code=exc.code,
            stripe_request_id=exc.request_id,
        )
        response = page(
            "Checkout is unavailable",
            "<p>We could not start the checkout just now. Please try again in a minute.</p>"
            '<p><a href="/">Back</a></p>',
            status=503 if exc.http_status == 429 else 502,
        )
        if exc.http_status == 429:
            response.headers["Retry-After"] = str(request.app[SETTINGS].retry_after_s)
        return response
    log.info("checkout session created", checkout_session_id=session.id)
    return web.Response(status=303, headers={"Location": str(session.url)})
