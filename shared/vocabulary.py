"""The project's words, each written once: event types, message headers, ids, outcomes.

The ingress, the worker and the tools all speak them; a name that travels between processes
(a header, a routing key, an outcome in the database) is defined here and nowhere else.
"""

from __future__ import annotations

import re
from enum import StrEnum

# --- event types -----------------------------------------------------------------------

SESSION_COMPLETED = "checkout.session.completed"
PAYMENT_SUCCEEDED = "checkout.session.async_payment_succeeded"
PAYMENT_FAILED = "checkout.session.async_payment_failed"
SESSION_EXPIRED = "checkout.session.expired"  # routed to the work queue, and ignored there
# Not Stripe's: published by the ingress's success page (and the tools) to ask the workers
# to fulfill a session through the same idempotent path as its webhooks.
FULFILLMENT_REQUESTED = "fulfillment.requested"

# The Stripe event types the worker acts on (backfill lists these).
STRIPE_HANDLED_TYPES = (SESSION_COMPLETED, PAYMENT_SUCCEEDED, PAYMENT_FAILED)
# What the worker does with each type it handles.
FULFILL_TYPES = frozenset({SESSION_COMPLETED, PAYMENT_SUCCEEDED, FULFILLMENT_REQUESTED})
PAYMENT_FAILED_TYPES = frozenset({PAYMENT_FAILED})
# The routing keys the work queue is bound to.
WORK_BINDINGS = ("checkout.session.*", FULFILLMENT_REQUESTED)

# Outbound messages, on the fulfillment.out exchange (type and routing key).
ORDER_FULFILLED = "order.fulfilled"
OUTBOUND_PAYMENT_FAILED = "payment.failed"
OUTBOUND_TYPES = (ORDER_FULFILLED, OUTBOUND_PAYMENT_FAILED)

# --- message headers -------------------------------------------------------------------

# Set by the ingress (and the tools) on every event message.
HEADER_EVENT_ID = "stripe-event-id"
HEADER_EVENT_TYPE = "stripe-event-type"
HEADER_LIVEMODE = "stripe-livemode"
HEADER_CREATED = "stripe-created"
HEADER_API_VERSION = "stripe-api-version"
HEADER_ACCOUNT = "stripe-account"
HEADER_RECEIVED_AT = "received-at"

# Set by the worker on retried and dead-lettered copies; the DLQ tools read them.
HEADER_ATTEMPT = "fulfillment-attempt"
HEADER_FIRST_FAILED_AT = "fulfillment-first-failed-at"
HEADER_LAST_FAILED_AT = "fulfillment-last-failed-at"
HEADER_ERROR_TYPE = "fulfillment-error-type"
HEADER_ERROR_MESSAGE = "fulfillment-error-message"
HEADER_WORKER_ID = "fulfillment-worker-id"
# On a dead letter a worker sent: permanent, retries_exhausted or stripe_not_found.
HEADER_DEAD_LETTER_REASON = "fulfillment-dead-letter-reason"
# Set by `dlq replay` on the copy it puts back on the work queue.
HEADER_REPLAYED_FROM = "replayed-from"

# Set by the worker on outbound messages: the same on every copy, so receivers deduplicate.
HEADER_DEDUPE_ID = "fulfillment-id"
HEADER_CHECKOUT_SESSION_ID = "checkout-session-id"

# --- ids -------------------------------------------------------------------------------

# A Checkout Session id as Stripe makes them (cs_test_… or cs_live_…), and nothing that
# could change the URL it is put into.
CHECKOUT_SESSION_ID = re.compile(r"cs_(?:test|live)_[A-Za-z0-9_]{1,250}")
# A connected account's id (Stripe Connect), as events carry it and Stripe-Account takes it.
ACCOUNT_ID = re.compile(r"acct_[A-Za-z0-9]{1,250}")

# --- outcomes --------------------------------------------------------------------------


class Outcome(StrEnum):
    """What handling one message came to: the worker's log lines, its metrics'
    ``outcome`` label and ``processed_events.outcome`` all use these words."""

    FULFILLED = "fulfilled"
    ALREADY_FULFILLED = "already_fulfilled"
    AWAITING_PAYMENT = "awaiting_payment"
    PAYMENT_FAILED = "payment_failed"
    IGNORED_FULFILLED = "ignored_fulfilled"  # a failure notice for a session fulfilled
    NOT_AN_ORDER = "not_an_order"  # a setup-mode session: nothing was sold
    IGNORED = "ignored"  # a type the worker does not handle
    # the message was not handled; what became of it
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    REQUEUED = "requeued"
    ABANDONED = "abandoned"
