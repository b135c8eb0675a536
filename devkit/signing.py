"""Sign and build webhook payloads exactly as Stripe does, from Stripe's published fixtures.

The one ``Stripe-Signature`` maker: the stand-in's Checkout, the demo, ``ops/`` and the
tests all sign with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

from devkit.fixtures import fixture


def new_secret() -> str:
    return "whsec_" + secrets.token_hex(16)


def signature_header(
    payload: bytes, secrets_: Sequence[str] | str, *, timestamp: int | None = None
) -> str:
    """``t=…,v1=…[,v1=…]``: one v1 per secret, each an HMAC-SHA256 over ``"{t}.{body}"``,
    as Stripe signs for an endpoint whose secret is being rolled."""
    if isinstance(secrets_, str):
        secrets_ = [secrets_]
    t = int(time.time()) if timestamp is None else timestamp
    signed = f"{t}.".encode() + payload
    parts = [f"t={t}"]
    for secret in secrets_:
        parts.append("v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


def checkout_session(
    session_id: str | None = None, *, payment_status: str = "paid", **overrides: Any
) -> dict[str, Any]:
    session = fixture("checkout.session")
    session["id"] = session_id or "cs_test_" + secrets.token_hex(12)
    session["payment_status"] = payment_status
    session["status"] = "complete"
    session["amount_total"] = session.get("amount_total") or 2000
    session["amount_subtotal"] = session.get("amount_subtotal") or 2000
    session["currency"] = session.get("currency") or "usd"
    session.update(overrides)
    return session


def event(
    event_type: str = "checkout.session.completed",
    data_object: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A Stripe event of ``event_type`` around ``data_object`` (default: a paid session)."""
    doc = fixture("event")
    doc["id"] = event_id or "evt_" + secrets.token_hex(12)
    doc["type"] = event_type
    doc["created"] = int(time.time()) if created is None else created
    doc["api_version"] = "2025-06-30.basil"
    doc["data"] = {"object": data_object if data_object is not None else checkout_session()}
    return doc


def body(doc: dict[str, Any]) -> bytes:
    """Serialized the way Stripe sends it: pretty-printed JSON, UTF-8."""
    return json.dumps(doc, indent=2).encode()


def fixture_object(name: str) -> dict[str, Any]:
    """A Stripe fixture object with a fresh id."""
    obj = fixture(name)
    prefix = obj["id"].split("_", 1)[0]
    obj["id"] = f"{prefix}_{secrets.token_hex(12)}"
    return obj
