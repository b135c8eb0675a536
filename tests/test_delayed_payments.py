"""Delayed payments and their events in any order: Stripe's current word decides."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from shared.topology import Topology
from shared.vocabulary import HEADER_ERROR_MESSAGE
from tests.conftest import db_fetch, drain, wait_for
from tests.pipeline import fulfillment_rows, fulfillment_steps, session_event, settle
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


async def test_an_unpaid_session_waits_and_is_fulfilled_once_when_the_delayed_payment_succeeds(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    sid = standin.add_session(payment_status="unpaid")["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    async def state() -> Any:
        rows = await db_fetch(
            database_url, "SELECT state FROM checkout_sessions WHERE checkout_session_id = $1", sid
        )
        return rows[0]["state"] if rows else None

    assert await wait_for(state) == "awaiting_payment"
    await settle(worker, topology, channel)
    assert await fulfillment_rows(database_url, sid) == []
    assert smtp.for_session(sid) == []

    standin.set_payment_status(sid, "paid")
    await publish(session_event(standin, "checkout.session.async_payment_succeeded", sid))
    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await publish(session_event(standin, "checkout.session.completed", sid))  # late duplicate
    await settle(worker, topology, channel)

    assert len(await fulfillment_rows(database_url, sid)) == 1
    assert await state() == "fulfilled"
    assert len(smtp.for_session(sid)) == 1
    assert [m.routing_key for m in await drain(channel, outbound)] == ["order.fulfilled"]


async def test_success_while_stripe_still_says_unpaid_is_retried_not_shelved(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """No event follows async_payment_succeeded: recorded as "awaiting payment", the order
    would wait for ever. Retried until Stripe agrees; if it never does, a dead letter says so."""
    catches_up = standin.add_session(payment_status="unpaid")["id"]
    never = standin.add_session(payment_status="unpaid")["id"]
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.async_payment_succeeded", catches_up))
    await wait_for(lambda: standin.request_count >= 1)
    standin.set_payment_status(catches_up, "paid")
    await publish(session_event(standin, "checkout.session.async_payment_succeeded", never))

    assert len(await wait_for(lambda: fulfillment_rows(database_url, catches_up))) == 1
    assert len(await asyncio.to_thread(smtp.wait, 1)) == 1
    [dead] = await wait_for(lambda: drain(channel, topology.dead_queue), timeout_s=20)
    assert json.loads(dead.body)["data"]["object"]["id"] == never
    assert dead.headers["fulfillment-error-type"] == "TransientError"
    assert "still says session" in dead.headers["fulfillment-error-message"]
    assert await fulfillment_rows(database_url, never) == []


async def test_a_failed_delayed_payment_sends_one_notice_and_fulfills_nothing(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    sid = standin.add_session(payment_status="unpaid", customer_email="bob@example.com")["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))
    failed = session_event(standin, "checkout.session.async_payment_failed", sid)
    await publish(failed)
    await publish(failed)

    [mail] = await asyncio.to_thread(smtp.wait, 1)
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert mail["Message-ID"] == f"<payment-failed.{sid}@shop.test>"
    assert "did not go through" in mail.get_content()
    assert await fulfillment_rows(database_url, sid) == []
    rows = await db_fetch(
        database_url, "SELECT state FROM checkout_sessions WHERE checkout_session_id = $1", sid
    )
    assert rows[0]["state"] == "payment_failed"
    [out] = await drain(channel, outbound)
    assert out.routing_key == "payment.failed"
    assert out.headers["fulfillment-id"] == f"payment.failed:{sid}"
    assert json.loads(out.body)["id"] == out.headers["fulfillment-id"]
    assert out.headers["stripe-event-id"] == failed["id"]

    # a late duplicate of `completed`, still unpaid: the failure stays on record
    await publish(session_event(standin, "checkout.session.completed", sid))
    await settle(worker, topology, channel)
    rows = await db_fetch(
        database_url, "SELECT state FROM checkout_sessions WHERE checkout_session_id = $1", sid
    )
    assert rows[0]["state"] == "payment_failed"
    assert len(smtp.for_session(sid)) == 1 and await drain(channel, outbound) == []


async def test_a_payment_failure_after_fulfillment_changes_nothing(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    sid = standin.add_session()["id"]
    worker = await start_worker(worker_settings)
    await publish(session_event(standin, "checkout.session.completed", sid))
    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await asyncio.to_thread(smtp.wait, 1)

    standin.set_payment_status(sid, "unpaid")  # a stale or contradictory failure event
    await publish(session_event(standin, "checkout.session.async_payment_failed", sid))
    late = session_event(standin, "checkout.session.completed", sid)  # read as unpaid too
    await publish(late)
    await settle(worker, topology, channel)

    assert len(smtp.for_session(sid)) == 1
    assert smtp.for_session(sid)[0]["Message-ID"] == f"<order.{sid}@shop.test>"
    rows = await db_fetch(
        database_url,
        "SELECT s.state, p.outcome FROM checkout_sessions s, processed_events p "
        "WHERE s.checkout_session_id = $1 AND p.event_id = $2",
        sid,
        late["id"],
    )
    assert [tuple(r) for r in rows] == [("fulfilled", "already_fulfilled")]


async def test_success_arriving_before_completed_still_fulfills_once(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    sid = standin.add_session()["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.async_payment_succeeded", sid))
    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await publish(session_event(standin, "checkout.session.completed", sid))
    await settle(worker, topology, channel)

    assert len(await fulfillment_rows(database_url, sid)) == 1
    assert len(smtp.for_session(sid)) == 1
    assert len(await drain(channel, outbound)) == 1


async def test_a_stale_failure_event_for_a_paid_session_fulfills_it(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Stripe's current word wins: the only event that arrived says the payment failed,
    but the session is paid (a retried payment succeeded, its event not yet here)."""
    sid = standin.add_session(customer_email="paid@example.com")["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.async_payment_failed", sid))

    assert len(await wait_for(lambda: fulfillment_rows(database_url, sid))) == 1
    await settle(worker, topology, channel)
    assert [m["Message-ID"] for m in smtp.for_session(sid)] == [f"<order.{sid}@shop.test>"]
    assert [m.routing_key for m in await drain(channel, outbound)] == ["order.fulfilled"]


