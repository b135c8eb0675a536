"""An order: what fulfillment needs from a Checkout Session, read once from Stripe's object."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shared.errors import TransientError
from shared.money import format_amount as format_amount  # its users in worker/ import it here


@dataclass(frozen=True, slots=True)
class LineItem:
    id: str
    description: str | None  # None when Stripe has none (neither the item's nor the price's)
    price_id: str | None
    quantity: int | None  # None for a metered price (usage-based: no quantity at checkout)
    unit_amount: int | None
    amount_total: int  # after discounts and taxes, as Stripe has it
    currency: str
    amount_subtotal: int = 0  # before discounts and taxes (quantity x unit amount)


@dataclass(frozen=True, slots=True)
class Order:
    """A Checkout Session as fulfillment sees it."""

    session_id: str
    payment_status: str
    amount_total: int
    currency: str
    customer_id: str | None
    customer_email: str | None
    customer_name: str | None
    livemode: bool
    items: tuple[LineItem, ...]
    account: str | None = None  # the connected account it was sold on (Stripe Connect)
    mode: str = "payment"  # payment | subscription | setup (only saved a payment method)
    subscription: str | None = None  # the subscription a subscription-mode session started
    # amount_total = amount_subtotal - amount_discount + amount_shipping (+ amount_tax, unless
    # the prices include it)
    amount_subtotal: int = 0
    amount_discount: int = 0
    amount_shipping: int = 0
    amount_tax: int = 0

    @classmethod
    def from_session(cls, session: dict[str, Any], *, account: str | None = None) -> Order:
        """Read a retrieved session (``expand=["line_items"]``); TransientError if it is not one.

        ``account``: the connected account it was retrieved from, None for the platform."""
        if session.get("object") != "checkout.session" or not session.get("id"):
            # Stripe answers a session's URL with the session, so this came from something in
            # between (a gateway, a cut-off body): retried, not a verdict on the event
            raise TransientError("Stripe returned something that is not a checkout.session")
        details = session.get("customer_details") or {}
        currency = _currency(session.get("currency"))
        details_of_total = session.get("total_details") or {}
        items = []
        for item in (session.get("line_items") or {}).get("data") or []:
            price = item.get("price") or {}
            items.append(
                LineItem(
                    id=_stored(item["id"]),
                    description=_text(item.get("description")) or _text(price.get("nickname")),
                    price_id=_id_of(price),
                    quantity=None if item.get("quantity") is None else int(item["quantity"]),
                    unit_amount=price.get("unit_amount"),
                    amount_total=int(item.get("amount_total") or 0),
                    currency=_currency(item.get("currency") or currency),
                    amount_subtotal=int(
                        item.get("amount_subtotal")
                        if item.get("amount_subtotal") is not None
                        else item.get("amount_total") or 0
                    ),
                )
            )
        return cls(
            session_id=session["id"],
            payment_status=session.get("payment_status") or "unpaid",
            amount_total=int(session.get("amount_total") or 0),
            currency=currency,
            customer_id=_id_of(session.get("customer")),
            customer_email=_text(details.get("email")) or _text(session.get("customer_email")),
            customer_name=_name(details.get("name")),
            livemode=bool(session.get("livemode")),
            items=tuple(items),
            account=account,
            mode=_text(session.get("mode")) or "payment",
            subscription=_id_of(session.get("subscription")),
            amount_subtotal=int(session.get("amount_subtotal") or 0),
            amount_discount=int(details_of_total.get("amount_discount") or 0),
            amount_shipping=int(details_of_total.get("amount_shipping") or 0),
            amount_tax=int(details_of_total.get("amount_tax") or 0),
        )

    @property
    def total(self) -> str:
        return format_amount(self.amount_total, self.currency)


_CURRENCY = re.compile(r"[a-z]{3}")
NAME_MAX_CHARS = 100


def _id_of(value: Any) -> str | None:
    """An expandable field's id: Stripe sends the id, or the object when expanded."""
    found = value if isinstance(value, str) else (value or {}).get("id")
    return _stored(found) if isinstance(found, str) else None


def _stored(value: Any) -> Any:
    """A string as PostgreSQL can store it: text cannot hold NUL, which would make the
    order impossible to record (dead-lettered for good), so a NUL becomes U+FFFD."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _currency(value: Any) -> str:
    """An ISO 4217 code in Stripe's lowercase (usd when absent, as for a setup session);
    anything else is not Stripe's answer (it goes into the email's subject line)."""
    if value is None:
        return "usd"
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value.lower()):
        raise TransientError(f"Stripe returned a currency that is not one: {str(value)[:20]!r}")
    return value.lower()


def _text(value: Any) -> str | None:
    """A text field as Stripe sends it: a non-empty string, else None."""
    return _stored(value) if isinstance(value, str) and value else None


def _name(value: Any) -> str | None:
    """The customer's name for the greeting: one line, bounded (it is what the buyer typed)."""
    return one_line(_stored(value), NAME_MAX_CHARS) if isinstance(value, str) else None


def one_line(text: str, max_chars: int) -> str | None:
    """``text`` as one line of at most ``max_chars`` (line breaks and runs of whitespace made
    one space), None if nothing is left."""
    return " ".join(text.split())[:max_chars] or None
