"""Ingress settings, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ingress.clients import parse_trusted
from shared.errors import ConfigError
from shared.settings import (
    BrokerSettings,
    Env,
    default_of,
    env_float,
    env_int,
    env_list,
    env_port,
    env_str,
)

# A day: a signature older than that is no delivery attempt of Stripe's (each is signed
# anew), and a wider window only lets older captured requests in.
MAX_TOLERANCE_S = 86_400


@dataclass(frozen=True)
class IngressSettings:
    """What the Stripe-facing HTTP ingress needs."""

    webhook_secrets: tuple[str, ...] = field(repr=False)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    host: str = "0.0.0.0"
    port: int = 8080
    tolerance_s: int = 300
    max_body_bytes: int = 1024 * 1024
    retry_after_s: int = 10
    read_timeout_s: float = 10.0
    # request body bytes this process holds at once beyond each body's first 64 KiB: a bound
    # on its memory that many slow uploads cannot pass (ingress/guards.py BodyBudget)
    max_buffered_bytes: int = 64 * 1024 * 1024
    # /metrics on a port of its own, kept off the public one
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    # the proxies whose X-Forwarded-For names the client (ingress/clients.py); "*": any
    forwarded_allow_ips: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Env | None = None) -> IngressSettings:
        env = os.environ if env is None else env
        secrets = env_list(env, "STRIPE_WEBHOOK_SECRETS")
        if not secrets:
            raise ConfigError(
                "STRIPE_WEBHOOK_SECRETS is not set: give the endpoint's signing secret(s), "
                "comma-separated (whsec_…; `stripe listen` prints one)"
            )
        bad = [s for s in secrets if not s.startswith("whsec_") or s == "whsec_"]
        if bad:
            raise ConfigError(
                "STRIPE_WEBHOOK_SECRETS entries must start with whsec_ and go on after it"
            )
        tolerance_s = env_int(
            env,
            "STRIPE_WEBHOOK_TOLERANCE_S",
            default_of(cls, "tolerance_s"),
            minimum=0,
            maximum=MAX_TOLERANCE_S,
        )
        if tolerance_s == 0:
            raise ConfigError(
                "STRIPE_WEBHOOK_TOLERANCE_S must be positive: 0 would disable the replay check"
            )
        max_body_bytes = env_int(
            env, "INGRESS_MAX_BODY_BYTES", default_of(cls, "max_body_bytes"), minimum=1024
        )
        max_buffered_bytes = env_int(
            env,
            "INGRESS_MAX_BUFFERED_BYTES",
            # at least one whole body, by default too
            max(default_of(cls, "max_buffered_bytes"), max_body_bytes),
            minimum=max_body_bytes,
        )
        forwarded = env_list(env, "FORWARDED_ALLOW_IPS")
        try:
            parse_trusted(forwarded)
        except ValueError as exc:
            raise ConfigError(
                f"FORWARDED_ALLOW_IPS must list IP addresses or CIDR blocks (or *): {exc}"
            ) from None
        return cls(
            webhook_secrets=secrets,
            broker=BrokerSettings.from_env(env),
            host=env_str(env, "INGRESS_HOST", default_of(cls, "host")),
            port=env_port(env, "INGRESS_PORT", default_of(cls, "port")),
            tolerance_s=tolerance_s,
            max_body_bytes=max_body_bytes,
            max_buffered_bytes=max_buffered_bytes,
            retry_after_s=env_int(
                env, "INGRESS_RETRY_AFTER_S", default_of(cls, "retry_after_s"), minimum=1
            ),
            read_timeout_s=env_float(
                env, "INGRESS_READ_TIMEOUT_S", default_of(cls, "read_timeout_s"), minimum=0.1
            ),
            metrics_host=env_str(env, "INGRESS_METRICS_HOST", default_of(cls, "metrics_host")),
            metrics_port=env_port(env, "INGRESS_METRICS_PORT", default_of(cls, "metrics_port")),
            forwarded_allow_ips=forwarded,
        )
