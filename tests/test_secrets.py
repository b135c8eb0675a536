"""No secret in any log line: the pipeline run with distinctive secrets, every line scanned.

`fulfillment ingress` and `fulfillment worker` run as processes at LOG_LEVEL=DEBUG with a
webhook secret, a Stripe key, an SMTP password and a database password that appear nowhere
else, through their happy paths and their error paths (bad signatures, a Stripe outage, an
unknown session dead-lettered). Not one output line may hold any of them, nor their random
part alone; and the lines must show those paths ran, so the scan cannot pass on silence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import shared.logging as shared_logging
from devkit import signing as sh
from devkit.mailsink import SmtpSink, _Handler
from devkit.stripe import StripeStandIn
from shared.logging import configure_logging, get_logger, register_secrets
from shared.settings import BrokerSettings, LogSettings
from shared.topology import Topology
from tests.conftest import free_port, wait_for
from tests.pipeline import session_event
from tests.processes import RoleProcess, broker_env, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)

URL = "/webhooks/stripe"


def _token(label: str) -> str:
    """A value found nowhere but where this test puts it (letters and digits only)."""
    return f"{label}{secrets.token_hex(10)}"


class Secrets:
    """This run's secret values, and the random tokens inside them."""

    def __init__(self) -> None:
        self.webhook_token = _token("WhLeak")
        self.webhook = "whsec_" + self.webhook_token
        # a second endpoint's secret of another shape: only its registration can mask it all
        self.webhook2_token = _token("WhTwoLeak")
        self.webhook2 = f"whsec_{self.webhook2_token}-{self.webhook2_token[::-1]}"
        self.api_token = _token("KeyLeak")
        self.api_key = "sk_test_" + self.api_token
        self.smtp_password = _token("SmtpLeak")
        self.db_password = _token("DbLeak")
        self.broker_password = _token("RabbitLeak")  # a wrong one: only refusals use it

    @property
    def values(self) -> dict[str, str]:
        return {
            "webhook secret": self.webhook,
            "webhook secret token": self.webhook_token,
            "second webhook secret": self.webhook2,
            "second webhook secret token": self.webhook2_token,
            "second webhook secret tail": self.webhook2_token[::-1],
            "API key": self.api_key,
            "API key token": self.api_token,
            "SMTP password": self.smtp_password,
            "database password": self.db_password,
            "RabbitMQ password": self.broker_password,
        }


def leaks(lines: list[str], values: dict[str, str]) -> list[str]:
    return [f"{name} in: {line}" for line in lines for name, v in values.items() if v in line]


class AuthSmtpSink(SmtpSink):
    """The test SMTP sink, offering AUTH (over plain TCP) for one user and password."""

    def __init__(self, port: int, username: str, password: str) -> None:
        super().__init__(port)
        self.credentials = (username.encode(), password.encode())
        self.logins: list[bool] = []

    def start(self) -> None:
        def authenticate(
            server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
        ) -> AuthResult:
            ok = isinstance(auth_data, LoginPassword) and tuple(auth_data) == self.credentials
            self.logins.append(ok)
            return AuthResult(success=ok)

        self._controller = Controller(
            _Handler(self),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,
        )
        self._controller.start()


def with_password(url: str, password: str) -> tuple[str, str | None]:
    """The database URL with ``password`` in it, unless it has one (then it is kept)."""
    parts = urlsplit(url)
    if parts.password:
        return url, None  # a server that checks passwords: ours would be refused
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{parts.username or 'postgres'}:{password}@{host}"
    return parts._replace(netloc=netloc).geturl(), password


@pytest.fixture
def secret() -> Secrets:
    return Secrets()


@pytest.fixture
def auth_smtp(secret: Secrets) -> Iterator[AuthSmtpSink]:
    sink = AuthSmtpSink(free_port(), "orders", secret.smtp_password)
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
async def processes() -> AsyncIterator[list[RoleProcess]]:
    started: list[RoleProcess] = []
    yield started
    for process in started:
        await process.stop()


