"""Answers in Stripe's place that are not what Stripe sends: retried, bounded, or stored safely."""

from __future__ import annotations

import json

import pytest

from shared.vocabulary import HEADER_ERROR_MESSAGE
from tests.conftest import wait_for
from tests.pipeline import COMPLETED, Pipeline

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
    status: int, body: bytes | str, content_type: str, pipeline: Pipeline
) -> None:
    """A proxy's or gateway's page, or a body cut short, is no verdict on the session:
    Stripe answers every GET with a JSON object. Retried; the next answer fulfills."""
    standin = pipeline.standin
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
    worker = await pipeline.start()

    await pipeline.send(COMPLETED, sid)

    await pipeline.fulfilled(sid)
    await pipeline.settle(worker)
    assert await pipeline.dead_letters() == []
    assert len(pipeline.mails_for(sid)) == 1
    assert await pipeline.fulfillments(other) == [] and pipeline.mails_for(other) == []
    assert len(await pipeline.items(sid)) == 1  # its own T-shirt


async def test_a_session_answered_without_its_line_items_expanded_is_fulfilled_with_them(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
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
    await pipeline.start()

    sid = await pipeline.complete(line_items=[("T-shirt", 2, 2000), ("Mug", 1, 1250)])

    await pipeline.fulfilled(sid)
    assert await pipeline.items(sid) == [("Mug", 1, 1250), ("T-shirt", 2, 4000)]
    [mail] = await pipeline.mails(1)
    assert "2 x T-shirt" in mail.get_content()


async def test_a_nul_in_what_stripe_answers_cannot_stop_a_paid_order_being_recorded(
    pipeline: Pipeline,
) -> None:
    """Black-box trial: PostgreSQL's text cannot hold a NUL, so a customer name or item
    description with one dead-lettered the paid order for good. Now stored as U+FFFD; a
    customer email with one is no address (recorded as undeliverable, the order stands)."""
    standin = pipeline.standin
    named = standin.add_session(line_items=[("Tea\x00pot", 1, 900)])
    named["customer_details"]["name"] = "Nul\x00Name"
    named["customer"] = "cus_a\x00b"
    named["mode"] = "payment\x00"
    [item] = standin.line_items[named["id"]]
    item["id"], item["price"]["id"] = "li_a\x00b", "price_a\x00b"
    mailless = standin.add_session(customer_email="jenny\x00@example.com")
    await pipeline.start()

    await pipeline.send(COMPLETED, named["id"])
    await pipeline.send(COMPLETED, mailless["id"])

    [row] = await pipeline.fulfilled(named["id"])
    assert (row["customer_name"], row["customer_id"]) == ("Nul\ufffdName", "cus_a\ufffdb")
    assert row["mode"] == "payment\ufffd"
    [ids] = await pipeline.rows(
        "SELECT line_item_id, price_id FROM fulfillment_line_items WHERE checkout_session_id = $1",
        named["id"],
    )
    assert tuple(ids) == ("li_a\ufffdb", "price_a\ufffdb")
    assert await pipeline.items(named["id"]) == [("Tea\ufffdpot", 1, 900)]
    [mail] = await pipeline.mails(1)
    assert "1 x Tea\ufffdpot" in mail.get_content()

    steps = await wait_for(lambda: pipeline.both_steps(mailless["id"]))
    assert steps["confirmation_email"].startswith("failed: ")
    assert steps["order_fulfilled_message"].startswith("published ")
    assert await pipeline.dead_letters() == []


@pytest.mark.parametrize(
    "gateway_page",
    [
        None,
        b"{}",  # no list at all
        b'{"object": "list", "data": [], "has_more": true, "url": "/v1/x"}',  # more, yet empty
    ],
)
async def test_a_session_with_more_line_items_than_one_page_is_fulfilled_with_all_of_them(
    gateway_page: bytes | None, pipeline: Pipeline
) -> None:
    """Stripe expands only the first 10 line items; the rest come from /line_items pages
    (here more than one: pages hold at most 100, and the paging must not stop early).
    A page that is not Stripe's (a gateway's 200 without a list) is retried: it used to
    end the paging, and the order was recorded and announced with items missing (review)."""
    items = [(f"Item {i:03}", 1, 100 + i) for i in range(123)]
    if gateway_page is not None:
        pipeline.standin.answer_next(
            1, gateway_page, content_type="application/json", path="*/line_items"
        )
    await pipeline.start()

    sid = await pipeline.complete(line_items=items)

    [row] = await pipeline.fulfilled(sid)
    assert row["amount_total"] == sum(unit for _, _, unit in items)
    stored = await pipeline.items(sid)
    assert [description for description, _, _ in stored] == [d for d, _, _ in items]
    [mail] = await pipeline.mails(1)
    assert all(f"1 x {d}" in mail.get_content() for d, _, _ in items)


async def test_a_list_of_line_items_that_never_ends_is_dead_lettered_not_fetched_forever(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adversarial trial: an answer that kept saying has_more was paged through forever
    (13,567 calls in 20 s, memory growing). Bounded far above Checkout's 100 items; the
    bound is lowered here so that a 23-item session crosses it."""
    from worker import stripe_reader

    monkeypatch.setattr(stripe_reader, "MAX_LINE_ITEMS", 15)
    await pipeline.start()

    sid = await pipeline.complete(line_items=[(f"Item {i:02}", 1, 100) for i in range(23)])

    [letter] = await wait_for(pipeline.dead_letters)
    assert "more than 15 line items" in letter.headers[HEADER_ERROR_MESSAGE]
    assert await pipeline.fulfillments(sid) == []
