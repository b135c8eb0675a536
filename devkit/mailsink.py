"""A local SMTP sink for development: accepts every message and reports it: one line with
its recipients, subject and Message-ID, then its text, indented."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP

from shared import runtime


class _Report:
    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.report(
            f"to={','.join(envelope.rcpt_tos)} subject={message['Subject']!r} "
            f"message-id={message['Message-ID']}"
        )
        text = message.get_body(preferencelist=("plain",))
        if text is not None:
            for line in text.get_content().splitlines():
                self.report(f"  {line}")
        return "250 Message accepted for delivery"


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


class _Record:
    def __init__(self, path: str) -> None:
        self.path = path

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(f"{message['Message-ID']}\t{message['To']}\t{message['Subject']}\n")
            out.flush()
        return "250 Message accepted for delivery"


if __name__ == "__main__":
    main()
