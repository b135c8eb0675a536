"""``fulfillment send TYPE``: one realistic, signed event to the ingress, as ``stripe
trigger`` sends one, and the ingress's answer.

Signed with the first of STRIPE_WEBHOOK_SECRETS, else with the local secret ``up`` keeps.
Where a local Stripe stand-in answers (STRIPE_API_BASE, or ``up``'s on STANDIN_PORT), a
session fitting the type is seeded in it first, so the workers find it; ``--session`` sends
the event for a session Stripe (or the stand-in) already has, read from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import stripe

from fulfillment.console import link_host
from fulfillment.local import local_secret
from fulfillment.sendable import KINDS, Kind
from shared.errors import ConfigError, FulfillmentError
from shared.settings import env_list, env_port, env_str
from shared.stripe_client import STRIPE_API_BASE, AIOHTTPClient, StripeSettings, make_client

# What the stand-in answers the workers with when `up` stands in for Stripe.
STANDIN_KEY = "sk_test_local_standin"
DEFAULT_STANDIN_PORT = 12111
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Sent:
    event_id: str
    session_id: str
    seeded_in: str | None  # the stand-in the session was seeded in, if it was
    url: str
    status: int
    answer: str


def signing_secret(env: Mapping[str, str]) -> str:
    """The first configured secret, else the one `fulfillment up` keeps for local runs."""
    configured = env_list(env, "STRIPE_WEBHOOK_SECRETS")
    if configured:
        return configured[0]
    secret, path = local_secret(create=False)
    if secret is None:
        raise ConfigError(
            f"no secret to sign with: STRIPE_WEBHOOK_SECRETS is not set and there is no {path} "
            "(`fulfillment up` makes it on its first local run; run `send` where you ran `up`)"
        )
    return secret


def ingress_url(env: Mapping[str, str]) -> str:
    """The webhook route of the ingress the settings describe, on this machine."""
    host = link_host(env_str(env, "INGRESS_HOST", "0.0.0.0"))
    return f"http://{host}:{env_port(env, 'INGRESS_PORT', 8080)}/webhooks/stripe"


def standin_base(env: Mapping[str, str]) -> str | None:
    """Where a local Stripe stand-in would be: STRIPE_API_BASE, else `up`'s on STANDIN_PORT
    when no STRIPE_API_KEY is set; None for Stripe itself."""
    base = env_str(env, "STRIPE_API_BASE", "")
    if not base:
        if env_str(env, "STRIPE_API_KEY", ""):
            return None  # a key and no other base: real Stripe
        base = f"http://127.0.0.1:{env_port(env, 'STANDIN_PORT', DEFAULT_STANDIN_PORT)}"
    base = base.rstrip("/")
    return None if base == STRIPE_API_BASE else base


async def _answers(http: aiohttp.ClientSession, standin: str) -> bool:
    """Whether a stand-in answers there (its control routes: Stripe has none)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with http.get(f"{standin}/_standin/stats", timeout=aiohttp.ClientTimeout(2)) as r:
            return r.status == 200 and "sessions" in await r.json()
    return False


async def _seed(http: aiohttp.ClientSession, standin: str, kind: Kind) -> dict[str, Any]:
    """A session fitting the event type, seeded in the stand-in, as the event shows it."""
    async with http.post(
        f"{standin}/_standin/sessions", json={"payment_status": kind.payment_status}
    ) as r:
        if r.status != 201:
            raise FulfillmentError(f"the stand-in at {standin} did not seed a session: {r.status}")
        session: dict[str, Any] = await r.json()
    return {**session, "status": kind.status}


async def _read(env: Mapping[str, str], standin: str | None, session_id: str) -> dict[str, Any]:
    """The session as Stripe (or the stand-in) has it now."""
    if standin is not None:
        settings = StripeSettings(api_key=env_str(env, "STRIPE_API_KEY", STANDIN_KEY),
                                  api_base=standin)  # fmt: skip
    else:
        settings = StripeSettings.from_env(env)
    http = AIOHTTPClient(timeout=settings.timeout_s)
    try:
        client = make_client(settings, http_client=http)
        session = await client.v1.checkout.sessions.retrieve_async(session_id)
    except stripe.StripeError as exc:
        where = standin or settings.api_base
        raise FulfillmentError(
            f"cannot read {session_id} from {where}: {exc.user_message or exc}"
        ) from None
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    return session.to_dict()


async def send(
    env: Mapping[str, str], event_type: str, *, session_id: str | None, url: str | None
) -> Sent:
    """Sign and post one event of ``event_type``; what the ingress answered."""
    from devkit import signing  # the product imports devkit only where it plays Stripe

    secret = signing_secret(env)
    target = url or ingress_url(env)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(TIMEOUT_S)) as http:
        candidate = standin_base(env)
        standin = candidate if candidate and await _answers(http, candidate) else None
        if session_id is not None:
            session = await _read(env, standin, session_id)
        elif standin is not None:
            session = await _seed(http, standin, KINDS[event_type])
        else:
            where = f" at {candidate}" if candidate else " (STRIPE_API_KEY names real Stripe)"
            raise ConfigError(
                f"no local Stripe stand-in answers{where}, and real Stripe knows only its own "
                "sessions: give --session cs_… of one, or run `fulfillment up` without "
                "STRIPE_API_KEY (its stand-in listens on STANDIN_PORT)"
            )
        # a snapshot event: the session as it is now (a thin one would refer to it)
        event = signing.event(event_type, session)
        body = signing.body(event)
        headers = {"Stripe-Signature": signing.signature_header(body, secret),
                   "Content-Type": "application/json"}  # fmt: skip
        try:
            async with http.post(target, data=body, headers=headers) as r:
                status, answer = r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FulfillmentError(
                f"no answer from {target} ({type(exc).__name__}): is `fulfillment up` (or the "
                "ingress) running there? (--url names another)"
            ) from None
    return Sent(event["id"], session["id"], None if session_id else standin, target, status, answer)
