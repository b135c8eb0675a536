"""Stripe's error answers: the JSON shape stripe-python maps onto its exception classes.

404 -> ``InvalidRequestError``, 401 -> ``AuthenticationError``, 429 -> ``RateLimitError``,
5xx -> ``APIError`` (and a dropped connection -> ``APIConnectionError``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 402: "card_error"}
_ERROR_MESSAGES = {
    401: "Invalid API Key provided.",
    404: "No such object: the requested resource does not exist.",
    409: "This object cannot be accessed right now because another API request or Stripe "
    "process is currently accessing it.",
    429: "Too many requests hit the API too quickly. We recommend an exponential backoff of "
    "your requests.",
}


class StripeError(Exception):
    """Raised inside handlers; answered as Stripe's ``{"error": {...}}`` JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        self.code = code
        self.param = param
        self.should_retry = should_retry
        self.retry_after = retry_after

    def response(self) -> web.Response:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")
        if self.param is not None:
            error["param"] = self.param
        headers = {}
        if self.should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if self.should_retry else "false"
        if self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        return web.json_response({"error": error}, status=self.status, headers=headers)

    @classmethod
    def injected(
        cls, status: int, should_retry: bool | None = None, retry_after: float | None = None
    ) -> StripeError:
        code = {429: "rate_limit", 409: "lock_timeout", 404: "resource_missing"}.get(status)
        message = _ERROR_MESSAGES.get(status, "An unknown error occurred")
        return cls(status, message, code=code, should_retry=should_retry, retry_after=retry_after)

    @classmethod
    def missing(cls, kind: str, object_id: str, param: str = "id") -> StripeError:
        return cls(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)

    @classmethod
    def invalid(cls, param: str, message: str) -> StripeError:
        return cls(400, message, param=param)