async def test_no_secret_appears_in_any_log_line_of_the_ingress_or_the_worker(
    secret: Secrets,
    topology: Topology,
    broker_settings: BrokerSettings,
    worker_settings: WorkerSettings,
    standin: StripeStandIn,
    auth_smtp: AuthSmtpSink,
    processes: list[RoleProcess],
) -> None:
    port = free_port()
    ingress = RoleProcess(
        ["ingress"],
        {
            **broker_env(broker_settings),
            "STRIPE_WEBHOOK_SECRETS": f"{secret.webhook},{secret.webhook2}",
            "INGRESS_PORT": str(port),
            "INGRESS_HOST": "127.0.0.1",
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
        },
    )
    processes.append(ingress)
    database_url, db_password = with_password(worker_settings.database_url, secret.db_password)
    worker = RoleProcess(
        ["worker"],
        {
            **worker_env(worker_settings),
            "STRIPE_API_KEY": secret.api_key,
            "SMTP_URL": f"smtp://orders:{secret.smtp_password}@127.0.0.1:{auth_smtp.port}",
            # the sink offers AUTH without TLS: a relay on this host, which the opt-out is for
            "SMTP_ALLOW_PLAINTEXT_AUTH": "true",
            "DATABASE_URL": database_url,
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
        },
    )
    processes.append(worker)
    await asyncio.gather(ingress.start("broker connected"), worker.start("worker consuming"))

    base = f"http://127.0.0.1:{port}{URL}"
    now = int(time.time())
    paid_once = standin.add_session()["id"]  # Stripe fails once: retried within the worker
    paid_later = standin.add_session()["id"]  # Stripe fails until a delay queue retries it
    unknown = "cs_test_" + secrets.token_hex(12)  # Stripe has no such session: dead-lettered
    quick_retries = worker_settings.quick_retries

    async with aiohttp.ClientSession() as http:

        async def post(raw: bytes, header: str) -> tuple[int, str]:
            headers = {"Content-Type": "application/json", "Stripe-Signature": header}
            async with http.post(base, data=raw, headers=headers) as response:
                return response.status, (await response.json())["error"]["type"] if (
                    response.status != 200
                ) else "accepted"

        def handled(session_id: str, outcome: str) -> bool:
            return any(
                e.get("checkout_session_id") == session_id and e.get("outcome") == outcome
                for e in worker.events("event handled")
            )

        # a valid event (signed by the second secret), Stripe failing once
        standin.fail_next(1, 500)
        doc = session_event(standin, "checkout.session.completed", paid_once)
        raw = sh.body(doc)
        assert await post(raw, sh.signature_header(raw, secret.webhook2)) == (200, "accepted")
        await wait_for(lambda: handled(paid_once, "fulfilled"), timeout_s=20)

        # Stripe failing through every quick retry: the event goes by a delay queue
        standin.fail_next(quick_retries, 500)
        later = session_event(standin, "checkout.session.completed", paid_later)
        raw = sh.body(later)
        assert await post(raw, sh.signature_header(raw, secret.webhook)) == (200, "accepted")
        await wait_for(lambda: handled(paid_later, "fulfilled"), timeout_s=20)

        # a session Stripe does not know: dead-lettered at once
        ghost = sh.event("checkout.session.completed", sh.checkout_session(unknown))
        raw = sh.body(ghost)
        assert await post(raw, sh.signature_header(raw, secret.webhook)) == (200, "accepted")
        await wait_for(lambda: worker.events("dead-lettered"), timeout_s=20)

        # refused at the door; some carry the secrets themselves in header or body
        raw = sh.body(sh.event())
        refusals = [
            (raw, sh.signature_header(raw, sh.new_secret()), "invalid_signature"),
            (raw, sh.signature_header(raw, secret.webhook, timestamp=now - 3600), None),
            (raw, f"t={now},v1={secret.webhook}", "invalid_signature"),
            (raw, secret.webhook, "malformed_signature"),
            (raw, f"t={secret.api_key},v1=00", "malformed_signature"),
            (f"{secret.api_key} {secret.webhook}".encode(), None, "malformed_event"),
        ]
        for body, header, code in refusals:
            signed = header or sh.signature_header(body, secret.webhook)
            status, got = await post(body, signed)
            assert status == 400
            assert got == (code or "timestamp_out_of_tolerance")

    ingress.signal(signal.SIGTERM)
    worker.signal(signal.SIGTERM)
    assert await ingress.wait(20) == 0
    assert await worker.wait(20) == 0

    # the scan
    values = dict(secret.values)
    if db_password is None:
        del values["database password"]
    broker = urlsplit(broker_settings.url)
    if broker.password:
        values["RabbitMQ credentials"] = f"{broker.username}:{broker.password}@"
    found = leaks(ingress.lines, values) + leaks(worker.lines, values)
    assert not found, "\n".join(found[:10])

    # ... over lines that show every path ran (so the scan did not pass on silence)
    # one login or more: the worker keeps its SMTP connection open between messages
    assert auth_smtp.logins and all(auth_smtp.logins), "SMTP AUTH with the password"
    assert len(auth_smtp.for_session(paid_once)) == len(auth_smtp.for_session(paid_later)) == 1
    queued = {e["event_id"] for e in ingress.events("webhook queued")}
    assert {doc["id"], later["id"], ghost["id"]} <= queued
    reasons = {e["reason"] for e in ingress.events("webhook rejected")}
    assert reasons >= {
        "invalid_signature",
        "timestamp_out_of_tolerance",
        "malformed_signature",
        "malformed_event",
    }
    [connected] = ingress.events("broker connected")
    assert ":***@" in connected["broker"]
    retried = [e for e in worker.events("retry scheduled") if e.get("event_id") == later["id"]]
    assert retried and "500" in retried[0]["error"]
    [dead] = worker.events("dead-lettered")
    assert (dead["event_id"], dead["reason"]) == (ghost["id"], "stripe_not_found")
    # every outcome line, whatever the outcome, carries the same fields
    outcome_lines = [*worker.events("event handled"), *retried, dead]
    fields = ("event_id", "event_type", "checkout_session_id", "attempt", "outcome")
    for line in outcome_lines:
        assert all(line.get(f) is not None for f in fields), line
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0, line
        assert isinstance(line["redelivered"], bool), line
    assert worker.events("effect done")
    assert any(log.get("level") == "debug" for log in ingress.logs), "DEBUG lines were on"


