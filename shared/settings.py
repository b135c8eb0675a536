"""Settings from the environment: parsed once at start, frozen, each bad value named.

Each component has its own frozen dataclass with a ``from_env()`` constructor; what
more than one component needs (the broker) lives here, the rest beside its component.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from shared.errors import ConfigError

Env = Mapping[str, str]

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_RETRY_DELAYS_S = (10.0, 60.0, 600.0, 3600.0, 21600.0)


def default_of(cls: type[Any], name: str) -> Any:
    """The default a settings dataclass declares for its field ``name``: the one place
    each default is written, which ``from_env`` falls back to when the variable is unset."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            break
    raise TypeError(f"{cls.__name__}.{name} has no default")


def _raw(env: Env, name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(env: Env, name: str, default: str) -> str:
    """A string setting; blank counts as unset."""
    return _raw(env, name) or default


def env_int(
    env: Env, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer setting, optionally bounded."""
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


MAX_PORT = 65535


def env_port(env: Env, name: str, default: int) -> int:
    """A TCP port to listen on: 0 (any free port) to 65535."""
    return env_int(env, name, default, minimum=0, maximum=MAX_PORT)


def listen_error(
    name: str, host: str, port: int, exc: OSError, *, host_setting: str | None = None
) -> ConfigError:
    """A port setting we cannot listen on, as the one-line reason a bad setting gets; the
    host's setting (``host_setting``) is named instead when the host is what is wrong."""
    if host_setting and isinstance(exc, socket.gaierror):
        name = host_setting  # not an address, nor a name that resolves
    elif host_setting and exc.errno == errno.EADDRNOTAVAIL:
        name = host_setting  # an address, but none of this machine's
    # an errno's own text (asyncio's repeats the address); a name lookup's (errno < 0) as is
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
    return ConfigError(f"{name}: cannot listen on {host}:{port}: {reason}")


def env_float(env: Env, name: str, default: float, *, minimum: float | None = None) -> float:
    """A number setting (seconds, usually), optionally bounded below (exclusive of 0 if 0)."""
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {value:g}")
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_bool(env: Env, name: str, default: bool) -> bool:
    """A yes-or-no setting: true/false, yes/no, on/off or 1/0, in any case."""
    raw = _raw(env, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def env_list(env: Env, name: str) -> tuple[str, ...]:
    """A comma-separated list; empty items are dropped."""
    raw = _raw(env, name)
    if raw is None:
        return ()
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def env_url(env: Env, name: str, default: str, *, schemes: tuple[str, ...]) -> str:
    """A URL setting whose scheme must be one of ``schemes``; the value is never echoed raw."""
    value = env_str(env, name, default)
    # no article: "a amqp://", "a http://" read wrong, and which one fits depends on the scheme
    wanted = " or ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port (e.g. a password with '/')
    except ValueError:
        raise ConfigError(
            f"{name} is not a valid URL (percent-encode special characters in the user name "
            "or password)"
        ) from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(
            f"{name} must be a URL starting {wanted} with a host, got {redact_url(value)!r}"
        )
    return value


# Query parameters that carry a password or a secret in the URLs we are given (libpq and
# asyncpg take password and sslpassword; the rest are the usual spellings elsewhere).
SECRET_QUERY_PARAMS = frozenset(
    {"password", "sslpassword", "passwd", "pass", "pwd", "secret", "token", "access_token",
     "api_key", "apikey", "client_secret"}
)  # fmt: skip


def redact_url(url: str) -> str:
    """The URL with any password replaced (``user:***@``, ``?password=***``), for logs,
    error messages and command output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if "://" not in url:
        # no scheme: urlsplit finds no netloc, so it cannot tell where a password is
        return "<URL without scheme>" if "@" in url or "=" in url else url
    if parts.query:
        parts = parts._replace(query=_redact_query(parts.query))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    return parts.geturl()


def _redact_query(query: str) -> str:
    """The query with the value of every secret parameter replaced; the rest as it was."""
    pieces = []
    for piece in query.split("&"):
        name, equals, _ = piece.partition("=")
        if equals and unquote_plus(name).strip().lower() in SECRET_QUERY_PARAMS:
            piece = f"{name}=***"
        pieces.append(piece)
    return "&".join(pieces)


def _delays(env: Env, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env_list(env, name)
    if not raw:
        return default
    delays: list[float] = []
    for item in raw:
        try:
            delay = float(item)
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated seconds, got {item!r}") from None
        if not 0 < delay <= 7 * 86400:
            raise ConfigError(f"{name} delays must be in (0, 604800] seconds, got {item!r}")
        delays.append(delay)
    return tuple(delays)


# Room for the longest name made from the prefix (AMQP names are at most 255 bytes).
MAX_PREFIX_BYTES = 200


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how every component names and uses it."""

    url: str = field(default=DEFAULT_RABBITMQ_URL, repr=False)
    prefix: str = ""
    publish_timeout_s: float = 5.0
    retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    delivery_limit: int = 10

    @classmethod
    def from_env(cls, env: Env | None = None) -> BrokerSettings:
        env = os.environ if env is None else env
        prefix = env_str(env, "BROKER_PREFIX", default_of(cls, "prefix"))
        if any(c.isspace() for c in prefix) or "#" in prefix or "*" in prefix:
            raise ConfigError(f"BROKER_PREFIX must not hold spaces, '#' or '*', got {prefix!r}")
        if len(prefix.encode()) > MAX_PREFIX_BYTES:
            raise ConfigError(
                f"BROKER_PREFIX must be at most {MAX_PREFIX_BYTES} bytes (the names made from "
                f"it are at most 255), got {len(prefix.encode())}"
            )
        return cls(
            url=env_url(env, "RABBITMQ_URL", default_of(cls, "url"), schemes=("amqp", "amqps")),
            prefix=prefix,
            publish_timeout_s=env_float(
                env, "PUBLISH_TIMEOUT_S", default_of(cls, "publish_timeout_s"), minimum=0.01
            ),
            retry_delays_s=_delays(env, "RETRY_DELAYS_S", default_of(cls, "retry_delays_s")),
            delivery_limit=env_int(
                env, "DELIVERY_LIMIT", default_of(cls, "delivery_limit"), minimum=1
            ),
        )

    @property
    def display_url(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class LogSettings:
    """How logs are written: level and format (``auto`` = readable on a terminal, else JSON)."""

    level: str = "INFO"
    format: str = "auto"

    @classmethod
    def from_env(cls, env: Env | None = None) -> LogSettings:
        env = os.environ if env is None else env
        level = env_str(env, "LOG_LEVEL", default_of(cls, "level")).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        fmt = env_str(env, "LOG_FORMAT", default_of(cls, "format")).lower()
        if fmt not in ("auto", "json", "console"):
            raise ConfigError(f"LOG_FORMAT must be auto, json or console, got {fmt!r}")
        return cls(level=level, format=fmt)
