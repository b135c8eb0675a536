"""What a message on the work queue says: its event, its Checkout Session, its attempt."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage

from shared.envelope import EventEnvelope
from shared.errors import MalformedEvent
from shared.vocabulary import CHECKOUT_SESSION_ID, FULFILLMENT_REQUESTED
from worker import retry


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a message says, read once."""

    event: EventEnvelope
    session_id: str | None
    attempt: int


def parse(message: AbstractIncomingMessage) -> Delivery:
    """Read the event and its Checkout Session id; MalformedEvent if it is not usable."""
    attempt = retry.attempt_of(message.headers or {})
    try:
        doc = json.loads(message.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedEvent("body is not valid JSON") from None
    event = EventEnvelope.from_dict(doc)
    obj = (doc.get("data") or {}).get("object") if isinstance(doc.get("data"), dict) else None
    session_id = None
    if event.type.startswith("checkout.session.") or event.type == FULFILLMENT_REQUESTED:
        # Stripe always says "object": "checkout.session"; without it the cs_ id is enough,
        # as the session is read from Stripe anyway (which 404s an id that is no session)
        if not isinstance(obj, dict) or obj.get("object", "checkout.session") != "checkout.session":
            raise MalformedEvent(f"{event.type} event without a checkout.session in data.object")
        session_id = obj.get("id")
        if not isinstance(session_id, str) or not CHECKOUT_SESSION_ID.fullmatch(session_id):
            raise MalformedEvent("data.object.id is not a Checkout Session id (cs_…)")
    return Delivery(event, session_id, attempt)
