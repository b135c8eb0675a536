"""What is retried (in process, through delay queues) and what is dead-lettered, with why."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from devkit import signing as sh
from devkit.stripe import StripeStandIn
from shared.vocabulary import (
    HEADER_ATTEMPT,
    HEADER_DEAD_LETTER_REASON,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_EVENT_ID,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_WORKER_ID,
)
from tests.captured_logs import Logs
from tests.conftest import counted, depth, wait_for
from tests.pipeline import COMPLETED, Pipeline
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


async def test_stripe_errors_at_first_are_retried_in_process_then_fulfilled(
    pipeline: Pipeline,
) -> None:
    sid = pipeline.standin.add_session()["id"]
    pipeline.standin.fail_next(1, 429)
    await pipeline.start()

    await pipeline.send(COMPLETED, sid)

    await pipeline.fulfilled(sid)
    assert len(await pipeline.dead_letters()) == 0
    assert pipeline.standin.request_count >= 2


@pytest.mark.parametrize(
    ("retry_after", "through_delay_queue", "from_gateway"),
    [(1.5, False, False), (30.0, True, False), (1.5, False, True), (30.0, True, True)],
)
async def test_a_retry_after_is_waited_in_process_when_short_and_in_a_delay_queue_when_long(
    retry_after: float, through_delay_queue: bool, from_gateway: bool, pipeline: Pipeline
) -> None:
    """Stripe sends no Retry-After, but a gateway in front of it may: a short one is waited
    before the quick retry (not 0.1 s later), a long one in a delay queue, where the
    message waits without holding a worker's slot. Read also from an answer that is not
    Stripe's error JSON (a gateway's page), whose headers stripe-python's error drops."""

    def sent_to_delay_queues() -> float:
        return counted("worker_retries_total", event_type="checkout.session.completed")

    standin = pipeline.standin
    sid = standin.add_session()["id"]
    if from_gateway:
        page = b"<html><body>503 Service Temporarily Unavailable</body></html>"
        standin.answer_next(1, page, status=503, headers={"Retry-After": f"{retry_after:g}"})
    else:
        standin.fail_next(1, 429, retry_after=retry_after)
    before = sent_to_delay_queues()
    await pipeline.start()
    started = time.monotonic()

    await pipeline.send(COMPLETED, sid)

    await pipeline.fulfilled(sid, timeout_s=20)
    assert sent_to_delay_queues() - before == (1 if through_delay_queue else 0)
    if not through_delay_queue:
        assert time.monotonic() - started >= retry_after
    else:  # not the first delay queue's 0.5 s: the longest, nearest to what was asked
        assert pipeline.settings.broker.retry_delays_s == (0.5, 1.0)
        assert time.monotonic() - started >= 1.0
    assert await pipeline.dead_letters() == []


_STRIPE_BODY = {"error": {"type": "invalid_request_error", "message": "as Stripe says"}}


@pytest.mark.parametrize(
    ("error", "expected", "retry_after_s"),
    [
        (lambda s: s.APIConnectionError("connection reset"), "transient", None),
        (lambda s: s.RateLimitError("slow down", http_status=429), "transient", None),
        (
            lambda s: s.RateLimitError("slow down", http_status=429, headers={"retry-after": "2"}),
            "transient",
            2.0,
        ),
        (lambda s: s.APIError("oops", http_status=500, json_body=_STRIPE_BODY), "transient", None),
        (
            lambda s: s.APIError("locked", http_status=409, json_body=_STRIPE_BODY),
            "transient",
            None,
        ),
        # not Stripe's JSON (a proxy's page, a body cut short): no verdict from Stripe
        (lambda s: s.APIError("Invalid response body", http_status=200), "transient", None),
        (lambda s: s.APIError("Invalid response body", http_status=403), "transient", None),
        # Stripe's own 4xx verdicts: retrying cannot help
        (lambda s: s.APIError("gone", http_status=410, json_body=_STRIPE_BODY), "permanent", None),
        (
            lambda s: s.InvalidRequestError(
                "No such checkout.session", "id", http_status=404, json_body=_STRIPE_BODY
            ),
            "not found",
            None,
        ),
        (
            lambda s: s.InvalidRequestError(
                "bad", "expand", http_status=400, json_body=_STRIPE_BODY
            ),
            "permanent",
            None,
        ),
        (lambda s: s.AuthenticationError("revoked key", http_status=401), "transient", None),
    ],
)
def test_stripe_errors_are_retried_unless_stripe_itself_refused(
    error: Any, expected: str, retry_after_s: float | None
) -> None:
    import stripe

    from shared.errors import TransientError
    from shared.stripe_client import StripeNotFound, classify

    ours = classify(error(stripe))
    kind = (
        "not found"
        if isinstance(ours, StripeNotFound)
        else "transient"
        if isinstance(ours, TransientError)
        else "permanent"
    )
    assert kind == expected, ours
    assert getattr(ours, "retry_after_s", None) == retry_after_s