async def test_no_secret_appears_when_the_broker_or_the_database_refuses_or_is_away(
    secret: Secrets,
    broker_settings: BrokerSettings,
    worker_settings: WorkerSettings,
    processes: list[RoleProcess],
) -> None:
    # RabbitMQ refuses the (wrong, distinctive) password: the ingress keeps retrying and
    # logs each attempt; a worker gives up at start with one line on stderr
    broker = urlsplit(broker_settings.url)
    wrong_broker = broker._replace(
        netloc=f"{broker.username}:{secret.broker_password}@{broker.hostname}:{broker.port}"
    ).geturl()
    ingress = RoleProcess(
        ["ingress"],
        {
            **broker_env(broker_settings),
            "RABBITMQ_URL": wrong_broker,
            "STRIPE_WEBHOOK_SECRETS": secret.webhook,
            "INGRESS_PORT": str(free_port()),
            "INGRESS_HOST": "127.0.0.1",
            "LOG_LEVEL": "DEBUG",
        },
    )
    processes.append(ingress)
    database_url, _ = with_password(worker_settings.database_url, secret.db_password)
    worker_env_ = {
        **worker_env(worker_settings),
        "STRIPE_API_KEY": secret.api_key,
        "SMTP_URL": f"smtp://orders:{secret.smtp_password}@127.0.0.1:{free_port()}",
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "DEBUG",
    }
    no_broker = RoleProcess(["worker"], {**worker_env_, "RABBITMQ_URL": wrong_broker})
    parts = urlsplit(database_url)
    no_database = RoleProcess(
        ["worker"],
        {
            **worker_env_,
            "DATABASE_URL": parts._replace(
                netloc=f"postgres:{secret.db_password}@127.0.0.1:{free_port()}"
            ).geturl(),
        },
    )
    processes.extend([no_broker, no_database])
    await asyncio.gather(ingress.start(), no_broker.start(), no_database.start())

    await wait_for(lambda: len(ingress.events("broker unavailable")) >= 3, timeout_s=20)
    assert await no_broker.wait(30) != 0
    assert await no_database.wait(30) != 0
    ingress.signal(signal.SIGTERM)
    await ingress.wait(20)

    everything = ingress.lines + no_broker.lines + no_database.lines
    found = leaks(everything, secret.values)
    assert not found, "\n".join(found[:10])
    # the refusals were logged, with the URLs in them masked
    refused = ingress.events("broker unavailable")[0]
    assert "ACCESS_REFUSED" in refused["error"] and ":***@" in refused["broker"]
    assert f"the broker at amqp://{broker.username}:***@" in no_broker.lines[-1]
    assert "refused the user name or password" in no_broker.lines[-1]
    assert "cannot reach PostgreSQL at postgresql://postgres:***@" in no_database.lines[-1]


