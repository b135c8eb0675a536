"""The stand-in's objects: customers, products and prices, Checkout Sessions with their line
items, and events, built from Stripe's published fixtures (:mod:`devkit.fixtures`)."""

from __future__ import annotations

import copy
import fnmatch
import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devkit.fixtures import fixture
from devkit.stripe.errors import StripeError
from devkit.stripe.params import bool_param, int_param, list_param

API_VERSION = "2026-10-28.endive"
# (description, quantity, unit_amount); quantity None: a metered (usage-based) price
LineItem = tuple[str, int | None, int]
# What the admin route may set on a seeded session: add_session's keywords.
SEEDABLE = (
    "payment_status", "currency", "customer_email", "customer", "metadata", "account",
    "mode", "discount", "shipping", "tax", "tax_included", "status", "created",
)  # fmt: skip
# A Checkout Session's statuses, as Stripe's list filter takes them.
SESSION_STATUSES = ("open", "complete", "expired")


def new_id(prefix: str) -> str:
    infix = "_test" if prefix == "cs" else ""
    return f"{prefix}{infix}_{secrets.token_hex(12)}"


class StripeObjects:
    """What the stand-in knows, seeded by the methods below and read by its routes."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.line_items: dict[str, list[dict[str, Any]]] = {}
        self.session_accounts: dict[str, str] = {}  # session id -> its connected account
        self.customers: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.delivery_success: dict[str, bool] = {}
        self._event_order: dict[str, int] = {}
        self._session_order: dict[str, int] = {}
        self._sequence = itertools.count()

    def add_customer(
        self,
        customer_id: str | None = None,
        *,
        email: str | None = "jenny@example.com",
        name: str | None = "Jenny Rosen",
    ) -> dict[str, Any]:
        customer = fixture("customer")
        customer.update(
            id=customer_id or new_id("cus"),
            email=email,
            name=name,
            created=int(time.time()),
            discount=None,
        )
        self.customers[customer["id"]] = customer
        return customer

    def _line_item(
        self,
        description: str,
        quantity: int | None,
        unit_amount: int,
        currency: str,
        *,
        recurring: bool = False,
    ) -> dict[str, Any]:
        product = fixture("product")
        product.update(
            id=new_id("prod"), name=description, description=None, created=int(time.time())
        )
        product.update(updated=product["created"], default_price=None, package_dimensions=None)
        price = fixture("price")
        recurring = recurring or quantity is None  # a metered price is a recurring one
        price.update(
            id=new_id("price"),
            currency=currency,
            product=product["id"],
            type="recurring" if recurring else "one_time",
            recurring={
                "interval": "month",
                "interval_count": 1,
                "meter": None,
                "trial_period_days": None,
                "usage_type": "metered" if quantity is None else "licensed",
            }
            if recurring
            else None,
            transform_quantity=None,
            unit_amount=unit_amount,
            unit_amount_decimal=str(unit_amount),
            created=product["created"],
        )
        product["default_price"] = price["id"]
        self.products[product["id"]] = product
        item = fixture("item")
        amount = 0 if quantity is None else quantity * unit_amount  # metered: billed later
        item.update(
            id=new_id("li"),
            description=description,
            quantity=quantity,
            currency=currency,
            price=price,
            adjustable_quantity=None,
            amount_subtotal=amount,
            amount_total=amount,
            amount_discount=0,
            amount_tax=0,
        )
        return item

    def add_session(
        self,
        session_id: str | None = None,
        *,
        payment_status: str = "paid",
        line_items: Iterable[LineItem] | None = None,
        currency: str = "usd",
        customer_email: str = "jenny@example.com",
        customer: str | None = None,
        metadata: Mapping[str, str] | None = None,
        account: str | None = None,
        mode: str = "payment",
        discount: int = 0,
        shipping: int = 0,
        tax: int = 0,
        tax_included: bool = False,
        status: str = "complete",
        created: int | None = None,
    ) -> dict[str, Any]:
        """Seed a checkout.session, completed unless ``status`` says otherwise (``open``,
        ``expired``), created now unless ``created`` (a Unix time) says when; totals are the
        sum of ``line_items``.

        ``line_items`` are ``(description, quantity, unit_amount)``, default one 2000 T-shirt.
        With ``account`` (Stripe Connect) the session lives on that connected account and,
        as on Stripe, is found only by requests with ``Stripe-Account: <account>``.
        ``mode="setup"``: a session that only saved a payment method, as Stripe has it: no
        items, no amounts, no currency, ``no_payment_required`` and a SetupIntent.
        ``mode="subscription"``: monthly prices and a Subscription id. ``discount``,
        ``shipping`` and ``tax`` go into ``total_details`` and, as on Stripe, into the line
        items' ``amount_total`` (after discounts and taxes; here all on the first item),
        while ``amount_subtotal`` stays before them. ``tax_included``: the prices include
        the tax (VAT-style), so it does not add to the total.
        Returns the stored session (without ``line_items``, which appear only when expanded).
        """
        setup = mode == "setup"
        items = [
            self._line_item(
                description, quantity, unit_amount, currency, recurring=mode == "subscription"
            )
            for description, quantity, unit_amount in (line_items or [("T-shirt", 1, 2000)])
            if not setup
        ]
        subtotal: int | None = None if setup else sum(item["amount_subtotal"] for item in items)
        added_tax = 0 if tax_included else tax
        total = None if subtotal is None else subtotal - discount + shipping + added_tax
        if items and (discount or tax):
            first = items[0]
            first.update(amount_discount=discount, amount_tax=tax)
            first["amount_total"] = first["amount_subtotal"] - discount + added_tax
        if setup:
            payment_status = "no_payment_required"
        session = fixture("checkout.session")
        sid = session_id or new_id("cs")
        now = int(time.time()) if created is None else created
        session.update(
            id=sid,
            url=None,
            status=status,
            mode=mode,
            payment_status=payment_status,
            currency=None if setup else currency,
            amount_subtotal=subtotal,
            amount_total=total,
            created=now,
            expires_at=now + 24 * 3600,
            customer=customer,
            metadata=dict(metadata or {}),
            payment_intent=None if payment_status == "no_payment_required" else new_id("pi"),
            setup_intent=new_id("seti") if setup else None,
            subscription=new_id("sub") if mode == "subscription" else None,
            currency_conversion=None,
            shipping_cost=None,
            shipping_address_collection=None,
            collected_information=None,
            total_details=None
            if setup
            else {"amount_discount": discount, "amount_shipping": shipping, "amount_tax": tax},
        )
        session["customer_details"]["email"] = customer_email
        self.sessions[sid] = session
        self.line_items[sid] = items
        self._session_order.setdefault(sid, next(self._sequence))
        if account is not None:
            self.session_accounts[sid] = account
        return session

    def set_payment_status(self, session_id: str, status: str) -> None:
        self.sessions[session_id]["payment_status"] = status

    def add_event(self, event: dict[str, Any], *, delivery_success: bool = False) -> dict[str, Any]:
        """Store a full Stripe event dict; ``/v1/events`` lists newest ``created`` first."""
        self.events[event["id"]] = event
        self.delivery_success[event["id"]] = delivery_success
        self._event_order[event["id"]] = next(self._sequence)
        return event

    def add_session_event(
        self,
        session_id: str,
        event_type: str = "checkout.session.completed",
        *,
        created: int | None = None,
        delivery_success: bool = False,
    ) -> dict[str, Any]:
        """Store an event (from the event fixture) around a snapshot of a seeded session."""
        event = fixture("event")
        event.update(
            id=new_id("evt"),
            type=event_type,
            created=int(time.time()) if created is None else created,
            api_version=API_VERSION,
            data={"object": copy.deepcopy(self.sessions[session_id])},
        )
        if session_id in self.session_accounts:
            event["account"] = self.session_accounts[session_id]  # a Connect event
        return self.add_event(event, delivery_success=delivery_success)

    def lookup(self, object_id: str) -> dict[str, Any] | None:
        """The object an expandable field's id names (a customer or a product)."""
        return self.customers.get(object_id) or self.products.get(object_id)

    def matching_sessions(
        self, query: Mapping[str, str], account: str | None = None
    ) -> list[dict[str, Any]]:
        """The sessions ``GET /v1/checkout/sessions`` lists for ``query``, newest first."""
        status = query.get("status")
        if status is not None and status not in SESSION_STATUSES:
            raise StripeError.invalid(
                "status", f"Invalid status: must be one of {', '.join(SESSION_STATUSES)}"
            )
        within = _created_filter(query)

        def keep(sid: str, session: dict[str, Any]) -> bool:
            return (
                (status is None or session["status"] == status)
                and within(int(session["created"]))
                # like Stripe: an account's own sessions only
                and self.session_accounts.get(sid) == account
            )

        found = [session for sid, session in self.sessions.items() if keep(sid, session)]
        found.sort(key=lambda s: (s["created"], self._session_order.get(s["id"], 0)),
                   reverse=True)  # fmt: skip
        return found

    def matching_events(
        self, query: Mapping[str, str], account: str | None = None
    ) -> list[dict[str, Any]]:
        types = list_param(query, "types") + list_param(query, "type")
        within = _created_filter(query)
        delivered = bool_param(query, "delivery_success")

        def keep(event: dict[str, Any]) -> bool:
            checks = (
                not types or any(fnmatch.fnmatchcase(event["type"], t) for t in types),
                within(int(event["created"])),
                delivered is None or self.delivery_success[event["id"]] == delivered,
                # like Stripe: an account's own events only (a connected account's with
                # Stripe-Account, the platform's without)
                event.get("account") == account,
            )
            return all(checks)

        events = [event for event in self.events.values() if keep(event)]
        events.sort(key=lambda e: (e["created"], self._event_order[e["id"]]), reverse=True)
        return events


def _created_filter(query: Mapping[str, str]) -> Callable[[int], bool]:
    """Stripe's ``created`` filter: an exact time, or ``created[gt|gte|lt|lte]`` bounds."""
    exact = int_param(query, "created")
    bounds = {op: int_param(query, f"created[{op}]") for op in ("gt", "gte", "lt", "lte")}

    def within(created: int) -> bool:
        return (
            (exact is None or created == exact)
            and (bounds["gt"] is None or created > bounds["gt"])
            and (bounds["gte"] is None or created >= bounds["gte"])
            and (bounds["lt"] is None or created < bounds["lt"])
            and (bounds["lte"] is None or created <= bounds["lte"])
        )

    return within
