"""The Checkout side: session creation for an existing customer, the hosted page, the
success page, and webhook + landing page together fulfilling once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import stripe
import structlog

from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from ingress.success import request_id
from shared.topology import Topology
from shared.vocabulary import HEADER_EVENT_ID, HEADER_EVENT_TYPE
from tests.conftest import db_fetch, drain, wait_for
from tests.pipeline import fulfillment_rows
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def stripe_client(worker_settings: WorkerSettings) -> Any:
    http = stripe.AIOHTTPClient()
    yield stripe.StripeClient(
        worker_settings.stripe.api_key,
        base_addresses={"api": worker_settings.stripe.api_base},
        http_client=http,
        max_network_retries=0,
    )
    await http.close_async()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"success_url": None}, "success_url"),
        ({"success_url": "not a url"}, "success_url"),
        ({"customer": "cus_missing"}, "customer"),
        ({"line_items": [{"price": "price_missing", "quantity": 1}]}, "line_items[0][price]"),
        ({"line_items": [{"price": "PRICE", "quantity": 0}]}, "line_items[0][quantity]"),
        ({"line_items": None}, "line_items"),
        ({"mode": None}, "mode"),
    ],
)
async def test_the_stand_in_refuses_checkout_parameters_stripe_would_refuse(
    checkout_stack: dict[str, Any], stripe_client: Any, change: dict[str, Any], param: str
) -> None:
    params: dict[str, Any] = {
        "mode": "payment",
        "customer": checkout_stack["customer"]["id"],
        "line_items": [{"price": checkout_stack["price"]["id"], "quantity": 1}],
        "success_url": "https://shop.test/ok?session_id={CHECKOUT_SESSION_ID}",
    }
    for key, value in change.items():
        if value is None:
            params.pop(key)
        elif key == "line_items":
            params[key] = [
                {
                    **v,
                    "price": checkout_stack["price"]["id"] if v["price"] == "PRICE" else v["price"],
                }
                for v in value
            ]
        else:
            params[key] = value

    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_client.v1.checkout.sessions.create_async(params=params)

    assert caught.value.param == param


async def test_create_checkout_session_redirects_to_the_hosted_page_for_the_existing_customer(
    checkout_stack: dict[str, Any], standin: StripeStandIn
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{checkout_stack['base']}/create-checkout-session", allow_redirects=False
        ) as r:
            assert r.status == 303
            location = r.headers["Location"]
    session_id = location.rsplit("/", 1)[1]
    session = standin.sessions[session_id]
    assert location.endswith(f"/pay/{session_id}")
    assert session["customer"] == checkout_stack["customer"]["id"]
    assert session["mode"] == "payment"
    assert session["success_url"].endswith("/checkout/success?session_id={CHECKOUT_SESSION_ID}")
    assert session["amount_total"] == 3000  # 2 x 1500
    assert session["customer_details"]["email"] == "grace@example.com"


async def test_a_stripe_error_becomes_a_plain_error_page_and_stripes_text_goes_to_the_log(
    checkout_stack: dict[str, Any], standin: StripeStandIn
) -> None:
    """Stripe's text may name the account, a key's last digits or a customer: it is for the
    log, not for whoever clicked."""
    standin.customers.clear()  # the configured customer no longer exists
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{checkout_stack['base']}/create-checkout-session", allow_redirects=False
            ) as r:
                text = await r.text()
    assert r.status == 502
    assert "could not start the checkout" in text
    assert "No such customer" not in text and "cus_" not in text and "Traceback" not in text
    assert r.headers["Content-Type"].startswith("text/html")
    [line] = [line for line in logs if line["event"] == "checkout session not created"]
    assert "No such customer" in line["error"] and line["stripe_status"] == 404


async def success_page(checkout_stack: dict[str, Any], session_id: str) -> tuple[int, str]:
    """The landing page Stripe sends the customer back to: its status and text."""
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{checkout_stack['base']}/checkout/success", params={"session_id": session_id}
        ) as r:
            return r.status, await r.text()


@pytest.mark.parametrize(
    ("session_id", "status"),
    [("", 400), ("nope", 400), ("cs_test_<script>", 400), ("cs_test_unknown12345", 404)],
)
async def test_the_success_page_refuses_a_malformed_or_unknown_session_id(
    checkout_stack: dict[str, Any], session_id: str, status: int, channel: Any, topology: Topology
) -> None:
    answered, text = await success_page(checkout_stack, session_id)
    assert answered == status
    assert "<script>" not in text
    assert await drain(channel, topology.work_queue) == []


async def test_paying_fulfills_once_although_both_the_webhook_and_the_landing_page_ask(
    checkout_stack: dict[str, Any],
    standin: StripeStandIn,
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    database_url: str,
) -> None:
    await start_worker(worker_settings)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{checkout_stack['base']}/create-checkout-session", allow_redirects=False
        ) as r:
            pay_url = r.headers["Location"]
        async with http.get(pay_url) as r:
            page = await r.text()
            assert "Pay" in page and "saved card" in page
        async with http.post(pay_url) as r:  # follows the redirect to the success page
            assert r.status == 200
            assert "/checkout/success?session_id=cs_" in str(r.url)
            text = await r.text()
    session_id = pay_url.rsplit("/", 1)[1]
    assert "Thank you" in text and session_id in text

    await wait_for(lambda: fulfillment_rows(database_url, session_id))
    await asyncio.to_thread(smtp.wait, 1)

    async def both_handled() -> list[Any]:
        rows = await db_fetch(
            database_url,
            "SELECT event_type FROM processed_events WHERE checkout_session_id = $1",
            session_id,
        )
        return rows if len(rows) == 2 else []

    handled = await wait_for(both_handled)
    assert sorted(r["event_type"] for r in handled) == [
        "checkout.session.completed",
        "fulfillment.requested",
    ]
    assert len(await fulfillment_rows(database_url, session_id)) == 1
    assert len(smtp.for_session(session_id)) == 1
    assert [status for _, status in checkout_stack["hosted"].deliveries] == [200]


async def test_the_success_page_queues_a_fulfillment_request_for_a_paid_session(
    checkout_stack: dict[str, Any], standin: StripeStandIn, channel: Any, topology: Topology
) -> None:
    session_id = standin.add_session(payment_status="paid")["id"]
    answered, text = await success_page(checkout_stack, session_id)
    assert answered == 200 and "went through" in text
    [message] = await drain(channel, topology.work_queue)
    assert message.headers[HEADER_EVENT_TYPE] == "fulfillment.requested"
    assert json.loads(message.body)["data"]["object"]["id"] == session_id
    # one id per session, so a second request is known as the same one
    assert message.message_id == message.headers[HEADER_EVENT_ID] == request_id(session_id)


@pytest.mark.parametrize(
    ("status", "payment_status", "says"),
    [
        ("complete", "unpaid", "Your payment is processing"),
        ("open", "unpaid", "nothing has been paid yet"),
        ("expired", "unpaid", "expired before it was paid"),
    ],
)
async def test_the_success_page_tells_an_unpaid_session_the_truth_and_queues_nothing(
    checkout_stack: dict[str, Any],
    standin: StripeStandIn,
    channel: Any,
    topology: Topology,
    status: str,
    payment_status: str,
    says: str,
) -> None:
    session_id = standin.add_session(payment_status=payment_status)["id"]
    standin.sessions[session_id]["status"] = status
    answered, text = await success_page(checkout_stack, session_id)
    assert answered == 200 and says in text
    assert "went through" not in text
    assert await drain(channel, topology.work_queue) == []


async def test_the_success_page_of_a_setup_mode_session_promises_no_order(
    checkout_stack: dict[str, Any], standin: StripeStandIn, channel: Any, topology: Topology
) -> None:
    """A Checkout that only saved a card (another flow sharing this page) is not an order:
    no "confirmation email on its way", nothing queued."""
    session_id = standin.add_session(mode="setup")["id"]
    answered, text = await success_page(checkout_stack, session_id)
    assert answered == 200 and "payment method was saved" in text
    assert "confirmation email" not in text
    assert await drain(channel, topology.work_queue) == []
