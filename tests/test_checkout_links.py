"""Existing customers check out only through signed links: the link's rules, the Checkout
pages following one, a guest without one, and CHECKOUT_CUSTOMER refused with a live key."""

from __future__ import annotations

import html
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest

from devkit.stripe import StripeStandIn
from ingress.checkout import CheckoutSettings
from ingress.links import (
    ExpiredLink,
    MalformedLink,
    TamperedLink,
    _signature,
    sign_checkout_link,
    verify_checkout_link,
)
from shared.errors import ConfigError
from tests.pipeline import Pipeline
from tests.processes import run_fulfillment
from tests.storefront import LINK_SECRET, Storefront, storefront_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(60)

SECRET = "s" * 32
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
SHOP = "https://shop.example"


def query(link: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(link).query, keep_blank_values=True)


def relinked(link: str, pairs: list[tuple[str, str]]) -> str:
    return urlsplit(link)._replace(query=urlencode(pairs)).geturl()


# --- the link itself --------------------------------------------------------------------------


def test_a_link_names_its_customer_and_expiry_and_verifies_with_its_secret() -> None:
    link = sign_checkout_link(SECRET, SHOP, customer="cus_Abc123", now=NOW)

    assert link.startswith("https://shop.example/?")
    claims = verify_checkout_link(SECRET, query(link), now=NOW + timedelta(minutes=29))
    assert claims.customer == "cus_Abc123" and claims.customer_email is None
    assert claims.expires_at == NOW + timedelta(minutes=30)  # Checkout's prefill lifetime


def test_a_link_for_an_email_carries_it_to_verify() -> None:
    link = sign_checkout_link(SECRET, SHOP + "/shop", customer_email="new+1@example.com", now=NOW)

    assert urlsplit(link).path == "/shop/"
    assert verify_checkout_link(SECRET, query(link), now=NOW).customer_email == "new+1@example.com"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda q: [(k, "cus_Other1" if k == "customer" else v) for k, v in q],
            id="another-customer",
        ),
        pytest.param(
            lambda q: [(k, str(int(v) + 3600) if k == "exp" else v) for k, v in q],
            id="later-expiry",
        ),
        pytest.param(lambda q: [*q, ("customer_email", "x@example.com")], id="claim-added"),
        pytest.param(lambda q: [(k, v) for k, v in q if k != "exp"], id="claim-removed"),
        pytest.param(lambda q: [*q, ("utm_source", "mail")], id="anything-added"),
        pytest.param(
            lambda q: [
                (k, v[:-1] + ("A" if v[-1] != "A" else "B")) if k == "sig" else (k, v) for k, v in q
            ],
            id="signature-changed",
        ),
    ],
)
def test_a_link_with_anything_changed_is_refused_as_tampered(change: Any) -> None:
    link = sign_checkout_link(SECRET, SHOP, customer="cus_Abc123", now=NOW)

    with pytest.raises(TamperedLink):
        verify_checkout_link(SECRET, change(query(link)), now=NOW)


def test_a_link_signed_with_another_secret_is_refused() -> None:
    link = sign_checkout_link("o" * 32, SHOP, customer="cus_Abc123", now=NOW)

    with pytest.raises(TamperedLink):
        verify_checkout_link(SECRET, query(link), now=NOW)


def test_a_link_past_its_expiry_is_refused_as_expired() -> None:
    link = sign_checkout_link(SECRET, SHOP, customer="cus_Abc123", now=NOW)

    with pytest.raises(ExpiredLink):
        verify_checkout_link(SECRET, query(link), now=NOW + timedelta(minutes=30))


@pytest.mark.parametrize(
    ("pairs", "says"),
    [
        ([], "not signed"),
        ([("customer", "cus_Abc123")], "not signed"),
        ([("sig", "x"), ("sig", "y")], "repeated"),
        ([("v", "1")] * 2 + [("sig", "x")], "repeated"),
        ([("customer", "c" * 600), ("sig", "x")], "longer"),
        ([(f"k{i}", "v") for i in range(20)] + [("sig", "x")], "longer"),
    ],
)
def test_a_malformed_link_is_refused_saying_what_is_wrong(
    pairs: list[tuple[str, str]], says: str
) -> None:
    with pytest.raises(MalformedLink, match=says):
        verify_checkout_link(SECRET, pairs, now=NOW)


