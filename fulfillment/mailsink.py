"""A local SMTP sink for development: accepts every message and reports it in one line."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP


class _Report:
    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.report(
            f"to={','.join(envelope.rcpt_tos)} subject={message['Subject']!r} "
            f"message-id={message['Message-ID']}"
        )
        return "250 Message accepted for delivery"


async def start_mail_sink(
    host: str, port: int, report: Callable[[str], None]
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SMTP(_Report(report)), host, port)
