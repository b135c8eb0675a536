"""structlog, set up once per process: JSON off a terminal, readable on one, secrets masked."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from shared.settings import SECRET_QUERY_PARAMS, LogSettings

# Stripe secret keys, restricted keys and webhook secrets; passwords in URLs, as user:pass@
# and as a query parameter (?password=…, &sslpassword=…; the names redact_url masks), and
# the same in a libpq key=value string (password=… ).
_SECRET_PARAM = "|".join(sorted(SECRET_QUERY_PARAMS, key=len, reverse=True))
_SECRET_PATTERNS = re.compile(
    r"(?:whsec|sk_live|sk_test|rk_live|rk_test)_[A-Za-z0-9]+"
    r"|(?<=://)([^:/@\s]*):[^@/\s]+(?=@)"
    rf"|(?i:(?<![\w-])(?:{_SECRET_PARAM})=)(?!\*\*\*)[^&\s#'\",;)]+"
)
_known_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Mask these exact values in every later log line (for secrets of no known shape)."""
    _known_secrets.update(v for v in values if len(v) >= 6)


def mask_secrets(text: str) -> str:
    """The text with every known or recognisable secret replaced by ``***``."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return _SECRET_PATTERNS.sub(_masked, text)


def _masked(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return f"{match.group(1)}:***"  # user:password@ keeps the user
    name, equals, _ = match.group().partition("=")
    return f"{name}=***" if equals else "***"


def _mask(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, BaseException):
        return mask_secrets(f"{type(value).__name__}: {value}")
    if isinstance(value, bytes | bytearray):
        return mask_secrets(value.decode("utf-8", "replace"))
    if depth < 8:
        if isinstance(value, dict):
            return {k: _mask(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [_mask(v, depth + 1) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return mask_secrets(repr(value))


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = _mask(value)
    return event_dict


def configure_logging(component: str, settings: LogSettings | None = None) -> None:
    """Route structlog and stdlib logging to stderr with timestamp, level and component."""
    settings = settings or LogSettings.from_env()
    console = settings.format == "console" or (settings.format == "auto" and sys.stderr.isatty())
    level = getattr(logging, settings.level)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)

    # Libraries log through stdlib logging: render their lines the same way.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                *shared[:1],
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(allow=("remote", "error", "similar_not_logged")),
                *shared[1:],
                _bind_component(component),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq/aio-pika are chatty about reconnects at INFO; our own lines say what matters.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # stripe-python logs every request at INFO; aiosmtpd (the dev mail sink) every command
    logging.getLogger("stripe").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)


class LogSampler:
    """At most one line per key per interval; the next admitted line says how many similar
    ones were left out. The metrics count every event; the log shows what and how many."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None to leave this one out, else how many were left out since the last line."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._left_out.pop(key, 0)


def _bind_component(component: str) -> Any:
    def bind(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("component", component)
        return event_dict

    return bind


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``component`` is already bound by configure_logging."""
    return structlog.get_logger(name)
