"""The confirmation email's content: amounts that add up, one-line fields, one bare address."""

from __future__ import annotations

import pytest

from devkit.stripe import StripeStandIn

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("discount", "tax", "total", "lines"),
    [
        # one price tax-inclusive (12.00 holding 2.00), one exclusive (10.00 plus 1.00)
        (0, 300, 2300, ["Subtotal: 22.00 EUR", "Tax: 1.00 EUR", "Tax included: 2.00 EUR"]),
        (
            220,  # and 10% off: Stripe's tax shrinks with it
            270,
            2070,
            [
                "Subtotal: 22.00 EUR",
                "Discount: -2.20 EUR",
                "Tax: 0.90 EUR",
                "Tax included: 1.80 EUR",
            ],
        ),
        (220, 270, 2500, []),  # figures that add up no way we know: items and total only
    ],
)
def test_the_email_adds_up_when_a_session_mixes_tax_inclusive_and_exclusive_prices(
    discount: int, tax: int, total: int, lines: list[str]
) -> None:
    """Downstream trial: a session with both kinds of price lost every adjustment line,
    its discount too, though Stripe's figures add up."""
    from worker.mail import confirmation_email
    from worker.order import LineItem, Order

    def item(name: str, amount: int) -> LineItem:
        return LineItem(f"li_{name}", name, "price_1", 1, amount, amount, "eur", amount)

    order = Order(
        session_id="cs_test_mixed",
        payment_status="paid",
        amount_total=total,
        currency="eur",
        customer_id=None,
        customer_email="jenny@example.com",
        customer_name=None,
        livemode=False,
        items=(item("Book", 1200), item("Pen", 1000)),
        amount_subtotal=2200,
        amount_discount=discount,
        amount_tax=tax,
    )

    text = confirmation_email(order, "shop@shop.test").get_payload(decode=True).decode()
    shown = [t for t in text.splitlines() if t.startswith(("Subtotal", "Discount", "Tax"))]
    assert shown == lines
    assert f"Total: {total / 100:.2f} EUR" in text


@pytest.mark.parametrize(
    "address", ["jenny\ufffd@example.com", "jenny@exa\x00mple.com", "jen\x85ny@example.com"]
)
def test_an_address_with_a_control_or_replacement_character_is_undeliverable(address: str) -> None:
    """A NUL Stripe sent is stored as U+FFFD (PostgreSQL text cannot hold it); neither is
    part of any mailbox, so the email is recorded as undeliverable, not sent to a guess."""
    from worker.mail import Undeliverable, confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(customer_email=address)["id"]
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": []}))

    with pytest.raises(Undeliverable, match="no usable customer email"):
        confirmation_email(order, "shop@shop.test")


@pytest.mark.parametrize("customer", ["jenny@example.com", "zoë@example.com"])
@pytest.mark.parametrize(
    "sender", ["Boutique Café <orders@shop.example>", '"Shop, Inc." <orders@shop.example>']
)
def test_the_sender_keeps_its_address_whatever_its_display_name(sender: str, customer: str) -> None:
    """Downstream trial: a non-ASCII MAIL_FROM name was encoded together with the address
    (compat32), so mail clients saw a From with no address: no replies, DMARC failures."""
    import email
    import email.policy

    from aiosmtplib.email import flatten_message

    from worker.mail import confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(customer_email=customer)["id"]
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": []}))
    # flattened as the mailer's client does (SMTPUTF8 only for a non-ASCII customer address)
    raw = flatten_message(confirmation_email(order, sender), utf8=not customer.isascii())

    # as a client reads it (RFC 6532: headers in UTF-8 when the relay takes SMTPUTF8)
    parsed = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    [address] = parsed["From"].addresses
    assert address.addr_spec == "orders@shop.example"
    assert address.display_name == email.utils.parseaddr(sender)[0]


