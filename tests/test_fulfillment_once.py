"""A paid session is fulfilled once: one row, one email, one order.fulfilled, whatever repeats."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace
from typing import Any

import aio_pika
import pytest

from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from shared.topology import Topology
from shared.vocabulary import HEADER_ERROR_TYPE, HEADER_EVENT_ID
from tests.conftest import counted, db_fetch, drain, wait_for
from tests.pipeline import fulfillment_rows, fulfillment_steps, session_event, settle, stored_items
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


async def test_a_paid_completed_session_gives_one_row_one_email_and_one_order_fulfilled(
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
    session = standin.add_session(
        line_items=[("T-shirt", 2, 2000), ("Mug", 1, 1250)], customer_email="ada@example.com"
    )
    sid = session["id"]
    await start_worker(worker_settings)

    completed = session_event(standin, "checkout.session.completed", sid)
    await publish(completed)

    rows = await wait_for(lambda: fulfillment_rows(database_url, sid))
    assert len(rows) == 1
    row = rows[0]
    assert (row["amount_total"], row["currency"], row["customer_email"]) == (
        5250,
        "usd",
        "ada@example.com",
    )
    assert await stored_items(database_url, sid) == [("Mug", 1, 1250), ("T-shirt", 2, 4000)]

    [mail] = await asyncio.to_thread(smtp.wait, 1)
    assert mail["To"] == "ada@example.com"
    assert mail["Message-ID"] == f"<order.{sid}@shop.test>"
    text = mail.get_content()
    assert "2 x T-shirt" in text and "1 x Mug" in text
    assert "Total: 52.50 USD" in text

    [out] = await wait_for(lambda: drain(channel, outbound))
    assert out.routing_key == "order.fulfilled"
    assert out.headers["fulfillment-id"] == f"order.fulfilled:{sid}"
    assert out.headers["stripe-event-id"] == completed["id"]
    assert out.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert out.content_type == "application/json" and out.message_id
    body = json.loads(out.body)
    assert body["id"] == out.headers["fulfillment-id"]  # receivers may key on either
    assert (body["checkout_session_id"], body["amount_total"], body["currency"]) == (
        sid,
        5250,
        "usd",
    )
    assert [i["quantity"] for i in body["items"]] == [2, 1]


@pytest.mark.parametrize("tax_included", [False, True])
async def test_a_subscription_with_a_metered_price_discount_shipping_and_tax_is_told_right(
    tax_included: bool,
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
    """A metered price has no quantity (Stripe sends null): stored as NULL and shown
    without one, not as 1. The email's lines add up to the total, with Stripe's figures:
    items before discounts and taxes (an item's amount_total is after them), then
    subtotal, discount, shipping and tax, added or included. order.fulfilled says it
    started a subscription."""
    session = standin.add_session(
        mode="subscription",
        line_items=[("Pro plan", 1, 2900), ("API calls", None, 2)],
        discount=500,
        shipping=499,
        tax=120,
        tax_included=tax_included,
    )
    sid = session["id"]
    total = 2900 - 500 + 499 + (0 if tax_included else 120)
    assert session["amount_total"] == total
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    [row] = await wait_for(lambda: fulfillment_rows(database_url, sid))
    plan_after = 2900 - 500 + (0 if tax_included else 120)  # Stripe's item amount_total
    assert await stored_items(database_url, sid) == [
        ("API calls", None, 0),
        ("Pro plan", 1, plan_after),
    ]
    # what the email itemises is on record for support (downstream trial)
    breakdown = ("amount_subtotal", "amount_discount", "amount_shipping", "amount_tax")
    assert [row[c] for c in breakdown] == [2900, 500, 499, 120]
    assert (row["mode"], row["subscription_id"]) == ("subscription", session["subscription"])
    subtotals = await db_fetch(
        database_url,
        "SELECT description, amount_subtotal FROM fulfillment_line_items "
        "WHERE checkout_session_id = $1 ORDER BY description",
        sid,
    )
    assert [tuple(r) for r in subtotals] == [("API calls", 0), ("Pro plan", 2900)]
    [mail] = await asyncio.to_thread(smtp.wait, 1)
    text = mail.get_content()
    assert "Thank you for your subscription. It is confirmed and active." in text
    assert "on its way" not in text  # a subscription is not shipped
    assert "  1 x Pro plan  29.00 USD" in text and "  API calls  0.00 USD" in text
    for line in ("Subtotal: 29.00 USD", "Discount: -5.00 USD", "Shipping: 4.99 USD"):
        assert line in text
    tax_line = "Tax included: 1.20 USD" if tax_included else "Tax: 1.20 USD"
    assert tax_line in text and f"Total: {total / 100:.2f} USD" in text

    [out] = await wait_for(lambda: drain(channel, outbound))
    body = json.loads(out.body)
    assert (body["mode"], body["subscription"]) == ("subscription", session["subscription"])
    assert body["subscription"].startswith("sub_")
    assert [i["quantity"] for i in body["items"]] == [1, None]
    assert [(i["amount_subtotal"], i["amount_total"]) for i in body["items"]] == [
        (2900, plan_after),
        (0, 0),
    ]
    assert (body["amount_subtotal"], body["amount_total"]) == (2900, total)
    assert body["total_details"] == {
        "amount_discount": 500,
        "amount_shipping": 499,
        "amount_tax": 120,
    }


async def test_duplicates_and_both_success_events_for_one_session_fulfill_it_once(
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
    first = await start_worker(worker_settings)
    await start_worker(replace(worker_settings, worker_id="test-worker-2"))
    completed = session_event(standin, "checkout.session.completed", sid)

    await asyncio.gather(
        *(publish(completed) for _ in range(20)),
        publish(session_event(standin, "checkout.session.async_payment_succeeded", sid)),
    )

    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await settle(first, topology, channel)
    assert len(await fulfillment_rows(database_url, sid)) == 1
    assert len(smtp.for_session(sid)) == 1
    assert len(await drain(channel, outbound)) == 1
    # one row per event; each handling counted, the first one's outcome kept
    handled = await db_fetch(
        database_url,
        "SELECT event_id, outcome, times_handled FROM processed_events "
        "WHERE checkout_session_id = $1",
        sid,
    )
    by_event = {r["event_id"]: r for r in handled}
    assert len(by_event) == 2 and by_event[completed["id"]]["times_handled"] == 20
    [row] = await fulfillment_rows(database_url, sid)
    assert by_event[row["event_id"]]["outcome"] == "fulfilled"  # the event that fulfilled
    assert sorted(r["outcome"] for r in handled) == ["already_fulfilled", "fulfilled"]


async def test_workers_on_the_code_before_migration_0004_can_still_record_events(
    database_url: str,
) -> None:
    """During a rollout the migration runs first: the previous code's insert (without the
    columns 0004 added) must keep working, or every event it handles is dead-lettered."""
    event_id = f"evt_rollout_{uuid.uuid4().hex}"
    previous_code_sql = """INSERT INTO processed_events
               (event_id, event_type, checkout_session_id, outcome)
           SELECT $1, $2, $3, $4 FROM (VALUES (1)) AS always
           ON CONFLICT (event_id) DO UPDATE SET outcome = EXCLUDED.outcome,
               processed_at = now()
           RETURNING 1"""
    for outcome in ("fulfilled", "already_fulfilled"):
        await db_fetch(
            database_url, previous_code_sql, event_id, "checkout.session.completed", None, outcome
        )
    [row] = await db_fetch(
        database_url, "SELECT * FROM processed_events WHERE event_id = $1", event_id
    )
    assert row["outcome"] == "already_fulfilled" and row["last_outcome"] is None


async def test_events_for_a_session_fulfilled_in_full_do_not_call_stripe_again(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Stripe's rate limit is the scarce resource: once a session is fulfilled with every
    effect recorded, its later events (async_payment_succeeded, the landing page's
    fulfillment.requested, a stale failure) are recorded as handled without an API call.
    (A repeated `completed` still asks Stripe: it is nearly always a session's first
    event, and checking first would cost every order a database round trip.)"""
    sid = standin.add_session()["id"]
    worker = await start_worker(worker_settings)
    await publish(session_event(standin, "checkout.session.completed", sid))

    async def both_steps() -> bool:
        return len(await fulfillment_steps(database_url, sid)) == 2

    await wait_for(both_steps)
    await settle(worker, topology, channel)
    calls = standin.request_count

    later = [
        session_event(standin, "fulfillment.requested", sid),
        session_event(standin, "checkout.session.async_payment_succeeded", sid),
        session_event(standin, "checkout.session.async_payment_failed", sid),
    ]
    for event in later:
        await publish(event)
    await settle(worker, topology, channel)

    assert standin.request_count == calls
    outcomes = await db_fetch(
        database_url,
        "SELECT event_id, outcome FROM processed_events WHERE checkout_session_id = $1",
        sid,
    )
    by_id = {r["event_id"]: r["outcome"] for r in outcomes}
    assert [by_id[e["id"]] for e in later] == [
        "already_fulfilled",
        "already_fulfilled",
        "ignored_fulfilled",
    ]
    assert len(smtp.for_session(sid)) == 1


