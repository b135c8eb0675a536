"""The Checkout page names what it sells: the product's name and price, read from Stripe once
at start (the price id while Stripe has not said, or when it cannot)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from devkit.stripe import StripeStandIn
from ingress.app import create_app
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(60)


async def page_text(base: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/") as answer:
        assert answer.status == 200
        return await answer.text()


async def test_the_page_names_the_product_and_its_price_from_stripe(
    checkout_stack: dict[str, Any], standin: StripeStandIn
) -> None:
    reads_before = standin.requests.count(("GET", f"/v1/prices/{checkout_stack['price']['id']}"))

    text = await wait_for(
        lambda: _showing(checkout_stack["base"], "2 x Notebook at 15.00 USD"), timeout_s=10
    )
    await page_text(checkout_stack["base"])

    assert "price_" not in text
    # read once, at start, not per page
    reads = standin.requests.count(("GET", f"/v1/prices/{checkout_stack['price']['id']}"))
    assert reads - reads_before <= 1


async def _showing(base: str, words: str) -> str | None:
    text = await page_text(base)
    return text if words in text else None


async def test_a_price_stripe_does_not_know_is_named_by_its_id(
    checkout_stack: dict[str, Any], standin: StripeStandIn
) -> None:
    checkout = replace(checkout_stack["checkout"], price="price_unknown123")
    port = free_port()
    server = TestServer(
        create_app(checkout_stack["settings"], checkout=checkout), host="127.0.0.1", port=port
    )
    await server.start_server()
    try:
        await wait_for(lambda: ("GET", "/v1/prices/price_unknown123") in standin.requests)
        text = await page_text(f"http://127.0.0.1:{port}")
    finally:
        await server.close()

    assert "2 x the product priced price_unknown123," in text
