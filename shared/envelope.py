"""The event envelope: the few fields of a Stripe event that routing and bookkeeping need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.errors import MalformedEvent


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    """Routing fields of a Stripe event; the raw body travels beside it, unchanged."""

    id: str
    type: str
    livemode: bool
    created: int
    api_version: str | None

    @classmethod
    def parse(cls, raw: bytes | str) -> EventEnvelope:
        """Read the routing fields, or raise MalformedEvent saying what is wrong."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedEvent(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise MalformedEvent("body is nested too deeply") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> EventEnvelope:
        """Validate an already decoded event document."""
        if not isinstance(doc, dict):
            raise MalformedEvent("body is not a JSON object")
        if doc.get("object") != "event":
            raise MalformedEvent('body is not a Stripe event (expected "object": "event")')
        event_id, event_type = doc.get("id"), doc.get("type")
        if not isinstance(event_id, str) or not event_id:
            raise MalformedEvent('event has no string "id"')
        if not isinstance(event_type, str) or not event_type:
            raise MalformedEvent('event has no string "type"')
        if len(event_id) > 255 or len(event_type) > 255:
            # AMQP short strings (routing keys, header values) hold at most 255 bytes
            raise MalformedEvent('event "id" or "type" is longer than 255 characters')
        created = doc.get("created", 0)
        api_version = doc.get("api_version")
        return cls(
            id=event_id,
            type=event_type,
            livemode=doc.get("livemode") is True,
            created=created if isinstance(created, int) and not isinstance(created, bool) else 0,
            api_version=api_version if isinstance(api_version, str) else None,
        )
