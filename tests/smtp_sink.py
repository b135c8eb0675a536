"""A real SMTP server (aiosmtpd) that keeps what it receives, and can be stopped and restarted."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if self.sink.refuse_ehlo:
            return ["502 5.5.1 EHLO not available, say HELO"]  # the client falls back to HELO
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.sink.refuse_sender:
            return "553 5.7.1 Sender address rejected: not owned by the authenticated user"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.sink.rcpt_delay_s:
            await asyncio.sleep(self.sink.rcpt_delay_s)
        if self.sink.relay_denied:
            return f"554 5.7.1 <{address}>: Relay access denied"
        if address in self.sink.deferred_recipients:
            return f"450 4.2.1 <{address}>: Mailbox temporarily unavailable, try later"
        if address in self.sink.unknown_recipients:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.data_answer is not None:
            return self.sink.data_answer  # refused (or deferred) once the content is in
        # UTF-8 (not ASCII) for the bytes: with SMTPUTF8, headers may be UTF-8 (RFC 6532)
        message = email.message_from_string(
            envelope.content.decode("utf-8"), policy=email.policy.default
        )
        with self.sink.lock:
            self.sink.messages.append(message)  # type: ignore[arg-type]
            self.sink.peers.append(session.peer)
        hook, self.sink.after_data = self.sink.after_data, None
        if hook is not None:
            await hook()  # runs once, after the message is kept and before the 250
        return "250 Message accepted for delivery"


class SmtpSink:
    """Collects every message; ``stop()``/``start()`` simulate an outage on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[EmailMessage] = []
        self.peers: list[Any] = []  # the client's (host, port) of each message: its connection
        self.lock = threading.Lock()
        self.rcpt_delay_s = 0.0
        self.unknown_recipients: set[str] = set()  # refused with 550 at RCPT
        self.deferred_recipients: set[str] = set()  # deferred with 450 at RCPT
        self.smtputf8 = False  # offer SMTPUTF8 (RFC 6531); takes effect at the next start()
        self.refuse_ehlo = False  # EHLO answered 502: the client says HELO (no extensions)
        self.refuse_sender = False  # every MAIL FROM refused with 553 (a relay misconfigured)
        self.relay_denied = False  # every RCPT refused with 554 5.7.1 (we may not relay)
        self.data_answer: str | None = None  # every DATA answered with this, nothing kept
        self.after_data: Callable[[], Awaitable[None]] | None = None
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=self.smtputf8
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if m["To"] == address]

    def for_session(self, session_id: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if m["X-Checkout-Session-Id"] == session_id]

    def wait(self, count: int, timeout_s: float = 10.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"expected {count} emails, got {len(self.messages)}")
