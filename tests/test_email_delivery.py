"""Sending the email: the relay down, deferring, refusing; written off or retried, sent once."""

from __future__ import annotations

import asyncio
from email.mime.text import MIMEText

import pytest

from devkit.mailsink import SmtpSink
from tests.conftest import counted, wait_for
from tests.pipeline import COMPLETED, Pipeline
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


async def test_smtp_down_is_retried_and_one_email_is_sent_once_it_is_back(
    pipeline: Pipeline,
) -> None:
    smtp = pipeline.smtp
    sid = pipeline.standin.add_session()["id"]
    smtp.stop()
    worker = await pipeline.start()

    completed = await pipeline.send(COMPLETED, sid)
    await pipeline.fulfilled(sid)  # the row does not wait for mail
    await asyncio.sleep(1.0)  # at least one retry through a delay queue
    assert smtp.for_session(sid) == []
    smtp.start()

    await pipeline.mails(1, timeout_s=15)
    await pipeline.settle(worker)
    assert len(smtp.for_session(sid)) == 1
    assert len(await pipeline.fulfillments(sid)) == 1
    assert await pipeline.dead_letters() == []
    # the attempt that sent the email finished the fulfillment: counted as fulfilled, not
    # as a no-op (its row was written by the first attempt)
    [processed] = await pipeline.rows(
        "SELECT outcome FROM processed_events WHERE event_id = $1", completed["id"]
    )
    assert processed["outcome"] == "fulfilled"


def mail_numbered(n: int) -> MIMEText:
    """A plain message with subject ``n<n>``, for the mailer's own tests."""
    m = MIMEText(f"message {n}")
    m["From"], m["To"], m["Subject"] = "orders@shop.test", "ada@example.com", f"n{n}"
    return m


async def test_the_mailer_reuses_its_connection_and_survives_the_relay_dropping_it(
    smtp: SmtpSink, worker_settings: WorkerSettings
) -> None:
    from worker.mail import Mailer

    mailer = Mailer(worker_settings.smtp)
    try:
        for n in range(3):
            await mailer.send(mail_numbered(n))
        assert len(smtp.messages) == 3
        assert len(set(smtp.peers)) == 1  # one connection for all three

        smtp.stop()  # the relay restarts: the idle connection is dead
        smtp.start()
        await mailer.send(mail_numbered(3))  # sent on a new connection, no error
        assert [m["Subject"] for m in smtp.messages] == ["n0", "n1", "n2", "n3"]
        assert len(set(smtp.peers)) == 2
    finally:
        await mailer.close()


@pytest.mark.parametrize(
    ("answer", "written_off"),
    [
        ("554 5.6.0 Bad content", True),
        ("552 5.3.4 Message too big", True),
        ("554 5.7.1 Rejected as spam", False),
        ("451 4.3.0 Try again later", False),
    ],
)
async def test_a_refusal_at_data_is_judged_as_one_at_rcpt_is(
    answer: str, written_off: bool, smtp: SmtpSink, worker_settings: WorkerSettings
) -> None:
    from shared.errors import TransientError
    from worker.mail import Mailer, Undeliverable

    smtp.data_answer = answer
    mailer = Mailer(worker_settings.smtp)
    try:
        with pytest.raises((TransientError, Undeliverable)) as caught:
            await mailer.send(mail_numbered(0))
    finally:
        await mailer.close()
    assert type(caught.value) is (Undeliverable if written_off else TransientError)


async def test_a_connection_idle_longer_than_its_limit_is_not_used_again(
    smtp: SmtpSink, worker_settings: WorkerSettings
) -> None:
    """A relay (or a NAT on the way) may drop an idle connection without a word: a send on
    it would wait out the whole timeout. Past max_idle_s a new connection is opened."""
    from worker.mail import Mailer

    mailer = Mailer(worker_settings.smtp, max_idle_s=0.2)
    try:
        await mailer.send(mail_numbered(0))
        await mailer.send(mail_numbered(1))  # at once: the same connection
        await asyncio.sleep(0.4)
        await mailer.send(mail_numbered(2))
    finally:
        await mailer.close()
    assert smtp.peers[0] == smtp.peers[1] != smtp.peers[2]


