"""Fulfillment, as Stripe's Checkout guide asks: keyed on the session, safe to run many times.

``fulfill(session_id)`` may run for every event of a session, concurrently on many workers,
after crashes at any instant. Per session:

1. Retrieve the session from Stripe with its line items (the event may be stale).
2. Take the session's advisory lock in PostgreSQL: one worker at a time per session.
3. In one transaction: the ``fulfillments`` row and its line items, if not there yet.
4. Each external effect in turn (``order.fulfilled`` message, confirmation email): skip it
   if recorded, else do it and record it (committed at once). Only an effect whose outcome
   is unknown is repeated (a crash between doing and recording it, an outbound message the
   broker did not confirm in time), with the same deterministic id for receivers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeAlias

from shared.envelope import EventEnvelope
from shared.errors import PermanentError, TransientError
from shared.logging import get_logger
from shared.vocabulary import PAYMENT_SUCCEEDED, SESSION_COMPLETED, Outcome
from worker import mail, metrics
from worker.order import Order
from worker.outbound import Outbound
from worker.relay import EmailInDoubt
from worker.settings import SmtpSettings
from worker.store import LockedSession, SessionState, Store
from worker.stripe_reader import StripeReader

log = get_logger(__name__)

Effect = Callable[[Order], Awaitable[str]]

# The effects of a fulfillment, in order; each is recorded under its name once done. The
# message the rest of the business acts on (shipping, access) goes first: a courtesy email
# held up by an SMTP outage or a recipient's deferral must not hold it up for hours.
FULFILLED_STEPS = ("order_fulfilled_message", "confirmation_email")


# The external effects done while handling one message, as (step, detail) in order, kept
# by the caller across its in-process retries: the outcome line lists them all, also those
# of an attempt that failed afterwards.
EffectsLog: TypeAlias = list[tuple[str, str]]


class Fulfiller:
    """Handlers for the Checkout events; every method is idempotent per session."""

    def __init__(
        self, store: Store, stripe: StripeReader, outbound: Outbound, smtp: SmtpSettings
    ) -> None:
        self._store = store
        self._stripe = stripe
        self._outbound = outbound
        self._smtp = smtp
        self._mailer = mail.Mailer(smtp)

    async def close(self) -> None:
        await self._mailer.close()

    async def fulfill(
        self, session_id: str, event: EventEnvelope, effects_log: EffectsLog
    ) -> Outcome:
        """Fulfill a paid (or free) session once; record an unpaid one as awaiting payment.

        Each external effect done is appended to ``effects_log`` as soon as it is done: the
        caller keeps one across its in-process retries of the message."""
        # `completed` is a session's first event nearly always (Stripe sends it once;
        # duplicates are rare), so checking first would cost every order a round trip to
        # save a rare API call. Every other event usually follows a fulfillment.
        if event.type != SESSION_COMPLETED and await self._settled_before(
            session_id, event, Outcome.ALREADY_FULFILLED
        ):
            return Outcome.ALREADY_FULFILLED
        order = await self._stripe.retrieve_for(session_id, event)
        if order.payment_status not in ("paid", "no_payment_required", "unpaid"):
            raise PermanentError(f"unexpected payment_status {order.payment_status!r}")
        if order.mode == "setup":
            # A setup-mode Checkout only saved a payment method for later: nothing was sold,
            # so there is no order to record, confirm or announce, though its payment_status
            # (no_payment_required) reads like a free order's. Recorded as handled.
            await self._store.record_event(event, session_id, Outcome.NOT_AN_ORDER)
            return Outcome.NOT_AN_ORDER
        async with self._store.locked(session_id) as held:
            state, steps = await held.read_state()
            # (a fulfilled session stays one: an "unpaid" read racing the payment is stale,
            # and the effects still owed go on below)
            if order.payment_status == "unpaid" and state != SessionState.FULFILLED:
                outcome = await self._await_payment(held, order, event, state)
            else:
                outcome = await self._complete(held, order, event, state, steps, effects_log)
            await held.finish(event, outcome)
        return outcome

    async def _await_payment(
        self,
        held: LockedSession,
        order: Order,
        event: EventEnvelope,
        state: SessionState | None,
    ) -> Outcome:
        """An unpaid session (a delayed payment method): recorded as awaiting payment."""
        if event.type == PAYMENT_SUCCEEDED:
            # The event says the payment went through, and no later event will come to
            # fulfill it: shelved as "awaiting payment", the order would be lost in
            # silence. Retried until Stripe agrees, else dead-lettered.
            raise TransientError(
                f"Stripe still says session {order.session_id} is unpaid, though this "
                "event says its delayed payment succeeded"
            )
        if state in (None, SessionState.NEW):
            await held.set_state(order, event.id, SessionState.AWAITING_PAYMENT)
        return Outcome.AWAITING_PAYMENT

    async def _complete(
        self,
        held: LockedSession,
        order: Order,
        event: EventEnvelope,
        state: SessionState | None,
        steps: frozenset[str],
        effects_log: EffectsLog,
    ) -> Outcome:
        """A paid (or free) session: the order recorded once, then every effect still owed."""
        created = state != SessionState.FULFILLED
        if created:
            if not order.items:
                # Checkout sells at least one item; Stripe's answer is odd, and the order is
                # recorded once: said where an operator will see it
                log.warning(
                    "paid order without line items",
                    checkout_session_id=order.session_id,
                    amount_total=order.amount_total,
                )
            await held.record_fulfillment(order, event.id)
        effects = (partial(self._outbound.order_fulfilled, event), self._send_confirmation)
        await self._run_effects(
            held, order, steps, effects_log, tuple(zip(FULFILLED_STEPS, effects, strict=True))
        )
        # "fulfilled" when this message did any of it: the row, the effects an earlier
        # delivery left undone (SMTP was down, the worker was killed), or all of it in an
        # attempt that failed only afterwards (its record or lock); the log may also hold a
        # failed-payment attempt's steps, hence the filter
        did = created or any(step in FULFILLED_STEPS for step, _ in effects_log)
        return Outcome.FULFILLED if did else Outcome.ALREADY_FULFILLED

    async def payment_failed(
        self, session_id: str, event: EventEnvelope, effects_log: EffectsLog
    ) -> Outcome:
        """Tell the customer once, record it; never for a session already fulfilled."""
        if await self._settled_before(session_id, event, Outcome.IGNORED_FULFILLED):
            return Outcome.IGNORED_FULFILLED
        order = await self._stripe.retrieve_for(session_id, event)
        if order.payment_status != "unpaid":
            # Stripe's current word wins over a stale event: a paid session is fulfilled.
            return await self.fulfill(session_id, event, effects_log)
        async with self._store.locked(session_id) as held:
            state, steps = await held.read_state()
            if state == SessionState.FULFILLED:
                outcome = Outcome.IGNORED_FULFILLED
            else:
                if state != SessionState.PAYMENT_FAILED:
                    await held.set_state(order, event.id, SessionState.PAYMENT_FAILED)
                await self._run_effects(
                    held,
                    order,
                    steps,
                    effects_log,
                    (  # the message first, as for a fulfillment
                        ("payment_failed_message", partial(self._outbound.payment_failed, event)),
                        ("payment_failed_email", self._send_failure),
                    ),
                )
                outcome = Outcome.PAYMENT_FAILED
            await held.finish(event, outcome)
        return outcome

    async def _settled_before(
        self, session_id: str, event: EventEnvelope, outcome: Outcome
    ) -> bool:
        """True (and the event recorded as handled) when the session is fulfilled with every
        effect recorded: nothing Stripe could say now changes that, so the API call is
        skipped. A session's later events (async_payment_succeeded, the landing page's
        fulfillment.requested, a stale failure) would otherwise spend Stripe's rate limit
        (100 reads/s in live mode by default). One round trip; no lock, as nothing is done."""
        return await self._store.settled_before(session_id, event, outcome, FULFILLED_STEPS)

    async def _run_effects(
        self,
        held: LockedSession,
        order: Order,
        already_done: frozenset[str],
        effects_log: EffectsLog,
        effects: tuple[tuple[str, Effect], ...],
    ) -> None:
        """Do each effect not yet recorded, recording it (committed) right after; each done
        one goes into ``effects_log`` at once."""
        for step, effect in effects:
            if step in already_done:
                continue
            detail = await effect(order)
            effects_log.append((step, detail))  # done, even if recording it fails
            await held.record_step(step, detail)
            # DEBUG: the outcome line lists every effect with its detail (one line per
            # message); this one is for tracing a handler that died mid-way
            log.debug("effect done", checkout_session_id=order.session_id, step=step, detail=detail)

    async def _send_confirmation(self, order: Order) -> str:
        return await self._send(order, mail.confirmation_email)

    async def _send_failure(self, order: Order) -> str:
        return await self._send(order, mail.payment_failed_email)

    async def _send(self, order: Order, build: Callable[[Order, str], Any]) -> str:
        if not order.customer_email:
            return "skipped: the session has no customer email"
        try:
            message = build(order, self._smtp.sender)
            await self._mailer.send(message)
        except mail.Undeliverable as exc:
            # The order stands (the row is committed, the customer paid): the email is
            # recorded as failed, for support to follow up, rather than dead-lettering an
            # event whose replay could never succeed.
            metrics.UNDELIVERABLE_EMAILS.labels(build.__name__).inc()
            log.warning(
                "email undeliverable; recorded as failed",
                checkout_session_id=order.session_id,
                error=str(exc),
            )
            return f"failed: {exc}"[:1000]
        except EmailInDoubt as exc:
            # not recorded: the delay queue sends it again (same Message-ID) unless a
            # recipient's server drops the repeat
            metrics.EMAILS_IN_DOUBT.labels(build.__name__).inc()
            log.warning(
                "email outcome unknown; sent again through the delay queue",
                checkout_session_id=order.session_id,
                message_id=message["Message-ID"],
                error=str(exc),
            )
            raise
        return f"sent {message['Message-ID']}"
