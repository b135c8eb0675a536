"""Delayed payments and their events in any order: Stripe's current word decides."""

from __future__ import annotations

import asyncio
import json

import pytest

from shared.vocabulary import HEADER_ERROR_MESSAGE
from tests.conftest import wait_for
from tests.pipeline import COMPLETED, FAILED, SUCCEEDED, Pipeline

pytestmark = pytest.mark.timeout(60)


async def test_an_unpaid_session_waits_and_is_fulfilled_once_when_the_delayed_payment_succeeds(
    pipeline: Pipeline,
) -> None:
    worker = await pipeline.start()
    sid = await pipeline.complete(payment_status="unpaid")

    assert await wait_for(lambda: pipeline.state(sid)) == "awaiting_payment"
    await pipeline.settle(worker)
    assert await pipeline.fulfillments(sid) == []
    assert pipeline.mails_for(sid) == []

    pipeline.standin.set_payment_status(sid, "paid")
    await pipeline.send(SUCCEEDED, sid)
    await pipeline.fulfilled(sid)
    await pipeline.send(COMPLETED, sid)  # late duplicate
    await pipeline.settle(worker)

    assert len(await pipeline.fulfillments(sid)) == 1
    assert await pipeline.state(sid) == "fulfilled"
    assert len(pipeline.mails_for(sid)) == 1
    assert [m.routing_key for m in await pipeline.outbound_messages()] == ["order.fulfilled"]


async def test_success_while_stripe_still_says_unpaid_is_retried_not_shelved(
    pipeline: Pipeline,
) -> None:
    """No event follows async_payment_succeeded: recorded as "awaiting payment", the order
    would wait for ever. Retried until Stripe agrees; if it never does, a dead letter says so."""
    standin = pipeline.standin
    catches_up = standin.add_session(payment_status="unpaid")["id"]
    never = standin.add_session(payment_status="unpaid")["id"]
    await pipeline.start()

    await pipeline.send(SUCCEEDED, catches_up)
    await wait_for(lambda: standin.request_count >= 1)
    standin.set_payment_status(catches_up, "paid")
    await pipeline.send(SUCCEEDED, never)

    assert len(await pipeline.fulfilled(catches_up)) == 1
    assert len(await pipeline.mails(1)) == 1
    [dead] = await wait_for(pipeline.dead_letters, timeout_s=20)
    assert json.loads(dead.body)["data"]["object"]["id"] == never
    assert dead.headers["fulfillment-error-type"] == "TransientError"
    assert "still says session" in dead.headers["fulfillment-error-message"]
    assert await pipeline.fulfillments(never) == []


async def test_a_failed_delayed_payment_sends_one_notice_and_fulfills_nothing(
    pipeline: Pipeline,
) -> None:
    worker = await pipeline.start()

    sid = await pipeline.complete(payment_status="unpaid", customer_email="bob@example.com")
    failed = pipeline.event(FAILED, sid)
    await pipeline.publish(failed)
    await pipeline.publish(failed)

    [mail] = await pipeline.mails(1)
    await pipeline.settle(worker)
    assert len(pipeline.mails_for(sid)) == 1
    assert mail["Message-ID"] == f"<payment-failed.{sid}@shop.test>"
    assert "did not go through" in mail.get_content()
    assert await pipeline.fulfillments(sid) == []
    assert await pipeline.state(sid) == "payment_failed"
    [out] = await pipeline.outbound_messages()
    assert out.routing_key == "payment.failed"
    assert out.headers["fulfillment-id"] == f"payment.failed:{sid}"
    assert json.loads(out.body)["id"] == out.headers["fulfillment-id"]
    assert out.headers["stripe-event-id"] == failed["id"]

    # a late duplicate of `completed`, still unpaid: the failure stays on record
    await pipeline.send(COMPLETED, sid)
    await pipeline.settle(worker)
    assert await pipeline.state(sid) == "payment_failed"
    assert len(pipeline.mails_for(sid)) == 1 and await pipeline.outbound_messages() == []


async def test_a_payment_failure_after_fulfillment_changes_nothing(pipeline: Pipeline) -> None:
    worker = await pipeline.start()
    sid = await pipeline.complete()
    await pipeline.fulfilled(sid)
    await pipeline.mails(1)

    pipeline.standin.set_payment_status(sid, "unpaid")  # a stale or contradictory failure event
    await pipeline.send(FAILED, sid)
    late = await pipeline.send(COMPLETED, sid)  # read as unpaid too
    await pipeline.settle(worker)

    assert len(pipeline.mails_for(sid)) == 1
    assert pipeline.mails_for(sid)[0]["Message-ID"] == f"<order.{sid}@shop.test>"
    rows = await pipeline.rows(
        "SELECT s.state, p.outcome FROM checkout_sessions s, processed_events p "
        "WHERE s.checkout_session_id = $1 AND p.event_id = $2",
        sid,
        late["id"],
    )
    assert [tuple(r) for r in rows] == [("fulfilled", "already_fulfilled")]


