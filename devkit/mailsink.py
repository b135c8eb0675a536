"""SMTP sinks for development: each accepts mail as a relay would, and prints, records or
keeps it instead of delivering it.

* :func:`start_mail_sink`: a server in the caller's event loop that prints each message,
  one line with its recipients, subject and Message-ID, then its text, indented (what
  ``fulfillment up`` runs when no relay is configured).
* ``python -m devkit.mailsink``: the same in its own process; with ``--record`` it appends
  one line per message to a file instead, so a count survives the sink being restarted.
* :class:`SmtpSink`: a server in its own thread that keeps every message and can be told
  to refuse, defer or stall (at RCPT, at the greeting, or in answering the message's end),
  and be stopped and started again on the same port (the tests').
"""

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
from aiosmtpd.smtp import SMTP

from shared import runtime

ACCEPTED = "250 Message accepted for delivery"


def _parse(content: bytes) -> EmailMessage:
    # UTF-8, not ASCII: with SMTPUTF8 the headers may be UTF-8 (RFC 6532)
    text = content.decode("utf-8", errors="surrogateescape")
    return email.message_from_string(text, policy=email.policy.default)


class _Report:
    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = _parse(envelope.content)
        self.report(
            f"to={','.join(envelope.rcpt_tos)} subject={message['Subject']!r} "
            f"message-id={message['Message-ID']}"
        )
        text = message.get_body(preferencelist=("plain",))
        if text is not None:
            for line in text.get_content().splitlines():
                self.report(f"  {line}")
        return ACCEPTED


class _Record:
    def __init__(self, path: str) -> None:
        self.path = path

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = _parse(envelope.content)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(f"{message['Message-ID']}\t{message['To']}\t{message['Subject']}\n")
            out.flush()
        return ACCEPTED


async def start_mail_sink(
    host: str, port: int, report: Callable[[str], None]
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SMTP(_Report(report)), host, port)


def main(argv: list[str] | None = None) -> None:
    """``python -m devkit.mailsink --port 1025 [--record FILE]``: a sink in its own process.

    With ``--record`` each accepted message appends ``Message-ID<TAB>To<TAB>Subject`` to
    FILE before the sink answers 250, so a counter survives the sink being restarted.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--record", help="append one line per accepted message to this file")
    args = parser.parse_args(argv)

    def report(line: str) -> None:
        print(line, flush=True)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handler = _Record(args.record) if args.record else _Report(report)
        server = await loop.create_server(lambda: SMTP(handler), args.host, args.port)
        async with server:
            await server.serve_forever()

    runtime.run(serve())


class _Handler:
    """:class:`SmtpSink`'s answers: its faults at each step, else it keeps the message."""

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
        message = _parse(envelope.content)
        with self.sink.lock:
            self.sink.messages.append(message)
            self.sink.peers.append(session.peer)
        hook, self.sink.after_data = self.sink.after_data, None
        if hook is not None:
            await hook()  # runs once, after the message is kept and before the 250
        if self.sink.data_reply_delay_s:
            # the message is taken (kept above); the answer saying so comes late
            await asyncio.sleep(self.sink.data_reply_delay_s)
        return ACCEPTED


class _Server(SMTP):
    """aiosmtpd's server, which can take a connection and never greet (a hung relay)."""

    def __init__(self, handler: _Handler, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._greeted = False

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True  # the first line pushed is the greeting
            if self._sink.stall_greeting:
                try:
                    await asyncio.Event().wait()  # until the client goes (handler cancelled)
                finally:
                    if self.transport is not None:
                        self.transport.close()  # aiosmtpd would only once greeted
        await super().push(status)


class _Controller(Controller):
    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        return _Server(self.handler, self._sink, **self.SMTP_kwargs)


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
        self.data_reply_delay_s = 0.0  # each message kept at once, its 250 sent this late
        self.stall_greeting = False  # connections taken meanwhile are never greeted
        self.after_data: Callable[[], Awaitable[None]] | None = None
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = _Controller(
            self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=self.smtputf8
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


if __name__ == "__main__":
    main()
