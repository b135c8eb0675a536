"""The retry policy: what becomes of a message whose handling failed, decided without a broker.

Two stages, as in dramatiq's Retries middleware:

* in process: a transient error is tried again a few times at once (``quick_retries``);
* then ``decide``: a transient failure goes to the delay queue for its attempt (its TTL
  sends it back to the work queue), until the schedule runs out; a permanent one, or one
  past the schedule, goes to the dead-letter queue. The decision carries the headers the
  copy is published with; the consumer only carries it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base

from shared.backoff import compute_backoff
from shared.errors import PermanentError, RetryLater, TransientError
from shared.logging import mask_secrets
from shared.stripe_client import StripeNotFound
from shared.topology import Topology
from shared.vocabulary import (
    HEADER_ACCOUNT,
    HEADER_API_VERSION,
    HEADER_ATTEMPT,
    HEADER_CREATED,
    HEADER_DEAD_LETTER_REASON,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_LIVEMODE,
    HEADER_RECEIVED_AT,
    HEADER_REPLAYED_FROM,
    HEADER_WORKER_ID,
    Outcome,
)
from worker import db

# The longest Retry-After honoured by waiting in process (with the message held); a longer
# one sends the message to its delay queue.
QUICK_RETRY_AFTER_MAX_S = 5.0

# A dead letter's error message is cut to this many characters.
ERROR_MESSAGE_MAX_CHARS = 1000


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed (outage, overload), as opposed to never."""
    if isinstance(exc, PermanentError):
        return False
    return isinstance(exc, TransientError) or db.is_transient(exc)


def retried_in_process(exc: BaseException) -> bool:
    """Whether a quick retry in process may help: transient, and not one to leave to the
    delay queues at once (RetryLater)."""
    return is_transient(exc) and not isinstance(exc, RetryLater)


def asked_wait(exc: BaseException | None) -> float:
    """How long the other side asked us to wait before trying again (0: it did not say)."""
    return getattr(exc, "retry_after_s", None) or 0.0


# Headers come from whoever could publish to the queue, so each one read is checked: a
# count past any schedule is clamped (a crafted "99999999999999999999" must not become a
# number the broker's tables cannot hold), and anything else that is not what we write
# counts as absent.
MAX_ATTEMPT = 1_000_000
_MAX_DIGITS = 30
_MAX_TIME_CHARS = 64


def attempt_of(headers: Mapping[str, Any]) -> int:
    """Which attempt this delivery is: 1 for a first one, else one more than its copy says
    (at most MAX_ATTEMPT; a count that is no whole number counts as none)."""
    return min(_count(headers.get(HEADER_ATTEMPT)), MAX_ATTEMPT - 1) + 1


def _count(value: Any) -> int:
    """A whole number of 0 or more from a header, else 0."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS):
            return 0
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value) if abs(value) < 2.0**63 else MAX_ATTEMPT
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)


def _time_of(value: Any) -> str | None:
    """A failure time as we write it (ISO 8601), else None."""
    if not isinstance(value, str) or len(value) > _MAX_TIME_CHARS:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


# What a copy keeps of a message's own headers when its headers could not be sent as they
# came (one the broker's tables cannot hold): those the ingress sets, when they are what it
# sets. The rest goes; the body keeps the event.
_KEPT_TEXT = (HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_API_VERSION, HEADER_ACCOUNT,
              HEADER_RECEIVED_AT, HEADER_REPLAYED_FROM)  # fmt: skip
_MAX_TEXT_BYTES = 255


def cleaned_headers(received: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of ``received`` that are ours and of the type we write."""
    kept: dict[str, Any] = {}
    for name in _KEPT_TEXT:
        value = received.get(name)
        if isinstance(value, str) and len(value.encode("utf-8", "replace")) <= _MAX_TEXT_BYTES:
            kept[name] = value
    if isinstance(received.get(HEADER_LIVEMODE), bool):
        kept[HEADER_LIVEMODE] = received[HEADER_LIVEMODE]
    created = received.get(HEADER_CREATED)
    if isinstance(created, int) and not isinstance(created, bool) and 0 <= created < 2**63:
        kept[HEADER_CREATED] = created
    return kept


# --- in process ------------------------------------------------------------------------


def _retry_after(state: RetryCallState) -> float:
    """The Retry-After of the last attempt's error, or 0."""
    return asked_wait(state.outcome.exception() if state.outcome is not None else None)


