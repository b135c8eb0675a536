"""An ingress with the Checkout routes, set up as each test asks: the stand-in's hosted page
delivering signed webhooks to it, a customer and a price in the stand-in.

Import ``storefront_fixture`` into a test module to use the ``storefront`` fixture."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devkit.stripe import HostedCheckout, StripeStandIn
from ingress.app import create_app
from ingress.checkout import CheckoutSettings
from ingress.settings import IngressSettings
from tests.conftest import free_port
from worker.settings import WorkerSettings

LINK_SECRET = "link-secret-" + "0123456789abcdef" * 3


@dataclass
class Storefront:
    base: str
    app: web.Application
    hosted: HostedCheckout
    customer: dict[str, Any]
    price: dict[str, Any]
    checkout: CheckoutSettings
    settings: IngressSettings

    def session_creations(self) -> int:
        """Checkout Sessions the ingress asked Stripe (the stand-in) to create so far."""
        standin = self.hosted.standin
        return sum(1 for r in standin.requests if r == ("POST", "/v1/checkout/sessions"))

    def session_reads(self) -> int:
        standin = self.hosted.standin
        return sum(
            1 for m, p in standin.requests if m == "GET" and p.startswith("/v1/checkout/sessions/")
        )


@pytest.fixture(name="storefront")
async def storefront_fixture(
    standin: StripeStandIn, stripe_base: str, worker_settings: WorkerSettings, topology: Any
) -> AsyncIterator[Callable[..., Any]]:
    """``await storefront(**CheckoutSettings fields)``, and two of IngressSettings'."""
    from aiohttp.test_utils import TestServer

    servers: list[tuple[TestServer, HostedCheckout]] = []

    async def start(
        *, forwarded_allow_ips: tuple[str, ...] = (), read_timeout_s: float = 10.0, **fields: Any
    ) -> Storefront:
        secret = "whsec_" + uuid.uuid4().hex
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        hosted = HostedCheckout(
            standin, webhook_url=f"{public}/webhooks/stripe", webhook_secret=secret
        )
        customer = standin.add_customer(email="grace@example.com", name="Grace Hopper")
        price = hosted.add_price("Notebook", 1500)
        checkout = CheckoutSettings(
            stripe=worker_settings.stripe,
            price=price["id"],
            public_url=public,
            link_secret=LINK_SECRET,
        )
        checkout = dataclasses.replace(checkout, **fields)
        settings = IngressSettings(
            webhook_secrets=(secret,),
            broker=worker_settings.broker,
            forwarded_allow_ips=forwarded_allow_ips,
            read_timeout_s=read_timeout_s,
        )
        app = create_app(settings, checkout=checkout)
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server()
        servers.append((server, hosted))
        return Storefront(public, app, hosted, customer, price, checkout, settings)

    yield start
    for server, hosted in servers:
        await hosted.close()
        await server.close()


def from_address(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (any of 127.0.0.0/8 on Linux)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
