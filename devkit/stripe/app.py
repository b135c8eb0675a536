"""The stand-in's HTTP face: Stripe's API routes over its objects, with its faults applied.

Served endpoints (all ``GET``, ``Authorization: Bearer sk_...`` required)::

    /v1/checkout/sessions                  status, created[gt|gte|lt|lte], limit,
                                           starting_after, ending_before, expand[]
    /v1/checkout/sessions/{id}             expand[]: line_items, line_items.data.price.product,
                                           customer
    /v1/checkout/sessions/{id}/line_items  limit, starting_after, ending_before, expand[]
    /v1/events                             type, types[], created[gt|gte|lt|lte], delivery_success,
                                           limit, starting_after, ending_before
    /v1/events/{id}
    /v1/customers/{id}

With a :class:`~devkit.stripe.checkout.HostedCheckout` attached, also Checkout Session
creation, prices and the hosted payment page. Under ``/_standin`` (no key, no faults):
control routes to seed and fault a stand-in that runs in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from devkit.stripe.errors import StripeError
from devkit.stripe.faults import Faults
from devkit.stripe.params import expand_field, list_param, paginate
from devkit.stripe.store import API_VERSION, SEEDABLE, StripeObjects

__all__ = ["ADMIN", "StripeStandIn", "serve"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADMIN = "/_standin"


class StripeStandIn(StripeObjects, Faults):
    """Objects and faults served over HTTP; seed objects, then point stripe-python here.

    Every request, faulted or not, is logged in :attr:`requests` as ``(method, path)``.
    """

    def __init__(self, *, seed: int | None = None, latency_s: float = 0.0) -> None:
        StripeObjects.__init__(self)
        Faults.__init__(self, seed=seed, latency_s=latency_s)
        self.requests: list[tuple[str, str]] = []
        self.checkout: Any = None  # a HostedCheckout adds session creation and the pay page

    @property
    def request_count(self) -> int:
        return len(self.requests)

    # --- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/checkout/sessions", self._list_sessions)
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
        # Control routes, for a stand-in in another process (ops/ scripts, `fulfillment up`).
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
        if self.take_drop():
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)  # never sent: the connection is gone
        request_id = "req_" + secrets.token_hex(7)
        response: web.StreamResponse | None = self.injected_answer(request.path)
        if response is None:
            try:
                self._authenticate(request)
                response = await handler(request)
            except StripeError as exc:
                response = exc.response()
        response.headers["Request-Id"] = request_id
        response.headers["Stripe-Version"] = request.headers.get("Stripe-Version", API_VERSION)
        return response

    async def _admin_add_session(self, request: web.Request) -> web.Response:
        """POST {id?, line_items?: [[description, quantity, unit_amount]], and any other
        keyword of ``add_session``}; what is left out takes ``add_session``'s default."""
        body = await request.json()
        unknown = set(body) - {"id", "line_items", *SEEDABLE}
        if unknown:
            return web.json_response(
                {"error": f"unknown fields {sorted(unknown)}; known: id, line_items, "
                 f"{', '.join(SEEDABLE)}"},
                status=400,
            )  # fmt: skip
        options: dict[str, Any] = {k: body[k] for k in SEEDABLE if k in body}
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
        """POST {latency_s?, fail_rate?, statuses?, fail_next?: n, fail_for_s?, status?,
        retry_after?, drop_next?, clear?}."""
        body = await request.json()
        if body.get("clear"):
            self.clear_faults()
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
        if body.get("fail_for_s"):
            self.fail_for(float(body["fail_for_s"]), int(body.get("status", 500)))
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

    def _line_item_list(
        self, session_id: str, query: Mapping[str, str], expand: list[str]
    ) -> dict[str, Any]:
        url = f"/v1/checkout/sessions/{session_id}/line_items"
        page = paginate(copy.deepcopy(self.line_items[session_id]), query, url, "item")
        for path in expand:
            expand_field(page, path.split("."), self.lookup)
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
        expand = list_param(request.query, "expand")
        if any(path.split(".")[0] == "line_items" for path in expand):
            nested = [p.split(".", 1)[1] for p in expand if p.startswith("line_items.")]
            # Like Stripe: the first page (10 items) with has_more; the rest via /line_items.
            session["line_items"] = self._line_item_list(sid, {}, nested)
        for path in expand:
            if not path.startswith("line_items"):
                expand_field(session, path.split("."), self.lookup)
        return web.json_response(session)

    async def _get_line_items(self, request: web.Request) -> web.Response:
        sid = self._session_id(request)
        expand = list_param(request.query, "expand")
        return web.json_response(self._line_item_list(sid, request.query, expand))

    async def _list_sessions(self, request: web.Request) -> web.Response:
        """Newest first, as Stripe lists them; a connected account's with ``Stripe-Account``."""
        sessions = self.matching_sessions(request.query, request.headers.get("Stripe-Account"))
        page = paginate(sessions, request.query, "/v1/checkout/sessions", "checkout.session")
        page["data"] = copy.deepcopy(page["data"])
        for path in list_param(request.query, "expand"):
            expand_field(page, path.split("."), self.lookup)
        return web.json_response(page)

    async def _list_events(self, request: web.Request) -> web.Response:
        events = self.matching_events(request.query, request.headers.get("Stripe-Account"))
        return web.json_response(paginate(events, request.query, "/v1/events", "event"))

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
