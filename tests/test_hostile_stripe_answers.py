"""Answers in Stripe's place that are not what Stripe sends: retried, bounded, or stored safely."""

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
from tests.pipeline import fulfillment_rows, fulfillment_steps, session_event, settle, stored_items
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


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
