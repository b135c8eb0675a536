"""A paid session is fulfilled once: one row, one email, one order.fulfilled, whatever repeats."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace

import aio_pika
import pytest

from shared.vocabulary import HEADER_ERROR_TYPE, HEADER_EVENT_ID
from tests.conftest import counted, db_fetch, wait_for
from tests.pipeline import COMPLETED, FAILED, SUCCEEDED, Pipeline

pytestmark = pytest.mark.timeout(60)


async def test_a_paid_completed_session_gives_one_row_one_email_and_one_order_fulfilled(
    pipeline: Pipeline,
) -> None:
    session = pipeline.standin.add_session(
        line_items=[("T-shirt", 2, 2000), ("Mug", 1, 1250)], customer_email="ada@example.com"
    )
    sid = session["id"]
    await pipeline.start()

    completed = await pipeline.send(COMPLETED, sid)

    rows = await pipeline.fulfilled(sid)
    assert len(rows) == 1
    row = rows[0]
    assert (row["amount_total"], row["currency"], row["customer_email"]) == (
        5250,
        "usd",
        "ada@example.com",
    )
    assert await pipeline.items(sid) == [("Mug", 1, 1250), ("T-shirt", 2, 4000)]

    [mail] = await pipeline.mails(1)
    assert mail["To"] == "ada@example.com"
    assert mail["Message-ID"] == f"<order.{sid}@shop.test>"
    text = mail.get_content()
    assert "2 x T-shirt" in text and "1 x Mug" in text
    assert "Total: 52.50 USD" in text

    [out] = await wait_for(pipeline.outbound_messages)
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
    tax_included: bool, pipeline: Pipeline
) -> None:
    """A metered price has no quantity (Stripe sends null): stored as NULL and shown
    without one, not as 1. The email's lines add up to the total, with Stripe's figures:
    items before discounts and taxes (an item's amount_total is after them), then
    subtotal, discount, shipping and tax, added or included. order.fulfilled says it
    started a subscription."""
    session = pipeline.standin.add_session(
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
    await pipeline.start()

    await pipeline.send(COMPLETED, sid)

    [row] = await pipeline.fulfilled(sid)
    plan_after = 2900 - 500 + (0 if tax_included else 120)  # Stripe's item amount_total
    assert await pipeline.items(sid) == [
        ("API calls", None, 0),
        ("Pro plan", 1, plan_after),
    ]
    # what the email itemises is on record for support (downstream trial)
    breakdown = ("amount_subtotal", "amount_discount", "amount_shipping", "amount_tax")
    assert [row[c] for c in breakdown] == [2900, 500, 499, 120]
    assert (row["mode"], row["subscription_id"]) == ("subscription", session["subscription"])
    subtotals = await pipeline.rows(
        "SELECT description, amount_subtotal FROM fulfillment_line_items "
        "WHERE checkout_session_id = $1 ORDER BY description",
        sid,
    )
    assert [tuple(r) for r in subtotals] == [("API calls", 0), ("Pro plan", 2900)]
    [mail] = await pipeline.mails(1)
    text = mail.get_content()
    assert "Thank you for your subscription. It is confirmed and active." in text
    assert "on its way" not in text  # a subscription is not shipped
    assert "  1 x Pro plan  29.00 USD" in text and "  API calls  0.00 USD" in text
    for line in ("Subtotal: 29.00 USD", "Discount: -5.00 USD", "Shipping: 4.99 USD"):
        assert line in text
    tax_line = "Tax included: 1.20 USD" if tax_included else "Tax: 1.20 USD"
    assert tax_line in text and f"Total: {total / 100:.2f} USD" in text

    [out] = await wait_for(pipeline.outbound_messages)
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
    pipeline: Pipeline,
) -> None:
    sid = pipeline.standin.add_session()["id"]
    first = await pipeline.start()
    await pipeline.start(replace(pipeline.settings, worker_id="test-worker-2"))
    completed = pipeline.event(COMPLETED, sid)

    await asyncio.gather(
        *(pipeline.publish(completed) for _ in range(20)),
        pipeline.publish(pipeline.event(SUCCEEDED, sid)),
    )

    await pipeline.fulfilled(sid)
    await pipeline.settle(first)
    assert len(await pipeline.fulfillments(sid)) == 1
    assert len(pipeline.mails_for(sid)) == 1
    assert len(await pipeline.outbound_messages()) == 1
    # one row per event; each handling counted, the first one's outcome kept
    handled = await pipeline.rows(
        "SELECT event_id, outcome, times_handled FROM processed_events "
        "WHERE checkout_session_id = $1",
        sid,
    )
    by_event = {r["event_id"]: r for r in handled}
    assert len(by_event) == 2 and by_event[completed["id"]]["times_handled"] == 20
    [row] = await pipeline.fulfillments(sid)
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
    pipeline: Pipeline,
) -> None:
    """Stripe's rate limit is the scarce resource: once a session is fulfilled with every
    effect recorded, its later events (async_payment_succeeded, the landing page's
    fulfillment.requested, a stale failure) are recorded as handled without an API call.
    (A repeated `completed` still asks Stripe: it is nearly always a session's first
    event, and checking first would cost every order a database round trip.)"""
    standin = pipeline.standin
    worker = await pipeline.start()
    sid = await pipeline.complete()

    await wait_for(lambda: pipeline.both_steps(sid))
    await pipeline.settle(worker)
    calls = standin.request_count

    later = [
        pipeline.event("fulfillment.requested", sid),
        pipeline.event(SUCCEEDED, sid),
        pipeline.event(FAILED, sid),
    ]
    for event in later:
        await pipeline.publish(event)
    await pipeline.settle(worker)

    assert standin.request_count == calls
    outcomes = await pipeline.rows(
        "SELECT event_id, outcome FROM processed_events WHERE checkout_session_id = $1", sid
    )
    by_id = {r["event_id"]: r["outcome"] for r in outcomes}
    assert [by_id[e["id"]] for e in later] == [
        "already_fulfilled",
        "already_fulfilled",
        "ignored_fulfilled",
    ]
    assert len(pipeline.mails_for(sid)) == 1


async def test_a_setup_mode_session_is_not_an_order_and_sends_nothing(
    pipeline: Pipeline,
) -> None:
    """Checkout in setup mode only saves a card: no_payment_required, like a free order,
    but nothing was sold. No order, no "order confirmed" email, no order.fulfilled."""
    standin = pipeline.standin
    setup = standin.add_session(mode="setup", customer_email="sam@example.com")
    assert (setup["payment_status"], setup["amount_total"], standin.line_items[setup["id"]]) == (
        "no_payment_required",
        None,
        [],
    )
    free = standin.add_session(line_items=[("Sample", 1, 0)], payment_status="no_payment_required")
    worker = await pipeline.start()

    completed = await pipeline.send(COMPLETED, setup["id"])
    await pipeline.send(COMPLETED, free["id"])

    await pipeline.fulfilled(free["id"])  # a free order is one
    await pipeline.settle(worker)
    assert await pipeline.fulfillments(setup["id"]) == []
    assert pipeline.mails_for(setup["id"]) == [] and len(pipeline.mails_for(free["id"])) == 1
    assert [m.headers["checkout-session-id"] for m in await pipeline.outbound_messages()] == [
        free["id"]
    ]
    rows = await pipeline.rows(
        "SELECT event_id, outcome FROM processed_events WHERE checkout_session_id = $1",
        setup["id"],
    )
    assert [tuple(r) for r in rows] == [(completed["id"], "not_an_order")]


async def test_a_connected_accounts_session_is_read_on_its_behalf_and_recorded_with_it(
    pipeline: Pipeline,
) -> None:
    """Stripe Connect: a session created on a connected account exists only there, so its
    event (with "account") is fulfilled by reading it with Stripe-Account; the same
    session asked for on the platform is not found."""
    account = "acct_1Connected0001"
    sid = pipeline.standin.add_session(line_items=[("Lamp", 1, 4500)], account=account)["id"]
    connected = pipeline.event(COMPLETED, sid)
    connected["account"] = account
    platform = pipeline.event(COMPLETED, sid)
    await pipeline.start()

    await pipeline.publish(connected)
    [row] = await pipeline.fulfilled(sid)
    assert (row["stripe_account"], row["amount_total"]) == (account, 4500)
    assert await pipeline.items(sid) == [("Lamp", 1, 4500)]
    [mail] = await pipeline.mails(1)
    assert "1 x Lamp" in mail.get_content()
    [out] = await wait_for(pipeline.outbound_messages)
    assert json.loads(out.body)["account"] == account

    await pipeline.publish(platform)
    [letter] = await wait_for(pipeline.dead_letters)
    assert letter.headers[HEADER_EVENT_ID] == platform["id"]
    assert letter.headers[HEADER_ERROR_TYPE] == "StripeNotFound"


async def test_other_checkout_and_unhandled_types_are_acked_and_counted(
    pipeline: Pipeline,
) -> None:
    sid = pipeline.standin.add_session()["id"]
    worker = await pipeline.start()

    ignored = {"event_type": "checkout.session.expired", "outcome": "ignored"}
    before = counted("worker_messages_total", **ignored)

    await pipeline.send("checkout.session.expired", sid)
    await pipeline.settle(worker)

    assert await pipeline.fulfillments(sid) == []
    assert await pipeline.dead_letters() == []
    assert pipeline.standin.request_count == 0
    assert counted("worker_messages_total", **ignored) - before == 1