async def test_an_errors_retry_after_is_its_own_never_an_earlier_answers(
    standin: StripeStandIn, worker_settings: WorkerSettings
) -> None:
    """Review: the headers kept for classify outlived their request, so a dropped
    connection after a gateway's 503 carried that 503's Retry-After: 120."""
    import stripe

    from shared.stripe_client import AIOHTTPClient, classify, make_client

    http = AIOHTTPClient(timeout=3)
    client = make_client(worker_settings.stripe, http_client=http)
    sid = standin.add_session()["id"]
    errors = []
    try:
        standin.answer_next(1, b"<html>busy</html>", status=503, headers={"Retry-After": "120"})
        for drops in (0, 2):  # aiohttp resends a GET once after a disconnect: two drops
            standin.drop_next(drops)
            with pytest.raises(stripe.StripeError) as caught:
                await client.raw_request_async("get", f"/v1/checkout/sessions/{sid}")
            errors.append(classify(caught.value))
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert [getattr(e, "retry_after_s", None) for e in errors] == [120.0, None]


async def test_an_answer_cut_off_mid_body_is_a_connection_error_retried() -> None:
    """Review: aiohttp's own error for a body cut short is not a StripeError, so it was
    taken for a bug and dead-lettered at once."""
    import stripe

    from shared.errors import TransientError
    from shared.stripe_client import AIOHTTPClient, StripeSettings, classify, make_client

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b'Content-Length: 1000\r\n\r\n{"object": "checkout.se')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = AIOHTTPClient(timeout=3)
    settings = StripeSettings(api_key="sk_test_cut", api_base=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(stripe.APIConnectionError) as caught:
            await make_client(settings, http_client=http).raw_request_async(
                "get", "/v1/checkout/sessions/cs_test_1"
            )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
        server.close()
        await server.wait_closed()
    assert isinstance(classify(caught.value), TransientError)


async def test_stripe_away_for_longer_goes_through_a_delay_queue_and_then_fulfills(
    pipeline: Pipeline,
) -> None:
    sid = pipeline.standin.add_session()["id"]
    pipeline.standin.fail_next(
        4, 500
    )  # two quick tries, a delay, two more, a second delay, then up
    worker = await pipeline.start()

    await pipeline.send(COMPLETED, sid)

    # the second attempt's failure waits in the second delay queue, not the first again
    await wait_for(lambda: depth(pipeline.channel, pipeline.topology.retry_queues[1]), timeout_s=10)
    rows = await pipeline.fulfilled(sid, timeout_s=20)
    assert len(rows) == 1
    await pipeline.settle(worker)
    assert len(pipeline.mails_for(sid)) == 1
    assert await pipeline.dead_letters() == []
    processed = await pipeline.rows(
        "SELECT outcome FROM processed_events WHERE checkout_session_id = $1", sid
    )
    assert [r["outcome"] for r in processed] == ["fulfilled"]


@pytest.mark.timeout(90)
async def test_stripe_answering_404_for_a_while_is_waited_out_and_an_unknown_session_still_dies(
    logs: Logs, pipeline: Pipeline
) -> None:
    """The issue's trial: Stripe answers 404 for every session for 10 s (a key of another
    account or mode mid-rotation). Every session in that window was dead-lettered at once,
    none fulfilled after; now each goes through STRIPE_NOT_FOUND_RETRIES delay queues and
    is fulfilled once Stripe finds it. A session Stripe never knew still ends in the DLQ,
    as stripe_not_found, after its retries."""
    labels = {"event_type": COMPLETED, "reason": "stripe_not_found"}
    before = counted("worker_dead_letters_total", **labels)
    async with pipeline.retrying_every(6, 6) as settings:
        await pipeline.start(replace(settings, stripe_not_found_retries=2))
        pipeline.standin.fail_for(10, 404)
        never = sh.event(COMPLETED, sh.checkout_session("cs_test_never_known_404"))
        await pipeline.publish(never)
        sessions = []
        for _ in range(10):
            sessions.append(await pipeline.complete())
            await asyncio.sleep(0.9)

        for sid in sessions:
            await pipeline.fulfilled(sid, timeout_s=30)
        [letter] = await wait_for(pipeline.dead_letters, timeout_s=20)
    assert letter.headers[HEADER_EVENT_ID] == never["id"]
    assert letter.headers[HEADER_ERROR_TYPE] == "StripeNotFound"
    assert letter.headers[HEADER_ATTEMPT] == 3  # the first delivery and two delay queues
    assert letter.headers[HEADER_DEAD_LETTER_REASON] == "stripe_not_found"
    assert counted("worker_dead_letters_total", **labels) - before == 1
    for sid in sessions:
        assert len(pipeline.mails_for(sid)) == 1
    [dead] = logs.events("dead-lettered")
    assert dead["reason"] == "stripe_not_found"
    logs.assert_no_traceback()


async def test_an_unknown_session_or_malformed_body_is_dead_lettered_at_once_with_reasons(
    pipeline: Pipeline,
) -> None:
    good = pipeline.standin.add_session()["id"]
    unknown = sh.event(COMPLETED, sh.checkout_session("cs_test_unknown_123"))
    await pipeline.start()

    await pipeline.publish(unknown)
    await pipeline.publish(b"{not json")
    await pipeline.send(COMPLETED, good)

    await pipeline.fulfilled(good)

    async def dead() -> list[AbstractIncomingMessage]:
        return (
            await pipeline.dead_letters()
            if (await depth(pipeline.channel, pipeline.topology.dead_queue)) >= 2
            else []
        )

    letters = await wait_for(dead)
    by_type = {m.headers[HEADER_ERROR_TYPE]: m for m in letters}
    assert set(by_type) == {"StripeNotFound", "MalformedEvent"}
    not_found = by_type["StripeNotFound"]
    assert not_found.headers[HEADER_EVENT_ID] == unknown["id"]
    assert "No such checkout.session" in not_found.headers[HEADER_ERROR_MESSAGE]
    assert not_found.headers[HEADER_ATTEMPT] == 1
    assert not_found.headers[HEADER_WORKER_ID] == "test-worker"
    assert not_found.delivery_mode == aio_pika.DeliveryMode.PERSISTENT  # as every copy is
    assert not_found.headers[HEADER_FIRST_FAILED_AT] <= not_found.headers[HEADER_LAST_FAILED_AT]
    assert json.loads(not_found.body)["id"] == unknown["id"]
    assert by_type["MalformedEvent"].body == b"{not json"


async def test_a_live_event_with_a_test_key_is_retried_and_says_why_not_session_not_found(
    pipeline: Pipeline,
) -> None:
    """Adversarial trial: a live endpoint's events with a test-mode key were dead-lettered
    at once as unknown sessions (Stripe's test mode cannot see live objects): a setting
    to fix, so retried and named, then replayable from the DLQ once fixed."""
    assert pipeline.settings.stripe.api_key.startswith("sk_test_")
    live_session = sh.checkout_session("cs_live_a1b2c3d4e5f6", livemode=True)
    live = {**sh.event(COMPLETED, live_session), "livemode": True}
    test = sh.event(COMPLETED, sh.checkout_session())
    by_reason = {
        reason: {"event_type": "checkout.session.completed", "reason": reason}
        for reason in ("retries_exhausted", "stripe_not_found")
    }
    before = {r: counted("worker_dead_letters_total", **labels) for r, labels in by_reason.items()}
    await pipeline.start()

    await pipeline.publish(live)
    await pipeline.publish(test)

    found: list[AbstractIncomingMessage] = []

    async def both_dead() -> list[AbstractIncomingMessage] | None:
        found.extend(await pipeline.dead_letters())  # draining takes them
        return found if len(found) == 2 else None

    letters = {m.headers[HEADER_EVENT_ID]: m.headers for m in await wait_for(both_dead)}
    assert letters[live["id"]][HEADER_ERROR_TYPE] == "TransientError"
    assert (
        "live-mode session, but STRIPE_API_KEY is a test-mode key"
        in (letters[live["id"]][HEADER_ERROR_MESSAGE])
    )
    assert letters[live["id"]][HEADER_ATTEMPT] > 1  # retried, not dead-lettered at once
    assert letters[test["id"]][HEADER_ERROR_TYPE] == "StripeNotFound"  # really unknown
    # the first failure is kept across the attempts: the delay queues lie between the two
    first, last = (
        datetime.fromisoformat(letters[live["id"]][header])
        for header in (HEADER_FIRST_FAILED_AT, HEADER_LAST_FAILED_AT)
    )
    assert (last - first).total_seconds() >= sum(pipeline.settings.broker.retry_delays_s)
    for reason, labels in by_reason.items():
        assert counted("worker_dead_letters_total", **labels) - before[reason] == 1, reason


async def test_a_test_event_on_a_live_key_is_an_unknown_session_dead_lettered_at_once(
    pipeline: Pipeline,
) -> None:
    """Review: a live Connect endpoint also receives connected accounts' test events, which
    a live key cannot read and nobody needs fulfilled: not a setting to fix, so not
    retried for hours; dead-lettered at once as the unknown session it is."""
    stripe_settings = replace(pipeline.settings.stripe, api_key="sk_live_" + "x" * 24)
    await pipeline.start(replace(pipeline.settings, stripe=stripe_settings))
    test = sh.event(COMPLETED, sh.checkout_session("cs_test_connected_1"))
    await pipeline.publish({**test, "account": "acct_1Connected0001"})

    [letter] = await wait_for(pipeline.dead_letters)
    assert letter.headers[HEADER_ERROR_TYPE] == "StripeNotFound"
    assert letter.headers[HEADER_ATTEMPT] == 1


async def test_a_secret_in_an_error_is_masked_in_the_dead_letter_as_in_the_log(
    pipeline: Pipeline,
) -> None:
    """Adversarial trial: an API error echoing the key was masked in the log line but
    stored whole in the dead letter's error header, which `dlq list/show` print."""
    key = pipeline.settings.stripe.api_key
    error = {"error": {"type": "invalid_request_error", "message": f"Bad request with {key}"}}
    pipeline.standin.answer_next(
        1, json.dumps(error).encode(), status=400, content_type="application/json"
    )
    await pipeline.start()

    await pipeline.complete()

    [letter] = await wait_for(pipeline.dead_letters)
    message = letter.headers[HEADER_ERROR_MESSAGE]
    assert key not in message and "Bad request with ***" in message


@pytest.mark.parametrize(
    "session_id",
    ["cs_../../v1/customers/cus_1", "cs_test_1?expand[]=customer", "cs_a/b", "cs_", "pi_123"],
)
def test_an_event_whose_session_id_could_reach_another_url_is_malformed(session_id: str) -> None:
    """The id goes into a Stripe API path: only Stripe's id alphabet gets through."""
    from types import SimpleNamespace

    from shared.errors import MalformedEvent
    from worker.consumer import parse

    doc = sh.event("checkout.session.completed", sh.checkout_session(session_id))
    with pytest.raises(MalformedEvent, match="not a Checkout Session id"):
        parse(SimpleNamespace(headers={}, body=json.dumps(doc).encode()))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data_object", "session_id"),
    [
        ({"id": "cs_test_minimal"}, "cs_test_minimal"),  # no "object": the id is enough
        ({"id": "cs_test_full", "object": "checkout.session"}, "cs_test_full"),
        ({"id": "cs_test_x", "object": "payment_intent"}, None),  # another object: malformed
        ({"object": "checkout.session"}, None),
        ("cs_test_bare", None),
    ],
)
def test_the_session_id_is_read_from_data_object(data_object: Any, session_id: str | None) -> None:
    from types import SimpleNamespace

    from shared.errors import MalformedEvent
    from worker.consumer import parse

    doc = sh.event("checkout.session.completed", data_object)
    message = SimpleNamespace(headers={}, body=json.dumps(doc).encode())
    if session_id is None:
        with pytest.raises(MalformedEvent):
            parse(message)  # type: ignore[arg-type]
    else:
        assert parse(message).session_id == session_id  # type: ignore[arg-type]
