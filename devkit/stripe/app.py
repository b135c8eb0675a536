"""A local stand-in for the parts of Stripe's API that fulfillment reads, with fault injection.

Objects are built from Stripe's published fixtures (:mod:`devkit.fixtures`); errors carry
the JSON shape stripe-python maps onto its own exception classes, so the real client (pointed
here through ``base_addresses={"api": base_url}`` or ``stripe.api_base``) behaves as against
Stripe: 404 -> ``InvalidRequestError``, 401 -> ``AuthenticationError``, 429 -> ``RateLimitError``,
5xx -> ``APIError``, a dropped connection -> ``APIConnectionError``.

Served endpoints (all ``GET``, ``Authorization: Bearer sk_...`` required)::

    /v1/checkout/sessions/{id}             expand[]: line_items, line_items.data.price.product,
                                           customer
    /v1/checkout/sessions/{id}/line_items  limit, starting_after, ending_before, expand[]
    /v1/events                             type, types[], created[gt|gte|lt|lte], delivery_success,
                                           limit, starting_after, ending_before
    /v1/events/{id}
    /v1/customers/{id}

Run standalone with seeded demo sessions: ``python -m devkit.stripe --port 12111``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import fnmatch
import itertools
import json
import random
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web

from devkit.fixtures import fixture

__all__ = ["StripeStandIn", "main", "serve"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (description, quantity, unit_amount); quantity None: a metered (usage-based) price
LineItem = tuple[str, int | None, int]

API_VERSION = "2026-10-28.endive"
_MAX_LIMIT = 100
_DEFAULT_LIMIT = 10
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 402: "card_error"}
_ERROR_MESSAGES = {
    401: "Invalid API Key provided.",
    409: "This object cannot be accessed right now because another API request or Stripe "
    "process is currently accessing it.",
    429: "Too many requests hit the API too quickly. We recommend an exponential backoff of "
    "your requests.",
}


ADMIN = "/_standin"


def _new_id(prefix: str) -> str:
    infix = "_test" if prefix == "cs" else ""
    return f"{prefix}{infix}_{secrets.token_hex(12)}"


class StripeError(Exception):
    """Raised inside handlers; answered as Stripe's ``{"error": {...}}`` JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        self.code = code
        self.param = param
        self.should_retry = should_retry
        self.retry_after = retry_after

    def response(self) -> web.Response:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")
        if self.param is not None:
            error["param"] = self.param
        headers = {}
        if self.should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if self.should_retry else "false"
        if self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        return web.json_response({"error": error}, status=self.status, headers=headers)

    @classmethod
    def injected(
        cls, status: int, should_retry: bool | None = None, retry_after: float | None = None
    ) -> StripeError:
        code = {429: "rate_limit", 409: "lock_timeout"}.get(status)
        message = _ERROR_MESSAGES.get(status, "An unknown error occurred")
        return cls(status, message, code=code, should_retry=should_retry, retry_after=retry_after)

    @classmethod
    def missing(cls, kind: str, object_id: str, param: str = "id") -> StripeError:
        return cls(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)

    @classmethod
    def invalid(cls, param: str, message: str) -> StripeError:
        return cls(400, message, param=param)


def _list_param(query: Mapping[str, str], name: str) -> list[str]:
    """``name``, ``name[]`` or ``name[0]``, ``name[1]``... (stripe-python sends indexed keys)."""
    indexed: list[tuple[int, str]] = []
    plain: list[str] = []
    pattern = re.compile(re.escape(name) + r"\[(\d*)\]")
    for key, value in query.items():
        if key == name:
            plain.append(value)
        elif match := pattern.fullmatch(key):
            indexed.append((int(match.group(1) or 0), value))
    return plain + [value for _, value in sorted(indexed, key=lambda kv: kv[0])]


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise StripeError.invalid(name, f"Invalid integer: {raw}") from None


def _bool_param(query: Mapping[str, str], name: str) -> bool | None:
    raw = query.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise StripeError.invalid(name, f"Invalid boolean: {raw}")
    return raw == "true"


