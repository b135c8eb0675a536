"""GET /checkout/success: where Stripe sends the customer back, telling them the truth about
their session, and asking the workers to fulfill it when it is paid.

Following Stripe's fulfillment guide, the page does not trust its query string: it reads
the session from Stripe. Reloads cost nothing: each session's answer is kept a while, in
a bounded cache, and reloads arriving together share one Stripe call. A paid session gets
one ``fulfillment.requested`` message per cached answer, with an id derived from the
session, so the workers fulfill through the same idempotent path as the webhook
(whichever comes first fulfills; the other finds it done).
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import stripe
from aiohttp import web

from ingress.checkout import LOOKUP_LIMIT, STRIPE, over_limit
from ingress.keys import PUBLISHER
from ingress.pages import page
from shared.envelope import EventEnvelope
from shared.errors import BrokerUnavailable
from shared.logging import get_logger
from shared.vocabulary import CHECKOUT_SESSION_ID, FULFILLMENT_REQUESTED

log = get_logger(__name__)

# How long an answer is kept: a settled one (paid, expired, unknown to Stripe) changes no
# more, an open or processing one may any moment.
SETTLED_TTL_S = 600.0
PENDING_TTL_S = 5.0
MAX_ANSWERS = 10_000
PAID = ("paid", "no_payment_required")


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the page says about a session: what Stripe said, and whether the workers
    were asked to fulfill it."""

    found: bool
    status: str | None = None  # open, complete or expired
    payment_status: str | None = None
    mode: str | None = None
    requested: bool = False

    @property
    def paid(self) -> bool:
        return self.status in ("complete", None) and self.payment_status in PAID

    @property
    def settled(self) -> bool:
        """Nothing Stripe says about it will change (requested, if paid)."""
        if not self.found or self.status == "expired" or self.mode == "setup":
            return True
        return self.paid and self.requested


LookUp = Callable[[], Awaitable[SessionView]]


class SessionAnswers:
    """Each session's answer for a while (least recently used first out past
    ``max_entries``); at most one look-up per session at a time."""

    def __init__(self, max_entries: int = MAX_ANSWERS, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self._clock = clock
        self._answers: OrderedDict[str, tuple[SessionView, float]] = OrderedDict()
        self._looking: dict[str, asyncio.Task[SessionView]] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def known(self, session_id: str) -> SessionView | None:
        """The answer kept for the session, if it is still fresh."""
        kept = self._answers.get(session_id)
        if kept is None:
            return None
        if kept[1] <= self._clock():
            del self._answers[session_id]
            return None
        self._answers.move_to_end(session_id)
        return kept[0]

    def looking_up(self, session_id: str) -> bool:
        return session_id in self._looking

    async def answer(self, session_id: str, look_up: LookUp) -> SessionView:
        """The kept answer, else the look-up under way, else a new one (kept once done)."""
        kept = self.known(session_id)
        if kept is not None:
            return kept
        task = self._looking.get(session_id)
        if task is None:
            task = asyncio.ensure_future(self._keep(session_id, look_up))
            self._looking[session_id] = task
            task.add_done_callback(lambda done: self._done(session_id, done))
        # shielded: a visitor who leaves does not cancel the answer others wait for
        return await asyncio.shield(task)

    def _done(self, session_id: str, task: asyncio.Task[SessionView]) -> None:
        self._looking.pop(session_id, None)
        if not task.cancelled():
            task.exception()  # its waiters have it; none left must not make it "unretrieved"

    async def _keep(self, session_id: str, look_up: LookUp) -> SessionView:
        view = await look_up()
        ttl_s = SETTLED_TTL_S if view.settled else PENDING_TTL_S
        self._answers[session_id] = (view, self._clock() + ttl_s)
        self._answers.move_to_end(session_id)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)
        return view


ANSWERS = web.AppKey("session_answers", SessionAnswers)


