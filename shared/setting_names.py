"""Every setting's name, in one place, and the warning for a variable that looks like one.

A misspelt name (``WORKER_CONCURENCY``) is otherwise ignored in silence and the process runs
on the default. tests/test_settings_typos.py checks this list against docs/settings.md's
table and against the names the code reads, so it cannot drift: a new setting is one line
here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

# Every environment variable the project's processes and commands read, one a line.
SETTINGS = (
    "RABBITMQ_URL",
    "BROKER_PREFIX",
    "RETRY_DELAYS_S",
    "DELIVERY_LIMIT",
    "PUBLISH_TIMEOUT_S",
    "DATABASE_URL",
    "STRIPE_WEBHOOK_SECRETS",
    "STRIPE_WEBHOOK_TOLERANCE_S",
    "STRIPE_API_KEY",
    "STRIPE_API_BASE",
    "STRIPE_TIMEOUT_S",
    "SMTP_URL",
    "MAIL_FROM",
    "SMTP_TIMEOUT_S",
    "SMTP_CONNECT_TIMEOUT_S",
    "SMTP_DATA_TIMEOUT_S",
    "SMTP_COOLDOWN_S",
    "INGRESS_HOST",
    "INGRESS_PORT",
    "INGRESS_MAX_BODY_BYTES",
    "INGRESS_READ_TIMEOUT_S",
    "INGRESS_MAX_BUFFERED_BYTES",
    "INGRESS_RETRY_AFTER_S",
    "WORKER_CONCURRENCY",
    "WORKER_GRACE_S",
    "WORKER_QUICK_RETRIES",
    "STRIPE_NOT_FOUND_RETRIES",
    "WORKER_METRICS_HOST",
    "WORKER_METRICS_PORT",
    "WORKER_ID",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "EVENT_LOOP",
    "CHECKOUT_PRICE",
    "CHECKOUT_CUSTOMER",
    "CHECKOUT_QUANTITY",
    "PUBLIC_URL",
    "STANDIN_PORT",
    "RABBITMQ_MANAGEMENT_URL",
    "NO_COLOR",
    "CHECKOUT_LINK_SECRET",
    "CHECKOUT_CREATE_PER_MIN",
    "CHECKOUT_CREATE_BURST",
    "CHECKOUT_LOOKUP_PER_MIN",
    "CHECKOUT_LOOKUP_BURST",
    "FORWARDED_ALLOW_IPS",
    "SMTP_ALLOW_PLAINTEXT_AUTH",
    "INGRESS_METRICS_HOST",
    "INGRESS_METRICS_PORT",
    "RECONCILE_INTERVAL_S",
    "RECONCILE_GRACE_S",
    "RECONCILE_OVERLAP_S",
)

# Set by `fulfillment up` for its children, so that they do not warn about what it did.
CHECKED_MARK = "_FULFILLMENT_SETTINGS_CHECKED"

# A variable starting with one of these is meant for us, or is a typo of ours.
PREFIXES = (
    "STRIPE_", "RABBITMQ_", "BROKER_", "RETRY_", "DELIVERY_", "PUBLISH_", "DATABASE_",
    "SMTP_", "MAIL_", "INGRESS_", "WORKER_", "LOG_", "EVENT_LOOP", "CHECKOUT_", "PUBLIC_",
    "STANDIN_", "FORWARDED_", "RECONCILE_",
)  # fmt: skip

# Names with our prefixes that belong to other programs a machine may have set them for:
# the RabbitMQ server's own environment, the Stripe CLI's, and what compose.yaml itself
# reads (from .env or the shell: the ports and passwords of the containers).
FOREIGN = frozenset(
    {
        "INGRESS_BIND", "INGRESS_HOST_PORT", "MAILPIT_UI_PORT", "RABBITMQ_PASSWORD",
        "RABBITMQ_UI_PORT", "RABBITMQ_METRICS_PORT",
        "RABBITMQ_NODENAME", "RABBITMQ_NODE_IP_ADDRESS", "RABBITMQ_NODE_PORT",
        "RABBITMQ_DIST_PORT", "RABBITMQ_USE_LONGNAME", "RABBITMQ_BASE", "RABBITMQ_HOME",
        "RABBITMQ_CONF_ENV_FILE", "RABBITMQ_CONFIG_FILE", "RABBITMQ_CONFIG_FILES",
        "RABBITMQ_ADVANCED_CONFIG_FILE", "RABBITMQ_MNESIA_BASE", "RABBITMQ_MNESIA_DIR",
        "RABBITMQ_PLUGINS_DIR", "RABBITMQ_ENABLED_PLUGINS_FILE", "RABBITMQ_PID_FILE",
        "RABBITMQ_LOG_BASE", "RABBITMQ_LOGS", "RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS",
        "RABBITMQ_DEFAULT_VHOST", "RABBITMQ_ERLANG_COOKIE", "RABBITMQ_SERVER_ERL_ARGS",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "RABBITMQ_CTL_ERL_ARGS",
        "STRIPE_DEVICE_NAME", "STRIPE_CLI_TELEMETRY_OPTOUT",
    }
)  # fmt: skip

# Names people bring from Stripe's samples and other projects, and what ours is.
MEANT = {
    "STRIPE_WEBHOOK_SECRET": "STRIPE_WEBHOOK_SECRETS (plural: one or more whsec_… secrets, "
    "comma-separated)",
    "STRIPE_ENDPOINT_SECRET": "STRIPE_WEBHOOK_SECRETS",
    "STRIPE_SIGNING_SECRET": "STRIPE_WEBHOOK_SECRETS",
    "STRIPE_SECRET_KEY": "STRIPE_API_KEY",
    "BROKER_URL": "RABBITMQ_URL",
    "AMQP_URL": "RABBITMQ_URL",
}

# What a URL setting holds, which other projects spread over several variables.
URL_PARTS = ("HOST", "PORT", "USER", "USERNAME", "PASS", "PASSWORD", "VHOST", "NAME")

# How alike a name must be to one of ours to be taken for a typo of it (difflib's ratio):
# WORKER_CONCURENCY scores 0.97 against WORKER_CONCURRENCY, RABBIT_URL 0.91 against
# RABBITMQ_URL; unrelated names of a shell's environment stay below.
CLOSE = 0.85


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """One sentence for each variable that looks meant for us but is no setting of ours."""
    notes = []
    known = set(SETTINGS)
    for name in sorted(env):
        if name in known or name in FOREIGN or name == CHECKED_MARK:
            continue
        if name in MEANT:
            notes.append(f"{name} is not a setting; did you mean {MEANT[name]}?")
            continue
        family, _, part = name.rpartition("_")
        if part in URL_PARTS and f"{family}_URL" in known:
            notes.append(
                f"{name} is not a setting; did you mean {family}_URL? "
                "(one URL holds host, port, user, password and the rest)"
            )
            continue
        close = difflib.get_close_matches(name.upper(), SETTINGS, n=1, cutoff=CLOSE)
        if close:
            notes.append(f"{name} is not a setting; did you mean {close[0]}?")
        elif name.startswith(PREFIXES):
            notes.append(f"{name} is not a setting of ours (docs/settings.md lists them all)")
    return notes
