"""Workers against real RabbitMQ, PostgreSQL and SMTP, with the Stripe stand-in over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

import aio_pika
import pytest

from devkit import signing as sh
from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from shared.topology import Topology
from shared.vocabulary import (
    HEADER_ATTEMPT,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_EVENT_ID,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_WORKER_ID,
)
from tests.conftest import counted, db_fetch, depth, drain, wait_for
from tests.pipeline import (
    both_steps,
    fulfillment_rows,
    fulfillment_steps,
    session_event,
    settle,
    stored_items,
)
from tests.tcp_proxy import TcpProxy
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


@pytest.mark.parametrize(
    ("discount", "tax", "total", "lines"),
    [
        # one price tax-inclusive (12.00 holding 2.00), one exclusive (10.00 plus 1.00)
        (0, 300, 2300, ["Subtotal: 22.00 EUR", "Tax: 1.00 EUR", "Tax included: 2.00 EUR"]),
        (
            220,  # and 10% off: Stripe's tax shrinks with it
            270,
            2070,
            [
                "Subtotal: 22.00 EUR",
                "Discount: -2.20 EUR",
                "Tax: 0.90 EUR",
                "Tax included: 1.80 EUR",
            ],
        ),
        (220, 270, 2500, []),  # figures that add up no way we know: items and total only
    ],
)
def test_the_email_adds_up_when_a_session_mixes_tax_inclusive_and_exclusive_prices(
    discount: int, tax: int, total: int, lines: list[str]
) -> None:
    """Downstream trial: a session with both kinds of price lost every adjustment line,
    its discount too, though Stripe's figures add up."""
    from worker.mail import confirmation_email
    from worker.order import LineItem, Order

    def item(name: str, amount: int) -> LineItem:
        return LineItem(f"li_{name}", name, "price_1", 1, amount, amount, "eur", amount)

    order = Order(
        session_id="cs_test_mixed",
        payment_status="paid",
        amount_total=total,
        currency="eur",
        customer_id=None,
        customer_email="jenny@example.com",
        customer_name=None,
        livemode=False,
        items=(item("Book", 1200), item("Pen", 1000)),
        amount_subtotal=2200,
        amount_discount=discount,
        amount_tax=tax,
    )

    text = confirmation_email(order, "shop@shop.test").get_payload(decode=True).decode()
    shown = [t for t in text.splitlines() if t.startswith(("Subtotal", "Discount", "Tax"))]
    assert shown == lines
    assert f"Total: {total / 100:.2f} EUR" in text


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


