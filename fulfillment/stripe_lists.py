"""Every page of a Stripe list, each page asked for again through Stripe's passing failures.

``backfill`` (events) and ``reconcile`` (Checkout Sessions) page through long lists while
the workers spend the same account's rate limit: a 429 or a 5xx on page 40 is waited out
rather than ending a run that paged through 39 already.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import stripe
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from shared.backoff import compute_backoff
from shared.errors import FulfillmentError, TransientError
from shared.logging import get_logger
from shared.stripe_client import AIOHTTPClient, StripeSettings, classify, make_client

log = get_logger(__name__)

# Tries per page: what shared.stripe_client.classify calls transient (a 429: the account's
# read limit is shared with the workers, which may be catching up too; a 5xx, 409, 401/403,
# a dropped or cut-off answer) is waited out, 4 to 8 s over the tries.
PAGE_TRIES = 5
# The longest wait between tries, also when Stripe (or a gateway) asks for longer.
PAGE_WAIT_MAX_S = 30.0
# Stripe's largest page.
PAGE_SIZE = 100

# One page of a list: stripe-python's ``list_async`` of a resource, given the query.
ListPage = Callable[[stripe.StripeClient, dict[str, Any]], Awaitable[Any]]


async def list_every_page(
    settings: StripeSettings,
    list_page: ListPage,
    params: dict[str, Any],
    *,
    noun: str,
    fields: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every object the list holds, in Stripe's order (newest first), as plain dicts: only
    their ``fields`` when given, so that a long list is kept in a fraction of the memory.

    Pages of ``PAGE_SIZE`` (``params`` may say less), after the last object of the page
    before (``starting_after``); a failed page is tried ``PAGE_TRIES`` times, its failure
    logged (``listing Stripe <noun> failed; retrying``). Raises FulfillmentError in one
    line once a page fails for good, or at once on Stripe's verdict on the request (a 400).
    """
    # ours: a body cut short becomes an APIConnectionError (retried), not aiohttp's own
    http = AIOHTTPClient(timeout=settings.timeout_s)
    client = make_client(settings, http_client=http)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(PAGE_TRIES),
        wait=page_wait,
        retry=retry_if_exception_type(TransientError),
        before_sleep=_retry_logged(noun),
        reraise=True,
    )
    found: list[dict[str, Any]] = []
    try:
        after: dict[str, str] = {}
        while True:
            query = {"limit": PAGE_SIZE, **params, **after}
            page: Any = await retrying(_page, list_page, client, query)
            for item in page.data:
                doc = item.to_dict(for_json=True)
                found.append(doc if fields is None else {k: doc.get(k) for k in fields})
            # an empty page cannot name the next one (starting_after is its last object's id)
            if not page.has_more or not page.data:
                break
            after = {"starting_after": page.data[-1].id}
    except FulfillmentError as exc:
        raise FulfillmentError(str(exc)) from None  # one line, no chain
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    return found


async def _page(list_page: ListPage, client: stripe.StripeClient, query: dict[str, Any]) -> Any:
    """One page; Stripe's errors as ours (transient or permanent)."""
    try:
        return await list_page(client, query)
    except stripe.StripeError as exc:
        raise classify(exc) from exc


def page_wait(state: RetryCallState) -> float:
    """Growing waits between tries, or what the answer asked for (Retry-After), bounded."""
    exc = state.outcome.exception() if state.outcome else None
    asked = getattr(exc, "retry_after_s", None) or 0.0
    backoff = compute_backoff(state.attempt_number, base_s=0.5, max_s=PAGE_WAIT_MAX_S)
    return min(max(asked, backoff), PAGE_WAIT_MAX_S)


def _retry_logged(noun: str) -> Callable[[RetryCallState], None]:
    def logged(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            f"listing Stripe {noun} failed; retrying",
            attempt=state.attempt_number,
            of=PAGE_TRIES,
            error=str(exc),
        )

    return logged