async def test_no_failure_notice_for_a_fulfilled_session_whose_email_is_still_owed(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Not fulfilled in full (the confirmation is deferred), so the failure event is not
    settled by the shortcut: the check under the session lock must refuse it."""
    smtp.deferred_recipients.add("owed@example.com")
    sid = standin.add_session(customer_email="owed@example.com")["id"]
    worker = await start_worker(worker_settings)
    await publish(session_event(standin, "checkout.session.completed", sid))
    assert [m.routing_key for m in await wait_for(lambda: drain(channel, outbound))] == [
        "order.fulfilled"
    ]

    standin.set_payment_status(sid, "unpaid")  # a stale or contradictory read
    failed = session_event(standin, "checkout.session.async_payment_failed", sid)
    await publish(failed)
    outcome = await wait_for(
        lambda: db_fetch(
            database_url, "SELECT outcome FROM processed_events WHERE event_id = $1", failed["id"]
        )
    )
    smtp.deferred_recipients.clear()
    await asyncio.to_thread(smtp.wait, 1, 15)
    await settle(worker, topology, channel)

    assert outcome[0]["outcome"] == "ignored_fulfilled"
    assert [m["Message-ID"] for m in smtp.for_session(sid)] == [f"<order.{sid}@shop.test>"]
    assert await drain(channel, outbound) == []  # no payment.failed
    state = await db_fetch(
        database_url, "SELECT state FROM checkout_sessions WHERE checkout_session_id = $1", sid
    )
    assert state[0]["state"] == "fulfilled"


async def test_a_delayed_payments_owed_email_is_sent_by_its_own_events_retry(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """`async_payment_succeeded` fulfills, the email is deferred, and the event is retried:
    the retry must not be settled as already fulfilled while an effect is still owed."""
    sid = standin.add_session(payment_status="unpaid", customer_email="ach@example.com")["id"]
    worker = await start_worker(worker_settings)
    await publish(session_event(standin, "checkout.session.completed", sid))
    await wait_for(
        lambda: db_fetch(
            database_url,
            "SELECT 1 FROM checkout_sessions WHERE checkout_session_id = $1 "
            "AND state = 'awaiting_payment'",
            sid,
        )
    )
    smtp.deferred_recipients.add("ach@example.com")
    standin.set_payment_status(sid, "paid")
    await publish(session_event(standin, "checkout.session.async_payment_succeeded", sid))
    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await asyncio.sleep(0.7)  # a retry through the first delay queue meanwhile

    smtp.deferred_recipients.clear()
    await asyncio.to_thread(smtp.wait, 1, 15)
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert (await fulfillment_steps(database_url, sid))["confirmation_email"].startswith("sent ")


async def test_a_payment_status_stripe_does_not_document_is_dead_lettered_not_fulfilled(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Only `paid` and `no_payment_required` are paid: a value Stripe may add one day (or
    an odd answer) is kept for a person to look at, never taken for a payment."""
    sid = standin.add_session(payment_status="processing")["id"]
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    [letter] = await wait_for(lambda: drain(channel, topology.dead_queue), timeout_s=15)
    assert "unexpected payment_status 'processing'" in letter.headers[HEADER_ERROR_MESSAGE]
    assert await fulfillment_rows(database_url, sid) == []
    assert smtp.for_session(sid) == []


def test_a_session_that_does_not_say_its_payment_status_is_taken_as_unpaid() -> None:
    from worker.order import Order

    assert Order.from_session({"object": "checkout.session", "id": "cs_test_1"}).payment_status == (
        "unpaid"
    )
