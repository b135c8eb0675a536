"""The Checkout routes' settings, and what their modules share: the app's keys for them
and the per-client limit.

The routes are optional, on when CHECKOUT_PRICE is set: a page with a Checkout button and
session creation (ingress/checkout_page.py), the success page that also asks for
fulfillment (ingress/success.py). The page is public, so it checks out a guest; an
existing customer comes through a signed link (ingress/links.py). Each client may ask
Stripe a few times a minute (ingress/limits.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import stripe
from aiohttp import web

from ingress import metrics
from ingress.clients import ClientAddress
from ingress.limits import ClientBuckets
from ingress.links import MIN_SECRET_CHARS
from ingress.pages import too_many_requests
from shared.errors import ConfigError
from shared.logging import LogSampler, get_logger
from shared.settings import Env, default_of, env_int, env_str, env_url
from shared.stripe_client import StripeSettings

log = get_logger(__name__)


@dataclass(frozen=True)
class LinkSettings:
    """What minting and checking signed links needs: the secret, and where we live."""

    secret: str | None = field(default=None, repr=False)
    public_url: str = "http://localhost:8080"

    @classmethod
    def from_env(cls, env: Env | None = None) -> LinkSettings:
        env = os.environ if env is None else env
        secret = env_str(env, "CHECKOUT_LINK_SECRET", "") or None
        if secret is not None and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"CHECKOUT_LINK_SECRET must be at least {MIN_SECRET_CHARS} characters "
                "(make one with: openssl rand -hex 32)"
            )
        return cls(
            secret=secret,
            public_url=env_url(
                env, "PUBLIC_URL", default_of(cls, "public_url"), schemes=("http", "https")
            ).rstrip("/"),
        )


@dataclass(frozen=True)
class CheckoutSettings:
    """What the Checkout routes need: the price sold, to whom, where we live, how often."""

    stripe: StripeSettings
    price: str
    quantity: int = 1
    # every session's customer when no link names one; refused with a live key
    customer: str | None = None
    public_url: str = LinkSettings.public_url
    link_secret: str | None = field(default=None, repr=False)
    # per client: sessions created, and success-page lookups that ask Stripe (0: no limit)
    create_per_min: int = 5
    create_burst: int = 5
    lookup_per_min: int = 20
    lookup_burst: int = 10

    @classmethod
    def from_env(cls, env: Env | None = None) -> CheckoutSettings | None:
        """None unless CHECKOUT_PRICE is set (the routes are optional)."""
        env = os.environ if env is None else env
        price = env_str(env, "CHECKOUT_PRICE", "")
        if not price:
            return None
        if not price.startswith("price_"):
            raise ConfigError("CHECKOUT_PRICE must be a Price id (price_…)")
        stripe_settings = StripeSettings.from_env(env)
        customer = env_str(env, "CHECKOUT_CUSTOMER", "") or None
        if customer is not None and not customer.startswith("cus_"):
            raise ConfigError("CHECKOUT_CUSTOMER must be a Customer id (cus_…)")
        if customer is not None and stripe_settings.live_key:
            raise ConfigError(
                "CHECKOUT_CUSTOMER is refused with a live STRIPE_API_KEY: the Checkout page is "
                "public, so every visitor would check out as that customer, see their details "
                "and pay with their saved card. Send existing customers signed links instead "
                "(CHECKOUT_LINK_SECRET; `fulfillment checkout-link`, see docs/http.md)"
            )
        links = LinkSettings.from_env(env)

        return cls(
            stripe=stripe_settings,
            price=price,
            quantity=env_int(env, "CHECKOUT_QUANTITY", default_of(cls, "quantity"), minimum=1),
            customer=customer,
            public_url=links.public_url,
            link_secret=links.secret,
            create_per_min=env_int(
                env, "CHECKOUT_CREATE_PER_MIN", default_of(cls, "create_per_min"), minimum=0
            ),
            create_burst=env_int(
                env, "CHECKOUT_CREATE_BURST", default_of(cls, "create_burst"), minimum=1
            ),
            lookup_per_min=env_int(
                env, "CHECKOUT_LOOKUP_PER_MIN", default_of(cls, "lookup_per_min"), minimum=0
            ),
            lookup_burst=env_int(
                env, "CHECKOUT_LOOKUP_BURST", default_of(cls, "lookup_burst"), minimum=1
            ),
        )


CHECKOUT = web.AppKey("checkout", CheckoutSettings)
STRIPE = web.AppKey("stripe", stripe.StripeClient)
CLIENTS = web.AppKey("clients", ClientAddress)
CREATE_LIMIT = web.AppKey("create_limit", ClientBuckets)
LOOKUP_LIMIT = web.AppKey("lookup_limit", ClientBuckets)

# One line per second per kind of refusal: a flood is counted in the metrics, not logged.
_REFUSALS_LOGGED = LogSampler(interval_s=1.0)


def refusal_logged(kind: str) -> int | None:
    """None to leave this refusal's line out, else how many like it were (see LogSampler)."""
    return _REFUSALS_LOGGED.admit(kind)


def client_of(request: web.Request) -> str:
    """The client a limit counts this request against (ingress/clients.py)."""
    return request.app[CLIENTS].of(request.remote, request.headers.getall("X-Forwarded-For", ()))


def over_limit(request: web.Request, limit: ClientBuckets, route: str) -> web.Response | None:
    """429 when this request's client has used up its bucket for ``route``; else None (a
    token taken)."""
    if limit.off:
        return None
    client = client_of(request)
    wait_s = limit.take(client)
    if not wait_s:
        return None
    metrics.CLIENT_LIMITED.labels(route).inc()
    left_out = refusal_logged(f"limited:{route}")
    if left_out is not None:
        log.warning(
            "checkout request limited",
            route=route,
            client=client,
            retry_after_s=round(wait_s, 1),
            similar_not_logged=left_out or None,
        )
    return too_many_requests(wait_s)