def _paginate(
    items: Sequence[dict[str, Any]], query: Mapping[str, str], url: str, kind: str
) -> dict[str, Any]:
    """Stripe's list object over ``items`` (already in list order), cursor-paginated by id."""
    limit = _int_param(query, "limit")
    limit = _DEFAULT_LIMIT if limit is None else limit
    if not 1 <= limit <= _MAX_LIMIT:
        raise StripeError.invalid("limit", f"This value must be between 1 and {_MAX_LIMIT}.")
    ids = [item["id"] for item in items]

    def position(param: str) -> int:
        cursor = query[param]
        if cursor not in ids:
            raise StripeError.missing(kind, cursor, param)
        return ids.index(cursor)

    if "starting_after" in query:
        rest = list(items[position("starting_after") + 1 :])
        page, has_more = rest[:limit], len(rest) > limit
    elif "ending_before" in query:
        rest = list(items[: position("ending_before")])
        page, has_more = rest[-limit:], len(rest) > limit
    else:
        page, has_more = list(items[:limit]), len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _expand(obj: dict[str, Any], path: list[str], lookup: Callable[[str], Any]) -> None:
    """Replace the id at ``path`` (``data`` walks a list's items) with the object it names."""
    if not path:
        return
    key, rest = path[0], path[1:]
    value = obj.get(key)
    if key == "data" and isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                _expand(item, rest, lookup)
        return
    if isinstance(value, str) and (found := lookup(value)) is not None:
        obj[key] = value = copy.deepcopy(found)
    if isinstance(value, dict):
        _expand(value, rest, lookup)


# What the admin route may set on a seeded session: add_session's keywords.
_SEEDABLE = (
    "payment_status", "currency", "customer_email", "customer", "metadata", "account",
    "mode", "discount", "shipping", "tax", "tax_included",
)  # fmt: skip