def test_the_customers_name_is_one_bounded_line_in_the_greeting() -> None:
    from worker.order import NAME_MAX_CHARS, Order

    standin = StripeStandIn()
    sid = standin.add_session()["id"]
    session = dict(standin.sessions[sid])
    session["customer_details"] = {
        "email": "a@example.com",
        "name": "Eve\r\nVisit evil.example " * 50,
    }
    name = Order.from_session(session).customer_name
    assert name is not None and name.startswith("Eve Visit evil.example Eve")
    assert len(name) == NAME_MAX_CHARS and "\n" not in name and "\r" not in name


@pytest.mark.parametrize(
    ("currency", "line_total", "order_total"),
    [
        ("usd", "25.00 USD", "52.50 USD"),
        ("jpy", "2,500 JPY", "5,250 JPY"),  # zero-decimal: whole yen
        ("kwd", "2.500 KWD", "5.250 KWD"),  # three-decimal: thousandths (fils)
    ],
)
def test_the_confirmation_email_shows_amounts_in_the_currencys_own_minor_unit(
    currency: str, line_total: str, order_total: str
) -> None:
    from worker.mail import confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(line_items=[("Tea", 2, 1250), ("Cup", 1, 2750)], currency=currency)[
        "id"
    ]
    session = dict(standin.sessions[sid], line_items={"data": standin.line_items[sid]})
    mail = confirmation_email(Order.from_session(session), "shop@shop.test")
    text = mail.get_payload(decode=True).decode()
    assert f"2 x Tea  {line_total}" in text
    assert f"Total: {order_total}" in text


def test_an_items_description_is_one_line_in_the_email_and_kept_as_stripe_has_it() -> None:
    from worker.mail import DESCRIPTION_MAX_CHARS, confirmation_email
    from worker.order import Order

    standin = StripeStandIn()
    sid = standin.add_session(line_items=[("Tea\r\nBcc: x@evil.example", 2, 1250), ("Cup", 1, 50)])[
        "id"
    ]
    items = [dict(i) for i in standin.line_items[sid]]
    items[1]["description"], items[1]["price"]["nickname"] = None, None
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": items}))
    assert [i.description for i in order.items] == ["Tea\r\nBcc: x@evil.example", None]
    items[1]["description"] = {"not": "text"}  # not Stripe's answer: no description either
    odd = Order.from_session(dict(standin.sessions[sid], line_items={"data": items}))
    assert odd.items[1].description is None

    text = confirmation_email(order, "shop@shop.test").get_payload(decode=True).decode()
    assert "  2 x Tea Bcc: x@evil.example  25.00 USD\n" in text
    assert "  1 x Item  0.50 USD\n" in text  # no description: a placeholder in the email only
    assert "\r" not in text

    items[0]["description"] = "Tea " * 100
    order = Order.from_session(dict(standin.sessions[sid], line_items={"data": items}))
    text = confirmation_email(order, "shop@shop.test").get_payload(decode=True).decode()
    line = next(t for t in text.splitlines() if t.startswith("  2 x Tea"))
    assert len(line) == len("  2 x ") + DESCRIPTION_MAX_CHARS + len("  25.00 USD")


@pytest.mark.parametrize(
    "address",
    [
        "ada@example.com\r\nBcc: eve@example.com",
        "ada@example.com\nBcc: eve@example.com",
        "ada smith@example.com",
        "ada@exa mple.com",
        "ada@example.com\t",
        "ada@example.com, eve@example.com",
        "Ada <ada@example.com>",
    ],
)
def test_a_customer_email_that_is_not_one_bare_address_is_undeliverable(address: str) -> None:
    """No header injection and no second recipient: written off as undeliverable (the
    order goes on), never sent, never a crash of the email library."""
    from worker.mail import Undeliverable, confirmation_email
    from worker.order import Order

    order = Order(
        session_id="cs_test_address",
        payment_status="paid",
        amount_total=100,
        currency="usd",
        customer_id=None,
        customer_email=address,
        customer_name=None,
        livemode=False,
        items=(),
    )
    with pytest.raises(Undeliverable):
        confirmation_email(order, "Shop <orders@shop.test>")
