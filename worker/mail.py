"""Customer emails over SMTP, each with a Message-ID fixed per session and purpose."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
import time
from email.message import EmailMessage, Message
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr

import aiosmtplib
import idna

from shared.errors import PermanentError, TransientError
from worker.order import Order, format_amount, one_line
from worker.relay import RelayBreaker, RelayClient
from worker.settings import SmtpSettings


class Undeliverable(PermanentError):
    """Raised when this email can never be delivered (bad address, refused recipient or content)."""


# An item's line in an email shows at most this much of its description.
DESCRIPTION_MAX_CHARS = 200

# One address, no display name, no whitespace or control characters (no header injection).
_ADDRESS = re.compile(r"[^@\s<>,;\"\x00-\x1f\x7f\ufffd]+@[^@\s<>,;\"\x00-\x1f\x7f\ufffd]+")


def message_id(purpose: str, session_id: str, sender: str) -> str:
    """The same id for the same email every time, so mail systems can drop a repeat."""
    return f"<{purpose}.{session_id}@{_sender(sender)[1]}>"


@functools.lru_cache(maxsize=4)
def _sender(sender: str) -> tuple[str, str]:
    """MAIL_FROM as a From header, and its domain: parsed once, not for every email.
    (compat32 would encode a non-ASCII display name together with the address, leaving no
    address at all: formatted, the name alone is encoded and the address stays as it is.)"""
    name, address = parseaddr(sender)
    return formataddr((name, address)), address.rpartition("@")[2] or "localhost"


def confirmation_email(order: Order, sender: str) -> Message:
    lines = [
        f"Hello{' ' + order.customer_name if order.customer_name else ''},",
        "",
        "Thank you for your subscription. It is confirmed and active."
        if order.mode == "subscription"
        else "Thank you for your order. It is confirmed and on its way.",
        "",
    ]
    for item in order.items:
        count = "" if item.quantity is None else f"{item.quantity} x "  # None: metered price
        price = format_amount(item.amount_subtotal, item.currency)  # before discounts, taxes
        # one line per item, whatever the description holds (a merchant's text, no rules)
        description = one_line(item.description or "", DESCRIPTION_MAX_CHARS) or "Item"
        lines.append(f"  {count}{description}  {price}")
    lines += _adjustments(order)
    lines += ["", f"Total: {order.total}", "", f"Order reference: {order.session_id}"]
    return _message(
        order, sender, f"Your order is confirmed ({order.total})", "\n".join(lines), "order"
    )


def _adjustments(order: Order) -> list[str]:
    """Subtotal, discount, shipping and tax, so that the email's lines add up to the total;
    none when there are none, or when Stripe's figures do not add up either way."""
    discount, shipping, tax = order.amount_discount, order.amount_shipping, order.amount_tax
    if not (discount or shipping or tax):
        return []
    # Stripe's tax is the prices' own (tax_behavior inclusive: inside the subtotal) plus the
    # tax added to them (exclusive); a session may hold both kinds of price. What the total
    # adds beyond the discounted, shipped subtotal is the added part.
    added = order.amount_total - (order.amount_subtotal - discount + shipping)
    included = tax - added
    if not 0 <= added <= tax:
        return []  # an adjustment we do not know: the items and the total only

    def money(amount: int) -> str:
        return format_amount(amount, order.currency)

    lines = ["", f"Subtotal: {money(order.amount_subtotal)}"]
    lines += [f"Discount: {money(-discount)}"] if discount else []
    lines += [f"Shipping: {money(shipping)}"] if shipping else []
    lines += [f"Tax: {money(added)}"] if added else []  # added to the prices
    lines += [f"Tax included: {money(included)}"] if included else []  # VAT-style
    return lines


def payment_failed_email(order: Order, sender: str) -> Message:
    body = "\n".join(
        [
            f"Hello{' ' + order.customer_name if order.customer_name else ''},",
            "",
            f"The payment of {order.total} for your order did not go through, so the order",
            "has not been fulfilled. You can place it again with another payment method.",
            "",
            f"Order reference: {order.session_id}",
        ]
    )
    return _message(order, sender, "Your payment did not go through", body, "payment-failed")


