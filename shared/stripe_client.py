"""The Stripe client factory and the mapping of Stripe's errors onto ours."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import stripe

from shared.errors import ConfigError, PermanentError, TransientError
from shared.settings import Env, env_float, env_str, env_url

STRIPE_API_BASE = "https://api.stripe.com"


@dataclass(frozen=True)
class StripeSettings:
    """How to reach Stripe's API (or a stand-in, through STRIPE_API_BASE)."""

    api_key: str = field(repr=False)
    api_base: str = STRIPE_API_BASE
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Env | None = None) -> StripeSettings:
        env = os.environ if env is None else env
        api_key = env_str(env, "STRIPE_API_KEY", "")
        if not api_key:
            raise ConfigError(
                "STRIPE_API_KEY is not set: give a secret (sk_…) or restricted (rk_…) key"
            )
        if not api_key.startswith(("sk_", "rk_")):
            raise ConfigError("STRIPE_API_KEY must start with sk_ or rk_")
        return cls(
            api_key=api_key,
            api_base=env_url(
                env, "STRIPE_API_BASE", STRIPE_API_BASE, schemes=("http", "https")
            ).rstrip("/"),
            timeout_s=env_float(env, "STRIPE_TIMEOUT_S", 10.0, minimum=0.1),
        )


def make_client(settings: StripeSettings, *, http_client: stripe.HTTPClient) -> stripe.StripeClient:
    """A StripeClient on the given transport (the caller closes it); retries are ours.

    Pass ``stripe.AIOHTTPClient(timeout=…)`` for async calls and ``await
    http_client.close_async()`` when done: StripeClient has no close of its own.
    """
    return stripe.StripeClient(
        settings.api_key,
        base_addresses={"api": settings.api_base},
        http_client=http_client,
        max_network_retries=0,
    )


class StripeNotFound(PermanentError):
    """Raised when Stripe says the object does not exist (404 resource_missing)."""


def classify(exc: stripe.StripeError) -> TransientError | PermanentError:
    """Our error for a Stripe error: retry 429, 5xx, network and auth trouble, and answers
    that are not Stripe's JSON (APIError: a proxy's error page, a cut-off body); not the rest.
    """
    status = exc.http_status or 0
    message = f"Stripe {type(exc).__name__} ({status or 'no response'}): {exc.user_message or exc}"
    if (
        isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | stripe.APIError)
        or status >= 500
    ):
        return TransientError(message, retry_after_s=retry_after(exc.headers))
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        # a revoked or wrong key is fixed by an operator; keep the work until then
        return TransientError(message)
    if status == 404:
        return StripeNotFound(message)
    return PermanentError(message)


def retry_after(headers: object) -> float | None:
    """The seconds a ``Retry-After`` header asks for (Stripe does not send one; a proxy or
    gateway in front of it may), or None. The HTTP-date form is not used by either."""
    items = getattr(headers, "items", None)
    if items is None:
        return None
    for name, value in items():
        if str(name).lower() == "retry-after":
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return seconds if 0 <= seconds < float("inf") else None
    return None
