"""What every aiohttp server of ours (the ingress, the worker's /metrics) sets up alike."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

from shared.logging import LogSampler


def quiet_unparseable_requests() -> None:
    """Log a request aiohttp cannot parse as one sampled WARNING line; call before serving.

    Installed once per process however often it is called."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _UnparseableRequests) for f in server_log.filters):
        server_log.addFilter(_UnparseableRequests())


# One line per second per kind of unparseable request (a scanner's flood), like rejections.
_UNPARSEABLE_LOGGED = LogSampler(interval_s=1.0)


class _UnparseableRequests(logging.Filter):
    """A request aiohttp cannot parse (garbage, a bad header line, a broken chunk) is the
    client's fault, but aiohttp logs it at ERROR with a traceback: under a flood of junk
    that buries real errors and costs log volume. It becomes one WARNING line without the
    traceback; a handler's own crash (also logged by aiohttp.server) stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            left_out = _UNPARSEABLE_LOGGED.admit(type(exc).__name__)
            if left_out is None:
                return False
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "malformed HTTP request refused", ()
            record.exc_info, record.exc_text = None, None
            error = f"{type(exc).__name__}: {exc.message}"[:300]
            record.__dict__.update(remote=remote, error=error, similar_not_logged=left_out or None)
        return True
