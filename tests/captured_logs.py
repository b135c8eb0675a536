"""The log lines of in-process services, as their processes write them (JSON), for a test
to read: the ``logs`` fixture (import it into the test module).

configure_logging binds the stream it is given when called, so the fixture hands it a
buffer of its own; structlog's logger cache is turned off meanwhile, so that loggers first
used here do not keep writing to the buffer after the test.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from shared.logging import configure_logging
from shared.settings import LogSettings

_QUIETED = ("aiormq", "aio_pika", "aiohttp.access", "stripe", "mail.log")


class Logs:
    """What was logged since the fixture started."""

    def __init__(self, buffer: io.StringIO) -> None:
        self._buffer = buffer

    @property
    def text(self) -> str:
        return self._buffer.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.text.splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                found.append({"event": line, "unparsed": True})
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        """The lines whose message starts with ``event``."""
        return [line for line in self.lines() if str(line.get("event", "")).startswith(event)]

    def assert_no_traceback(self) -> None:
        """No line carries a traceback (structlog's ``exception`` key, or one printed)."""
        with_traceback = [
            line for line in self.lines() if "exception" in line or "Traceback" in str(line)
        ]
        assert not with_traceback, with_traceback[:3]


@pytest.fixture
def logs() -> Iterator[Logs]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in _QUIETED}
    buffer = io.StringIO()
    stderr, sys.stderr = sys.stderr, buffer  # type: ignore[assignment]
    try:
        configure_logging("worker", LogSettings(format="json"))
    finally:
        sys.stderr = stderr
    structlog.configure(cache_logger_on_first_use=False)
    yield Logs(buffer)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