class _LongRetryAfter(stop_base):
    """Stop retrying in process when the other side asked for a longer wait than that."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        return _retry_after(retry_state) > QUICK_RETRY_AFTER_MAX_S


def quick_retries(attempts: int) -> AsyncRetrying:
    """Up to ``attempts`` tries in process for transient errors (not RetryLater), with a
    short backoff (or the Retry-After asked for, if longer); the last error is raised as it
    is."""
    return AsyncRetrying(
        # a Retry-After longer than a quick retry's wait is waited in a delay queue
        stop=stop_after_attempt(attempts) | _LongRetryAfter(),
        wait=lambda state: max(
            compute_backoff(state.attempt_number, base_s=0.2, max_s=2.0), _retry_after(state)
        ),
        retry=retry_if_exception(retried_in_process),
        reraise=True,
    )


# --- through the broker ----------------------------------------------------------------


class DeadLetterReason(StrEnum):
    """Why a message was dead-lettered (the ``reason`` of its log line, its metric and its
    header ``fulfillment-dead-letter-reason``)."""

    PERMANENT = "permanent"
    RETRIES_EXHAUSTED = "retries_exhausted"
    STRIPE_NOT_FOUND = "stripe_not_found"  # a 404 for the session, after its retries


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a failed message's copy goes, and what it says about why."""

    outcome: Outcome  # RETRY or DEAD_LETTER
    queue: str  # the delay queue, or the dead-letter queue
    delay_s: float | None  # the delay queue's delay; None for a dead letter
    reason: DeadLetterReason | None  # None for a retry
    headers: dict[str, Any]  # the failure headers the copy carries


def decide(
    exc: BaseException,
    attempt: int,
    topology: Topology,
    *,
    received: Mapping[str, Any],
    worker_id: str,
    now: str,
    not_found_retries: int = 0,
) -> Decision:
    """The retry policy for ``exc`` on the ``attempt``-th delivery (1-based) of a message
    that came with headers ``received``; ``now`` is the failure's time as headers carry it.

    A transient failure is retried while the schedule (one delay queue per delay) lasts,
    in the queue whose delay is at least the Retry-After the other side asked for. Stripe
    not finding the session named in a (signed) event is rarely final (a key of another
    mode or account mid-rotation, a read right after creation): retried through the first
    ``not_found_retries`` delay queues (STRIPE_NOT_FOUND_RETRIES), then dead-lettered as
    ``stripe_not_found``.
    """
    headers = failure_headers(exc, attempt, received=received, worker_id=worker_id, now=now)
    transient = is_transient(exc)
    if isinstance(exc, StripeNotFound):
        retries = min(not_found_retries, len(topology.retry_delays_s))
        reason = DeadLetterReason.STRIPE_NOT_FOUND
    else:
        retries = len(topology.retry_delays_s) if transient else 0
        reason = DeadLetterReason.RETRIES_EXHAUSTED if transient else DeadLetterReason.PERMANENT
    if attempt <= retries:
        queue, delay_s = topology.retry_queue_for(attempt, asked_wait(exc))
        return Decision(Outcome.RETRY, queue, delay_s, None, headers)
    headers[HEADER_DEAD_LETTER_REASON] = str(reason)
    return Decision(Outcome.DEAD_LETTER, topology.dead_queue, None, reason, headers)


def failure_headers(
    exc: BaseException,
    attempt: int,
    *,
    received: Mapping[str, Any],
    worker_id: str,
    now: str,
) -> dict[str, Any]:
    """What a retried or dead-lettered copy says about its failures; the first failure's
    time is kept from the copy it came as."""
    return {
        HEADER_ATTEMPT: min(max(attempt, 1), MAX_ATTEMPT),
        HEADER_FIRST_FAILED_AT: _time_of(received.get(HEADER_FIRST_FAILED_AT)) or now,
        HEADER_LAST_FAILED_AT: now,
        HEADER_ERROR_TYPE: type(exc).__name__,
        # masked as log lines are: a dead letter is read by people and tools too
        HEADER_ERROR_MESSAGE: mask_secrets(str(exc))[:ERROR_MESSAGE_MAX_CHARS]
        or type(exc).__name__,
        HEADER_WORKER_ID: worker_id,
    }
