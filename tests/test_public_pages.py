"""What the public port shows a stranger: security headers on every page, no Stripe text on
any page, and only a small Checkout form read."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import Any

import aiohttp
import pytest

from devkit.stripe import StripeStandIn
from tests.storefront import storefront_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(60)

STRIPE_TEXT = json.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "code": "api_key_expired",
            "message": "Expired API Key provided: sk_live_****1234, acct_1PgcB2B7WZ01zgkW",
        }
    }
).encode()


async def fetch(method: str, url: str, **kw: Any) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, allow_redirects=False, **kw) as r:
            return r.status, r.headers, await r.text()


async def test_every_page_sends_the_security_headers_and_its_style_is_allowed_by_hash(
    storefront: Any, standin: StripeStandIn
) -> None:
    shop = await storefront(lookup_burst=1)
    paid = standin.add_session(payment_status="paid")["id"]
    pages = [
        ("GET", "/", 200),
        ("GET", "/?customer=cus_1&sig=x", 403),
        ("GET", f"/checkout/success?session_id={paid}", 200),
        ("GET", "/checkout/success?session_id=nope", 400),
        ("GET", "/checkout/success?session_id=cs_test_unknown1", 429),  # the burst was used
    ]
    for method, path, expected in pages:
        status, headers, text = await fetch(method, shop.base + path)
        assert status == expected, path
        assert headers["Content-Type"].startswith("text/html"), path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert headers["Cache-Control"] == "no-store", path
        policy = dict(
            part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";")
        )
        assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
        assert "script" not in text.lower()
        (style,) = re.findall(r"<style>(.*?)</style>", text, re.S)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert policy["style-src"] == f"'sha256-{digest}'", path


async def test_every_other_answer_says_nosniff(storefront: Any) -> None:
    shop = await storefront()
    for method, path, expected in [
        ("POST", "/create-checkout-session", 303),
        ("POST", "/webhooks/stripe", 400),
        ("GET", "/nowhere", 404),
        ("GET", "/healthz", 200),
    ]:
        status, headers, _ = await fetch(method, shop.base + path)
        assert status == expected, path
        assert headers["X-Content-Type-Options"] == "nosniff", path


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/create-checkout-session"), ("GET", "/checkout/success?session_id=cs_test_a1")],
)
async def test_stripes_error_text_never_reaches_a_page(
    storefront: Any, standin: StripeStandIn, method: str, path: str
) -> None:
    shop = await storefront()
    standin.add_session("cs_test_a1")
    standin.answer_next(1, STRIPE_TEXT, status=401, content_type="application/json")

    status, _, text = await fetch(method, shop.base + path)

    assert status == 502
    for leak in ("Expired API Key", "sk_live", "acct_", "1234"):
        assert leak not in text
    assert shop.hosted.standin.request_count == 1  # Stripe was asked, and answered that


async def test_the_checkout_form_is_read_only_when_small_and_sent_in_time(
    storefront: Any,
) -> None:
    """The form holds a link's few parameters; a stranger's huge or endless body is refused
    without a Stripe call, as a webhook's would be."""
    shop = await storefront(read_timeout_s=0.5)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    url = shop.base + "/create-checkout-session"
    assert (await fetch("POST", url, data=b"a=" * 5000, headers=form))[0] == 413
    many = "&".join(f"f{n}=1" for n in range(100)).encode()
    assert (await fetch("POST", url, data=many, headers=form))[0] == 400

    reader, writer = await asyncio.open_connection("127.0.0.1", int(shop.base.rsplit(":", 1)[1]))
    writer.write(
        b"POST /create-checkout-session HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\nv=1"  # and no more
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert shop.session_creations() == 0