@pytest.mark.parametrize(
    ("address", "why"),
    [("gone@example.com", "550"), ("not an address", "no usable customer email")],
)
async def test_an_undeliverable_email_is_recorded_as_failed_and_the_order_goes_on(
    address: str, why: str, pipeline: Pipeline
) -> None:
    """A customer's address the mail server refuses for good (or that is not an address)
    must not dead-letter the event: the row is committed, so a replay could never send
    the order.fulfilled message. The email is recorded as failed; the rest goes on."""
    pipeline.smtp.unknown_recipients.add("gone@example.com")
    purpose = {"purpose": "confirmation_email"}
    before = counted("worker_emails_undeliverable_total", **purpose)
    worker = await pipeline.start()

    sid = await pipeline.complete(customer_email=address)

    steps = await wait_for(lambda: pipeline.both_steps(sid))
    assert steps["confirmation_email"].startswith("failed:")
    assert why in steps["confirmation_email"]
    assert steps["order_fulfilled_message"] == f"published order.fulfilled:{sid}"
    await pipeline.order_went_on(worker)
    assert pipeline.mails_for(sid) == []
    assert len(await pipeline.fulfillments(sid)) == 1
    assert counted("worker_emails_undeliverable_total", **purpose) - before == 1


@pytest.mark.parametrize(
    ("code", "message", "written_off"),
    [
        (550, "5.1.1 User unknown", True),
        (552, "5.2.2 Mailbox full", True),
        (552, "5.3.4 Message too big", True),
        (554, "5.6.0 Bad content", True),
        (550, "Mailbox unavailable", True),  # no enhanced status: 550-553 are about it
        (553, "Mailbox name not allowed", True),
        (554, "5.7.1 Message rejected as spam", False),  # policy: our sending as often
        (550, "5.7.26 Unauthenticated email is not accepted (DMARC)", False),
        (550, "5.4.5 Daily sending quota exceeded", False),
        (554, "5.0.0 rejected at DATA", False),
        (554, "Transaction failed", False),
        (451, "4.3.0 Try again later", False),
    ],
)
def test_only_a_refusal_about_the_recipient_or_message_writes_an_email_off(
    code: int, message: str, written_off: bool
) -> None:
    """The README's list, item 5: the rest is retried, then dead-lettered with the answer."""
    from worker.mail import _never_for_this_message

    assert _never_for_this_message(code, message) is written_off


@pytest.mark.parametrize(
    ("address", "smtputf8", "delivered_to", "step"),
    [
        # an internationalized domain goes out in its ASCII form: every relay routes that
        ("zoe@bücher.example", False, "zoe@xn--bcher-kva.example", "sent"),
        # by IDNA 2008, as registries: IDNA 2003 would send this to strasse.de, a stranger
        ("jenny@straße.de", False, "jenny@xn--strae-oqa.de", "sent"),
        # no such domain can exist (a snowman is not allowed): never retried
        ("sam@☃.example", False, None, "failed: session"),
        # a non-ASCII mailbox name needs SMTPUTF8; To: is then UTF-8, not an encoded-word
        ("zoë@example.com", True, "zoë@example.com", "sent"),
        # a relay without SMTPUTF8 can never take it: written off, the order goes on
        ("zoë@example.com", False, None, "failed: the mail relay does not offer SMTPUTF8"),
    ],
)
async def test_internationalized_customer_addresses_are_sent_or_written_off_never_retried(
    address: str, smtputf8: bool, delivered_to: str | None, step: str, pipeline: Pipeline
) -> None:
    smtp = pipeline.smtp
    smtp.stop()
    smtp.smtputf8 = smtputf8
    smtp.start()
    worker = await pipeline.start()

    sid = await pipeline.complete(customer_email=address)

    steps = await wait_for(lambda: pipeline.both_steps(sid))
    assert steps["confirmation_email"].startswith(step), steps
    await pipeline.order_went_on(worker)
    mails = smtp.for_session(sid)
    if delivered_to is None:
        assert mails == []
    else:
        [mail] = mails
        assert mail["To"] == delivered_to
        assert [a.addr_spec for a in mail["To"].addresses] == [delivered_to]


