"""The Stripe client factory and the mapping of Stripe's errors onto ours."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import stripe

from shared.errors import ConfigError, PermanentError, TransientError
from shared.settings import Env, default_of, env_float, env_str, env_url

STRIPE_API_BASE = "https://api.stripe.com"


@dataclass(frozen=True)
class StripeSettings:
    """How to reach Stripe's API (or a stand-in, through STRIPE_API_BASE)."""

    api_key: str = field(repr=False)
    api_base: str = STRIPE_API_BASE
    timeout_s: float = 10.0

    @property
    def live_key(self) -> bool | None:
        """True for a live-mode key, False for a test-mode one, None when it does not say."""
        if self.api_key.startswith(("sk_live_", "rk_live_")):
            return True
        if self.api_key.startswith(("sk_test_", "rk_test_")):
            return False
        return None

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
                env, "STRIPE_API_BASE", default_of(cls, "api_base"), schemes=("http", "https")
            ).rstrip("/"),
            timeout_s=env_float(env, "STRIPE_TIMEOUT_S", default_of(cls, "timeout_s"), minimum=0.1),
        )


# The headers of the last answer in this task that was an error: stripe-python keeps them on
# its exception only when the body is Stripe's error JSON, and a Retry-After comes from a
# gateway in front of Stripe, whose body is not.
_ERROR_HEADERS: ContextVar[Mapping[str, str] | None] = ContextVar("error_headers", default=None)


class AIOHTTPClient(stripe.AIOHTTPClient):
    """stripe-python's aiohttp transport, remembering an error answer's headers for
    ``classify`` (in the task that made the request)."""

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        _ERROR_HEADERS.set(None)  # an earlier answer's must not stick to this request's error
        try:
            content, status, response_headers = await super().request_async(
                method, url, headers, post_data
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            # an answer cut off mid-body surfaces here as aiohttp's own error, which
            # stripe-python does not wrap: as a connection error, it is retried
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"connection to Stripe failed mid-answer: {type(exc).__name__}: {exc}",
                should_retry=True,
            ) from exc
        _ERROR_HEADERS.set(response_headers if status >= 400 else None)
        return content, status, response_headers


def make_client(settings: StripeSettings, *, http_client: stripe.HTTPClient) -> stripe.StripeClient:
    """A StripeClient on the given transport (the caller closes it); retries are ours.

    Pass ``AIOHTTPClient(timeout=…)`` (this module's) for async calls and ``await
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
    """Our error for a Stripe error: retry 429, 409, 5xx, network and auth trouble, and
    answers that are not Stripe's error JSON (a proxy's error page, a cut-off body: an
    APIError without Stripe's body); not the rest (Stripe's own 4xx verdicts).
    """
    status = exc.http_status or 0
    message = f"Stripe {type(exc).__name__} ({status or 'no response'}): {exc.user_message or exc}"
    if (
        isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError)
        or status >= 500
        or status == 409  # Stripe's lock_timeout: another request holds the object
        or (isinstance(exc, stripe.APIError) and not _stripe_error_body(exc))
    ):
        headers = exc.headers or _ERROR_HEADERS.get() or {}
        return TransientError(message, retry_after_s=retry_after(headers))
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        # a revoked or wrong key is fixed by an operator; keep the work until then
        return TransientError(message)
    if status == 404:
        return StripeNotFound(message)
    return PermanentError(message)


def _stripe_error_body(exc: stripe.StripeError) -> bool:
    """Whether the answer was Stripe's own error JSON, i.e. Stripe's verdict."""
    body = exc.json_body
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


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
