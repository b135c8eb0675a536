"""Stripe-Signature verification against several secrets, with stripe-python's own code."""

from __future__ import annotations

import time

from stripe import SignatureVerificationError, WebhookSignature


class InvalidSignature(Exception):
    """Raised when a request's Stripe-Signature does not prove it came from Stripe."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def verify(payload: bytes, header: str | None, secrets: tuple[str, ...], tolerance_s: int) -> int:
    """Accept if any secret verifies the header over the raw body, returning its signed
    timestamp (``t=``); else raise InvalidSignature.

    Several secrets cover rotation (Stripe signs with both while the old one expires) and
    several endpoints feeding one ingress.
    """
    if not header:
        raise InvalidSignature("missing_signature", "Stripe-Signature header is missing")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSignature(
            "invalid_signature", "body is not UTF-8, so it cannot be signed"
        ) from None
    timestamp = _timestamp(header)
    stale = False
    for secret in secrets:
        try:
            WebhookSignature.verify_header(text, header, secret, tolerance_s)
        except SignatureVerificationError as exc:
            stale = stale or "tolerance" in str(exc)
            continue
        # stripe-python checks only the past; a timestamp far ahead is as suspect.
        if timestamp > time.time() + tolerance_s:
            raise InvalidSignature("timestamp_out_of_tolerance", "timestamp is in the future")
        return timestamp
    if stale:
        raise InvalidSignature(
            "timestamp_out_of_tolerance", f"timestamp is older than {tolerance_s}s"
        )
    raise InvalidSignature("invalid_signature", "no signature matches any configured secret")


def _timestamp(header: str) -> int:
    # Same grammar stripe-python accepts: "t=<int>" and at least one "v1=<hex>".
    if not header.isascii():
        # stripe-python compares signatures with hmac.compare_digest, which raises TypeError
        # (not a verification error) on non-ASCII strings: a real header is ASCII anyway.
        raise InvalidSignature("malformed_signature", "Stripe-Signature header must be ASCII")
    timestamp: int | None = None
    has_v1 = False
    for item in header.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            continue
        if key == "t" and timestamp is None:
            try:
                timestamp = int(value)
            except ValueError:
                break
        elif key == "v1" and value:
            has_v1 = True
    if timestamp is None or not has_v1:
        raise InvalidSignature(
            "malformed_signature", "Stripe-Signature header must look like t=<unix time>,v1=<hex>"
        )
    return timestamp
