"""The retry policy as a pure function: no broker, no database, no clock."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from shared.errors import MalformedEvent, PermanentError, TransientError
from shared.stripe_client import StripeNotFound
from shared.topology import Topology
from shared.vocabulary import (
    HEADER_ATTEMPT,
    HEADER_DEAD_LETTER_REASON,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_WORKER_ID,
    Outcome,
)
from worker.mail import Undeliverable
from worker.retry import (
    DeadLetterReason,
    Decision,
    attempt_of,
    decide,
    failure_headers,
    is_transient,
)
from worker.store import SessionLockLost

TOPOLOGY = Topology("p", (10.0, 60.0, 600.0), delivery_limit=5)
TEN_S, ONE_MIN, TEN_MIN = TOPOLOGY.retry_queues
NOW = "2026-01-02T03:04:05.678+00:00"


def _decide(exc: BaseException, attempt: int, received: dict[str, Any] | None = None) -> Decision:
    return decide(exc, attempt, TOPOLOGY, received=received or {}, worker_id="w-1", now=NOW)


@pytest.mark.parametrize(
    ("attempt", "queue", "delay_s"),
    [(1, TEN_S, 10.0), (2, ONE_MIN, 60.0), (3, TEN_MIN, 600.0)],
)
def test_a_transient_failure_goes_to_the_delay_queue_of_its_attempt(
    attempt: int, queue: str, delay_s: float
) -> None:
    decision = _decide(TransientError("Stripe unavailable"), attempt)

    assert (decision.outcome, decision.queue, decision.delay_s) == (Outcome.RETRY, queue, delay_s)
    assert decision.reason is None


def test_a_transient_failure_past_the_schedule_is_dead_lettered_as_retries_exhausted() -> None:
    decision = _decide(TransientError("Stripe unavailable"), 4)

    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.queue == TOPOLOGY.dead_queue
    assert decision.delay_s is None
    assert decision.reason is DeadLetterReason.RETRIES_EXHAUSTED


@pytest.mark.parametrize(
    "exc",
    [
        PermanentError("a handler refused"),
        MalformedEvent("body is not valid JSON"),
        Undeliverable("bad address"),
        KeyError("a bug"),
    ],
    ids=type,
)
def test_a_permanent_failure_or_a_bug_is_dead_lettered_at_once(exc: BaseException) -> None:
    decision = _decide(exc, 1)

    assert (decision.outcome, decision.queue) == (Outcome.DEAD_LETTER, TOPOLOGY.dead_queue)
    assert decision.reason is DeadLetterReason.PERMANENT


@pytest.mark.parametrize(("attempt", "queue"), [(1, TEN_S), (2, ONE_MIN), (3, None), (4, None)])
def test_a_session_stripe_does_not_find_goes_through_the_first_delay_queues_then_the_dlq(
    attempt: int, queue: str | None
) -> None:
    """A 404 for the session a signed event names is rarely final (a key of another mode
    or account mid-rotation, a read right after creation): STRIPE_NOT_FOUND_RETRIES delay
    queues first, then a dead letter saying so."""
    decision = decide(
        StripeNotFound("No such checkout.session"),
        attempt,
        TOPOLOGY,
        received={},
        worker_id="w-1",
        now=NOW,
        not_found_retries=2,
    )

    if queue is not None:
        assert (decision.outcome, decision.queue, decision.reason) == (Outcome.RETRY, queue, None)
        assert HEADER_DEAD_LETTER_REASON not in decision.headers
    else:
        assert (decision.outcome, decision.queue) == (Outcome.DEAD_LETTER, TOPOLOGY.dead_queue)
        assert decision.reason is DeadLetterReason.STRIPE_NOT_FOUND
        assert decision.headers[HEADER_DEAD_LETTER_REASON] == "stripe_not_found"


def test_stripe_not_finding_the_session_is_dead_lettered_at_once_without_retries() -> None:
    decision = _decide(StripeNotFound("No such checkout.session"), 1)

    assert (decision.outcome, decision.reason) == (
        Outcome.DEAD_LETTER,
        DeadLetterReason.STRIPE_NOT_FOUND,
    )


def test_a_retry_after_longer_than_the_attempts_delay_picks_a_delay_queue_that_long() -> None:
    assert _decide(TransientError("429", retry_after_s=30), 1).queue == ONE_MIN
    assert _decide(TransientError("429", retry_after_s=7200), 1).queue == TEN_MIN  # the longest
    assert _decide(TransientError("429", retry_after_s=5), 2).queue == ONE_MIN  # never shorter


@pytest.mark.parametrize(
    "exc",
    [
        TransientError("SMTP unavailable"),
        SessionLockLost("the lock's connection failed"),
        TimeoutError(),
        ConnectionResetError(),
        asyncpg.DeadlockDetectedError("deadlock"),
        asyncpg.InternalClientError("cannot switch to state 12"),
    ],
    ids=type,
)
def test_outages_of_what_the_worker_depends_on_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)
    assert _decide(exc, 1).outcome is Outcome.RETRY


def test_the_failure_headers_say_what_failed_where_and_since_when() -> None:
    first = _decide(TransientError("Stripe unavailable"), 1)
    assert first.headers == {
        HEADER_ATTEMPT: 1,
        HEADER_FIRST_FAILED_AT: NOW,
        HEADER_LAST_FAILED_AT: NOW,
        HEADER_ERROR_TYPE: "TransientError",
        HEADER_ERROR_MESSAGE: "Stripe unavailable",
        HEADER_WORKER_ID: "w-1",
    }
    earlier = "2026-01-01T00:00:00.000+00:00"
    later = _decide(PermanentError("gone"), 3, {HEADER_FIRST_FAILED_AT: earlier})
    assert later.headers[HEADER_FIRST_FAILED_AT] == earlier  # kept from the copy it came as
    assert later.headers[HEADER_LAST_FAILED_AT] == NOW
    assert later.headers[HEADER_ATTEMPT] == 3


def test_the_error_message_header_is_masked_bounded_and_never_empty() -> None:
    def message(exc: BaseException) -> Any:
        return failure_headers(exc, 1, received={}, worker_id="w", now=NOW)[HEADER_ERROR_MESSAGE]

    assert message(TransientError("key sk_test_abc123 refused")) == "key *** refused"
    assert len(message(TransientError("x" * 5000))) == 1000
    assert message(KeyError()) == "KeyError"


def test_the_decision_depends_only_on_its_inputs() -> None:
    exc = TransientError("Stripe unavailable", retry_after_s=30)
    assert _decide(exc, 2, {HEADER_FIRST_FAILED_AT: "t0"}) == _decide(
        exc, 2, {HEADER_FIRST_FAILED_AT: "t0"}
    )


@pytest.mark.parametrize(
    ("headers", "attempt"),
    [({}, 1), ({HEADER_ATTEMPT: 1}, 2), ({HEADER_ATTEMPT: "4"}, 5), ({HEADER_ATTEMPT: "x"}, 1)],
)
def test_the_attempt_is_one_more_than_the_copy_says(headers: dict[str, Any], attempt: int) -> None:
    assert attempt_of(headers) == attempt


async def test_a_send_in_doubt_or_a_relay_not_answering_is_not_tried_again_in_process() -> None:
    """Either would wait out the same timeout again, or send the email twice: the delay
    queue decides. Other transient errors are tried again at once."""
    from worker.relay import EmailInDoubt, RelayUnavailable
    from worker.retry import quick_retries

    for error, calls_expected in (
        (EmailInDoubt("no reply to the message's end"), 1),
        (RelayUnavailable("relay not answering"), 1),
        (TransientError("Stripe 503"), 3),
    ):
        calls = 0

        async def failing(error: Exception = error) -> None:
            nonlocal calls
            calls += 1
            raise error

        with pytest.raises(type(error)):
            await quick_retries(3)(failing)
        assert calls == calls_expected, error
        assert _decide(error, 1).outcome is Outcome.RETRY
