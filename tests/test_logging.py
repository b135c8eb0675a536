"""Log lines: one JSON object each on stderr (or readable on request), every secret masked.

configure_logging binds ``sys.stderr`` when it is called, so each test calls it itself, after
capsys has replaced the stream; the fixture below puts structlog and stdlib logging back.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp.http_exceptions import BadStatusLine

import shared.http_server as http_server
import shared.logging as shared_logging
from shared.http_server import quiet_unparseable_requests
from shared.logging import configure_logging, get_logger, mask_secrets, register_secrets
from shared.settings import LogSettings

WEBHOOK_SECRET = "whsec_" + "Ab12Cd34" * 4
API_KEY = "sk_test_51H" + "x9Y8z7W6" * 3
RESTRICTED_KEY = "rk_live_51H" + "Q1w2E3r4" * 3
PASSWORD = "hunter2pass"
URL = f"amqp://guest:{PASSWORD}@rabbit.internal:5672/prod"
SECRETS = (WEBHOOK_SECRET, API_KEY, RESTRICTED_KEY, PASSWORD)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {
        name: logging.getLogger(name).level for name in ("aiormq", "aio_pika", "aiohttp.access")
    }
    known = set(shared_logging._known_secrets)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    shared_logging._known_secrets.intersection_update(known)


def json_lines(err: str) -> list[dict[str, Any]]:
    lines = err.splitlines()
    assert lines, "nothing was logged to stderr"
    return [json.loads(line) for line in lines]


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
    assert "whsec_" not in text
    assert "sk_test_" not in text
    assert "rk_live_" not in text


def test_a_json_log_line_is_one_object_on_stderr_with_timestamp_level_and_component(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("ingress", LogSettings(format="json"))

    get_logger("tests").info("event accepted", event_id="evt_123", attempt=2)

    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    (line,) = json_lines(err)
    assert line["event"] == "event accepted"
    assert line["component"] == "ingress"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert line["timestamp"][:4].isdigit() and "T" in line["timestamp"]
    assert line["event_id"] == "evt_123"
    assert line["attempt"] == 2


def test_auto_format_writes_json_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("worker", LogSettings(format="auto"))

    get_logger("tests").warning("slow", seconds=1.5)

    (line,) = json_lines(capsys.readouterr().err)
    assert (line["event"], line["level"], line["component"]) == ("slow", "warning", "worker")


def test_lines_below_the_configured_level_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ingress", LogSettings(level="WARNING", format="json"))
    log = get_logger("tests")

    log.info("not shown")
    log.warning("shown")
    logging.getLogger("some.library").info("library chatter")

    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["shown"]


def test_stripe_secrets_and_url_passwords_are_masked_in_every_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("ingress", LogSettings(format="json"))

    get_logger("tests").info(
        f"configured with {WEBHOOK_SECRET}",
        secret=WEBHOOK_SECRET,
        api_key=f"key={API_KEY}",
        restricted=RESTRICTED_KEY,
        broker=URL,
    )

    err = capsys.readouterr().err
    assert_no_secret(err)
    (line,) = json_lines(err)
    assert line["event"] == "configured with ***"
    assert line["secret"] == "***"
    assert line["api_key"] == "key=***"
    assert line["restricted"] == "***"
    assert line["broker"] == "amqp://guest:***@rabbit.internal:5672/prod"


def test_secrets_in_an_exception_value_or_traceback_are_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("ingress", LogSettings(format="json"))
    log = get_logger("tests")
    error = RuntimeError(f"cannot connect to {URL} with {API_KEY}")

    log.error("publish failed", error=error)
    try:
        raise error
    except RuntimeError:
        log.exception("publish failed with traceback")

    err = capsys.readouterr().err
    assert_no_secret(err)
    first, second = json_lines(err)
    assert (
        first["error"]
        == "RuntimeError: cannot connect to amqp://guest:***@rabbit.internal:5672/prod with ***"
    )
    assert "Traceback" in second["exception"]
    assert "RuntimeError: cannot connect to amqp://guest:***@" in second["exception"]


def test_a_library_logging_through_stdlib_gets_the_same_json_line_with_secrets_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("worker", LogSettings(format="json"))
    library = logging.getLogger("some.library")

    library.warning("reconnecting to %s", URL)
    try:
        raise ConnectionError(f"auth failed for {RESTRICTED_KEY}")
    except ConnectionError:
        library.exception("giving up on %s", WEBHOOK_SECRET)

    err = capsys.readouterr().err
    assert_no_secret(err)
    first, second = json_lines(err)
    assert first["event"] == "reconnecting to amqp://guest:***@rabbit.internal:5672/prod"
    assert (first["level"], first["component"], first["logger"]) == (
        "warning",
        "worker",
        "some.library",
    )
    assert "timestamp" in first
    assert second["event"] == "giving up on ***"
    assert second["level"] == "error"
    assert "ConnectionError: auth failed for ***" in second["exception"]


def test_values_registered_as_secrets_are_masked_whatever_their_shape(
    capsys: pytest.CaptureFixture[str],
) -> None:
    opaque = "db-pw-" + secrets.token_hex(8)
    configure_logging("ingress", LogSettings(format="json"))
    register_secrets([opaque])

    get_logger("tests").info(f"using {opaque}", password=opaque)
    logging.getLogger("some.library").error("login with %s refused", opaque)

    err = capsys.readouterr().err
    assert opaque not in err
    first, second = json_lines(err)
    assert first["event"] == "using ***"
    assert first["password"] == "***"
    assert second["event"] == "login with *** refused"


def test_registered_values_shorter_than_six_characters_are_ignored() -> None:
    register_secrets(["abc"])

    assert mask_secrets("abc and abcdef") == "abc and abcdef"


def test_console_format_writes_a_readable_line_not_json_and_still_masks_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("ingress", LogSettings(format="console"))

    get_logger("tests").info("event accepted", secret=WEBHOOK_SECRET, event_id="evt_123")

    err = capsys.readouterr().err
    assert_no_secret(err)
    assert len(err.splitlines()) == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)
    assert "event accepted" in err
    assert "evt_123" in err
    assert "ingress" in err
    assert "***" in err


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"secret": WEBHOOK_SECRET}, id="dict"),
        pytest.param([API_KEY], id="list"),
        pytest.param((URL,), id="tuple"),
        pytest.param(RESTRICTED_KEY.encode(), id="bytes"),
    ],
)
def test_secrets_nested_in_containers_or_bytes_are_masked(
    capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    configure_logging("ingress", LogSettings(format="json"))

    get_logger("tests").info("nested", value=value)

    assert_no_secret(capsys.readouterr().err)


@pytest.fixture
def server_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """aiohttp.server's logger, its filters put back after the test; a fresh sampler."""
    monkeypatch.setattr(http_server, "_UNPARSEABLE_LOGGED", shared_logging.LogSampler(3600))
    log = logging.getLogger("aiohttp.server")
    filters = log.filters[:]
    yield log
    log.filters[:] = filters


