"""Settings from the environment: defaults, parsing, and every bad value named, never a secret."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path

import pytest

from fulfillment.reconcile import ReconcileSettings
from ingress.checkout import CheckoutSettings
from ingress.settings import IngressSettings
from shared.errors import ConfigError
from shared.settings import (
    DEFAULT_RABBITMQ_URL,
    DEFAULT_RETRY_DELAYS_S,
    BrokerSettings,
    LogSettings,
    default_of,
)
from shared.stripe_client import StripeSettings
from worker.settings import SmtpSettings, WorkerSettings

SECRET = "whsec_" + "a1b2c3d4" * 4
OTHER_SECRET = "whsec_" + "e5f6a7b8" * 4
PASSWORD = "hunter2-very-secret"


def ingress_env(**extra: str) -> dict[str, str]:
    return {"STRIPE_WEBHOOK_SECRETS": SECRET, **extra}


# --- defaults ---------------------------------------------------------------------------------


def test_broker_settings_fall_back_to_their_defaults_when_nothing_is_set() -> None:
    settings = BrokerSettings.from_env({})

    assert settings == BrokerSettings()
    assert settings.url == DEFAULT_RABBITMQ_URL
    assert settings.prefix == ""
    assert settings.publish_timeout_s == 5.0
    assert settings.retry_delays_s == DEFAULT_RETRY_DELAYS_S
    assert settings.delivery_limit == 10


def test_blank_values_count_as_unset() -> None:
    blank = {
        "RABBITMQ_URL": "  ",
        "BROKER_PREFIX": "",
        "PUBLISH_TIMEOUT_S": " ",
        "RETRY_DELAYS_S": "",
        "DELIVERY_LIMIT": "\t",
        "LOG_LEVEL": "",
        "LOG_FORMAT": " ",
    }

    assert BrokerSettings.from_env(blank) == BrokerSettings()
    assert LogSettings.from_env(blank) == LogSettings()


def test_log_settings_default_to_info_and_auto_format() -> None:
    assert LogSettings.from_env({}) == LogSettings(level="INFO", format="auto")


def test_ingress_settings_need_only_the_webhook_secret_and_default_the_rest() -> None:
    settings = IngressSettings.from_env(ingress_env())

    assert settings.webhook_secrets == (SECRET,)
    assert settings.broker == BrokerSettings()
    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert settings.tolerance_s == 300
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.retry_after_s == 10
    assert settings.read_timeout_s == 10.0


def test_the_default_body_budget_holds_at_least_one_whole_body_of_the_configured_limit() -> None:
    # 64 MiB by default; a body limit raised above that raises the budget with it, or every
    # body over 64 MiB would be refused 503 "overloaded" with nothing else in flight
    mib = 1024 * 1024
    assert IngressSettings.from_env(ingress_env()).max_buffered_bytes == 64 * mib
    small = IngressSettings.from_env(ingress_env(INGRESS_MAX_BODY_BYTES=str(2 * mib)))
    assert small.max_buffered_bytes == 64 * mib
    big = IngressSettings.from_env(ingress_env(INGRESS_MAX_BODY_BYTES=str(100 * mib)))
    assert big.max_buffered_bytes == 100 * mib
    chosen = ingress_env(
        INGRESS_MAX_BODY_BYTES=str(100 * mib), INGRESS_MAX_BUFFERED_BYTES=str(300 * mib)
    )
    assert IngressSettings.from_env(chosen).max_buffered_bytes == 300 * mib


def test_with_nothing_set_every_component_gets_exactly_the_defaults_its_class_declares() -> None:
    # from_env falls back to default_of(...), so the defaults are written once: a dataclass
    # built in code (tests, tools) and one read from an empty environment cannot differ
    stripe = StripeSettings(api_key="sk_test_x")
    worker = WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x"})

    assert StripeSettings.from_env({"STRIPE_API_KEY": "sk_test_x"}) == stripe
    assert SmtpSettings.from_env({}) == SmtpSettings()
    assert SmtpSettings().sender == "Orders <orders@localhost>"
    assert worker == dataclasses.replace(WorkerSettings(stripe=stripe), worker_id=worker.worker_id)
    assert IngressSettings.from_env(ingress_env()) == IngressSettings(webhook_secrets=(SECRET,))
    assert CheckoutSettings.from_env(
        {"STRIPE_API_KEY": "sk_test_x", "CHECKOUT_PRICE": "price_1"}
    ) == CheckoutSettings(stripe=stripe, price="price_1")


def test_each_worker_gets_an_id_of_its_own_when_none_is_set() -> None:
    built = WorkerSettings(stripe=StripeSettings(api_key="sk_test_x")).worker_id
    first, second = (
        WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x"}).worker_id for _ in range(2)
    )

    # several workers of one process (tests, up) or of one pid (containers) are told apart
    assert len({built, first, second}) == 3
    assert first.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    named = WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x", "WORKER_ID": " w-1 "})
    assert named.worker_id == "w-1"


def test_a_field_without_a_default_is_a_programming_error_not_a_silent_none() -> None:
    with pytest.raises(TypeError, match=r"StripeSettings\.api_key has no default"):
        default_of(StripeSettings, "api_key")
    with pytest.raises(TypeError, match="no default"):
        default_of(StripeSettings, "no_such_field")


def _every_setting(env: dict[str, str]) -> tuple[object, ...]:
    """Every settings object the components build from this environment (the worker's
    random id left out)."""
    required = {
        "STRIPE_WEBHOOK_SECRETS": SECRET,
        "STRIPE_API_KEY": "sk_test_x",
        "CHECKOUT_PRICE": "price_1",
        **env,
    }
    worker = WorkerSettings.from_env(required)
    return (
        BrokerSettings.from_env(required),
        LogSettings.from_env(required),
        IngressSettings.from_env(required),
        CheckoutSettings.from_env(required),
        dataclasses.replace(worker, worker_id=""),
        ReconcileSettings.from_env(required),
    )


def test_the_settings_reference_states_the_defaults_the_code_uses() -> None:
    reference = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    stated: dict[str, str] = {}
    rows = re.findall(r"^\| (`[A-Z_]+`(?: / `[A-Z_]+`)*) \| (`[^|]+`) \|", reference, re.M)
    for names, defaults in rows:
        for name, default in zip(names.split(" / "), defaults.split(" / "), strict=True):
            stated[name.strip("`")] = default.strip("`")
    # read outside the settings dataclasses (the event loop, the stand-in `up` starts)
    elsewhere = {"EVENT_LOOP", "STANDIN_PORT"}
    assert len(stated) >= 25

    for name, default in stated.items():
        if name in elsewhere:
            continue
        # setting the variable to what docs/settings.md says it defaults to changes nothing
        assert _every_setting({name: default}) == _every_setting({}), name
        # and the variable is one these settings read (else the line above proves nothing):
        # another value is refused or makes a difference
        try:
            assert _every_setting({name: "x@x"}) != _every_setting({}), name
        except ConfigError as exc:
            assert name in str(exc)


# --- parsing ----------------------------------------------------------------------------------


def test_set_values_are_parsed_into_their_types() -> None:
    settings = BrokerSettings.from_env(
        {
            "RABBITMQ_URL": "amqps://user:pw@rabbit.example:5671/vhost",
            "BROKER_PREFIX": "staging.eu",
            "PUBLISH_TIMEOUT_S": "2.5",
            "RETRY_DELAYS_S": " 1, 30 ,,600.5 ",
            "DELIVERY_LIMIT": "3",
        }
    )

    assert settings.url == "amqps://user:pw@rabbit.example:5671/vhost"
    assert settings.prefix == "staging.eu"
    assert settings.publish_timeout_s == 2.5
    assert settings.retry_delays_s == (1.0, 30.0, 600.5)
    assert settings.delivery_limit == 3


def test_log_level_and_format_are_case_insensitive() -> None:
    assert LogSettings.from_env({"LOG_LEVEL": "debug", "LOG_FORMAT": "JSON"}) == LogSettings(
        level="DEBUG", format="json"
    )


def test_comma_separated_webhook_secrets_are_all_kept_in_order_without_blanks() -> None:
    settings = IngressSettings.from_env({"STRIPE_WEBHOOK_SECRETS": f" {SECRET} ,, {OTHER_SECRET},"})

    assert settings.webhook_secrets == (SECRET, OTHER_SECRET)


def test_ingress_settings_read_the_broker_settings_from_the_same_environment() -> None:
    settings = IngressSettings.from_env(
        ingress_env(BROKER_PREFIX="blue", DELIVERY_LIMIT="4", STRIPE_WEBHOOK_TOLERANCE_S="60")
    )

    assert settings.broker.prefix == "blue"
    assert settings.broker.delivery_limit == 4
    assert settings.tolerance_s == 60


# --- every bad value stops with a ConfigError naming the variable -----------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("DELIVERY_LIMIT", "ten", id="int-not-a-number"),
        pytest.param("DELIVERY_LIMIT", "2.5", id="int-with-a-fraction"),
        pytest.param("DELIVERY_LIMIT", "0", id="int-below-minimum"),
        pytest.param("DELIVERY_LIMIT", "-3", id="int-negative"),
        pytest.param("PUBLISH_TIMEOUT_S", "soon", id="float-not-a-number"),
        pytest.param("PUBLISH_TIMEOUT_S", "nan", id="float-nan"),
        pytest.param("PUBLISH_TIMEOUT_S", "NaN", id="float-NaN"),
        pytest.param("PUBLISH_TIMEOUT_S", "inf", id="float-inf"),
        pytest.param("PUBLISH_TIMEOUT_S", "-1", id="float-negative"),
        pytest.param("PUBLISH_TIMEOUT_S", "0", id="float-zero"),
        pytest.param("RABBITMQ_URL", "http://rabbit:5672/", id="url-http-scheme"),
        pytest.param("RABBITMQ_URL", "rabbit:5672", id="url-no-scheme"),
        pytest.param("RABBITMQ_URL", "amqp:///vhost", id="url-no-host"),
        pytest.param("RETRY_DELAYS_S", "10,soon,60", id="delays-garbage"),
        pytest.param("RETRY_DELAYS_S", "10;60", id="delays-wrong-separator"),
        pytest.param("RETRY_DELAYS_S", "0", id="delays-zero"),
        pytest.param("RETRY_DELAYS_S", "10,0,60", id="delays-zero-among-others"),
        pytest.param("RETRY_DELAYS_S", "-5", id="delays-negative"),
        pytest.param("RETRY_DELAYS_S", "nan", id="delays-nan"),
        pytest.param("RETRY_DELAYS_S", "inf", id="delays-inf"),
        pytest.param("RETRY_DELAYS_S", "604801", id="delays-over-a-week"),
        pytest.param("BROKER_PREFIX", "my prefix", id="prefix-space"),
        pytest.param("BROKER_PREFIX", "a\tb", id="prefix-tab"),
        pytest.param("BROKER_PREFIX", "team#1", id="prefix-hash"),
        pytest.param("BROKER_PREFIX", "team.*", id="prefix-star"),
    ],
)
def test_a_bad_broker_value_stops_with_a_config_error_naming_the_variable(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        BrokerSettings.from_env({name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("LOG_LEVEL", "verbose", id="level-unknown"),
        pytest.param("LOG_LEVEL", "CRITICAL", id="level-not-offered"),
        pytest.param("LOG_LEVEL", "10", id="level-numeric"),
        pytest.param("LOG_FORMAT", "xml", id="format-unknown"),
    ],
)
def test_a_bad_log_value_stops_with_a_config_error_naming_the_variable(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        LogSettings.from_env({name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("STRIPE_WEBHOOK_TOLERANCE_S", "0", id="tolerance-zero"),
        pytest.param("STRIPE_WEBHOOK_TOLERANCE_S", "-1", id="tolerance-negative"),
        pytest.param("STRIPE_WEBHOOK_TOLERANCE_S", "5m", id="tolerance-not-a-number"),
        # as good as no check: a signature from 1970 verified (outside-in trial)
        pytest.param("STRIPE_WEBHOOK_TOLERANCE_S", "99999999999", id="tolerance-over-a-day"),
        pytest.param("STRIPE_WEBHOOK_SECRETS", "whsec_", id="secret-with-nothing-after-whsec_"),
        pytest.param("STRIPE_WEBHOOK_SECRETS", "whsec_a,whsec_", id="one-secret-empty"),
        # names made from it would be over AMQP's 255 bytes: the ingress retried for ever
        pytest.param("BROKER_PREFIX", "p" * 201, id="prefix-too-long-for-queue-names"),
        pytest.param("BROKER_PREFIX", "é" * 101, id="prefix-too-long-in-bytes-not-chars"),
        pytest.param("INGRESS_PORT", "http", id="port-not-a-number"),
        pytest.param("INGRESS_PORT", "-1", id="port-negative"),
        pytest.param("INGRESS_PORT", "65536", id="port-above-65535"),
        pytest.param("INGRESS_PORT", "99999", id="port-far-above-65535"),
        pytest.param("INGRESS_MAX_BODY_BYTES", "100", id="body-limit-below-minimum"),
        # the budget must hold at least one whole body, or big webhooks could never pass
        pytest.param("INGRESS_MAX_BUFFERED_BYTES", "2048", id="budget-below-one-body"),
        pytest.param("INGRESS_RETRY_AFTER_S", "0", id="retry-after-zero"),
        pytest.param("INGRESS_READ_TIMEOUT_S", "nan", id="read-timeout-nan"),
        pytest.param("INGRESS_READ_TIMEOUT_S", "0.01", id="read-timeout-below-minimum"),
        pytest.param("DELIVERY_LIMIT", "many", id="broker-value-through-ingress"),
    ],
)
def test_a_bad_ingress_value_stops_with_a_config_error_naming_the_variable(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        IngressSettings.from_env(ingress_env(**{name: value}))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # a prefetch of 0 is "unlimited" in AMQP: one worker would take the whole queue
        pytest.param("WORKER_CONCURRENCY", "0", id="concurrency-zero"),
        pytest.param("WORKER_CONCURRENCY", "-1", id="concurrency-negative"),
        pytest.param("WORKER_QUICK_RETRIES", "0", id="quick-retries-zero"),
        pytest.param("WORKER_GRACE_S", "-1", id="grace-negative"),
        pytest.param("SMTP_TIMEOUT_S", "0", id="smtp-timeout-zero"),
        pytest.param("SMTP_URL", "http://mail", id="smtp-url-scheme"),
        pytest.param("SMTP_URL", "smtp://", id="smtp-url-no-host"),
        pytest.param("MAIL_FROM", "Orders", id="mail-from-no-address"),
        # every From header and MAIL FROM carries it: formatted, it raised for every email
        pytest.param("MAIL_FROM", "Shop <orders@bücher.example>", id="mail-from-not-ascii"),
        pytest.param("DATABASE_URL", "mysql://db/x", id="database-url-scheme"),
        pytest.param("DELIVERY_LIMIT", "many", id="broker-value-through-worker"),
    ],
)
def test_a_bad_worker_value_stops_with_a_config_error_naming_the_variable(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x", name: value})


def test_the_smtp_url_scheme_decides_tls_and_the_default_port() -> None:
    """smtps:// is TLS from the first byte (port 465 unless given); smtp:// starts plain
    (port 25) and upgrades with STARTTLS when the relay offers it."""
    from worker.settings import SmtpSettings

    tls = SmtpSettings.from_env({"SMTP_URL": "smtps://u:p%40ss@mail.example"})
    assert (tls.use_tls, tls.port, tls.host, tls.username, tls.password) == (
        True,
        465,
        "mail.example",
        "u",
        "p@ss",
    )
    plain = SmtpSettings.from_env({"SMTP_URL": "smtp://mail.example"})
    assert (plain.use_tls, plain.port) == (False, 25)


@pytest.mark.parametrize("url", ["postgres://u@db/x", "postgresql://u@db/x"])
def test_both_postgresql_url_schemes_are_accepted(url: str) -> None:
    settings = WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x", "DATABASE_URL": url})
    assert settings.database_url == url


def test_a_broker_prefix_of_200_bytes_is_accepted() -> None:
    assert BrokerSettings.from_env({"BROKER_PREFIX": "é" * 100}).prefix == "é" * 100


@pytest.mark.parametrize("value", ["0", "65535"])
def test_every_port_from_0_to_65535_is_accepted(value: str) -> None:
    assert IngressSettings.from_env(ingress_env(INGRESS_PORT=value)).port == int(value)
    worker = WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x", "WORKER_METRICS_PORT": value})
    assert worker.metrics_port == int(value)


@pytest.mark.parametrize("value", ["65536", "70000", "-1"])
def test_a_worker_metrics_port_outside_0_to_65535_is_refused_naming_the_variable(
    value: str,
) -> None:
    with pytest.raises(ConfigError, match="WORKER_METRICS_PORT"):
        WorkerSettings.from_env({"STRIPE_API_KEY": "sk_test_x", "WORKER_METRICS_PORT": value})


def test_a_zero_webhook_tolerance_is_refused_because_it_would_disable_the_replay_check() -> None:
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_TOLERANCE_S") as caught:
        IngressSettings.from_env(ingress_env(STRIPE_WEBHOOK_TOLERANCE_S="0"))

    assert "replay" in str(caught.value)


@pytest.mark.parametrize("value", [None, "", "  ", ",", " , , "])
def test_missing_webhook_secrets_stop_with_a_config_error_naming_the_variable(
    value: str | None,
) -> None:
    env = {} if value is None else {"STRIPE_WEBHOOK_SECRETS": value}

    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRETS"):
        IngressSettings.from_env(env)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("sk_test_51Habcdefghijklmnop", id="api-key-instead"),
        pytest.param("a1b2c3d4e5f6", id="bare-value"),
        pytest.param(f"{SECRET},sk_live_51Habcdefghijklmnop", id="one-good-one-bad"),
        pytest.param("WHSEC_abcdef123456", id="wrong-case-prefix"),
    ],
)
def test_webhook_secrets_not_starting_with_whsec_are_refused_without_echoing_them(
    value: str,
) -> None:
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRETS") as caught:
        IngressSettings.from_env({"STRIPE_WEBHOOK_SECRETS": value})

    message = str(caught.value)
    for item in value.split(","):
        assert item not in message


# --- secrets stay out of messages and reprs ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"http://guest:{PASSWORD}@rabbit:5672/", id="wrong-scheme"),
        pytest.param(f"amqp://guest:{PASSWORD}@", id="no-host"),
        pytest.param(f"amqp://guest:{PASSWORD}@/vhost", id="no-host-with-path"),
        pytest.param(f"redis://:{PASSWORD}@rabbit:6379/0", id="password-without-user"),
    ],
)
def test_the_rabbitmq_password_never_appears_in_the_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_URL") as caught:
        BrokerSettings.from_env({"RABBITMQ_URL": url})

    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
    assert "***" in str(caught.value)


def test_the_rabbitmq_password_never_appears_in_the_config_error_when_the_scheme_is_missing() -> (
    None
):
    with pytest.raises(ConfigError, match="RABBITMQ_URL") as caught:
        BrokerSettings.from_env({"RABBITMQ_URL": f"guest:{PASSWORD}@rabbit:5672/"})

    assert PASSWORD not in str(caught.value)


def test_an_unparseable_rabbitmq_url_stops_with_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_URL"):
        BrokerSettings.from_env({"RABBITMQ_URL": f"amqp://guest:{PASSWORD}@[::1/"})


def test_a_rabbitmq_url_whose_port_is_not_a_number_is_refused_without_the_password() -> None:
    with pytest.raises(ConfigError, match="RABBITMQ_URL") as caught:
        BrokerSettings.from_env({"RABBITMQ_URL": "amqp://guest:pa/ss@rabbit:5672/"})

    assert "pa/ss" not in str(caught.value)


def test_the_rabbitmq_password_is_not_in_the_repr_of_any_settings_object() -> None:
    url = f"amqp://guest:{PASSWORD}@rabbit.internal:5672/prod"
    broker = BrokerSettings.from_env({"RABBITMQ_URL": url})
    ingress = IngressSettings.from_env(ingress_env(RABBITMQ_URL=url))

    assert broker.url == url
    assert ingress.broker.url == url
    for text in (repr(broker), str(broker), repr(ingress), str(ingress)):
        assert PASSWORD not in text


def test_the_display_url_shows_the_broker_with_the_password_masked() -> None:
    broker = BrokerSettings.from_env(
        {"RABBITMQ_URL": f"amqp://guest:{PASSWORD}@rabbit.internal:5672/prod"}
    )

    assert broker.display_url == "amqp://guest:***@rabbit.internal:5672/prod"


def test_webhook_secrets_are_not_in_the_repr_of_the_ingress_settings() -> None:
    settings = IngressSettings.from_env({"STRIPE_WEBHOOK_SECRETS": f"{SECRET},{OTHER_SECRET}"})

    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert OTHER_SECRET not in text
        assert "whsec_" not in text
