"""Checkout in the Stripe stand-in: create sessions, and a hosted payment page that pays.

``POST /v1/checkout/sessions`` validates what a merchant's server sends (as Stripe would
for ``mode=payment``), ``GET /pay/{id}`` is the hosted page, and its "Pay" button marks the
session paid, sends a signed ``checkout.session.completed`` to the configured webhook URL
(in the background, like Stripe), and redirects to ``success_url`` with the id filled in.
"""

from __future__ import annotations

import asyncio
import copy
import html
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from devkit import signing
from devkit.fixtures import fixture
from devkit.stripe.app import StripeStandIn
from devkit.stripe.errors import StripeError
from devkit.stripe.params import expand_field, list_param
from devkit.stripe.store import new_id
from shared.money import format_amount

SESSION_ID_TEMPLATE = "{CHECKOUT_SESSION_ID}"


class HostedCheckout:
    """Prices, Checkout Session creation and the hosted page, over a :class:`StripeStandIn`."""

    def __init__(
        self,
        standin: StripeStandIn,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        self.standin = standin
        standin.checkout = self  # the stand-in answers the Checkout routes through us
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.prices: dict[str, dict[str, Any]] = {}
        self.deliveries: list[tuple[str, int]] = []  # (event id, HTTP status) per attempt
        self._tasks: set[asyncio.Task[None]] = set()

    def add_price(
        self, name: str = "T-shirt", unit_amount: int = 2000, currency: str = "usd"
    ) -> dict[str, Any]:
        product = fixture("product")
        product.update(id=new_id("prod"), name=name, created=int(time.time()))
        price = fixture("price")
        price.update(
            id=new_id("price"), product=product["id"], currency=currency, type="one_time",
            recurring=None, unit_amount=unit_amount, unit_amount_decimal=str(unit_amount),
            nickname=name, transform_quantity=None,
        )  # fmt: skip
        self.standin.products[product["id"]] = product
        self.prices[price["id"]] = price
        return price

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- API ---------------------------------------------------------------------------

    async def get_price(self, request: web.Request) -> web.Response:
        price = self.prices.get(request.match_info["id"])
        if price is None:
            raise StripeError.missing("price", request.match_info["id"])
        price = copy.deepcopy(price)
        for path in list_param(request.query, "expand"):  # expand[]=product
            expand_field(price, path.split("."), self.standin.lookup)
        return web.json_response(price)

    async def create_session(self, request: web.Request) -> web.Response:
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        mode = params.get("mode")
        if mode is None:
            raise StripeError(400, "Missing required param: mode.", code="parameter_missing",
                              param="mode")  # fmt: skip
        if mode != "payment":
            raise StripeError.invalid("mode", "This stand-in only creates mode=payment sessions.")
        success_url = params.get("success_url")
        if not success_url:
            raise StripeError(400, "Missing required param: success_url.",
                              code="parameter_missing", param="success_url")  # fmt: skip
        for name in ("success_url", "cancel_url"):
            if name in params and not _absolute_url(params[name]):
                raise StripeError(400, f"Not a valid URL: {name}", code="url_invalid", param=name)
        customer_id = params.get("customer")
        customer = self.standin.customers.get(customer_id or "")
        if customer_id and customer is None:
            raise StripeError.missing("customer", customer_id, param="customer")
        items = self._requested_items(params)
        session = self.standin.add_session(
            payment_status="unpaid",
            line_items=[(p["nickname"] or "Item", q, p["unit_amount"]) for p, q in items],
            currency=items[0][0]["currency"],
            customer_email=(customer or {}).get("email") or params.get("customer_email") or "",
            customer=customer_id,
        )
        for item, (price, _) in zip(self.standin.line_items[session["id"]], items, strict=True):
            item["price"] = dict(price)
        host = f"{request.scheme}://{request.host}"
        session.update(
            status="open", mode="payment", success_url=success_url,
            cancel_url=params.get("cancel_url"), url=f"{host}/pay/{session['id']}",
        )  # fmt: skip
        if customer:
            session["customer_details"].update(
                email=customer.get("email"), name=customer.get("name")
            )
        return web.json_response(session)

    def _requested_items(self, params: dict[str, str]) -> list[tuple[dict[str, Any], int]]:
        items = []
        for i in range(100):
            price_id = params.get(f"line_items[{i}][price]")
            if price_id is None:
                break
            price = self.prices.get(price_id)
            if price is None:
                raise StripeError.missing("price", price_id, param=f"line_items[{i}][price]")
            raw_quantity = params.get(f"line_items[{i}][quantity]", "")
            if not raw_quantity.isdigit() or int(raw_quantity) < 1:
                raise StripeError.invalid(f"line_items[{i}][quantity]",
                                          "Quantity must be a positive integer.")  # fmt: skip
            items.append((price, int(raw_quantity)))
        if not items:
            raise StripeError(400, "Missing required param: line_items.",
                              code="parameter_missing", param="line_items")  # fmt: skip
        return items

    # --- hosted page -------------------------------------------------------------------

    def _open_session(self, session_id: str) -> dict[str, Any]:
        session = self.standin.sessions.get(session_id)
        if session is None or not session.get("success_url"):
            raise web.HTTPNotFound(text="No such Checkout Session", content_type="text/plain")
        return session

    async def hosted_page(self, request: web.Request) -> web.Response:
        session = self._open_session(request.match_info["id"])
        items = "".join(
            f"<li>{item['quantity']} x {html.escape(item['description'])}"
            f" — {format_amount(item['amount_total'], item['currency'])}</li>"
            for item in self.standin.line_items[session["id"]]
        )
        customer = self.standin.customers.get(session.get("customer") or "") or {}
        card = (
            "<p class=saved>Pay with your saved card •••• 4242 "
            f"({html.escape(customer['email'])})</p>"
            if customer.get("email") else "<p>Card: 4242 4242 4242 4242</p>"
        )  # fmt: skip
        body = f"""<!doctype html><html><head><title>Checkout (Stripe stand-in)</title></head>
<body><h1>Checkout</h1><ul>{items}</ul>
<p>Total: <strong>{format_amount(session["amount_total"], session["currency"])}</strong></p>
{card}
<form method=post action="/pay/{session["id"]}"><button id=pay type=submit>Pay</button></form>
<p><a href="{html.escape(session.get("cancel_url") or "#")}">Cancel</a></p></body></html>"""
        return web.Response(text=body, content_type="text/html")

    async def pay(self, request: web.Request) -> web.Response:
        session = self._open_session(request.match_info["id"])
        if session["status"] != "complete" or session["payment_status"] != "paid":
            session.update(status="complete", payment_status="paid")
            event = self.standin.add_session_event(session["id"])
            task = asyncio.create_task(self._deliver(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        target = session["success_url"].replace(SESSION_ID_TEMPLATE, session["id"])
        raise web.HTTPSeeOther(location=target)

    async def _deliver(self, event: dict[str, Any]) -> None:
        """Send the event like Stripe: signed, retried until 2xx (a few times here)."""
        if not self.webhook_url or not self.webhook_secret:
            return
        body = signing.body(event)
        async with aiohttp.ClientSession() as http:
            for attempt in range(5):
                headers = {"Stripe-Signature": signing.signature_header(body, self.webhook_secret),
                           "Content-Type": "application/json; charset=utf-8"}  # fmt: skip
                try:
                    async with http.post(self.webhook_url, data=body, headers=headers) as r:
                        self.deliveries.append((event["id"], r.status))
                        if 200 <= r.status < 300:
                            self.standin.delivery_success[event["id"]] = True
                            return
                except aiohttp.ClientError:
                    self.deliveries.append((event["id"], 0))
                await asyncio.sleep(0.5 * 2**attempt)


def _absolute_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)
