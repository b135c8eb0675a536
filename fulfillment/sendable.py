"""The event types ``fulfillment send`` makes, and the session each is sent for (apart from
send.py, so that the command line can offer them without importing what sending needs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.vocabulary import PAYMENT_FAILED, PAYMENT_SUCCEEDED, SESSION_COMPLETED


@dataclass(frozen=True)
class Kind:
    """The session Stripe sends an event type for."""

    payment_status: str
    status: str = "complete"


# Every type `send` can make, with the session it fits. Snapshot events carry the session;
# Stripe's thin events (v1.checkout.session.*) only a reference to it: they join this table
# with a field saying so, and `send` builds them with a thin builder beside signing.event.
KINDS: Mapping[str, Kind] = {
    SESSION_COMPLETED: Kind("paid"),
    PAYMENT_SUCCEEDED: Kind("paid"),
    PAYMENT_FAILED: Kind("unpaid"),
    "checkout.session.expired": Kind("unpaid", status="expired"),
}
