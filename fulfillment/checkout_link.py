"""``fulfillment checkout-link``: a signed link to the Checkout page for one customer, as the
merchant's backend would make with ingress.links (see docs/http.md#signed-links)."""

from __future__ import annotations

import argparse
from datetime import timedelta

from ingress.checkout import LinkSettings
from ingress.links import sign_checkout_link
from shared.errors import ConfigError, FulfillmentError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``30m``, ``2h``, ``1d``, ``90s`` or bare seconds (an argparse type)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 30m, 2h, 1d)") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"too long: {text}") from None


def checkout_link(*, customer: str | None, email: str | None, expires_in: timedelta) -> str:
    """The link on PUBLIC_URL, signed with CHECKOUT_LINK_SECRET."""
    settings = LinkSettings.from_env()
    if settings.secret is None:
        raise ConfigError(
            "CHECKOUT_LINK_SECRET is not set: give the secret the ingress checks links with"
        )
    try:
        return sign_checkout_link(
            settings.secret,
            settings.public_url,
            customer=customer,
            customer_email=email,
            expires_in=expires_in,
        )
    except ValueError as exc:
        raise FulfillmentError(str(exc)) from None