def _message(order: Order, sender: str, subject: str, body: str, purpose: str) -> Message:
    address = _recipient(order)
    message: Message
    if address.isascii():
        # MIMEText (compat32) rather than EmailMessage, whose header parsing costs a large
        # share of a fulfillment's CPU; so the values are checked here instead.
        message = MIMEText(body, "plain", "utf-8")
    else:
        # A non-ASCII mailbox name (RFC 6531): only EmailMessage writes it into To: as
        # UTF-8 (RFC 6532) when the relay speaks SMTPUTF8; compat32 would make it an
        # encoded-word, which is no address at all. Rare, so its cost does not matter.
        message = EmailMessage()
        message.set_content(body, charset="utf-8")
    message["From"] = _sender(sender)[0]
    message["To"] = address
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id(purpose, order.session_id, sender)
    message["X-Checkout-Session-Id"] = order.session_id
    return message


def _recipient(order: Order) -> str:
    """The customer's address as it can be sent to: one address, with an internationalized
    domain in its ASCII form (IDNA), which every relay can route; Undeliverable if none."""
    address = order.customer_email or ""
    if not _ADDRESS.fullmatch(address):
        raise Undeliverable(f"session {order.session_id} has no usable customer email")
    mailbox, _, domain = address.rpartition("@")
    if not domain.isascii():
        try:
            # IDNA 2008 (non-transitional UTS #46, as browsers and registries): the stdlib's
            # IDNA 2003 codec maps straße.de to strasse.de, someone else's domain
            domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise Undeliverable(
                f"session {order.session_id}: the customer email's domain is not a valid "
                "internationalized domain name"
            ) from None
    return f"{mailbox}@{domain}"


