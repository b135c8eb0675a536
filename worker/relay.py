"""The mail relay as a worker meets it: a timeout per stage, sends in doubt, a breaker.

* :class:`RelayClient` is aiosmtplib's client waiting for the reply to the message's end as
  long as RFC 5321 allows (SMTP_DATA_TIMEOUT_S, 10 min), not the command timeout. When that
  reply never comes, or the connection dies after the message's end was sent, the relay may
  have taken it: :class:`EmailInDoubt`, which nothing retries in process (the delay queue
  decides; the repeat has the same Message-ID).
* :class:`RelayBreaker`: once the relay failed to take a connection or to greet in time,
  every email of this process is deferred at once (:class:`RelayUnavailable`) for
  SMTP_COOLDOWN_S, rather than each worker slot waiting out the same timeout; then one
  connection is tried while the others wait for its outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import Default, SMTPStatus

from shared.errors import RetryLater
from shared.logging import get_logger
from worker import metrics

log = get_logger(__name__)

T = TypeVar("T")


class EmailInDoubt(RetryLater):
    """Raised when the whole message went to the relay and its answer did not come (no reply
    in time, or the connection lost): it may have been taken. Never sent again in process."""


class RelayUnavailable(RetryLater):
    """Raised when the relay does not take a connection or greet in time, or did so a moment
    ago (the breaker is open): the email waits in a delay queue, freeing the worker's slot."""


class RelayClient(aiosmtplib.SMTP):
    """aiosmtplib's client, with the reply to the message's end waited for ``data_timeout``
    seconds (the command timeout, ``timeout``, still bounds the reply to DATA itself)."""

    def __init__(self, *, data_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_timeout = data_timeout

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,
    ) -> SMTPResponse:
        start = await self.execute_command(b"DATA", timeout=timeout)
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        content = message.encode("ascii") if isinstance(message, str) else message
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        # as aiosmtplib sends it: CRLF line endings, leading dots doubled, then the end mark
        protocol.write(PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n")
        try:
            response = await protocol.read_response(timeout=self.data_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            self.close()
            why = (
                f"no reply within {self.data_timeout:g}s"
                if isinstance(exc, aiosmtplib.SMTPTimeoutError)
                else f"connection lost ({type(exc).__name__})"
            )
            raise EmailInDoubt(
                f"SMTP: the relay got the whole message but its answer did not come ({why}); "
                "it may have taken it"
            ) from None
        if response.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response


def unresponsive(exc: BaseException) -> bool:
    """Whether a failure to set a connection up means the relay is not answering (nothing
    taken, a timeout, a connection cut), as opposed to an answer (a refusal, AUTH failed)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return False
    return isinstance(
        exc,
        (
            aiosmtplib.SMTPConnectError,
            aiosmtplib.SMTPTimeoutError,
            aiosmtplib.SMTPServerDisconnected,
            OSError,
            TimeoutError,
        ),
    )


class RelayBreaker:
    """Per process: after the relay failed to take a connection or greet, connections are
    not tried for ``cooldown_s``; then one is (the probe), and the others wait for it."""

    def __init__(self, where: str, cooldown_s: float) -> None:
        self.where = where
        self.cooldown_s = cooldown_s
        self._open_until: float | None = None  # None: closed, connections are tried
        self._why = ""
        self._probe: asyncio.Future[bool] | None = None

    @property
    def open(self) -> bool:
        return self._open_until is not None

    async def connect(self, open_connection: Callable[[], Awaitable[T]]) -> T:
        """``open_connection()`` unless the breaker is open (RelayUnavailable at once); a
        failure to reach the relay opens it, and is raised as RelayUnavailable."""
        probe = await self._admit()
        try:
            connection = await open_connection()
        except Exception as exc:
            if not unresponsive(exc):
                self._answered()  # a refusal or an error of ours: the relay is there
                raise
            self._failed(exc)
            raise RelayUnavailable(
                f"SMTP relay {self.where} not answering ({type(exc).__name__}: "
                f"{str(exc) or 'no answer in time'}); emails deferred"
            ) from None
        except BaseException:
            if probe:
                self._settle(False)  # cancelled: the next caller probes
            raise
        self._answered()
        return connection

    async def _admit(self) -> bool:
        """Whether this caller is the probe; RelayUnavailable while the breaker is open."""
        while self._open_until is not None:
            if self._probe is not None:
                if not await asyncio.shield(self._probe):
                    raise self._refusal()
                continue
            if time.monotonic() < self._open_until:
                raise self._refusal()
            self._probe = asyncio.get_running_loop().create_future()
            return True
        return False

    def _refusal(self) -> RelayUnavailable:
        return RelayUnavailable(
            f"SMTP relay {self.where} not answering ({self._why}); not tried again for up "
            f"to {self.cooldown_s:g}s"
        )

    def _failed(self, exc: BaseException) -> None:
        if self._open_until is None:
            log.warning(
                "mail relay not answering; emails deferred to the delay queues, one "
                "connection tried again every cooldown",
                relay=self.where,
                error=f"{type(exc).__name__}: {str(exc) or 'no answer in time'}",
                cooldown_s=self.cooldown_s,
            )
            metrics.SMTP_RELAY_DOWN.set(1)
        self._why = f"{type(exc).__name__}: {str(exc) or 'no answer in time'}"
        self._open_until = time.monotonic() + self.cooldown_s
        self._settle(False)

    def _answered(self) -> None:
        if self._open_until is not None:
            log.info("mail relay answering again", relay=self.where)
            metrics.SMTP_RELAY_DOWN.set(0)
        self._open_until = None
        self._settle(True)

    def _settle(self, ok: bool) -> None:
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.set_result(ok)