def test_a_claim_this_version_does_not_know_is_refused_even_when_signed() -> None:
    """A later version may sign a price: an older shop must refuse it, not sell at its own."""
    params = {
        "v": "1",
        "exp": str(int(NOW.timestamp()) + 60),
        "customer": "cus_A1",
        "price": "price_cheap",
    }
    signed = [*params.items(), ("sig", _signature(SECRET, params))]

    with pytest.raises(MalformedLink, match="price"):
        verify_checkout_link(SECRET, signed, now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"customer": "cus_A1", "customer_email": "a@example.com"}, "not both"),
        ({"customer": "cus_A1&customer=cus_B2"}, "Customer id"),
        ({"customer_email": "a@example.com\r\nBcc: b@example.com"}, "email"),
        ({"customer": "cus_A1", "expires_in": timedelta(0)}, "positive"),
    ],
)
def test_signing_refuses_what_would_make_a_bad_link(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        sign_checkout_link(SECRET, SHOP, **kwargs)


def test_a_secret_shorter_than_32_characters_is_refused_both_ways() -> None:
    with pytest.raises(ValueError, match="32"):
        sign_checkout_link("short", SHOP, customer="cus_A1")
    with pytest.raises(ValueError, match="32"):
        verify_checkout_link("short", [])


def test_the_links_module_needs_nothing_but_the_standard_library() -> None:
    """The merchant's backend imports it (or copies the file) to mint links."""
    import ast
    import sys
    from pathlib import Path

    import ingress.links

    tree = ast.parse(Path(ingress.links.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    }
    assert imported and imported <= set(sys.stdlib_module_names), imported


# --- the Checkout pages following a link ------------------------------------------------------


async def follow(shop: Storefront, link: str) -> tuple[int, str, list[tuple[str, str]]]:
    """GET the link: its status, text, and the hidden fields its Checkout form carries."""
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as r:
            text = await r.text()
    hidden = re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', text)
    fields = [(html.unescape(k), html.unescape(v)) for k, v in hidden]
    return r.status, text, fields


async def submit(shop: Storefront, fields: list[tuple[str, str]]) -> tuple[int, str, str]:
    """POST the Checkout form: status, Location (the hosted page) and text."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{shop.base}/create-checkout-session", data=fields, allow_redirects=False
        ) as r:
            return r.status, r.headers.get("Location", ""), await r.text()


def shop_link(shop: Storefront, **kwargs: Any) -> str:
    return sign_checkout_link(LINK_SECRET, shop.base, **kwargs)


async def test_a_signed_link_checks_out_as_its_customer_and_the_order_is_fulfilled(
    storefront: Any, pipeline: Pipeline
) -> None:
    shop = await storefront()
    await pipeline.start()
    link = shop_link(shop, customer=shop.customer["id"])

    status, text, fields = await follow(shop, link)
    assert status == 200 and "saved card" in text
    assert dict(fields)["customer"] == shop.customer["id"] and "sig" in dict(fields)
    status, location, _ = await submit(shop, fields)

    assert status == 303
    session_id = location.rsplit("/", 1)[1]
    assert pipeline.standin.sessions[session_id]["customer"] == shop.customer["id"]
    async with aiohttp.ClientSession() as http, http.post(location) as r:
        assert r.status == 200 and "Thank you" in await r.text()
    rows = await pipeline.fulfilled(session_id)
    assert [r["customer_email"] for r in rows] == ["grace@example.com"]


async def test_a_link_for_an_email_prefills_it_for_a_new_customer(
    storefront: Any, standin: StripeStandIn
) -> None:
    shop = await storefront()
    _, _, fields = await follow(shop, shop_link(shop, customer_email="ada@example.com"))
    status, location, _ = await submit(shop, fields)

    session = standin.sessions[location.rsplit("/", 1)[1]]
    assert status == 303 and session["customer"] is None
    assert session["customer_details"]["email"] == "ada@example.com"


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(
            lambda q, shop: [(k, shop.other if k == "customer" else v) for k, v in q],
            id="another-customer",
        ),
        pytest.param(
            lambda q, shop: [(k, str(int(v) + 86400) if k == "exp" else v) for k, v in q],
            id="later-expiry",
        ),
        pytest.param(lambda q, shop: [(k, v) for k, v in q if k != "sig"], id="unsigned"),
    ],
)
async def test_a_changed_link_is_refused_403_on_the_page_and_the_form_with_no_stripe_call(
    storefront: Any, standin: StripeStandIn, spoil: Any
) -> None:
    shop = await storefront()
    shop.other = standin.add_customer(email="victim@example.com")["id"]  # type: ignore[attr-defined]
    link = shop_link(shop, customer=shop.customer["id"])
    spoiled = spoil(query(link), shop)

    status, text, fields = await follow(shop, relinked(link, spoiled))
    assert status == 403 and "not valid" in text and fields == []
    status, location, _ = await submit(shop, spoiled)  # the form sent as a stranger makes it

    assert status == 403 and location == ""
    assert shop.session_creations() == 0 and standin.sessions == {}


async def test_an_expired_link_or_one_signed_with_another_secret_is_refused_with_no_call(
    storefront: Any, standin: StripeStandIn
) -> None:
    shop = await storefront()
    old = sign_checkout_link(
        LINK_SECRET,
        shop.base,
        customer=shop.customer["id"],
        now=datetime.now(UTC) - timedelta(hours=1),
    )
    forged = sign_checkout_link("f" * 40, shop.base, customer=shop.customer["id"])

    status, text, _ = await follow(shop, old)
    assert status == 403 and "expired" in text
    assert (await submit(shop, query(old)))[0] == 403
    assert (await follow(shop, forged))[0] == 403
    assert (await submit(shop, query(forged)))[0] == 403
    assert shop.session_creations() == 0


async def test_without_a_link_the_checkout_is_a_guests_with_no_customer(
    storefront: Any, standin: StripeStandIn
) -> None:
    shop = await storefront()
    status, text, fields = await follow(shop, f"{shop.base}/?utm_source=newsletter")
    assert status == 200 and "saved card" not in text and fields == []
    status, location, _ = await submit(shop, [])

    assert status == 303
    session = standin.sessions[location.rsplit("/", 1)[1]]
    assert session["customer"] is None
    assert session["customer_details"]["email"] == ""  # nothing prefilled: the guest types it


async def test_links_are_refused_when_no_link_secret_is_set(
    storefront: Any, standin: StripeStandIn
) -> None:
    shop = await storefront(link_secret=None)
    link = sign_checkout_link(LINK_SECRET, shop.base, customer=shop.customer["id"])

    assert (await follow(shop, link))[0] == 403
    assert (await submit(shop, query(link)))[0] == 403
    assert shop.session_creations() == 0


# --- settings and the command ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["sk_live_51Habc", "rk_live_51Habc"])
def test_a_fixed_checkout_customer_with_a_live_key_is_refused_saying_why(key: str) -> None:
    env = {"CHECKOUT_PRICE": "price_1", "CHECKOUT_CUSTOMER": "cus_1", "STRIPE_API_KEY": key}

    with pytest.raises(ConfigError, match="CHECKOUT_CUSTOMER") as caught:
        CheckoutSettings.from_env(env)

    assert "every visitor would check out as that customer" in str(caught.value)
    assert "signed links" in str(caught.value)
    test_key = {**env, "STRIPE_API_KEY": "sk_test_51Habc"}  # the demo's and test keys' way
    assert CheckoutSettings.from_env(test_key).customer == "cus_1"  # type: ignore[union-attr]


def test_the_ingress_refuses_to_start_with_a_fixed_customer_and_a_live_key() -> None:
    env = {
        **os.environ,
        "STRIPE_WEBHOOK_SECRETS": "whsec_test",
        "CHECKOUT_PRICE": "price_1",
        "CHECKOUT_CUSTOMER": "cus_1",
        "STRIPE_API_KEY": "sk_live_51Habcdefgh",
    }
    result = run_fulfillment("ingress", env=env, timeout_s=30)

    assert result.returncode == 2
    assert "CHECKOUT_CUSTOMER is refused with a live STRIPE_API_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "sk_live_" not in result.stderr


@pytest.mark.parametrize("value", ["short", "x" * 31])
def test_a_link_secret_under_32_characters_is_refused_naming_the_variable(value: str) -> None:
    env = {
        "CHECKOUT_PRICE": "price_1",
        "STRIPE_API_KEY": "sk_test_x",
        "CHECKOUT_LINK_SECRET": value,
    }

    with pytest.raises(ConfigError, match="CHECKOUT_LINK_SECRET") as caught:
        CheckoutSettings.from_env(env)

    assert value not in str(caught.value)


def test_the_checkout_link_command_prints_a_link_the_ingress_accepts() -> None:
    env = {**os.environ, "CHECKOUT_LINK_SECRET": SECRET, "PUBLIC_URL": "https://shop.example/"}
    result = run_fulfillment(
        "checkout-link", "--customer", "cus_Abc123", "--expires-in", "2h", env=env
    )

    assert result.returncode == 0, result.stderr
    link = result.stdout.strip()
    assert link.startswith("https://shop.example/?")
    claims = verify_checkout_link(SECRET, query(link))
    assert claims.customer == "cus_Abc123"
    left = claims.expires_at - datetime.now(UTC)
    assert timedelta(minutes=119) < left <= timedelta(hours=2)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--customer", "cus_1"], {}, "CHECKOUT_LINK_SECRET is not set"),
        (["--customer", "nope"], {"CHECKOUT_LINK_SECRET": SECRET}, "Customer id"),
        (
            ["--customer", "cus_1", "--expires-in", "soon"],
            {"CHECKOUT_LINK_SECRET": SECRET},
            "not a duration",
        ),
        (
            ["--customer", "cus_1", "--email", "a@b.c"],
            {"CHECKOUT_LINK_SECRET": SECRET},
            "not allowed with",
        ),
    ],
)
def test_the_checkout_link_command_says_what_is_wrong_in_one_line(
    args: list[str], env: dict[str, str], says: str
) -> None:
    base = {k: v for k, v in os.environ.items() if k != "CHECKOUT_LINK_SECRET"}
    result = run_fulfillment("checkout-link", *args, env={**base, **env})

    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert SECRET not in result.stderr


def test_the_ingress_masks_the_link_secret_in_its_logs_before_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import structlog

    import ingress.main
    from ingress.settings import IngressSettings
    from shared import logging as shared_logging
    from shared import runtime

    known = set(shared_logging._known_secrets)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika", "stripe")}
    secret = "link-secret-of-no-known-shape-" + "q" * 20

    def serves(coroutine: Any) -> None:
        coroutine.close()  # started, not run: only what happens before serving matters

    monkeypatch.setattr(runtime, "run_service", serves)
    monkeypatch.setenv("CHECKOUT_PRICE", "price_1")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_x")
    monkeypatch.setenv("CHECKOUT_LINK_SECRET", secret)
    monkeypatch.delenv("CHECKOUT_CUSTOMER", raising=False)
    try:
        ingress.main.run(IngressSettings(webhook_secrets=("whsec_x",)))
        assert shared_logging.mask_secrets(f"a {secret} b") == "a *** b"
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in quiet.items():
            logging.getLogger(name).setLevel(old)
        shared_logging._known_secrets.intersection_update(known)
