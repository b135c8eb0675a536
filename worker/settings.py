"""Worker settings, from the environment."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from email.utils import parseaddr
from urllib.parse import unquote, urlsplit

from shared.errors import ConfigError
from shared.settings import (
    BrokerSettings,
    Env,
    default_of,
    env_bool,
    env_float,
    env_int,
    env_port,
    env_str,
    env_url,
)
from shared.stripe_client import StripeSettings

DEFAULT_DATABASE_URL = "postgresql://localhost/fulfillment"
DEFAULT_SMTP_URL = "smtp://localhost:1025"


@dataclass(frozen=True)
class SmtpSettings:
    """Mail relay: ``smtp://[user:pass@]host:port`` (STARTTLS if offered, and required
    with credentials) or ``smtps://``."""

    host: str = "localhost"
    port: int = 1025
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    use_tls: bool = False
    # Per stage, as MTAs wait (RFC 5321 4.5.3.2): connecting, the greeting, EHLO, STARTTLS
    # and AUTH; each reply to MAIL, RCPT and DATA; the reply to the message's end (10 min).
    connect_timeout_s: float = 10.0
    timeout_s: float = 10.0
    data_timeout_s: float = 600.0
    # after the relay failed to take a connection or greet: how long emails are deferred at
    # once, without trying, before one connection is tried again
    cooldown_s: float = 5.0
    sender: str = "Orders <orders@localhost>"
    # credentials over a connection without TLS: only for a relay on this host
    allow_plaintext_auth: bool = False
    # what we say in EHLO; aiosmtplib would otherwise resolve our FQDN on every connection
    local_hostname: str = field(default_factory=socket.gethostname)

    @classmethod
    def from_env(cls, env: Env) -> SmtpSettings:
        url = env_url(env, "SMTP_URL", DEFAULT_SMTP_URL, schemes=("smtp", "smtps"))
        parts = urlsplit(url)
        try:
            port = parts.port or (465 if parts.scheme == "smtps" else 25)
        except ValueError:
            raise ConfigError("SMTP_URL has an invalid port") from None
        sender = env_str(env, "MAIL_FROM", default_of(cls, "sender"))
        address = parseaddr(sender)[1]
        if "@" not in address:
            raise ConfigError(f"MAIL_FROM must be an email address, got {sender!r}")
        if not address.isascii():
            # it goes into every From header and MAIL FROM: an internationalized domain in
            # its ASCII form (xn--…) reaches every relay; a UTF-8 one needs SMTPUTF8 on each
            raise ConfigError(
                "MAIL_FROM's address must be ASCII (write an internationalized domain in its "
                f"xn-- form), got {sender!r}"
            )
        return cls(
            host=parts.hostname or "localhost",
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=parts.scheme == "smtps",
            connect_timeout_s=env_float(
                env, "SMTP_CONNECT_TIMEOUT_S", default_of(cls, "connect_timeout_s"), minimum=0.1
            ),
            timeout_s=env_float(env, "SMTP_TIMEOUT_S", default_of(cls, "timeout_s"), minimum=0.1),
            data_timeout_s=env_float(
                env, "SMTP_DATA_TIMEOUT_S", default_of(cls, "data_timeout_s"), minimum=0.1
            ),
            cooldown_s=env_float(env, "SMTP_COOLDOWN_S", default_of(cls, "cooldown_s"), minimum=0),
            sender=sender,
            allow_plaintext_auth=env_bool(
                env, "SMTP_ALLOW_PLAINTEXT_AUTH", default_of(cls, "allow_plaintext_auth")
            ),
        )

    @property
    def credentials(self) -> bool:
        return self.username is not None or self.password is not None


@dataclass(frozen=True)
class WorkerSettings:
    """What a fulfillment worker needs."""

    stripe: StripeSettings
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    concurrency: int = 32
    metrics_port: int = 9100
    metrics_host: str = "0.0.0.0"
    grace_s: float = 30.0
    quick_retries: int = 3
    # delay queues a session Stripe answers 404 for goes through before its dead letter
    stripe_not_found_retries: int = 2
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    )

    @classmethod
    def from_env(cls, env: Env | None = None, *, concurrency: int | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        return cls(
            stripe=StripeSettings.from_env(env),
            broker=BrokerSettings.from_env(env),
            database_url=database_url_from_env(env),
            smtp=SmtpSettings.from_env(env),
            concurrency=concurrency
            or env_int(env, "WORKER_CONCURRENCY", default_of(cls, "concurrency"), minimum=1),
            metrics_port=env_port(env, "WORKER_METRICS_PORT", default_of(cls, "metrics_port")),
            metrics_host=env_str(env, "WORKER_METRICS_HOST", default_of(cls, "metrics_host")),
            grace_s=env_float(env, "WORKER_GRACE_S", default_of(cls, "grace_s"), minimum=0),
            quick_retries=env_int(
                env, "WORKER_QUICK_RETRIES", default_of(cls, "quick_retries"), minimum=1
            ),
            stripe_not_found_retries=env_int(
                env,
                "STRIPE_NOT_FOUND_RETRIES",
                default_of(cls, "stripe_not_found_retries"),
                minimum=0,
            ),
            worker_id=env_str(env, "WORKER_ID", "") or default_of(cls, "worker_id"),
        )


def database_url_from_env(env: Env) -> str:
    return env_url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, schemes=("postgresql", "postgres"))