# --- the same, in process: configure_logging masks what a careless line would carry -------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika", "stripe")}
    known = set(shared_logging._known_secrets)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    shared_logging._known_secrets.intersection_update(known)


def test_each_service_registers_its_secrets_before_it_serves(
    secret: Secrets, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """A secret of no known shape (a second endpoint's, an SMTP password) is masked only
    because the service registered it: each must do so before anything can log it."""
    import ingress.main
    import worker.main
    from ingress.settings import IngressSettings
    from shared import runtime
    from shared.logging import mask_secrets

    def serves(coroutine: Any) -> None:
        coroutine.close()  # started, not run: only what happens before serving matters

    monkeypatch.setattr(runtime, "run_service", serves)
    for name in ("CHECKOUT_PRICE", "CHECKOUT_CUSTOMER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STRIPE_API_KEY", secret.api_key)
    monkeypatch.setenv("SMTP_URL", f"smtp://orders:{secret.smtp_password}@127.0.0.1:2525")
    unknown_shapes = (secret.webhook2_token[::-1], secret.smtp_password)
    assert all(tail in mask_secrets(f"a {tail} b") for tail in unknown_shapes)

    ingress.main.run(IngressSettings(webhook_secrets=(secret.webhook, secret.webhook2)))
    worker.main.run(concurrency=1)

    for value in (secret.webhook2, secret.smtp_password, secret.api_key):
        assert mask_secrets(f"a {value} b") == "a *** b", value


def test_configure_logging_masks_secrets_in_exceptions_and_nested_values(
    secret: Secrets, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("worker", LogSettings(level="DEBUG", format="json"))
    register_secrets([secret.webhook2, secret.smtp_password])
    log = get_logger("tests.secrets")
    error = RuntimeError(f"Stripe refused {secret.api_key} (smtp {secret.smtp_password})")
    payload = {
        "secret": secret.webhook,
        "endpoints": [{"signing": secret.webhook2}],
        "smtp": f"smtp://orders:{secret.smtp_password}@mail.internal:587",
    }

    log.error("stripe call failed", error=error, payload=payload)
    try:
        raise error
    except RuntimeError:
        log.exception("stripe call failed, with traceback", payload=payload)
        logging.getLogger("some.library").exception("retrying with %s", secret.api_key)
    log.debug(f"configured {secret.webhook} and {secret.api_key}")

    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    assert len(lines) == 4
    assert not leaks(err.splitlines(), secret.values)
    first, second, third, fourth = lines
    assert first["error"] == "RuntimeError: Stripe refused *** (smtp ***)"
    assert first["payload"] == {
        "secret": "***",
        "endpoints": [{"signing": "***"}],
        "smtp": "smtp://orders:***@mail.internal:587",
    }
    assert "RuntimeError: Stripe refused *** (smtp ***)" in second["exception"]
    assert third["event"] == "retrying with ***" and "Traceback" in third["exception"]
    assert fourth["event"] == "configured *** and ***"