class Mailer:
    """Hands messages to the relay over connections kept open between messages.

    Setting a connection up (TCP, greeting, EHLO, STARTTLS, AUTH) costs more round trips
    than the message itself; a busy worker reuses them. A connection is used by one
    message at a time, closed after any error, and not kept idle longer than
    ``max_idle_s`` (relays drop idle clients after a few minutes; Postfix after 300 s).
    """

    def __init__(self, settings: SmtpSettings, *, max_idle_s: float = 30.0) -> None:
        self.settings = settings
        self.max_idle_s = max_idle_s
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # (connection, idle since)
        self._tls = ssl.create_default_context() if settings.use_tls else None
        self._breaker = RelayBreaker(f"{settings.host}:{settings.port}", settings.cooldown_s)

    async def send(self, message: Message) -> None:
        """Hand the message over; TransientError if it may work later (RetryLater ones,
        EmailInDoubt and RelayUnavailable, left to the delay queues), Undeliverable if never."""
        try:
            client = self._reuse()
            if client is not None:
                try:
                    await _send_on(client, message)
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                    # The relay closed the idle connection meanwhile: once more on a new one.
                    # (Lost after the message's end, it is EmailInDoubt, never sent again.)
                    client = None
            if client is None:
                client = await self._breaker.connect(self._connect)
                await _send_on(client, message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(_never_for_this_message(r.code, r.message) for r in exc.recipients):
                raise Undeliverable(f"SMTP refused the recipient: {exc}") from None
            raise TransientError(f"SMTP refused or deferred the recipient: {exc}") from None
        except aiosmtplib.SMTPDataError as exc:
            if _never_for_this_message(exc.code, exc.message):
                raise Undeliverable(
                    f"SMTP refused the message ({exc.code}): {exc.message}"
                ) from None
            raise TransientError(f"SMTP error ({exc.code}): {exc.message}") from None
        except aiosmtplib.SMTPResponseException as exc:
            # Greeting, HELO, AUTH, MAIL FROM refused: the relay or our settings are wrong,
            # for every order alike. Retried (through the delay queues, then the DLQ to
            # replay once fixed) rather than marking every customer's email as failed.
            raise TransientError(f"SMTP error ({exc.code}): {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientError(f"SMTP unavailable: {type(exc).__name__}: {exc}") from None
        self._idle.append((client, time.monotonic()))

    async def close(self) -> None:
        """Say goodbye on every idle connection, all at once and bounded (a relay may not
        answer); whatever did not close cleanly, or is left when we are cancelled, is cut."""
        idle, self._idle = self._idle, []

        async def goodbye(client: aiosmtplib.SMTP) -> None:
            try:
                await asyncio.wait_for(client.quit(), timeout=2)
            except BaseException:
                _abort(client)
                raise

        await asyncio.gather(*(goodbye(c) for c, _ in idle), return_exceptions=True)

    def _reuse(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        fresh = []
        for client, since in self._idle:  # close every expired one, not only those on top
            if now - since < self.max_idle_s and client.is_connected:
                fresh.append((client, since))
            else:
                _abort(client)
        self._idle = fresh
        if fresh:
            return fresh.pop()[0]  # the most recently used: the least likely to be stale
        return None

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = RelayClient(
            data_timeout=s.data_timeout_s,
            hostname=s.host,
            port=s.port,
            use_tls=s.use_tls,
            # without credentials, STARTTLS when the server offers it; with them, see below
            start_tls=False if s.credentials else None,
            timeout=s.connect_timeout_s,  # for the connection's set-up; then timeout_s
            local_hostname=s.local_hostname,
            tls_context=self._tls,
        )
        try:
            await client.connect()
            if s.credentials:
                await self._log_in(client)
        except BaseException:
            _abort(client)
            raise
        client.timeout = s.timeout_s  # each reply to MAIL, RCPT and DATA
        return client

    async def _log_in(self, client: aiosmtplib.SMTP) -> None:
        """Send the credentials only over TLS: ``smtps://``, or STARTTLS, which a relay (or
        a man in the middle) that does not offer it makes a failure, the password unsent."""
        s = self.settings
        if not s.use_tls:
            with contextlib.suppress(aiosmtplib.SMTPHeloError):
                await client.ehlo()  # no EHLO, so no extensions: no STARTTLS either
            if client.supports_extension("starttls"):
                await client.starttls()
            elif not s.allow_plaintext_auth:
                raise TransientError(
                    f"SMTP: the relay at {s.host}:{s.port} offers no STARTTLS, so the "
                    "password in SMTP_URL was not sent; use smtps://, a relay that offers "
                    "STARTTLS, or SMTP_ALLOW_PLAINTEXT_AUTH=true for a relay on this host"
                )
        await client.login(s.username or "", s.password or "")


# RFC 3463 enhanced status: 5.1.x is a bad address, 5.2.x the mailbox, 5.3.x the message
# (too big), 5.6.x its content; 5.7.x is policy (relaying denied, not authenticated,
# sender not allowed), i.e. the relay or our settings, the same for every order.
_ENHANCED = re.compile(r"^\s*5\.(\d{1,3})\.\d{1,3}\b")
_ABOUT_THIS_MESSAGE = {"1", "2", "3", "6"}


def _never_for_this_message(code: int, message: str) -> bool:
    """Whether a refusal is about this recipient or message (give up on this email), not
    about the relay or our settings (retry until someone fixes them)."""
    if not 500 <= code < 600:
        return False
    enhanced = _ENHANCED.match(message or "")
    if enhanced:
        return enhanced.group(1) in _ABOUT_THIS_MESSAGE
    return code in (550, 551, 552, 553)  # no enhanced code: mailbox unavailable / bad name


async def _send_on(client: aiosmtplib.SMTP, message: Message) -> None:
    """Send on one connection; a connection that failed is closed, never reused."""
    try:
        await client.send_message(message)
    except aiosmtplib.SMTPNotSupported as exc:
        # Said only before anything is sent, and (aiosmtplib 3+) only for SMTPUTF8. Written
        # off only when the relay answered EHLO without it: a relay whose EHLO failed (a
        # fallback to HELO lists no extensions at all) may yet take it, so retry that.
        answered_ehlo = client.last_ehlo_response is not None
        _abort(client)
        if answered_ehlo and not str(message["To"]).isascii():
            raise Undeliverable(
                "the mail relay does not offer SMTPUTF8, which this customer's address needs"
            ) from None
        raise TransientError(f"SMTP: {exc}") from None
    except BaseException:
        _abort(client)
        raise


def _abort(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()