async def test_a_setup_mode_session_is_not_an_order_and_sends_nothing(
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
    """Checkout in setup mode only saves a card: no_payment_required, like a free order,
    but nothing was sold. No order, no "order confirmed" email, no order.fulfilled."""
    setup = standin.add_session(mode="setup", customer_email="sam@example.com")
    assert (setup["payment_status"], setup["amount_total"], standin.line_items[setup["id"]]) == (
        "no_payment_required",
        None,
        [],
    )
    free = standin.add_session(line_items=[("Sample", 1, 0)], payment_status="no_payment_required")
    worker = await start_worker(worker_settings)

    completed = session_event(standin, "checkout.session.completed", setup["id"])
    await publish(completed)
    await publish(session_event(standin, "checkout.session.completed", free["id"]))

    await wait_for(lambda: fulfillment_rows(database_url, free["id"]))  # a free order is one
    await settle(worker, topology, channel)
    assert await fulfillment_rows(database_url, setup["id"]) == []
    assert smtp.for_session(setup["id"]) == [] and len(smtp.for_session(free["id"])) == 1
    assert [m.headers["checkout-session-id"] for m in await drain(channel, outbound)] == [
        free["id"]
    ]
    rows = await db_fetch(
        database_url,
        "SELECT event_id, outcome FROM processed_events WHERE checkout_session_id = $1",
        setup["id"],
    )
    assert [tuple(r) for r in rows] == [(completed["id"], "not_an_order")]


async def test_a_connected_accounts_session_is_read_on_its_behalf_and_recorded_with_it(
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
    """Stripe Connect: a session created on a connected account exists only there, so its
    event (with "account") is fulfilled by reading it with Stripe-Account; the same
    session asked for on the platform is not found."""
    account = "acct_1Connected0001"
    sid = standin.add_session(line_items=[("Lamp", 1, 4500)], account=account)["id"]
    connected = session_event(standin, "checkout.session.completed", sid)
    connected["account"] = account
    platform = session_event(standin, "checkout.session.completed", sid)
    await start_worker(worker_settings)

    await publish(connected)
    [row] = await wait_for(lambda: fulfillment_rows(database_url, sid))
    assert (row["stripe_account"], row["amount_total"]) == (account, 4500)
    assert await stored_items(database_url, sid) == [("Lamp", 1, 4500)]
    [mail] = await asyncio.to_thread(smtp.wait, 1)
    assert "1 x Lamp" in mail.get_content()
    [out] = await wait_for(lambda: drain(channel, outbound))
    assert json.loads(out.body)["account"] == account

    await publish(platform)
    [letter] = await wait_for(lambda: drain(channel, topology.dead_queue))
    assert letter.headers[HEADER_EVENT_ID] == platform["id"]
    assert letter.headers[HEADER_ERROR_TYPE] == "StripeNotFound"


async def test_other_checkout_and_unhandled_types_are_acked_and_counted(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    sid = standin.add_session()["id"]
    worker = await start_worker(worker_settings)

    ignored = {"event_type": "checkout.session.expired", "outcome": "ignored"}
    before = counted("worker_messages_total", **ignored)

    await publish(session_event(standin, "checkout.session.expired", sid))
    await settle(worker, topology, channel)

    assert await fulfillment_rows(database_url, sid) == []
    assert await drain(channel, topology.dead_queue) == []
    assert standin.request_count == 0
    assert counted("worker_messages_total", **ignored) - before == 1
