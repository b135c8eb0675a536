"""The event envelope: the few fields of a Stripe event that routing and bookkeeping need."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shared.errors import MalformedEvent
from shared.vocabulary import ACCOUNT_ID


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    """Routing fields of a Stripe event; the raw body travels beside it, unchanged."""

    id: str
    type: str
    livemode: bool
    created: int
    api_version: str | None
    # The connected account (Stripe Connect) the event happened on; None for the
    # platform's own. Its objects are read from Stripe on behalf of that account.
    account: str | None = None

    @classmethod
    def parse(cls, raw: bytes | str) -> EventEnvelope:
        """Read the routing fields, or raise MalformedEvent saying what is wrong."""
        try:
            doc = json.loads(raw, parse_constant=_not_json)
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
        for name, value in (("id", event_id), ("type", event_type)):
            size = _utf8_size(value)
            if size is None:
                raise MalformedEvent(f'event "{name}" is not valid Unicode (a lone surrogate)')
            if size > 255:
                # AMQP short strings (routing key, type property) hold at most 255 bytes
                raise MalformedEvent(f'event "{name}" is longer than 255 bytes')
            if _CONTROL.search(value):
                # never in Stripe's ids and types; a NUL cannot even be stored in PostgreSQL,
                # so the event could never be processed, and a line break splits log lines
                raise MalformedEvent(f'event "{name}" holds a control character')
        # These become message headers: AMQP tables hold signed 64-bit integers and UTF-8.
        created = doc.get("created", 0)
        if (
            not isinstance(created, int)
            or isinstance(created, bool)
            or not _INT64_MIN <= created <= _INT64_MAX
        ):
            created = 0
        api_version = doc.get("api_version")
        if not isinstance(api_version, str) or not 0 < (_utf8_size(api_version) or 0) <= 64:
            # informational only (Stripe's are like "2025-09-30.clover"); an unbounded header
            # value could outgrow the broker's frame and close the shared connection
            api_version = None
        account = doc.get("account")
        if account is not None and not (isinstance(account, str) and ACCOUNT_ID.fullmatch(account)):
            # Dropping it would read the session from the platform (not found, or worse,
            # another object): refuse the event instead.
            raise MalformedEvent('event "account" is not a Stripe account id (acct_…)')
        return cls(
            id=event_id,
            type=event_type,
            livemode=doc.get("livemode") is True,
            created=created,
            api_version=api_version,
            account=account,
        )


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# C0 and C1 controls, DEL, and the line and paragraph separators some readers break at
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _not_json(constant: str) -> None:
    """Python's json reads NaN and Infinity, which JSON does not have."""
    raise ValueError(f"{constant} is not JSON")


def _utf8_size(value: str) -> int | None:
    """Its size in UTF-8, or None when it has no UTF-8 form (a lone surrogate, from "\\ud800")."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None
