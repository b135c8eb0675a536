"""Reading a Checkout Session from Stripe: the session with every line item, errors classified."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import stripe

from shared.envelope import EventEnvelope
from shared.errors import PermanentError, TransientError
from shared.stripe_client import StripeNotFound, classify
from worker.order import Order

# Far above Checkout's own limit (100 line items per session): a bound on a list that never
# ends, not a limit on real orders.
MAX_LINE_ITEMS = 10_000


class StripeReader:
    """Retrieves sessions as Orders; Stripe's errors come out as TransientError/PermanentError."""

    def __init__(self, client: stripe.StripeClient, *, live_key: bool | None = None) -> None:
        """``live_key``: whether STRIPE_API_KEY is a live-mode key (None: not known)."""
        self._stripe = client
        self._live_key = live_key

    async def retrieve(self, session_id: str, account: str | None = None) -> Order:
        """The session with all its line items, straight from Stripe.

        Through stripe-python's raw request (its HTTP client, retries, authentication and
        error classes) but reading the JSON as plain dicts, since building StripeObject trees
        for the session and its items costs a large share of a fulfillment's CPU.
        ``account``: a connected account's session is read on its behalf (``Stripe-Account``).
        """
        path = f"/v1/checkout/sessions/{quote(session_id, safe='')}"
        try:
            options = {"stripe_account": account} if account else {}
            doc = await self._get(path, {"expand": ["line_items"], **options})
            expanded = doc.get("line_items")
            if isinstance(expanded, dict) and isinstance(expanded.get("data"), list):
                # the expansion holds the first page only; the rest come from /line_items
                items = list(expanded["data"])
                has_more = bool(expanded.get("has_more"))
            else:
                # not expanded (an API, or a stand-in, that ignored expand[]): an order
                # must not go out without its items, so every page comes from /line_items
                items, has_more = [], True
            while has_more:
                after = {"starting_after": items[-1]["id"]} if items else {}
                page = await self._get(f"{path}/line_items", {"limit": 100, **after, **options})
                data = page.get("data")
                if page.get("object") != "list" or not isinstance(data, list):
                    # not Stripe's answer (it always sends a list here): an order must not
                    # go out with items missing, so try again rather than stop paging
                    raise TransientError(f"Stripe answered {path}/line_items with no list")
                if page.get("has_more") and not data:
                    raise TransientError(f"Stripe answered {path}/line_items with an empty page")
                items += data
                has_more = bool(page.get("has_more"))
                if len(items) > MAX_LINE_ITEMS:
                    # Checkout takes at most 100 line items, so a list that never ends is
                    # not Stripe's, and paging it unbounded would never stop
                    raise PermanentError(f"{path} lists more than {MAX_LINE_ITEMS} line items")
            doc["line_items"] = {"object": "list", "data": items, "has_more": False}
        except stripe.StripeError as exc:
            raise classify(exc) from exc
        if doc.get("id") != session_id:
            # not the session asked for (a cache or gateway in between mixing answers up):
            # fulfilling it would fulfill someone else's order under this one's lock
            raise TransientError(f"Stripe answered {path} with another object's id")
        return Order.from_session(doc, account=account)

    async def retrieve_for(self, session_id: str, event: EventEnvelope) -> Order:
        """``retrieve``, saying so when Stripe cannot find the session because the event and
        the API key are of different modes (a live endpoint's secret with a test key): a
        setting to fix, so it is retried (and replayable) rather than an unknown session."""
        try:
            return await self.retrieve(session_id, event.account)
        except StripeNotFound as exc:
            # Only this direction: a live endpoint also gets connected accounts' test events
            # (Stripe Connect), which a live key cannot read and nobody needs fulfilled.
            live_session = session_id.startswith("cs_live_") or (
                event.livemode and not session_id.startswith("cs_test_")
            )
            if not (live_session and self._live_key is False):
                raise
            raise TransientError(
                "a live-mode session, but STRIPE_API_KEY is a test-mode key, so Stripe cannot "
                f"see it: fix the key or the endpoint ({exc})"
            ) from exc

    async def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        response = await self._stripe.raw_request_async("get", path, **params)
        data = response.data
        if not isinstance(data, dict):
            # Stripe answers every GET with an object: this came from something in between
            # (a proxy, a gateway) or was cut short, so it may well be right next time.
            raise TransientError(f"Stripe answered {path} with something not an object")
        return data