async def test_success_arriving_before_completed_still_fulfills_once(pipeline: Pipeline) -> None:
    sid = pipeline.standin.add_session()["id"]
    worker = await pipeline.start()

    await pipeline.send(SUCCEEDED, sid)
    await pipeline.fulfilled(sid)
    await pipeline.send(COMPLETED, sid)
    await pipeline.settle(worker)

    assert len(await pipeline.fulfillments(sid)) == 1
    assert len(pipeline.mails_for(sid)) == 1
    assert len(await pipeline.outbound_messages()) == 1


async def test_a_stale_failure_event_for_a_paid_session_fulfills_it(pipeline: Pipeline) -> None:
    """Stripe's current word wins: the only event that arrived says the payment failed,
    but the session is paid (a retried payment succeeded, its event not yet here)."""
    sid = pipeline.standin.add_session(customer_email="paid@example.com")["id"]
    worker = await pipeline.start()

    await pipeline.send(FAILED, sid)

    assert len(await pipeline.fulfilled(sid)) == 1
    await pipeline.settle(worker)
    assert [m["Message-ID"] for m in pipeline.mails_for(sid)] == [f"<order.{sid}@shop.test>"]
    assert [m.routing_key for m in await pipeline.outbound_messages()] == ["order.fulfilled"]


async def test_no_failure_notice_for_a_fulfilled_session_whose_email_is_still_owed(
    pipeline: Pipeline,
) -> None:
    """Not fulfilled in full (the confirmation is deferred), so the failure event is not
    settled by the shortcut: the check under the session lock must refuse it."""
    pipeline.smtp.deferred_recipients.add("owed@example.com")
    worker = await pipeline.start()
    sid = await pipeline.complete(customer_email="owed@example.com")
    assert [m.routing_key for m in await wait_for(pipeline.outbound_messages)] == [
        "order.fulfilled"
    ]

    pipeline.standin.set_payment_status(sid, "unpaid")  # a stale or contradictory read
    failed = await pipeline.send(FAILED, sid)
    outcome = await wait_for(
        lambda: pipeline.rows(
            "SELECT outcome FROM processed_events WHERE event_id = $1", failed["id"]
        )
    )
    pipeline.smtp.deferred_recipients.clear()
    await pipeline.mails(1, timeout_s=15)
    await pipeline.settle(worker)

    assert outcome[0]["outcome"] == "ignored_fulfilled"
    assert [m["Message-ID"] for m in pipeline.mails_for(sid)] == [f"<order.{sid}@shop.test>"]
    assert await pipeline.outbound_messages() == []  # no payment.failed
    assert await pipeline.state(sid) == "fulfilled"


async def test_a_delayed_payments_owed_email_is_sent_by_its_own_events_retry(
    pipeline: Pipeline,
) -> None:
    """`async_payment_succeeded` fulfills, the email is deferred, and the event is retried:
    the retry must not be settled as already fulfilled while an effect is still owed."""
    worker = await pipeline.start()
    sid = await pipeline.complete(payment_status="unpaid", customer_email="ach@example.com")

    async def awaiting_payment() -> bool:
        return await pipeline.state(sid) == "awaiting_payment"

    await wait_for(awaiting_payment)
    pipeline.smtp.deferred_recipients.add("ach@example.com")
    pipeline.standin.set_payment_status(sid, "paid")
    await pipeline.send(SUCCEEDED, sid)
    await pipeline.fulfilled(sid)
    await asyncio.sleep(0.7)  # a retry through the first delay queue meanwhile

    pipeline.smtp.deferred_recipients.clear()
    await pipeline.mails(1, timeout_s=15)
    await pipeline.settle(worker)
    assert len(pipeline.mails_for(sid)) == 1
    assert (await pipeline.steps(sid))["confirmation_email"].startswith("sent ")


async def test_a_payment_status_stripe_does_not_document_is_dead_lettered_not_fulfilled(
    pipeline: Pipeline,
) -> None:
    """Only `paid` and `no_payment_required` are paid: a value Stripe may add one day (or
    an odd answer) is kept for a person to look at, never taken for a payment."""
    await pipeline.start()

    sid = await pipeline.complete(payment_status="processing")

    [letter] = await wait_for(pipeline.dead_letters, timeout_s=15)
    assert "unexpected payment_status 'processing'" in letter.headers[HEADER_ERROR_MESSAGE]
    assert await pipeline.fulfillments(sid) == []
    assert pipeline.mails_for(sid) == []


def test_a_session_that_does_not_say_its_payment_status_is_taken_as_unpaid() -> None:
    from worker.order import Order

    assert Order.from_session({"object": "checkout.session", "id": "cs_test_1"}).payment_status == (
        "unpaid"
    )