class StripeStandIn:
    """State and fault injection behind :meth:`app`; seed objects, then point stripe-python here.

    Faults apply per HTTP request, in this order: ``latency_s`` sleep, then a pending
    :meth:`drop_next`, then a pending :meth:`fail_next`, then :meth:`fail_rate`'s dice.
    Every request, faulted or not, is logged in :attr:`requests` as ``(method, path)``.
    """

    def __init__(self, *, seed: int | None = None, latency_s: float = 0.0) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.line_items: dict[str, list[dict[str, Any]]] = {}
        self.session_accounts: dict[str, str] = {}  # session id -> its connected account
        self.customers: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.delivery_success: dict[str, bool] = {}
        self._event_order: dict[str, int] = {}
        self._sequence = itertools.count()
        self.latency_s = latency_s
        self.requests: list[tuple[str, str]] = []
        self._rng = random.Random(seed)
        # (path glob or None for any request, the answer to give instead of Stripe's)
        self._fail_queue: deque[tuple[str | None, Callable[[], web.Response]]] = deque()
        self._fail_fraction = 0.0
        self._fail_statuses: tuple[int, ...] = (429, 500)
        self._drops = 0
        self.checkout: Any = None  # a HostedCheckout adds session creation and the pay page

    # --- seeding -------------------------------------------------------------------------

    def add_customer(
        self,
        customer_id: str | None = None,
        *,
        email: str | None = "jenny@example.com",
        name: str | None = "Jenny Rosen",
    ) -> dict[str, Any]:
        customer = fixture("customer")
        customer.update(
            id=customer_id or _new_id("cus"),
            email=email,
            name=name,
            created=int(time.time()),
            discount=None,
        )
        self.customers[customer["id"]] = customer
        return customer

    def _line_item(
        self,
        description: str,
        quantity: int | None,
        unit_amount: int,
        currency: str,
        *,
        recurring: bool = False,
    ) -> dict[str, Any]:
        product = fixture("product")
        product.update(
            id=_new_id("prod"), name=description, description=None, created=int(time.time())
        )
        product.update(updated=product["created"], default_price=None, package_dimensions=None)
        price = fixture("price")
        recurring = recurring or quantity is None  # a metered price is a recurring one
        price.update(
            id=_new_id("price"),
            currency=currency,
            product=product["id"],
            type="recurring" if recurring else "one_time",
            recurring={
                "interval": "month",
                "interval_count": 1,
                "meter": None,
                "trial_period_days": None,
                "usage_type": "metered" if quantity is None else "licensed",
            }
            if recurring
            else None,
            transform_quantity=None,
            unit_amount=unit_amount,
            unit_amount_decimal=str(unit_amount),
            created=product["created"],
        )
        product["default_price"] = price["id"]
        self.products[product["id"]] = product
        item = fixture("item")
        amount = 0 if quantity is None else quantity * unit_amount  # metered: billed later
        item.update(
            id=_new_id("li"),
            description=description,
            quantity=quantity,
            currency=currency,
            price=price,
            adjustable_quantity=None,
            amount_subtotal=amount,
            amount_total=amount,
            amount_discount=0,
            amount_tax=0,
        )
        return item

    def add_session(
        self,
        session_id: str | None = None,
        *,
        payment_status: str = "paid",
        line_items: Iterable[LineItem] | None = None,
        currency: str = "usd",
        customer_email: str = "jenny@example.com",
        customer: str | None = None,
        metadata: Mapping[str, str] | None = None,
        account: str | None = None,
        mode: str = "payment",
        discount: int = 0,
        shipping: int = 0,
        tax: int = 0,
        tax_included: bool = False,
    ) -> dict[str, Any]:
        """Seed a completed checkout.session; totals are the sum of ``line_items``.

        ``line_items`` are ``(description, quantity, unit_amount)``, default one 2000 T-shirt.
        With ``account`` (Stripe Connect) the session lives on that connected account and,
        as on Stripe, is found only by requests with ``Stripe-Account: <account>``.
        ``mode="setup"``: a session that only saved a payment method, as Stripe has it: no
        items, no amounts, no currency, ``no_payment_required`` and a SetupIntent.
        ``mode="subscription"``: monthly prices and a Subscription id. ``discount``,
        ``shipping`` and ``tax`` go into ``total_details`` and, as on Stripe, into the line
        items' ``amount_total`` (after discounts and taxes; here all on the first item),
        while ``amount_subtotal`` stays before them. ``tax_included``: the prices include
        the tax (VAT-style), so it does not add to the total.
        Returns the stored session (without ``line_items``, which appear only when expanded).
        """
        setup = mode == "setup"
        items = [
            self._line_item(
                description, quantity, unit_amount, currency, recurring=mode == "subscription"
            )
            for description, quantity, unit_amount in (line_items or [("T-shirt", 1, 2000)])
            if not setup
        ]
        subtotal: int | None = None if setup else sum(item["amount_subtotal"] for item in items)
        added_tax = 0 if tax_included else tax
        total = None if subtotal is None else subtotal - discount + shipping + added_tax
        if items and (discount or tax):
            first = items[0]
            first.update(amount_discount=discount, amount_tax=tax)
            first["amount_total"] = first["amount_subtotal"] - discount + added_tax
        if setup:
            payment_status = "no_payment_required"
        session = fixture("checkout.session")
        sid = session_id or _new_id("cs")
        now = int(time.time())
        session.update(
            id=sid,
            url=None,
            status="complete",
            mode=mode,
            payment_status=payment_status,
            currency=None if setup else currency,
            amount_subtotal=subtotal,
            amount_total=total,
            created=now,
            expires_at=now + 24 * 3600,
            customer=customer,
            metadata=dict(metadata or {}),
            payment_intent=None if payment_status == "no_payment_required" else _new_id("pi"),
            setup_intent=_new_id("seti") if setup else None,
            subscription=_new_id("sub") if mode == "subscription" else None,
            currency_conversion=None,
            shipping_cost=None,
            shipping_address_collection=None,
            collected_information=None,
            total_details=None
            if setup
            else {"amount_discount": discount, "amount_shipping": shipping, "amount_tax": tax},
        )
        session["customer_details"]["email"] = customer_email
        self.sessions[sid] = session
        self.line_items[sid] = items
        if account is not None:
            self.session_accounts[sid] = account
        return session

    def set_payment_status(self, session_id: str, status: str) -> None:
        self.sessions[session_id]["payment_status"] = status

    def add_event(self, event: dict[str, Any], *, delivery_success: bool = False) -> dict[str, Any]:
        """Store a full Stripe event dict; ``/v1/events`` lists newest ``created`` first."""
        self.events[event["id"]] = event
        self.delivery_success[event["id"]] = delivery_success
        self._event_order[event["id"]] = next(self._sequence)
        return event

    def add_session_event(
        self,
        session_id: str,
        event_type: str = "checkout.session.completed",
        *,
        created: int | None = None,
        delivery_success: bool = False,
    ) -> dict[str, Any]:
        """Store an event (from the event fixture) around a snapshot of a seeded session."""
        event = fixture("event")
        event.update(
            id=_new_id("evt"),
            type=event_type,
            created=int(time.time()) if created is None else created,
            api_version=API_VERSION,
            data={"object": copy.deepcopy(self.sessions[session_id])},
        )
        if session_id in self.session_accounts:
            event["account"] = self.session_accounts[session_id]  # a Connect event
        return self.add_event(event, delivery_success=delivery_success)

    # --- faults --------------------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int = 500,
        *,
        should_retry: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        """The next ``n`` requests answer ``status`` with Stripe's error JSON (queued after
        earlier calls). ``should_retry`` sets ``Stripe-Should-Retry``, which stripe-python's
        retry loop obeys (without it, it retries 409 and 5xx but never 429). ``retry_after``
        sets ``Retry-After`` (Stripe sends none; a gateway in front of it may)."""
        error = StripeError.injected(status, should_retry, retry_after)
        self._fail_queue.extend([(None, error.response)] * n)

    def answer_next(
        self,
        n: int,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "text/html",
        headers: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        """The next ``n`` requests get this answer instead of Stripe's (queued with
        ``fail_next``): what a proxy or gateway in front of Stripe may send, such as an
        HTML error page (with a ``Retry-After``) or a body that is not a JSON object.
        ``path`` (a glob, e.g. ``*/line_items``): only requests to it; others pass."""

        def answer() -> web.Response:
            return web.Response(
                body=body, status=status, content_type=content_type, headers=headers
            )

        self._fail_queue.extend([(path, answer)] * n)

    def fail_rate(self, fraction: float, statuses: Sequence[int] = (429, 500)) -> None:
        """Fail each request with probability ``fraction``, status drawn from ``statuses``
        (seeded by the constructor's ``seed``). ``fail_rate(0)`` turns it off."""
        self._fail_fraction = fraction
        self._fail_statuses = tuple(statuses)

    def drop_next(self, n: int) -> None:
        """Close the connection of the next ``n`` requests without answering.

        Note aiohttp's client (stripe-python's ``AIOHTTPClient``) itself resends an idempotent
        request once after a server disconnect, so it takes two drops to fail one GET there.
        """
        self._drops += n

    def clear_faults(self) -> None:
        self._fail_queue.clear()
        self._fail_fraction = 0.0
        self._drops = 0
        self.latency_s = 0.0

    @property
    def request_count(self) -> int:
        return len(self.requests)

    # --- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/checkout/sessions/{id}", self._get_session)
        app.router.add_get("/v1/checkout/sessions/{id}/line_items", self._get_line_items)
        app.router.add_get("/v1/events", self._list_events)
        app.router.add_get("/v1/events/{id}", self._get_event)
        app.router.add_get("/v1/customers/{id}", self._get_customer)
        # Checkout (devkit/stripe/checkout.py), answered once ``checkout`` is set
        for method, path, name in (
            ("POST", "/v1/checkout/sessions", "create_session"),
            ("GET", "/v1/prices/{id}", "get_price"),
            ("GET", "/pay/{id}", "hosted_page"),
            ("POST", "/pay/{id}", "pay"),
        ):
            app.router.add_route(method, path, self._checkout_route(name))
        # Control routes, for a stand-in running in another process (benchmarks, demo, chaos).
        app.router.add_post(f"{ADMIN}/sessions", self._admin_add_session)
        app.router.add_post(f"{ADMIN}/sessions/{{id}}/payment_status", self._admin_set_status)
        app.router.add_post(f"{ADMIN}/faults", self._admin_faults)
        app.router.add_get(f"{ADMIN}/stats", self._admin_stats)
        app.router.add_route("*", "/{tail:.*}", self._unrecognized)
        return app

    def _checkout_route(self, name: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if self.checkout is None:
                return await self._unrecognized(request)
            result: web.StreamResponse = await getattr(self.checkout, name)(request)
            return result

        return handler

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith((ADMIN + "/", "/pay/")):
            # control routes and the hosted page: no faults, no API key, not counted
            return await handler(request)
        self.requests.append((request.method, request.path))
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if self._drops > 0:
            self._drops -= 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)  # never sent: the connection is gone
        request_id = "req_" + secrets.token_hex(7)
        response: web.StreamResponse | None = self._injected(request.path)
        if response is None:
            try:
                self._authenticate(request)
                response = await handler(request)
            except StripeError as exc:
                response = exc.response()
        response.headers["Request-Id"] = request_id
        response.headers["Stripe-Version"] = request.headers.get("Stripe-Version", API_VERSION)
        return response

    def _injected(self, path: str) -> web.Response | None:
        """The fault's answer for this request, if one is due."""
        if self._fail_queue:
            only, answer = self._fail_queue[0]
            if only is None or fnmatch.fnmatchcase(path, only):
                self._fail_queue.popleft()
                return answer()
        if self._fail_fraction > 0 and self._rng.random() < self._fail_fraction:
            return StripeError.injected(self._rng.choice(self._fail_statuses)).response()
        return None

    async def _admin_add_session(self, request: web.Request) -> web.Response:
        """POST {id?, line_items?: [[description, quantity, unit_amount]], and any other
        keyword of ``add_session``}; what is left out takes ``add_session``'s default."""
        body = await request.json()
        unknown = set(body) - {"id", "line_items", *_SEEDABLE}
        if unknown:
            return web.json_response(
                {"error": f"unknown fields {sorted(unknown)}; known: id, line_items, "
                 f"{', '.join(_SEEDABLE)}"},
                status=400,
            )  # fmt: skip
        options: dict[str, Any] = {k: body[k] for k in _SEEDABLE if k in body}
        if body.get("line_items"):
            options["line_items"] = [tuple(item) for item in body["line_items"]]
        session = self.add_session(body.get("id"), **options)
        return web.json_response(session, status=201)

    async def _admin_set_status(self, request: web.Request) -> web.Response:
        session_id = request.match_info["id"]
        if session_id not in self.sessions:
            raise StripeError.missing("checkout.session", session_id, "session")
        self.set_payment_status(session_id, (await request.json())["payment_status"])
        return web.json_response(self.sessions[session_id])

    async def _admin_faults(self, request: web.Request) -> web.Response:
        """POST {latency_s?, fail_rate?, statuses?, fail_next?: n, status?, retry_after?,
        drop_next?, clear?}."""
        body = await request.json()
        if body.get("clear"):
            self.clear_faults()
            self.latency_s = 0.0
        if "latency_s" in body:
            self.latency_s = float(body["latency_s"])
        if "fail_rate" in body:
            self.fail_rate(float(body["fail_rate"]), tuple(body.get("statuses", (429, 500))))
        if body.get("fail_next"):
            retry_after = body.get("retry_after")
            self.fail_next(
                int(body["fail_next"]),
                int(body.get("status", 500)),
                retry_after=None if retry_after is None else float(retry_after),
            )
        if body.get("drop_next"):
            self.drop_next(int(body["drop_next"]))
        return web.json_response({"latency_s": self.latency_s})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.request_count, "sessions": len(self.sessions)})

    @staticmethod
    def _authenticate(request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        key = auth[len("Bearer ") :].strip()
        if not key.startswith(("sk_", "rk_")):
            raise StripeError(
                401, f"Invalid API Key provided: {key[:8]}****", code="api_key_invalid"
            )

    def _lookup(self, object_id: str) -> dict[str, Any] | None:
        return self.customers.get(object_id) or self.products.get(object_id)

    def _line_item_list(
        self, session_id: str, query: Mapping[str, str], expand: list[str]
    ) -> dict[str, Any]:
        url = f"/v1/checkout/sessions/{session_id}/line_items"
        page = _paginate(copy.deepcopy(self.line_items[session_id]), query, url, "item")
        for path in expand:
            _expand(page, path.split("."), self._lookup)
        return page

    def _session_id(self, request: web.Request) -> str:
        """The path's session id, if it exists for the account asked on behalf of."""
        sid = request.match_info["id"]
        account = request.headers.get("Stripe-Account")
        if sid not in self.sessions or self.session_accounts.get(sid) != account:
            raise StripeError.missing("checkout.session", sid, "session")
        return sid

    async def _get_session(self, request: web.Request) -> web.Response:
        sid = self._session_id(request)
        session = copy.deepcopy(self.sessions[sid])
        expand = _list_param(request.query, "expand")
        if any(path.split(".")[0] == "line_items" for path in expand):
            nested = [p.split(".", 1)[1] for p in expand if p.startswith("line_items.")]
            # Like Stripe: the first page (10 items) with has_more; the rest via /line_items.
            session["line_items"] = self._line_item_list(sid, {}, nested)
        for path in expand:
            if not path.startswith("line_items"):
                _expand(session, path.split("."), self._lookup)
        return web.json_response(session)

    async def _get_line_items(self, request: web.Request) -> web.Response:
        sid = self._session_id(request)
        expand = _list_param(request.query, "expand")
        return web.json_response(self._line_item_list(sid, request.query, expand))

    def _matching_events(
        self, query: Mapping[str, str], account: str | None = None
    ) -> list[dict[str, Any]]:
        types = _list_param(query, "types") + _list_param(query, "type")
        created_exact = _int_param(query, "created")
        bounds = {op: _int_param(query, f"created[{op}]") for op in ("gt", "gte", "lt", "lte")}
        delivered = _bool_param(query, "delivery_success")

        def keep(event: dict[str, Any]) -> bool:
            created = int(event["created"])
            checks = (
                not types or any(fnmatch.fnmatchcase(event["type"], t) for t in types),
                created_exact is None or created == created_exact,
                bounds["gt"] is None or created > bounds["gt"],
                bounds["gte"] is None or created >= bounds["gte"],
                bounds["lt"] is None or created < bounds["lt"],
                bounds["lte"] is None or created <= bounds["lte"],
                delivered is None or self.delivery_success[event["id"]] == delivered,
                # like Stripe: an account's own events only (a connected account's with
                # Stripe-Account, the platform's without)
                event.get("account") == account,
            )
            return all(checks)

        events = [event for event in self.events.values() if keep(event)]
        events.sort(key=lambda e: (e["created"], self._event_order[e["id"]]), reverse=True)
        return events

    async def _list_events(self, request: web.Request) -> web.Response:
        events = self._matching_events(request.query, request.headers.get("Stripe-Account"))
        return web.json_response(_paginate(events, request.query, "/v1/events", "event"))

    async def _get_event(self, request: web.Request) -> web.Response:
        event_id = request.match_info["id"]
        event = self.events.get(event_id)
        if event is None or event.get("account") != request.headers.get("Stripe-Account"):
            raise StripeError.missing("event", event_id)
        return web.json_response(event)

    async def _get_customer(self, request: web.Request) -> web.Response:
        customer_id = request.match_info["id"]
        if customer_id not in self.customers:
            raise StripeError.missing("customer", customer_id)
        return web.json_response(self.customers[customer_id])

    async def _unrecognized(self, request: web.Request) -> web.Response:
        raise StripeError(
            404,
            f"Unrecognized request URL ({request.method}: {request.path}). Please see "
            "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        )


@contextlib.asynccontextmanager
async def serve(
    standin: StripeStandIn, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``standin`` (on a free port by default); yields its base URL, ``http://host:port``."""
    runner = web.AppRunner(standin.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a local Stripe API stand-in. Seed and fault it over HTTP: "
        f"POST {ADMIN}/sessions, POST {ADMIN}/sessions/ID/payment_status, "
        f"POST {ADMIN}/faults, GET {ADMIN}/stats."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay on every API call")
    args = parser.parse_args(argv)
    standin = StripeStandIn(latency_s=args.latency_s)
    customer = standin.add_customer("cus_demo")
    standin.add_session(
        "cs_test_demo_paid",
        line_items=[("T-shirt", 2, 2000), ("Mug", 1, 1200)],
        customer=customer["id"],
    )
    standin.add_session("cs_test_demo_unpaid", payment_status="unpaid")
    standin.add_session_event("cs_test_demo_paid")
    standin.add_session_event("cs_test_demo_unpaid", "checkout.session.async_payment_failed")
    print(json.dumps({"sessions": sorted(standin.sessions), "events": sorted(standin.events)}))
    web.run_app(standin.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
