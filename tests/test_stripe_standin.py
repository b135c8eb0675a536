"""The Stripe stand-in, exercised through stripe-python's real async client (AIOHTTPClient)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe

from devkit.fixtures import fixture
from devkit.stripe import StripeStandIn, serve


@pytest.fixture
def standin() -> StripeStandIn:
    return StripeStandIn(seed=1234)


@pytest.fixture
async def base_url(standin: StripeStandIn) -> AsyncIterator[str]:
    async with serve(standin) as url:
        yield url


def make_client(base_url: str, http: stripe.HTTPClient, **kwargs: Any) -> stripe.StripeClient:
    kwargs.setdefault("max_network_retries", 0)
    return stripe.StripeClient(
        "sk_test_123", base_addresses={"api": base_url}, http_client=http, **kwargs
    )


@pytest.fixture
async def http() -> AsyncIterator[stripe.AIOHTTPClient]:
    client = stripe.AIOHTTPClient()
    yield client
    await client.close_async()  # type: ignore[no-untyped-call]


@pytest.fixture
def client(base_url: str, http: stripe.AIOHTTPClient) -> stripe.StripeClient:
    return make_client(base_url, http)


def new_event(event_type: str, created: int, event_id: str) -> dict[str, Any]:
    event = fixture("event")
    event.update(id=event_id, type=event_type, created=created)
    return event


# --- checkout sessions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payment_status", "items", "total"),
    [
        ("paid", [("T-shirt", 2, 2000), ("Mug", 1, 1200)], 5200),
        ("unpaid", [("Hoodie", 1, 4500)], 4500),
        ("no_payment_required", [("Free sample", 3, 0)], 0),
    ],
)
async def test_session_with_line_items_expanded(
    standin: StripeStandIn,
    client: stripe.StripeClient,
    payment_status: str,
    items: list[tuple[str, int, int]],
    total: int,
) -> None:
    seeded = standin.add_session(
        payment_status=payment_status, line_items=items, customer_email="ann@example.com"
    )
    session = await client.v1.checkout.sessions.retrieve_async(
        seeded["id"], params={"expand": ["line_items"]}
    )
    assert isinstance(session, stripe.checkout.Session)
    assert session.id == seeded["id"]
    assert session.status == "complete"
    assert session.payment_status == payment_status
    assert session.amount_subtotal == session.amount_total == total
    assert session.currency == "usd"
    assert session.customer_details is not None
    assert session.customer_details.email == "ann@example.com"
    line_items = session.line_items
    assert line_items is not None
    assert line_items["object"] == "list"
    assert line_items.has_more is False
    assert line_items.url == f"/v1/checkout/sessions/{seeded['id']}/line_items"
    got = []
    for item in line_items.data:
        assert item.object == "item"
        assert item.price is not None
        assert item.quantity is not None
        assert item.price.unit_amount is not None
        assert item.currency == item.price.currency == "usd"
        assert item.amount_subtotal == item.amount_total == item.quantity * item.price.unit_amount
        got.append((item.description, item.quantity, item.price.unit_amount))
    assert got == items
    assert sum(item.amount_total for item in line_items.data) == total


async def test_line_items_only_when_expanded(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    sid = standin.add_session("cs_test_plain")["id"]
    session = await client.v1.checkout.sessions.retrieve_async(sid)
    assert "line_items" not in session
    assert session.amount_total == 2000

    standin.set_payment_status(sid, "unpaid")
    again = await client.v1.checkout.sessions.retrieve_async(sid)
    assert again.payment_status == "unpaid"


async def test_sessions_list_newest_first_with_stripes_filters_and_pages(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    for i, status in enumerate(["complete", "open", "complete", "expired", "complete"]):
        paid = "paid" if status == "complete" else "unpaid"
        standin.add_session(f"cs_test_{i}", status=status, created=1000 + i, payment_status=paid)
    standin.add_session("cs_test_same_second", created=1004)  # seeded later: listed first
    standin.add_session("cs_test_connected", created=1002, account="acct_1")

    async def ids(params: dict[str, Any], **options: Any) -> list[str]:
        page = await client.v1.checkout.sessions.list_async(params=params, options=options)  # type: ignore[arg-type]
        assert page.url == "/v1/checkout/sessions"
        assert all(isinstance(s, stripe.checkout.Session) for s in page.data)
        return [session.id for session in page.data]

    assert await ids({}) == [
        "cs_test_same_second", "cs_test_4", "cs_test_3", "cs_test_2", "cs_test_1", "cs_test_0",
    ]  # fmt: skip
    assert await ids({"status": "complete"}) == [
        "cs_test_same_second", "cs_test_4", "cs_test_2", "cs_test_0",
    ]  # fmt: skip
    assert await ids({"status": "open"}) == ["cs_test_1"]
    assert await ids({"created": {"gte": 1001, "lt": 1004}}) == [
        "cs_test_3",
        "cs_test_2",
        "cs_test_1",
    ]
    assert await ids({"created": {"gt": 1001, "lte": 1002}}) == ["cs_test_2"]
    assert await ids({"created": 1003}) == ["cs_test_3"]
    # a connected account's sessions only on its behalf, and only its own
    assert await ids({}, stripe_account="acct_1") == ["cs_test_connected"]
    assert "cs_test_connected" not in await ids({"limit": 100})

    first = await client.v1.checkout.sessions.list_async(params={"status": "complete", "limit": 3})
    assert [s.id for s in first.data] == ["cs_test_same_second", "cs_test_4", "cs_test_2"]
    assert first.has_more is True
    rest = await client.v1.checkout.sessions.list_async(
        params={"status": "complete", "limit": 3, "starting_after": "cs_test_2"}
    )
    assert [s.id for s in rest.data] == ["cs_test_0"] and rest.has_more is False
    back = await client.v1.checkout.sessions.list_async(
        params={"status": "complete", "limit": 1, "ending_before": "cs_test_2"}
    )
    assert [s.id for s in back.data] == ["cs_test_4"] and back.has_more is True
    assert "line_items" not in first.data[0]  # only on a retrieve that expands it

    with pytest.raises(stripe.InvalidRequestError) as bad_status:
        await client.v1.checkout.sessions.list_async(params={"status": "paid"})  # type: ignore[typeddict-item]
    assert (bad_status.value.http_status, bad_status.value.param) == (400, "status")
    with pytest.raises(stripe.InvalidRequestError) as bad_limit:
        await client.v1.checkout.sessions.list_async(params={"limit": 101})
    assert (bad_limit.value.http_status, bad_limit.value.param) == (400, "limit")
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await client.v1.checkout.sessions.list_async(params={"starting_after": "cs_test_none"})
    assert unknown.value.http_status == 404


async def test_line_items_paginate(standin: StripeStandIn, client: stripe.StripeClient) -> None:
    items = [(f"Item {i}", 1, 100 * (i + 1)) for i in range(12)]
    sid = standin.add_session(line_items=items)["id"]

    # Like Stripe, the expanded property is only the first page.
    session = await client.v1.checkout.sessions.retrieve_async(
        sid, params={"expand": ["line_items"]}
    )
    assert session.line_items is not None
    assert len(session.line_items.data) == 10
    assert session.line_items.has_more is True
    assert session.amount_total == sum(unit for _, _, unit in items)

    page = await client.v1.checkout.sessions.line_items.list_async(sid, params={"limit": 5})
    assert [i.description for i in page.data] == [f"Item {i}" for i in range(5)]
    assert page.has_more is True
    second = await client.v1.checkout.sessions.line_items.list_async(
        sid, params={"limit": 5, "starting_after": page.data[-1].id}
    )
    assert [i.description for i in second.data] == [f"Item {i}" for i in range(5, 10)]

    before = standin.request_count
    every = [item.description async for item in page.auto_paging_iter()]
    assert every == [f"Item {i}" for i in range(12)]
    assert standin.request_count - before == 2  # pages 2 and 3; page 3 says has_more=false


async def test_expand_nested_product_and_customer(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    customer = standin.add_customer(email="bo@example.com", name="Bo")
    sid = standin.add_session(line_items=[("Poster", 1, 900)], customer=customer["id"])["id"]

    plain = await client.v1.checkout.sessions.retrieve_async(sid, params={"expand": ["line_items"]})
    assert plain.customer == customer["id"]
    assert plain.line_items is not None
    price = plain.line_items.data[0].price
    assert price is not None
    assert isinstance(price.product, str)

    session = await client.v1.checkout.sessions.retrieve_async(
        sid, params={"expand": ["line_items.data.price.product", "customer"]}
    )
    assert isinstance(session.customer, stripe.Customer)
    assert session.customer.email == "bo@example.com"
    assert session.line_items is not None
    price = session.line_items.data[0].price
    assert price is not None
    product = price.product
    assert isinstance(product, stripe.Product)
    assert product.name == "Poster"


async def test_unknown_session_is_resource_missing(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.checkout.sessions.retrieve_async("cs_test_nope")
    assert info.value.http_status == 404
    assert info.value.code == "resource_missing"
    assert info.value.param == "session"
    assert "No such checkout.session: 'cs_test_nope'" in str(info.value.user_message)

    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.checkout.sessions.line_items.list_async("cs_test_nope")
    assert info.value.http_status == 404


# --- events --------------------------------------------------------------------------------


@pytest.fixture
def seeded_events(standin: StripeStandIn) -> list[dict[str, Any]]:
    """Six events, created 1000..1005; even ones delivered; two types alternating."""
    events = []
    for i in range(6):
        event_type = "checkout.session.completed" if i % 2 == 0 else "charge.refunded"
        event = standin.add_event(
            new_event(event_type, 1000 + i, f"evt_{i}"), delivery_success=i % 3 == 0
        )
        events.append(event)
    return events


async def test_events_newest_first_and_filters(
    seeded_events: list[dict[str, Any]], client: stripe.StripeClient
) -> None:
    async def ids(params: dict[str, Any]) -> list[str]:
        page = await client.v1.events.list_async(params=params)  # type: ignore[arg-type]
        assert page.url == "/v1/events"
        return [event.id for event in page.data]

    assert await ids({}) == ["evt_5", "evt_4", "evt_3", "evt_2", "evt_1", "evt_0"]
    assert await ids({"type": "checkout.session.completed"}) == ["evt_4", "evt_2", "evt_0"]
    assert await ids({"type": "checkout.session.*"}) == ["evt_4", "evt_2", "evt_0"]
    assert await ids({"types": ["charge.refunded", "nothing.else"]}) == ["evt_5", "evt_3", "evt_1"]
    assert await ids({"created": {"gte": 1002, "lt": 1005}}) == ["evt_4", "evt_3", "evt_2"]
    assert await ids({"created": {"gt": 1002, "lte": 1005}}) == ["evt_5", "evt_4", "evt_3"]
    assert await ids({"created": 1003}) == ["evt_3"]
    assert await ids({"delivery_success": True}) == ["evt_3", "evt_0"]
    assert await ids({"delivery_success": False, "type": "checkout.session.completed"}) == [
        "evt_4",
        "evt_2",
    ]

    event = await client.v1.events.retrieve_async("evt_2")
    assert isinstance(event, stripe.Event)
    assert event.type == "checkout.session.completed"


async def test_events_paginate(
    standin: StripeStandIn, seeded_events: list[dict[str, Any]], client: stripe.StripeClient
) -> None:
    first = await client.v1.events.list_async(params={"limit": 2})
    assert [e.id for e in first.data] == ["evt_5", "evt_4"]
    assert first.has_more is True
    second = await client.v1.events.list_async(params={"limit": 2, "starting_after": "evt_4"})
    assert [e.id for e in second.data] == ["evt_3", "evt_2"]
    last = await client.v1.events.list_async(params={"limit": 2, "starting_after": "evt_2"})
    assert [e.id for e in last.data] == ["evt_1", "evt_0"]
    assert last.has_more is False
    back = await client.v1.events.list_async(params={"limit": 2, "ending_before": "evt_1"})
    assert [e.id for e in back.data] == ["evt_3", "evt_2"]
    assert back.has_more is True

    before = standin.request_count
    page = await client.v1.events.list_async(
        params={"limit": 2, "type": "checkout.session.completed"}
    )
    every = [event.id async for event in page.auto_paging_iter()]
    assert every == ["evt_4", "evt_2", "evt_0"]
    assert standin.request_count - before == 2
    queries = standin.requests[before:]
    assert all(query == ("GET", "/v1/events") for query in queries)

    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.events.list_async(params={"limit": 101})
    assert info.value.http_status == 400
    assert info.value.param == "limit"


async def test_event_and_customer_not_found(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.events.retrieve_async("evt_missing")
    assert (info.value.http_status, info.value.code) == (404, "resource_missing")

    customer = standin.add_customer("cus_known", email="cy@example.com", name="Cy")
    got = await client.v1.customers.retrieve_async(customer["id"])
    assert isinstance(got, stripe.Customer)
    assert (got.email, got.name) == ("cy@example.com", "Cy")
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.customers.retrieve_async("cus_missing")
    assert (info.value.http_status, info.value.code) == (404, "resource_missing")


async def test_unrecognized_url(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.products.retrieve_async("prod_123")
    assert info.value.http_status == 404
    assert "Unrecognized request URL (GET: /v1/products/prod_123)" in str(info.value.user_message)


# --- authentication ------------------------------------------------------------------------


async def test_authentication(base_url: str, http: stripe.AIOHTTPClient) -> None:
    bad = stripe.StripeClient(
        "pk_test_123", base_addresses={"api": base_url}, http_client=http, max_network_retries=0
    )
    with pytest.raises(stripe.AuthenticationError) as info:
        await bad.v1.events.list_async()
    assert info.value.http_status == 401

    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/v1/events") as response,
    ):
        assert response.status == 401
        body = await response.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert "You did not provide an API key" in body["error"]["message"]


# --- faults --------------------------------------------------------------------------------


async def test_fail_next_429_then_success(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    sid = standin.add_session()["id"]
    standin.fail_next(2, 429)
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError) as info:
            await client.v1.checkout.sessions.retrieve_async(sid)
        assert info.value.http_status == 429
        # RateLimitError leaves .code None; the body's code is on .error.
        assert info.value.code is None
        assert info.value.error is not None
        assert info.value.error.code == "rate_limit"
    session = await client.v1.checkout.sessions.retrieve_async(sid)
    assert session.id == sid
    assert standin.request_count == 3


async def test_fail_next_500_is_api_error(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    standin.fail_next(1, 500)
    with pytest.raises(stripe.APIError) as info:
        await client.v1.events.list_async()
    assert info.value.http_status == 500
    assert type(info.value) is stripe.APIError
    assert (await client.v1.events.list_async()).data == []


async def test_client_retries_follow_stripe_rules(
    standin: StripeStandIn, base_url: str, http: stripe.AIOHTTPClient
) -> None:
    """stripe-python retries 5xx on its own, 429 only when told to by Stripe-Should-Retry."""
    retrying = make_client(base_url, http, max_network_retries=1)
    standin.fail_next(1, 500)
    await retrying.v1.events.list_async()
    assert standin.request_count == 2

    standin.fail_next(1, 429)
    with pytest.raises(stripe.RateLimitError):
        await retrying.v1.events.list_async()
    assert standin.request_count == 3

    standin.fail_next(1, 429, should_retry=True)
    await retrying.v1.events.list_async()
    assert standin.request_count == 5


async def _outcomes(base_url: str, http: stripe.AIOHTTPClient, n: int) -> list[str]:
    client = make_client(base_url, http)
    outcomes = []
    for _ in range(n):
        try:
            await client.v1.events.list_async()
            outcomes.append("ok")
        except stripe.StripeError as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


async def test_fail_rate_is_seeded(http: stripe.AIOHTTPClient) -> None:
    runs = []
    for _ in range(2):
        standin = StripeStandIn(seed=7)
        standin.fail_rate(0.5)
        async with serve(standin) as url:
            runs.append(await _outcomes(url, http, 30))
    assert runs[0] == runs[1]
    assert {"ok", "RateLimitError", "APIError"} == set(runs[0])

    standin.fail_rate(0)
    async with serve(standin) as url:
        assert set(await _outcomes(url, http, 5)) == {"ok"}


async def test_latency(standin: StripeStandIn, client: stripe.StripeClient) -> None:
    standin.latency_s = 0.2
    start = time.monotonic()
    await client.v1.events.list_async()
    assert time.monotonic() - start >= 0.2

    start = time.monotonic()
    await asyncio.gather(*(client.v1.events.list_async() for _ in range(5)))
    assert time.monotonic() - start < 0.2 * 5  # concurrent requests wait side by side


async def test_drop_next_is_connection_error(
    standin: StripeStandIn, client: stripe.StripeClient
) -> None:
    sid = standin.add_session()["id"]
    # aiohttp's client resends an idempotent request once after a disconnect: 2 drops per GET.
    standin.drop_next(2)
    with pytest.raises(stripe.APIConnectionError):
        await client.v1.checkout.sessions.retrieve_async(sid)
    assert standin.request_count == 2

    standin.drop_next(1)
    session = await client.v1.checkout.sessions.retrieve_async(sid)
    assert session.id == sid
    assert standin.request_count == 4

    assert (await client.v1.checkout.sessions.retrieve_async(sid)).id == sid
    assert standin.requests[-1] == ("GET", f"/v1/checkout/sessions/{sid}")


# --- standalone ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_main_serves_demo_sessions(http: stripe.AIOHTTPClient) -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devkit.stripe",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        seeded = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert "cs_test_demo_paid" in seeded["sessions"]
        client = make_client(f"http://127.0.0.1:{port}", http)
        for _ in range(100):
            try:
                session = await client.v1.checkout.sessions.retrieve_async(
                    "cs_test_demo_paid", params={"expand": ["line_items"]}
                )
                break
            except stripe.APIConnectionError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the stand-in did not start")
        assert session.payment_status == "paid"
        assert session.amount_total == 5200
        events = await client.v1.events.list_async(params={"type": "checkout.session.completed"})
        assert [e.data.object["id"] for e in events.data] == ["cs_test_demo_paid"]
    finally:
        proc.terminate()
        await proc.wait()


async def test_the_control_routes_seed_sessions_and_faults_from_another_process() -> None:
    import aiohttp

    from devkit.stripe import StripeStandIn, serve

    standin = StripeStandIn(seed=3)
    async with serve(standin) as base, aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/_standin/sessions",
            json={"id": "cs_test_ctl", "payment_status": "unpaid", "line_items": [["Hat", 3, 700]]},
        ) as r:
            assert r.status == 201
            assert (await r.json())["amount_total"] == 2100
        # left out: add_session's own defaults; a field it does not know: a clear 400
        async with http.post(f"{base}/_standin/sessions", json={"mode": "setup"}) as r:
            assert r.status == 201 and (await r.json())["payment_status"] == "no_payment_required"
        async with http.post(f"{base}/_standin/sessions", json={"curency": "eur"}) as r:
            assert r.status == 400 and "curency" in (await r.json())["error"]
        assert standin.sessions["cs_test_ctl"]["customer_details"]["email"] == "jenny@example.com"
        async with http.post(
            f"{base}/_standin/sessions/cs_test_ctl/payment_status", json={"payment_status": "paid"}
        ) as r:
            assert (await r.json())["payment_status"] == "paid"
        async with http.post(f"{base}/_standin/faults", json={"fail_next": 1, "status": 429}) as r:
            assert r.status == 200
        headers = {"Authorization": "Bearer sk_test_x"}
        async with http.get(f"{base}/v1/checkout/sessions/cs_test_ctl", headers=headers) as r:
            assert r.status == 429
        async with http.get(f"{base}/v1/checkout/sessions/cs_test_ctl", headers=headers) as r:
            assert r.status == 200
        async with http.get(f"{base}/_standin/stats") as r:
            assert (await r.json())["requests"] == 2
