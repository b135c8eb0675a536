"""SMTP credentials travel only over TLS: a relay (or a man in the middle) that offers no
STARTTLS never sees the password; smtps:// and STARTTLS carry it; an explicit setting lets
a relay on the same host take it in clear."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from shared.errors import ConfigError, TransientError
from shared.topology import Topology
from shared.vocabulary import HEADER_ERROR_MESSAGE
from tests.conftest import drain, free_port, wait_for
from tests.pipeline import Pipeline
from tests.processes import RoleProcess, worker_env
from worker.mail import Mailer
from worker.settings import SmtpSettings, WorkerSettings

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "orders", "hunter2-smtp-secret"


class Relay:
    """An aiosmtpd relay that offers AUTH (without TLS unless given a certificate), keeps
    each message and each login, behind a proxy that records every byte the client sent."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.logins: list[tuple[str, bytes]] = []
        self.messages: list[bytes] = []
        self.sent_by_client = bytearray()
        self._tls = tls
        self.port = free_port()

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:  # fmt: skip
        self.logins.append((mechanism, auth_data.password))
        return AuthResult(success=auth_data.password == PASSWORD.encode())

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        inner = free_port()
        controller = Controller(
            self,
            hostname="127.0.0.1",
            port=inner,
            authenticator=self.authenticate,
            auth_require_tls=False,  # what makes it dangerous: AUTH offered in clear
            tls_context=self._tls,
        )
        controller.start()
        server = await asyncio.start_server(
            lambda r, w: self._pump(r, w, inner), "127.0.0.1", self.port
        )
        try:
            yield self
        finally:
            server.close()
            await asyncio.to_thread(controller.stop)

    async def _pump(self, reader: Any, writer: Any, inner: int) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", inner)

        async def copy(src: Any, dst: Any, record: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if record:
                        self.sent_by_client += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer, True), copy(up_reader, writer, False))

    def settings(self, **changes: Any) -> SmtpSettings:
        base = SmtpSettings(host="127.0.0.1", port=self.port, username=USER, password=PASSWORD,
                            timeout_s=5, sender="Shop <orders@shop.test>")  # fmt: skip
        return dataclasses.replace(base, **changes)


def an_email() -> Any:
    from email.mime.text import MIMEText

    message = MIMEText("hello")
    message["From"], message["To"], message["Subject"] = "orders@shop.test", "a@b.test", "hi"
    return message


async def test_a_relay_offering_auth_without_tls_never_sees_the_password() -> None:
    relay = Relay()
    async with relay.running():
        mailer = Mailer(relay.settings())
        with pytest.raises(TransientError) as caught:
            await mailer.send(an_email())
        await mailer.close()

    said = str(caught.value)
    assert "offers no STARTTLS" in said and "password in SMTP_URL was not sent" in said
    assert "SMTP_ALLOW_PLAINTEXT_AUTH" in said and PASSWORD not in said
    assert b"EHLO" in relay.sent_by_client  # it did speak to the relay
    assert b"AUTH" not in relay.sent_by_client.upper()
    assert PASSWORD.encode() not in relay.sent_by_client
    assert b"aHVudGVy" not in relay.sent_by_client  # nor base64 of it ("hunter")
    assert relay.logins == [] and relay.messages == []


async def test_without_credentials_the_relay_is_used_as_before() -> None:
    relay = Relay()
    async with relay.running():
        mailer = Mailer(relay.settings(username=None, password=None))
        await mailer.send(an_email())
        await mailer.close()
    assert len(relay.messages) == 1 and b"AUTH" not in relay.sent_by_client


async def test_the_explicit_setting_lets_a_relay_on_this_host_take_the_password_in_clear() -> None:
    relay = Relay()
    async with relay.running():
        mailer = Mailer(relay.settings(allow_plaintext_auth=True))
        await mailer.send(an_email())
        await mailer.close()
    assert relay.logins == [("PLAIN", PASSWORD.encode())] and len(relay.messages) == 1


@pytest.fixture
def trusted_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A certificate for 127.0.0.1 that this process's TLS clients trust (SSL_CERT_FILE)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-200:]!r}")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    yield cert


async def test_with_starttls_the_password_goes_only_after_it(trusted_certificate: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(trusted_certificate, trusted_certificate.with_name("key.pem"))
    relay = Relay(tls=context)
    async with relay.running():
        mailer = Mailer(relay.settings())
        await mailer.send(an_email())
        await mailer.close()

    in_clear = bytes(relay.sent_by_client).split(b"STARTTLS\r\n", 1)[0]
    assert b"EHLO" in in_clear and b"AUTH" not in in_clear.upper()
    assert PASSWORD.encode() not in relay.sent_by_client  # after STARTTLS: encrypted
    assert relay.logins == [("PLAIN", PASSWORD.encode())] and len(relay.messages) == 1


async def test_a_worker_with_credentials_and_no_tls_keeps_the_order_and_retries_the_email(
    pipeline: Pipeline,
) -> None:
    relay = Relay()
    async with relay.running():
        await pipeline.start(dataclasses.replace(pipeline.settings, smtp=relay.settings()))
        sid = await pipeline.complete()
        delay_queue = pipeline.topology.retry_queues[0]
        retried = await wait_for(
            lambda: drain(pipeline.channel, delay_queue), timeout_s=20, interval_s=0.2
        )

    [message] = retried
    assert "offers no STARTTLS" in message.headers[HEADER_ERROR_MESSAGE]
    assert list(await pipeline.steps(sid)) == ["order_fulfilled_message"]  # the order went on
    assert b"AUTH" not in relay.sent_by_client.upper() and relay.logins == []


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("0", False), ("YES", True)])
def test_the_plaintext_opt_out_is_a_yes_or_no_setting(value: str, expected: bool) -> None:
    env = {"SMTP_URL": "smtp://u:p@127.0.0.1:25", "SMTP_ALLOW_PLAINTEXT_AUTH": value}
    assert SmtpSettings.from_env(env).allow_plaintext_auth is expected
    with pytest.raises(ConfigError, match="SMTP_ALLOW_PLAINTEXT_AUTH"):
        SmtpSettings.from_env({**env, "SMTP_ALLOW_PLAINTEXT_AUTH": "sometimes"})


async def test_a_worker_warns_at_start_when_the_plaintext_opt_out_is_on(
    worker_settings: WorkerSettings, topology: Topology
) -> None:
    env = {
        **worker_env(worker_settings),
        "SMTP_URL": f"smtp://{USER}:{PASSWORD}@127.0.0.1:{worker_settings.smtp.port}",
        "SMTP_ALLOW_PLAINTEXT_AUTH": "true",
    }
    worker = RoleProcess(["worker"], env)
    try:
        await worker.start("worker consuming")
    finally:
        await worker.stop()
    [warning] = [line for line in worker.logs if "SMTP_ALLOW_PLAINTEXT_AUTH" in line["event"]]
    assert warning["level"] == "warning" and PASSWORD not in str(warning)