def test_a_request_aiohttp_cannot_parse_is_one_sampled_warning_line_without_traceback(
    capsys: pytest.CaptureFixture[str], server_log: logging.Logger
) -> None:
    configure_logging("ingress", LogSettings(format="json"))
    quiet_unparseable_requests()
    quiet_unparseable_requests()  # once per process however often it is called
    assert sum(isinstance(f, http_server._UnparseableRequests) for f in server_log.filters) == 1

    for _ in range(4):  # a scanner's flood: one line for the interval
        server_log.error(
            "Error handling request from %s", "203.0.113.9", exc_info=BadStatusLine(b"GARBAGE")
        )

    (line,) = json_lines(capsys.readouterr().err)
    assert (line["event"], line["level"]) == ("malformed HTTP request refused", "warning")
    assert line["remote"] == "203.0.113.9"
    assert line["error"].startswith("BadStatusLine: ")
    assert "exception" not in line


def test_a_handler_crash_logged_by_aiohttp_stays_an_error_with_its_traceback(
    capsys: pytest.CaptureFixture[str], server_log: logging.Logger
) -> None:
    configure_logging("ingress", LogSettings(format="json"))
    quiet_unparseable_requests()

    server_log.error("Error handling request from %s", "203.0.113.9", exc_info=RuntimeError("bug"))

    (line,) = json_lines(capsys.readouterr().err)
    assert (line["event"], line["level"]) == ("Error handling request from 203.0.113.9", "error")
    assert "RuntimeError: bug" in line["exception"]