async def test_stripe_errors_at_first_are_retried_in_process_then_fulfilled(
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
    standin.fail_next(1, 429)
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    await wait_for(lambda: fulfillment_rows(database_url, sid))
    assert len(await drain(channel, topology.dead_queue)) == 0
    assert standin.request_count >= 2


@pytest.mark.parametrize(
    ("retry_after", "through_delay_queue", "from_gateway"),
    [(1.5, False, False), (30.0, True, False), (1.5, False, True), (30.0, True, True)],
)
async def test_a_retry_after_is_waited_in_process_when_short_and_in_a_delay_queue_when_long(
    retry_after: float,
    through_delay_queue: bool,
    from_gateway: bool,
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Stripe sends no Retry-After, but a gateway in front of it may: a short one is waited
    before the quick retry (not 0.1 s later), a long one in a delay queue, where the
    message waits without holding a worker's slot. Read also from an answer that is not
    Stripe's error JSON (a gateway's page), whose headers stripe-python's error drops."""

    def sent_to_delay_queues() -> float:
        return counted("worker_retries_total", event_type="checkout.session.completed")

    sid = standin.add_session()["id"]
    if from_gateway:
        page = b"<html><body>503 Service Temporarily Unavailable</body></html>"
        standin.answer_next(1, page, status=503, headers={"Retry-After": f"{retry_after:g}"})
    else:
        standin.fail_next(1, 429, retry_after=retry_after)
    before = sent_to_delay_queues()
    await start_worker(worker_settings)
    started = time.monotonic()

    await publish(session_event(standin, "checkout.session.completed", sid))

    await wait_for(lambda: fulfillment_rows(database_url, sid), timeout_s=20)
    assert sent_to_delay_queues() - before == (1 if through_delay_queue else 0)
    if not through_delay_queue:
        assert time.monotonic() - started >= retry_after
    else:  # not the first delay queue's 0.5 s: the longest, nearest to what was asked
        assert worker_settings.broker.retry_delays_s == (0.5, 1.0)
        assert time.monotonic() - started >= 1.0
    assert await drain(channel, topology.dead_queue) == []


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (502, b"<html><body>502 Bad Gateway</body></html>", "text/html"),
        (200, b"<html><body>Please log in to the proxy</body></html>", "text/html"),
        (200, b"[1, 2, 3]", "application/json"),  # JSON, but not an object
        (200, b'{"status": "ok"}', "application/json"),  # an object, but not the session
        # adversarial trial: another session (a cache mixing answers up) was fulfilled in
        # this one's place; a currency that is not one reached the email's subject line
        (200, "another session", "application/json"),
        (200, "a currency with a line break", "application/json"),
    ],
)
async def test_an_answer_not_from_stripe_is_retried_not_dead_lettered(
    status: int,
    body: bytes | str,
    content_type: str,
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """A proxy's or gateway's page, or a body cut short, is no verdict on the session:
    Stripe answers every GET with a JSON object. Retried; the next answer fulfills."""
    sid = standin.add_session()["id"]
    other = standin.add_session()["id"]
    if isinstance(body, str):  # a session-shaped answer that is not this session's
        doc = dict(standin.sessions[sid], line_items={"object": "list", "data": []})
        if body == "another session":
            doc = dict(standin.sessions[other], line_items={"object": "list", "data": []})
        else:
            doc["currency"] = "us\r\nd"
        body = json.dumps(doc).encode()
    standin.answer_next(1, body, status=status, content_type=content_type)
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await settle(worker, topology, channel)
    assert await drain(channel, topology.dead_queue) == []
    assert len(smtp.for_session(sid)) == 1
    assert await fulfillment_rows(database_url, other) == [] and smtp.for_session(other) == []
    assert len(await stored_items(database_url, sid)) == 1  # its own T-shirt


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
    standin.fail_next(4, 500)  # two quick tries, a delay, two more, a second delay, then up
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    # the second attempt's failure waits in the second delay queue, not the first again
    await wait_for(lambda: depth(channel, topology.retry_queues[1]), timeout_s=10)
    rows = await wait_for(lambda: fulfillment_rows(database_url, sid), timeout_s=20)
    assert len(rows) == 1
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert await drain(channel, topology.dead_queue) == []
    processed = await db_fetch(
        database_url, "SELECT outcome FROM processed_events WHERE checkout_session_id = $1", sid
    )
    assert [r["outcome"] for r in processed] == ["fulfilled"]


async def test_an_unknown_session_or_malformed_body_is_dead_lettered_at_once_with_reasons(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    good = standin.add_session()["id"]
    unknown = sh.event("checkout.session.completed", sh.checkout_session("cs_test_unknown_123"))
    await start_worker(worker_settings)

    await publish(unknown)
    await publish(b"{not json")
    await publish(session_event(standin, "checkout.session.completed", good))

    await wait_for(lambda: fulfillment_rows(database_url, good))

    async def dead() -> list[Any]:
        return (
            await drain(channel, topology.dead_queue)
            if (await depth(channel, topology.dead_queue)) >= 2
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


async def test_smtp_down_is_retried_and_one_email_is_sent_once_it_is_back(
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
    smtp.stop()
    worker = await start_worker(worker_settings)

    completed = session_event(standin, "checkout.session.completed", sid)
    await publish(completed)
    await wait_for(lambda: fulfillment_rows(database_url, sid))  # the row does not wait for mail
    await asyncio.sleep(1.0)  # at least one retry through a delay queue
    assert smtp.for_session(sid) == []
    smtp.start()

    await asyncio.to_thread(smtp.wait, 1, 15)
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert len(await fulfillment_rows(database_url, sid)) == 1
    assert await drain(channel, topology.dead_queue) == []
    # the attempt that sent the email finished the fulfillment: counted as fulfilled, not
    # as a no-op (its row was written by the first attempt)
    [processed] = await db_fetch(
        database_url, "SELECT outcome FROM processed_events WHERE event_id = $1", completed["id"]
    )
    assert processed["outcome"] == "fulfilled"


async def test_a_session_answered_without_its_line_items_expanded_is_fulfilled_with_them(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by an outside-in trial: a Stripe stand-in that ignored ``expand[]`` got a paid
    order recorded and mailed with no items at all."""
    from devkit.stripe import app as stripe_standin

    read_list = stripe_standin.list_param
    monkeypatch.setattr(
        stripe_standin,
        "list_param",
        lambda query, name: [] if name == "expand" else read_list(query, name),
    )
    sid = standin.add_session(line_items=[("T-shirt", 2, 2000), ("Mug", 1, 1250)])["id"]
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    await wait_for(lambda: fulfillment_rows(database_url, sid))
    assert await stored_items(database_url, sid) == [("Mug", 1, 1250), ("T-shirt", 2, 4000)]
    [mail] = await asyncio.to_thread(smtp.wait, 1)
    assert "2 x T-shirt" in mail.get_content()


async def test_an_outbound_message_no_queue_is_bound_for_is_counted_and_recorded_so(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Downstream trial: with no subscriber's queue bound, the broker dropped order.fulfilled
    unseen and the step read "published". Now it is published mandatory: the broker's
    return is counted, logged and recorded; the order and its email go on."""
    sid = standin.add_session()["id"]
    before = counted("worker_outbound_unrouted_total", type="order.fulfilled")
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    steps = await wait_for(lambda: both_steps(database_url, sid))
    assert steps["order_fulfilled_message"] == (
        f"unrouted order.fulfilled:{sid}: no queue was bound for order.fulfilled "
        f"on {topology.out_exchange}"
    )
    assert steps["confirmation_email"].startswith("sent <order.")
    assert counted("worker_outbound_unrouted_total", type="order.fulfilled") == before + 1
    assert len(await fulfillment_rows(database_url, sid)) == 1


async def test_a_nul_in_what_stripe_answers_cannot_stop_a_paid_order_being_recorded(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    database_url: str,
    channel: Any,
    topology: Topology,
    outbound: str,
) -> None:
    """Black-box trial: PostgreSQL's text cannot hold a NUL, so a customer name or item
    description with one dead-lettered the paid order for good. Now stored as U+FFFD; a
    customer email with one is no address (recorded as undeliverable, the order stands)."""
    named = standin.add_session(line_items=[("Tea\x00pot", 1, 900)])
    named["customer_details"]["name"] = "Nul\x00Name"
    named["customer"] = "cus_a\x00b"
    named["mode"] = "payment\x00"
    [item] = standin.line_items[named["id"]]
    item["id"], item["price"]["id"] = "li_a\x00b", "price_a\x00b"
    mailless = standin.add_session(customer_email="jenny\x00@example.com")
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", named["id"]))
    await publish(session_event(standin, "checkout.session.completed", mailless["id"]))

    [row] = await wait_for(lambda: fulfillment_rows(database_url, named["id"]))
    assert (row["customer_name"], row["customer_id"]) == ("Nul\ufffdName", "cus_a\ufffdb")
    assert row["mode"] == "payment\ufffd"
    [ids] = await db_fetch(
        database_url,
        "SELECT line_item_id, price_id FROM fulfillment_line_items WHERE checkout_session_id = $1",
        named["id"],
    )
    assert tuple(ids) == ("li_a\ufffdb", "price_a\ufffdb")
    assert await stored_items(database_url, named["id"]) == [("Tea\ufffdpot", 1, 900)]
    [mail] = await asyncio.to_thread(smtp.wait, 1)
    assert "1 x Tea\ufffdpot" in mail.get_content()

    async def both_steps() -> dict[str, str] | None:
        found = await fulfillment_steps(database_url, mailless["id"])
        return found if len(found) == 2 else None

    steps = await wait_for(both_steps)
    assert steps["confirmation_email"].startswith("failed: ")
    assert steps["order_fulfilled_message"].startswith("published ")
    assert await drain(channel, topology.dead_queue) == []


@pytest.mark.parametrize(
    "gateway_page",
    [
        None,
        b"{}",  # no list at all
        b'{"object": "list", "data": [], "has_more": true, "url": "/v1/x"}',  # more, yet empty
    ],
)
async def test_a_session_with_more_line_items_than_one_page_is_fulfilled_with_all_of_them(
    gateway_page: bytes | None,
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    database_url: str,
) -> None:
    """Stripe expands only the first 10 line items; the rest come from /line_items pages
    (here more than one: pages hold at most 100, and the paging must not stop early).
    A page that is not Stripe's (a gateway's 200 without a list) is retried: it used to
    end the paging, and the order was recorded and announced with items missing (review)."""
    items = [(f"Item {i:03}", 1, 100 + i) for i in range(123)]
    sid = standin.add_session(line_items=items)["id"]
    if gateway_page is not None:
        standin.answer_next(1, gateway_page, content_type="application/json", path="*/line_items")
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    [row] = await wait_for(lambda: fulfillment_rows(database_url, sid))
    assert row["amount_total"] == sum(unit for _, _, unit in items)
    stored = await stored_items(database_url, sid)
    assert [description for description, _, _ in stored] == [d for d, _, _ in items]
    [mail] = await asyncio.to_thread(smtp.wait, 1)
    assert all(f"1 x {d}" in mail.get_content() for d, _, _ in items)


async def test_a_live_event_with_a_test_key_is_retried_and_says_why_not_session_not_found(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    topology: Topology,
) -> None:
    """Adversarial trial: a live endpoint's events with a test-mode key were dead-lettered
    at once as unknown sessions (Stripe's test mode cannot see live objects): a setting
    to fix, so retried and named, then replayable from the DLQ once fixed."""
    assert worker_settings.stripe.api_key.startswith("sk_test_")
    live_session = sh.checkout_session("cs_live_a1b2c3d4e5f6", livemode=True)
    live = {**sh.event("checkout.session.completed", live_session), "livemode": True}
    test = sh.event("checkout.session.completed", sh.checkout_session())
    by_reason = {
        reason: {"event_type": "checkout.session.completed", "reason": reason}
        for reason in ("retries_exhausted", "permanent")
    }
    before = {r: counted("worker_dead_letters_total", **labels) for r, labels in by_reason.items()}
    await start_worker(worker_settings)

    await publish(live)
    await publish(test)

    found: list[Any] = []

    async def both_dead() -> list[Any] | None:
        found.extend(await drain(channel, topology.dead_queue))  # draining takes them
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
    assert (last - first).total_seconds() >= sum(worker_settings.broker.retry_delays_s)
    for reason, labels in by_reason.items():
        assert counted("worker_dead_letters_total", **labels) - before[reason] == 1, reason


async def test_a_test_event_on_a_live_key_is_an_unknown_session_dead_lettered_at_once(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    topology: Topology,
) -> None:
    """Review: a live Connect endpoint also receives connected accounts' test events, which
    a live key cannot read and nobody needs fulfilled: not a setting to fix, so not
    retried for hours; dead-lettered at once as the unknown session it is."""
    stripe_settings = replace(worker_settings.stripe, api_key="sk_live_" + "x" * 24)
    await start_worker(replace(worker_settings, stripe=stripe_settings))
    test = sh.event("checkout.session.completed", sh.checkout_session("cs_test_connected_1"))
    await publish({**test, "account": "acct_1Connected0001"})

    [letter] = await wait_for(lambda: drain(channel, topology.dead_queue))
    assert letter.headers[HEADER_ERROR_TYPE] == "StripeNotFound"
    assert letter.headers[HEADER_ATTEMPT] == 1


async def test_a_list_of_line_items_that_never_ends_is_dead_lettered_not_fetched_forever(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adversarial trial: an answer that kept saying has_more was paged through forever
    (13,567 calls in 20 s, memory growing). Bounded far above Checkout's 100 items; the
    bound is lowered here so that a 23-item session crosses it."""
    from worker import stripe_reader

    monkeypatch.setattr(stripe_reader, "MAX_LINE_ITEMS", 15)
    sid = standin.add_session(line_items=[(f"Item {i:02}", 1, 100) for i in range(23)])["id"]
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    [letter] = await wait_for(lambda: drain(channel, topology.dead_queue))
    assert "more than 15 line items" in letter.headers[HEADER_ERROR_MESSAGE]
    assert await fulfillment_rows(database_url, sid) == []


async def test_a_secret_in_an_error_is_masked_in_the_dead_letter_as_in_the_log(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    topology: Topology,
) -> None:
    """Adversarial trial: an API error echoing the key was masked in the log line but
    stored whole in the dead letter's error header, which `dlq list/show` print."""
    key = worker_settings.stripe.api_key
    sid = standin.add_session()["id"]
    error = {"error": {"type": "invalid_request_error", "message": f"Bad request with {key}"}}
    standin.answer_next(1, json.dumps(error).encode(), status=400, content_type="application/json")
    await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    [letter] = await wait_for(lambda: drain(channel, topology.dead_queue))
    message = letter.headers[HEADER_ERROR_MESSAGE]
    assert key not in message and "Bad request with ***" in message


@pytest.mark.parametrize(
    "address", ["jenny\ufffd@example.com", "jenny@exa\x00mple.com", "jen\x85ny@example.com"]
)
def test_an_address_with_a_control_or_replacement_character_is_undeliverable(address: str) -> None:
    """A NUL Stripe sent is stored as U+FFFD (PostgreSQL text cannot hold it); neither is
    part of any mailbox, so the email is recorded as undeliverable, not sent to a guess."""
    from worker.mail import Undeliverable, confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(customer_email=address)["id"]
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": []}))

    with pytest.raises(Undeliverable, match="no usable customer email"):
        confirmation_email(order, "shop@shop.test")


@pytest.mark.parametrize("customer", ["jenny@example.com", "zoë@example.com"])
@pytest.mark.parametrize(
    "sender", ["Boutique Café <orders@shop.example>", '"Shop, Inc." <orders@shop.example>']
)
def test_the_sender_keeps_its_address_whatever_its_display_name(sender: str, customer: str) -> None:
    """Downstream trial: a non-ASCII MAIL_FROM name was encoded together with the address
    (compat32), so mail clients saw a From with no address: no replies, DMARC failures."""
    import email
    import email.policy

    from aiosmtplib.email import flatten_message

    from worker.mail import confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(customer_email=customer)["id"]
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": []}))
    # flattened as the mailer's client does (SMTPUTF8 only for a non-ASCII customer address)
    raw = flatten_message(confirmation_email(order, sender), utf8=not customer.isascii())

    # as a client reads it (RFC 6532: headers in UTF-8 when the relay takes SMTPUTF8)
    parsed = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    [address] = parsed["From"].addresses
    assert address.addr_spec == "orders@shop.example"
    assert address.display_name == email.utils.parseaddr(sender)[0]


def test_the_customers_name_is_one_bounded_line_in_the_greeting() -> None:
    from worker.order import NAME_MAX_CHARS, Order

    standin = StripeStandIn()
    sid = standin.add_session()["id"]
    session = dict(standin.sessions[sid])
    session["customer_details"] = {
        "email": "a@example.com",
        "name": "Eve\r\nVisit evil.example " * 50,
    }
    name = Order.from_session(session).customer_name
    assert name is not None and name.startswith("Eve Visit evil.example Eve")
    assert len(name) == NAME_MAX_CHARS and "\n" not in name and "\r" not in name


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


@pytest.mark.parametrize(
    ("currency", "line_total", "order_total"),
    [
        ("usd", "25.00 USD", "52.50 USD"),
        ("jpy", "2,500 JPY", "5,250 JPY"),  # zero-decimal: whole yen
        ("kwd", "2.500 KWD", "5.250 KWD"),  # three-decimal: thousandths (fils)
    ],
)
def test_the_confirmation_email_shows_amounts_in_the_currencys_own_minor_unit(
    currency: str, line_total: str, order_total: str
) -> None:
    from worker.mail import confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(line_items=[("Tea", 2, 1250), ("Cup", 1, 2750)], currency=currency)[
        "id"
    ]
    session = dict(standin.sessions[sid], line_items={"data": standin.line_items[sid]})
    mail = confirmation_email(Order.from_session(session), "shop@shop.test")
    text = mail.get_payload(decode=True).decode()
    assert f"2 x Tea  {line_total}" in text
    assert f"Total: {order_total}" in text


def test_an_items_description_is_one_line_in_the_email_and_kept_as_stripe_has_it() -> None:
    from worker.mail import DESCRIPTION_MAX_CHARS, confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(line_items=[("Tea\r\nBcc: x@evil.example", 2, 1250), ("Cup", 1, 50)])[
        "id"
    ]
    items = [dict(i) for i in standin.line_items[sid]]
    items[1]["description"], items[1]["price"]["nickname"] = None, None
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": items}))
    assert [i.description for i in order.items] == ["Tea\r\nBcc: x@evil.example", None]
    items[1]["description"] = {"not": "text"}  # not Stripe's answer: no description either
    odd = Order.from_session(dict(standin.sessions[sid], line_items={"data": items}))
    assert odd.items[1].description is None

    text = confirmation_email(order, "shop@shop.test").get_payload(decode=True).decode()
    assert "  2 x Tea Bcc: x@evil.example  25.00 USD\n" in text
    assert "  1 x Item  0.50 USD\n" in text  # no description: a placeholder in the email only
    assert "\r" not in text

    items[0]["description"] = "Tea " * 100
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": items}))
    text = confirmation_email(order, "shop@shop.test").get_payload(decode=True).decode()
    line = next(t for t in text.splitlines() if t.startswith("  2 x Tea"))
    assert len(line) == len("  2 x ") + DESCRIPTION_MAX_CHARS + len("  25.00 USD")


def mail_numbered(n: int) -> Any:
    """A plain message with subject ``n<n>``, for the mailer's own tests."""
    from email.mime.text import MIMEText

    m = MIMEText(f"message {n}")
    m["From"], m["To"], m["Subject"] = "orders@shop.test", "ada@example.com", f"n{n}"
    return m


async def test_the_mailer_reuses_its_connection_and_survives_the_relay_dropping_it(
    smtp: SmtpSink, worker_settings: WorkerSettings
) -> None:
    from worker.mail import Mailer

    mailer = Mailer(worker_settings.smtp)
    try:
        for n in range(3):
            await mailer.send(mail_numbered(n))
        assert len(smtp.messages) == 3
        assert len(set(smtp.peers)) == 1  # one connection for all three

        smtp.stop()  # the relay restarts: the idle connection is dead
        smtp.start()
        await mailer.send(mail_numbered(3))  # sent on a new connection, no error
        assert [m["Subject"] for m in smtp.messages] == ["n0", "n1", "n2", "n3"]
        assert len(set(smtp.peers)) == 2
    finally:
        await mailer.close()


@pytest.mark.parametrize(
    ("answer", "written_off"),
    [
        ("554 5.6.0 Bad content", True),
        ("552 5.3.4 Message too big", True),
        ("554 5.7.1 Rejected as spam", False),
        ("451 4.3.0 Try again later", False),
    ],
)
async def test_a_refusal_at_data_is_judged_as_one_at_rcpt_is(
    answer: str, written_off: bool, smtp: SmtpSink, worker_settings: WorkerSettings
) -> None:
    from shared.errors import TransientError
    from worker.mail import Mailer, Undeliverable

    smtp.data_answer = answer
    mailer = Mailer(worker_settings.smtp)
    try:
        with pytest.raises((TransientError, Undeliverable)) as caught:
            await mailer.send(mail_numbered(0))
    finally:
        await mailer.close()
    assert type(caught.value) is (Undeliverable if written_off else TransientError)


async def test_a_connection_idle_longer_than_its_limit_is_not_used_again(
    smtp: SmtpSink, worker_settings: WorkerSettings
) -> None:
    """A relay (or a NAT on the way) may drop an idle connection without a word: a send on
    it would wait out the whole timeout. Past max_idle_s a new connection is opened."""
    from worker.mail import Mailer

    mailer = Mailer(worker_settings.smtp, max_idle_s=0.2)
    try:
        await mailer.send(mail_numbered(0))
        await mailer.send(mail_numbered(1))  # at once: the same connection
        await asyncio.sleep(0.4)
        await mailer.send(mail_numbered(2))
    finally:
        await mailer.close()
    assert smtp.peers[0] == smtp.peers[1] != smtp.peers[2]


@pytest.mark.parametrize(
    "address",
    [
        "ada@example.com\r\nBcc: eve@example.com",
        "ada@example.com\nBcc: eve@example.com",
        "ada smith@example.com",
        "ada@exa mple.com",
        "ada@example.com\t",
        "ada@example.com, eve@example.com",
        "Ada <ada@example.com>",
    ],
)
def test_a_customer_email_that_is_not_one_bare_address_is_undeliverable(address: str) -> None:
    """No header injection and no second recipient: written off as undeliverable (the
    order goes on), never sent, never a crash of the email library."""
    from worker.mail import Undeliverable, confirmation_email
    from worker.order import Order

    order = Order(
        session_id="cs_test_address",
        payment_status="paid",
        amount_total=100,
        currency="usd",
        customer_id=None,
        customer_email=address,
        customer_name=None,
        livemode=False,
        items=(),
    )
    with pytest.raises(Undeliverable):
        confirmation_email(order, "Shop <orders@shop.test>")


async def order_went_on(worker: Any, topology: Topology, channel: Any, outbound: str) -> None:
    """Whatever became of the email: the order was announced once, nothing dead-lettered."""
    await settle(worker, topology, channel)
    assert [m.routing_key for m in await drain(channel, outbound)] == ["order.fulfilled"]
    assert await drain(channel, topology.dead_queue) == []


@pytest.mark.parametrize(
    ("address", "why"),
    [("gone@example.com", "550"), ("not an address", "no usable customer email")],
)
async def test_an_undeliverable_email_is_recorded_as_failed_and_the_order_goes_on(
    address: str,
    why: str,
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
    """A customer's address the mail server refuses for good (or that is not an address)
    must not dead-letter the event: the row is committed, so a replay could never send
    the order.fulfilled message. The email is recorded as failed; the rest goes on."""
    smtp.unknown_recipients.add("gone@example.com")
    sid = standin.add_session(customer_email=address)["id"]
    purpose = {"purpose": "confirmation_email"}
    before = counted("worker_emails_undeliverable_total", **purpose)
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    steps = await wait_for(lambda: both_steps(database_url, sid))
    assert steps["confirmation_email"].startswith("failed:")
    assert why in steps["confirmation_email"]
    assert steps["order_fulfilled_message"] == f"published order.fulfilled:{sid}"
    await order_went_on(worker, topology, channel, outbound)
    assert smtp.for_session(sid) == []
    assert len(await fulfillment_rows(database_url, sid)) == 1
    assert counted("worker_emails_undeliverable_total", **purpose) - before == 1


@pytest.mark.parametrize(
    ("code", "message", "written_off"),
    [
        (550, "5.1.1 User unknown", True),
        (552, "5.2.2 Mailbox full", True),
        (552, "5.3.4 Message too big", True),
        (554, "5.6.0 Bad content", True),
        (550, "Mailbox unavailable", True),  # no enhanced status: 550-553 are about it
        (553, "Mailbox name not allowed", True),
        (554, "5.7.1 Message rejected as spam", False),  # policy: our sending as often
        (550, "5.7.26 Unauthenticated email is not accepted (DMARC)", False),
        (550, "5.4.5 Daily sending quota exceeded", False),
        (554, "5.0.0 rejected at DATA", False),
        (554, "Transaction failed", False),
        (451, "4.3.0 Try again later", False),
    ],
)
def test_only_a_refusal_about_the_recipient_or_message_writes_an_email_off(
    code: int, message: str, written_off: bool
) -> None:
    """The README's list, item 5: the rest is retried, then dead-lettered with the answer."""
    from worker.mail import _never_for_this_message

    assert _never_for_this_message(code, message) is written_off


@pytest.mark.parametrize(
    ("address", "smtputf8", "delivered_to", "step"),
    [
        # an internationalized domain goes out in its ASCII form: every relay routes that
        ("zoe@bücher.example", False, "zoe@xn--bcher-kva.example", "sent"),
        # by IDNA 2008, as registries: IDNA 2003 would send this to strasse.de, a stranger
        ("jenny@straße.de", False, "jenny@xn--strae-oqa.de", "sent"),
        # no such domain can exist (a snowman is not allowed): never retried
        ("sam@☃.example", False, None, "failed: session"),
        # a non-ASCII mailbox name needs SMTPUTF8; To: is then UTF-8, not an encoded-word
        ("zoë@example.com", True, "zoë@example.com", "sent"),
        # a relay without SMTPUTF8 can never take it: written off, the order goes on
        ("zoë@example.com", False, None, "failed: the mail relay does not offer SMTPUTF8"),
    ],
)
async def test_internationalized_customer_addresses_are_sent_or_written_off_never_retried(
    address: str,
    smtputf8: bool,
    delivered_to: str | None,
    step: str,
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
    smtp.stop()
    smtp.smtputf8 = smtputf8
    smtp.start()
    sid = standin.add_session(customer_email=address)["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    steps = await wait_for(lambda: both_steps(database_url, sid))
    assert steps["confirmation_email"].startswith(step), steps
    await order_went_on(worker, topology, channel, outbound)
    mails = smtp.for_session(sid)
    if delivered_to is None:
        assert mails == []
    else:
        [mail] = mails
        assert mail["To"] == delivered_to
        assert [a.addr_spec for a in mail["To"].addresses] == [delivered_to]


async def test_a_non_ascii_address_is_retried_not_written_off_when_the_relays_ehlo_failed(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Review: a relay whose EHLO fails is spoken to with HELO, which lists no extensions,
    so SMTPUTF8 looks missing. That says nothing about the relay (a hiccup, a failover):
    retried, and sent once EHLO works, not written off for good."""
    smtp.stop()
    smtp.smtputf8, smtp.refuse_ehlo = True, True
    smtp.start()
    sid = standin.add_session(customer_email="zoë@example.com")["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    await wait_for(lambda: fulfillment_steps(database_url, sid))
    await asyncio.sleep(1.0)  # tried meanwhile, in process and through a delay queue
    assert list(await fulfillment_steps(database_url, sid)) == ["order_fulfilled_message"]
    smtp.refuse_ehlo = False

    [mail] = await asyncio.to_thread(smtp.wait, 1, 15)
    assert mail["To"] == "zoë@example.com"
    await settle(worker, topology, channel)
    assert (await fulfillment_steps(database_url, sid))["confirmation_email"].startswith("sent ")
    assert await drain(channel, topology.dead_queue) == []


async def test_a_deferred_email_does_not_hold_up_the_order_fulfilled_message(
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
    """The message the business ships on goes first: a recipient's mailbox deferring
    (450), or an SMTP outage, delays only the email, which is retried and sent once."""
    smtp.deferred_recipients.add("later@example.com")
    sid = standin.add_session(customer_email="later@example.com")["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    [out] = await wait_for(lambda: drain(channel, outbound))
    assert out.headers["fulfillment-id"] == f"order.fulfilled:{sid}"
    await asyncio.sleep(1.0)  # retried meanwhile, through a delay queue too
    assert list(await fulfillment_steps(database_url, sid)) == ["order_fulfilled_message"]
    assert smtp.for_session(sid) == []

    smtp.deferred_recipients.clear()
    await asyncio.to_thread(smtp.wait, 1, 15)
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert (await fulfillment_steps(database_url, sid))["confirmation_email"].startswith("sent ")
    assert await drain(channel, outbound) == [] and await drain(channel, topology.dead_queue) == []


@pytest.mark.parametrize("refusal", ["refuse_sender", "relay_denied"])
async def test_a_relay_refusing_us_is_retried_not_recorded_as_failed(
    refusal: str,
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """A 5xx at MAIL FROM (or AUTH), or a 5.7.x policy refusal at RCPT ("relay access
    denied"), is the relay's or our settings' fault, the same for every order: retried
    until fixed, never written off as this customer's failure."""
    setattr(smtp, refusal, True)
    sid = standin.add_session()["id"]
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))
    await wait_for(lambda: fulfillment_rows(database_url, sid))
    await asyncio.sleep(1.0)  # at least one retry through a delay queue
    assert "confirmation_email" not in await fulfillment_steps(database_url, sid)
    setattr(smtp, refusal, False)

    await asyncio.to_thread(smtp.wait, 1, 15)
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert (await fulfillment_steps(database_url, sid))["confirmation_email"].startswith("sent ")
    assert await drain(channel, topology.dead_queue) == []


async def test_a_broker_connection_drop_right_after_the_email_does_not_send_it_again(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    topology: Topology,
    rabbitmq_url: str,
) -> None:
    """Regression: aio-pika cancels a channel's consumer tasks when the connection drops;
    a handler cancelled between sending the email and recording it sent it again on
    redelivery. The work now finishes; only its ack is lost."""
    proxy = TcpProxy.in_front_of(rabbitmq_url)
    await proxy.start()
    proxied = proxy.url()
    settings = replace(worker_settings, broker=replace(worker_settings.broker, url=proxied))
    try:
        sid = standin.add_session()["id"]
        smtp.after_data = proxy.cutter()  # before the server's 250 to the email
        worker = await start_worker(settings)
        await publish(session_event(standin, "checkout.session.completed", sid))

        await asyncio.to_thread(smtp.wait, 1, 15)
        await wait_for(lambda: fulfillment_steps(database_url, sid))  # the email is recorded
        await proxy.restore()

        async def both_steps() -> bool:
            return len(await fulfillment_steps(database_url, sid)) == 2

        await wait_for(both_steps, timeout_s=30)
        await settle(worker, topology, channel)
        assert len(smtp.for_session(sid)) == 1
        assert [m.routing_key for m in await drain(channel, outbound)] == ["order.fulfilled"]
        assert await drain(channel, topology.dead_queue) == []
    finally:
        await proxy.close()


async def test_an_unconfirmed_outbound_message_is_published_again_said_and_counted(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    outbound: str,
    channel: Any,
    database_url: str,
    rabbitmq_url: str,
) -> None:
    """A broker slower to confirm than PUBLISH_TIMEOUT_S (an alarm, a stalled link): the
    message's fate is unknown, so the retry publishes it again, and both may arrive (chaos
    trial). Not silent: a warning and a counter; receivers drop the repeat by its id."""

    def unconfirmed() -> float:
        return counted("worker_outbound_unconfirmed_total", type="order.fulfilled")

    before = unconfirmed()  # (before the proxy: nothing between its start and the finally)
    proxy = TcpProxy.in_front_of(rabbitmq_url)
    await proxy.start()
    broker = replace(worker_settings.broker, url=proxy.url(), publish_timeout_s=0.3)
    try:
        sid = standin.add_session()["id"]
        await start_worker(replace(worker_settings, broker=broker, quick_retries=2))
        await asyncio.sleep(0.5)  # consuming
        proxy.downstream_delay_s = 1.0  # the delivery, and every confirm, come 1 s late
        await publish(session_event(standin, "checkout.session.completed", sid))

        async def one_unconfirmed() -> bool:
            return unconfirmed() > before

        await wait_for(one_unconfirmed, timeout_s=15)
        proxy.downstream_delay_s = 0.0
        await asyncio.to_thread(smtp.wait, 1, 15)
    finally:
        await proxy.close()
    copies = await wait_for(lambda: drain(channel, outbound), timeout_s=10)
    await asyncio.sleep(1.0)
    copies += await drain(channel, outbound)
    assert len(copies) >= 2  # the unconfirmed one arrived too
    assert {m.headers["fulfillment-id"] for m in copies} == {f"order.fulfilled:{sid}"}
    assert len({m.message_id for m in copies}) == len(copies)
    assert len(await fulfillment_rows(database_url, sid)) == 1
    assert len(smtp.for_session(sid)) == 1


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


async def test_a_connection_lost_inside_the_session_lock_surfaces_as_the_original_error(
    worker_settings: WorkerSettings, database_url: str
) -> None:
    """Regression (chaos run, PostgreSQL restart): the unlock on a broken connection raised
    its own error, which replaced the real one (here an SMTP outage, to be retried)."""
    import asyncpg

    from shared.errors import TransientError
    from worker import db
    from worker.store import Store

    pool = await db.create_pool(database_url, max_size=2)  # the worker's own: no reset
    store = Store(pool)
    admin = await asyncpg.connect(database_url)
    original = TransientError("SMTP unavailable")
    try:
        with pytest.raises(TransientError) as caught:
            async with store.locked("cs_test_lock_regression") as held:
                pid = await held.conn.fetchval("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.2)  # the database restarts while we talk to SMTP
                raise original
        assert caught.value is original
        # and the lock is free again for the next worker
        async with store.locked("cs_test_lock_regression") as held:
            assert await held.conn.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
        await pool.close()


async def test_a_handler_cancelled_inside_the_session_lock_leaves_the_session_free(
    worker_settings: WorkerSettings, database_url: str
) -> None:
    """The worker's pool does not reset connections on release, so the lock must be freed
    by the fulfiller itself when a handler is cancelled (shutdown after the grace period)."""
    import asyncpg

    from worker import db
    from worker.store import Store

    sid = "cs_test_cancelled_inside_lock"
    try_lock = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
    pool = await db.create_pool(database_url, max_size=1)
    store = Store(pool)
    admin = await asyncpg.connect(database_url)
    inside = asyncio.Event()

    async def handler() -> None:
        async with store.locked(sid):
            inside.set()
            await asyncio.sleep(30)  # an effect in progress

    try:
        task = asyncio.create_task(handler())
        await asyncio.wait_for(inside.wait(), 5)
        assert await admin.fetchval(try_lock, sid) is False  # held by the handler
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await admin.fetchval(try_lock, sid) is True  # free for the next worker
    finally:
        await admin.close()
        await pool.close()


def test_a_connection_broken_mid_protocol_counts_as_transient() -> None:
    """Regression (chaos run, PostgreSQL restart): asyncpg reports a connection the server
    dropped mid-protocol as InternalClientError; it was dead-lettered as a handler bug."""
    import asyncpg

    from worker.retry import is_transient

    assert is_transient(
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )
    )


async def test_a_database_blip_right_after_the_email_does_not_send_it_again(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """Regression (chaos run): when recording a sent email failed because PostgreSQL went
    away, the message was retried and the email sent again; now recording insists."""
    import asyncpg

    sid = standin.add_session()["id"]

    async def drop_every_database_connection() -> None:
        conn = await asyncpg.connect(database_url)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await conn.close()

    smtp.after_data = drop_every_database_connection
    worker = await start_worker(worker_settings)

    await publish(session_event(standin, "checkout.session.completed", sid))

    async def fulfilled() -> bool:
        return len(await fulfillment_steps(database_url, sid)) == 2

    await wait_for(fulfilled, timeout_s=20)
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1


async def test_a_failed_message_the_broker_cannot_take_a_copy_of_is_kept_not_lost(
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """The original is acked only once its retry copy is confirmed: with the delay queue
    gone (the copy is returned), the original goes back to the work queue, is tried again
    and fulfilled; nothing is lost and nothing dead-lettered for the broker's trouble."""
    sid = standin.add_session()["id"]
    standin.fail_next(2, 500)  # the quick retries used up: the message is for a delay queue
    worker = await start_worker(worker_settings)
    await channel.queue_delete(topology.retry_queues[0])

    await publish(session_event(standin, "checkout.session.completed", sid))

    assert len(await wait_for(lambda: fulfillment_rows(database_url, sid), timeout_s=20)) == 1
    await settle(worker, topology, channel)
    assert len(smtp.for_session(sid)) == 1
    assert await drain(channel, topology.dead_queue) == []


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


async def test_recording_an_effect_after_the_locks_connection_died_stops_the_event(
    worker_settings: WorkerSettings, database_url: str
) -> None:
    """The effect is recorded on a fresh connection, but the lock went with the old one:
    doing the next effect unlocked could race another worker, so the event is retried."""
    import asyncpg

    from worker import db
    from worker.store import _UPSERT_STATE, SessionLockLost, Store

    sid = "cs_test_lock_lost_mid_way"
    pool = await db.create_pool(database_url, max_size=2)
    store = Store(pool)
    admin = await asyncpg.connect(database_url)
    await admin.execute(_UPSERT_STATE, sid, "fulfilled", "paid", None, "evt_lock_lost")
    try:
        with pytest.raises(SessionLockLost):
            async with store.locked(sid) as held:
                pid = await held.conn.fetchval("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.2)
                await held.record_step("order_fulfilled_message", "done")
        assert await fulfillment_steps(database_url, sid) == {"order_fulfilled_message": "done"}
    finally:
        await admin.close()
        await pool.close()


async def test_a_stopping_worker_takes_no_new_message_while_it_finishes_its_own(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    start_worker: Any,
    publish: Any,
    channel: Any,
    database_url: str,
    topology: Topology,
) -> None:
    """On stop the consumer is cancelled first: a message arriving during the grace period
    stays in the queue for another worker (this one would be cut off holding it)."""
    held, later = standin.add_session()["id"], standin.add_session()["id"]
    standin.latency_s = 1.0
    worker = await start_worker(worker_settings)
    await publish(session_event(standin, "checkout.session.completed", held))
    await wait_for(lambda: worker.in_flight == 1)

    stopping = asyncio.create_task(worker.stop(grace_s=5))
    await asyncio.sleep(0.2)
    await publish(session_event(standin, "checkout.session.completed", later))
    await stopping

    assert len(await fulfillment_rows(database_url, held)) == 1
    assert await fulfillment_rows(database_url, later) == []
    assert standin.request_count == 1  # the later session was never looked up
    assert await depth(channel, topology.work_queue) == 1


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
