"""What the public port shows a stranger: security headers on every page, no Stripe text on
any page, and no /metrics (served on a port of its own)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
from typing import Any

import aiohttp
import pytest

from devkit import signing as sh
from devkit.stripe import StripeStandIn
from shared.settings import BrokerSettings
from shared.topology import Topology
from tests.conftest import free_port, wait_for
from tests.processes import ingress_process, run_fulfillment, worker_env
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
    # the page reads its price from Stripe once at start: that answer is not the one tested
    await wait_for(lambda: standin.request_count >= 1)
    asked_before = standin.request_count
    standin.answer_next(1, STRIPE_TEXT, status=401, content_type="application/json")

    status, _, text = await fetch(method, shop.base + path)

    assert status == 502
    for leak in ("Expired API Key", "sk_live", "acct_", "1234"):
        assert leak not in text
    assert standin.request_count == asked_before + 1  # Stripe was asked, and answered that


async def test_metrics_are_404_on_the_webhook_port_and_served_on_their_own(
    broker_settings: BrokerSettings, topology: Topology
) -> None:
    port, metrics_port = free_port(), free_port()
    secret = sh.new_secret()
    process = ingress_process(broker_settings, secret, port, INGRESS_METRICS_PORT=str(metrics_port))
    await process.start("ingress metrics listening")
    try:
        raw = sh.body(sh.event())
        status, _, _ = await fetch(
            "POST",
            f"http://127.0.0.1:{port}/webhooks/stripe",
            data=raw,
            headers={"Stripe-Signature": sh.signature_header(raw, secret)},
        )
        assert status == 200
        status, headers, text = await fetch("GET", f"http://127.0.0.1:{port}/metrics")
        assert status == 404 and "ingress_" not in text
        assert headers["Content-Type"].startswith("application/json")
        status, _, text = await fetch("GET", f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert 'ingress_webhook_requests_total{outcome="accepted"} 1.0' in text
        assert 'ingress_client_limited_total{route="checkout_success"} 0.0' in text
        assert (await fetch("GET", f"http://127.0.0.1:{metrics_port}/readyz"))[0] == 404
    finally:
        await process.stop()


@pytest.mark.parametrize("command", [["ingress"], ["up"]])
def test_a_metrics_port_another_program_holds_is_one_line_naming_the_setting(
    worker_settings: Any, command: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            **worker_env(worker_settings),
            "STRIPE_WEBHOOK_SECRETS": "whsec_test",
            "INGRESS_HOST": "127.0.0.1",
            "INGRESS_PORT": str(free_port()),
            "INGRESS_METRICS_HOST": "127.0.0.1",
            "INGRESS_METRICS_PORT": str(port),
            "WORKER_METRICS_PORT": str(free_port(2)),
            "STANDIN_PORT": str(free_port()),
        }
        result = run_fulfillment(*command, env=env, timeout_s=30)
    assert result.returncode == 2
    assert f"INGRESS_METRICS_PORT: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_names_where_the_ingress_serves_its_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    from fulfillment.up import _check_settings, _children

    env = {"STRIPE_WEBHOOK_SECRETS": "whsec_test", "STRIPE_API_KEY": "sk_test_x"}
    _children(env, _check_settings(env, 9300), 1, 8080, 9300)
    zero = {**env, "INGRESS_METRICS_PORT": "0"}
    _children(zero, _check_settings(zero, 9300), 1, 8080, 9300)

    first, second = [line for line in capsys.readouterr().out.splitlines() if "ingress:" in line]
    assert "POST http://localhost:8080/webhooks/stripe (healthz, readyz)" in first
    assert "metrics on http://localhost:9090/metrics" in first
    assert "metrics on a free port (its `ingress metrics listening` line names it)" in second


def test_up_refuses_the_ingress_metrics_port_on_a_workers_port() -> None:
    from fulfillment.local import LocalPlan
    from fulfillment.up import _check_ports_free, _check_settings, _listeners
    from shared.errors import ConfigError

    env = {"STRIPE_WEBHOOK_SECRETS": "whsec_test", "STRIPE_API_KEY": "sk_test_x"}
    env["INGRESS_METRICS_PORT"] = "9301"
    listeners = _listeners(_check_settings(env, 9300), 2, 8080, 9300, LocalPlan())
    with pytest.raises(ConfigError, match="WORKER_METRICS_PORT 9301 is also INGRESS_METRICS_PORT"):
        _check_ports_free(listeners)


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
