"""Signed Checkout links: who may check out as an existing customer, for how long.

Standard library only, so that a merchant's backend can mint links for its logged-in user
with this one file and no other part of this project::

    from ingress.links import sign_checkout_link
    url = sign_checkout_link(secret, "https://shop.example", customer="cus_123")

A link is the Checkout page's URL with claims in its query string (``customer`` or
``customer_email``, ``exp``, the format version ``v``) and ``sig``: an HMAC-SHA256, keyed
with the shared secret, over a canonical encoding of every other parameter. So anything
added, removed or changed breaks it, and claims a later version adds (a price, a quantity)
are covered without a new format; a verifier refuses a claim it does not know rather than
ignore what the link's signer meant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

VERSION = "1"
SIGNATURE = "sig"
# Every claim this version understands; the signature covers these and any other parameter.
CLAIMS = frozenset({"v", "exp", "customer", "customer_email"})
MIN_SECRET_CHARS = 32
DEFAULT_LIFETIME = timedelta(minutes=30)  # as long as Checkout keeps a customer's details

# Bounds on what a verifier reads: a link is short, and anything longer is not one of ours.
_MAX_PARAMS = 16
_MAX_VALUE_CHARS = 512
_CUSTOMER = re.compile(r"cus_[A-Za-z0-9]{1,250}")
# One address, no display name, nothing that could change a header or a URL it goes into.
_EMAIL = re.compile(r"[^@\s<>,;\"\x00-\x1f\x7f]{1,64}@[^@\s<>,;\"\x00-\x1f\x7f]{1,253}")
_DOMAIN = b"stripe-checkout-fulfillment checkout link\n"  # no other HMAC of ours can match


class InvalidLink(ValueError):
    """Raised when a link is not one to honour; ``reason`` says which kind of not."""

    reason = "invalid"


class MalformedLink(InvalidLink):
    """Raised when a link's parameters are not a link of this format."""

    reason = "malformed"


class TamperedLink(InvalidLink):
    """Raised when a link's signature does not match its parameters with this secret."""

    reason = "bad_signature"


class ExpiredLink(InvalidLink):
    """Raised when a link was genuine but its time is over."""

    reason = "expired"


@dataclass(frozen=True, slots=True)
class LinkClaims:
    """What a verified link says: whom the Checkout is for, and until when."""

    expires_at: datetime
    customer: str | None = None
    customer_email: str | None = None


def sign_checkout_link(
    secret: str,
    public_url: str,
    *,
    customer: str | None = None,
    customer_email: str | None = None,
    expires_in: timedelta = DEFAULT_LIFETIME,
    now: datetime | None = None,
) -> str:
    """A link to the Checkout page at ``public_url`` for ``customer`` (a ``cus_…`` id) or
    ``customer_email`` (prefilled for a new customer), valid for ``expires_in``."""
    _check_secret(secret)
    if customer is not None and customer_email is not None:
        # Stripe takes one or the other: an existing customer has an email already
        raise ValueError("give customer or customer_email, not both")
    if customer is not None and not _CUSTOMER.fullmatch(customer):
        raise ValueError(f"customer must be a Customer id (cus_…), got {customer!r}")
    if customer_email is not None and not _EMAIL.fullmatch(customer_email):
        raise ValueError(f"customer_email must be one email address, got {customer_email!r}")
    if expires_in <= timedelta(0):
        raise ValueError("expires_in must be positive")
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError(f"public_url must be an http(s) URL without a query, got {public_url!r}")
    issued = now or datetime.now(UTC)
    try:
        expires_at = issued + expires_in
    except OverflowError:
        raise ValueError("expires_in is too long: the link would expire after 9999") from None
    params = {"v": VERSION, "exp": str(int(expires_at.timestamp()))}
    if customer is not None:
        params["customer"] = customer
    if customer_email is not None:
        params["customer_email"] = customer_email
    query = _canonical(params) + f"&{SIGNATURE}={_signature(secret, params)}"
    return parts._replace(path=parts.path.rstrip("/") + "/", query=query, fragment="").geturl()


def verify_checkout_link(
    secret: str,
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    now: datetime | None = None,
) -> LinkClaims:
    """The claims of a link's query parameters (or of the form that carries them), or
    MalformedLink, TamperedLink or ExpiredLink. Repeated parameters are refused."""
    _check_secret(secret)
    pairs = list(params.items() if isinstance(params, Mapping) else params)
    if len(pairs) > _MAX_PARAMS or any(len(v) > _MAX_VALUE_CHARS for _, v in pairs):
        raise MalformedLink("the link is longer than any this shop makes")
    found = dict(pairs)
    if len(found) != len(pairs):
        raise MalformedLink("a parameter of the link is repeated")
    signature = found.pop(SIGNATURE, None)
    if not signature:
        raise MalformedLink("the link is not signed")
    if not hmac.compare_digest(signature.encode(), _signature(secret, found).encode()):
        # checked before anything else is read: an unsigned claim says nothing
        raise TamperedLink("the link's signature does not match its contents")
    if found.get("v") != VERSION:
        raise MalformedLink(f"link version {found.get('v')!r} is not one this shop reads")
    unknown = sorted(set(found) - CLAIMS)
    if unknown:
        raise MalformedLink(f"the link holds claims this shop does not know: {unknown}")
    exp = found.get("exp", "")
    if not (exp.isascii() and exp.isdigit() and len(exp) <= 12):
        raise MalformedLink("the link has no valid expiry")
    current = now.timestamp() if now is not None else time.time()
    if current >= int(exp):
        raise ExpiredLink("the link has expired")
    customer, email = found.get("customer"), found.get("customer_email")
    if customer is not None and not _CUSTOMER.fullmatch(customer):
        raise MalformedLink("the link's customer is not a Customer id")
    if email is not None and not _EMAIL.fullmatch(email):
        raise MalformedLink("the link's customer_email is not an email address")
    if customer is not None and email is not None:
        raise MalformedLink("the link names both a customer and an email")
    return LinkClaims(
        expires_at=datetime.fromtimestamp(int(exp), UTC), customer=customer, customer_email=email
    )


def _check_secret(secret: str) -> None:
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"the link secret must be at least {MIN_SECRET_CHARS} characters")


def _canonical(params: Mapping[str, str]) -> str:
    """Every parameter, sorted by name, each name and value percent-encoded alike."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(params.items()))


def _signature(secret: str, params: Mapping[str, str]) -> str:
    digest = hmac.new(
        secret.encode(), _DOMAIN + _canonical(params).encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