async def test_a_non_ascii_address_is_retried_not_written_off_when_the_relays_ehlo_failed(
    pipeline: Pipeline,
) -> None:
    """Review: a relay whose EHLO fails is spoken to with HELO, which lists no extensions,
    so SMTPUTF8 looks missing. That says nothing about the relay (a hiccup, a failover):
    retried, and sent once EHLO works, not written off for good."""
    smtp = pipeline.smtp
    smtp.stop()
    smtp.smtputf8, smtp.refuse_ehlo = True, True
    smtp.start()
    worker = await pipeline.start()

    sid = await pipeline.complete(customer_email="zoë@example.com")

    await wait_for(lambda: pipeline.steps(sid))
    await asyncio.sleep(1.0)  # tried meanwhile, in process and through a delay queue
    assert list(await pipeline.steps(sid)) == ["order_fulfilled_message"]
    smtp.refuse_ehlo = False

    [mail] = await pipeline.mails(1, timeout_s=15)
    assert mail["To"] == "zoë@example.com"
    await pipeline.settle(worker)
    assert (await pipeline.steps(sid))["confirmation_email"].startswith("sent ")
    assert await pipeline.dead_letters() == []


async def test_a_deferred_email_does_not_hold_up_the_order_fulfilled_message(
    pipeline: Pipeline,
) -> None:
    """The message the business ships on goes first: a recipient's mailbox deferring
    (450), or an SMTP outage, delays only the email, which is retried and sent once."""
    smtp = pipeline.smtp
    smtp.deferred_recipients.add("later@example.com")
    worker = await pipeline.start()

    sid = await pipeline.complete(customer_email="later@example.com")

    [out] = await wait_for(pipeline.outbound_messages)
    assert out.headers["fulfillment-id"] == f"order.fulfilled:{sid}"
    await asyncio.sleep(1.0)  # retried meanwhile, through a delay queue too
    assert list(await pipeline.steps(sid)) == ["order_fulfilled_message"]
    assert smtp.for_session(sid) == []

    smtp.deferred_recipients.clear()
    await pipeline.mails(1, timeout_s=15)
    await pipeline.settle(worker)
    assert len(smtp.for_session(sid)) == 1
    assert (await pipeline.steps(sid))["confirmation_email"].startswith("sent ")
    assert await pipeline.outbound_messages() == [] and await pipeline.dead_letters() == []


@pytest.mark.parametrize("refusal", ["refuse_sender", "relay_denied"])
async def test_a_relay_refusing_us_is_retried_not_recorded_as_failed(
    refusal: str, pipeline: Pipeline
) -> None:
    """A 5xx at MAIL FROM (or AUTH), or a 5.7.x policy refusal at RCPT ("relay access
    denied"), is the relay's or our settings' fault, the same for every order: retried
    until fixed, never written off as this customer's failure."""
    smtp = pipeline.smtp
    setattr(smtp, refusal, True)
    worker = await pipeline.start()

    sid = await pipeline.complete()
    await pipeline.fulfilled(sid)
    await asyncio.sleep(1.0)  # at least one retry through a delay queue
    assert "confirmation_email" not in await pipeline.steps(sid)
    setattr(smtp, refusal, False)

    await pipeline.mails(1, timeout_s=15)
    await pipeline.settle(worker)
    assert len(smtp.for_session(sid)) == 1
    assert (await pipeline.steps(sid))["confirmation_email"].startswith("sent ")
    assert await pipeline.dead_letters() == []