async def success(request: web.Request) -> web.Response:
    session_id = request.query.get("session_id", "")
    if not CHECKOUT_SESSION_ID.fullmatch(session_id):
        return page("Unknown order", "<p>That is not a Checkout Session id.</p>", status=400)
    answers = request.app[ANSWERS]
    if answers.known(session_id) is None and not answers.looking_up(session_id):
        # only what would ask Stripe counts against the client: a reload answered from
        # what is kept costs nothing
        limited = over_limit(request, request.app[LOOKUP_LIMIT], "checkout_success")
        if limited is not None:
            return limited
    try:
        view = await answers.answer(session_id, lambda: _look_up(request.app, session_id))
    except stripe.StripeError as exc:
        log.warning(
            "checkout session not read",
            checkout_session_id=session_id,
            error=f"{type(exc).__name__}: {exc.user_message or exc}",
            stripe_status=exc.http_status,
        )
        return page("Try again shortly", "<p>We could not reach Stripe.</p>", status=502)
    return _render(session_id, view)


async def _look_up(app: web.Application, session_id: str) -> SessionView:
    """Stripe's answer about the session; for a paid one, the workers asked to fulfill it."""
    try:
        session = await app[STRIPE].v1.checkout.sessions.retrieve_async(session_id)
    except stripe.StripeError as exc:
        if exc.http_status == 404:
            return SessionView(found=False)
        raise
    view = SessionView(
        found=True,
        status=getattr(session, "status", None),
        payment_status=getattr(session, "payment_status", None),
        mode=getattr(session, "mode", None),
    )
    if view.mode != "setup" and view.paid:
        livemode = bool(getattr(session, "livemode", False))
        requested = await _request_fulfillment(app, session_id, livemode)
        view = SessionView(True, view.status, view.payment_status, view.mode, requested)
    return view


def _render(session_id: str, view: SessionView) -> web.Response:
    reference = f"<p>Order reference: <code>{html.escape(session_id)}</code></p>"
    if not view.found:
        return page("Unknown order", "<p>No such Checkout Session.</p>", status=404)
    if view.mode == "setup":
        # a Checkout that only saved a card (another flow sharing this page): no order
        return page(
            "Saved",
            "<p>Your payment method was saved. Nothing was ordered or charged.</p>"
            f"<p>Reference: <code>{html.escape(session_id)}</code></p>",
        )
    state = html.escape(str(view.payment_status))
    if view.status == "expired":
        title, text = "Checkout expired", "This checkout expired before it was paid."
        text += ' Nothing was charged. <a href="/">Start again</a>.'
    elif view.status == "open":
        title, text = "Not paid yet", "This checkout is still open: nothing has been paid yet."
    elif view.paid:
        title = "Thank you!"
        text = (
            "Your payment went through and your order is being fulfilled; "
            "a confirmation email is on its way."
        )
        if not view.requested:
            text += " (Fulfillment will follow from Stripe's notification.)"
    else:
        title = "Thank you!"
        text = "Your payment is processing; we will email you as soon as it succeeds."
    return page(title, f'<p id="status" data-payment-status="{state}">{text}</p>{reference}')


def request_id(session_id: str) -> str:
    """The fulfillment request's event id (and message id): one per session, so a repeat
    is recognised as the same request (``processed_events``, a receiver's dedupe)."""
    return "req_" + hashlib.sha256(session_id.encode()).hexdigest()[:32]


async def _request_fulfillment(app: web.Application, session_id: str, livemode: bool) -> bool:
    event_id = request_id(session_id)
    doc = {
        "id": event_id,
        "object": "event",
        "type": FULFILLMENT_REQUESTED,
        "created": int(time.time()),
        "livemode": livemode,
        "api_version": None,
        "data": {"object": {"id": session_id, "object": "checkout.session"}},
    }
    raw = json.dumps(doc).encode()
    try:
        await app[PUBLISHER].publish(raw, EventEnvelope.from_dict(doc), message_id=event_id)
    except BrokerUnavailable as exc:
        # the webhook still fulfills; the page must not fail because of this
        log.warning(
            "fulfillment request not queued", checkout_session_id=session_id, error=str(exc)
        )
        return False
    return True


def install(app: web.Application) -> None:
    app[ANSWERS] = SessionAnswers()
    app.router.add_get("/checkout/success", success)
