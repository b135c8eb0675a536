"""``fulfillment demo``: the stack with Stripe stood in fulfills a realistic mix, once each."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aio_pika
import pytest

from devkit import signing as sh
from devkit.mailsink import SmtpSink
from shared.topology import Topology
from tests.conftest import depth, free_port
from tests.processes import RoleProcess, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def demo_topology(
    worker_settings: WorkerSettings, channel: Any, topology: Topology
) -> AsyncIterator[Topology]:
    """The demo's own queues (BROKER_PREFIX=<the test's>.demo), deleted afterwards."""
    demo = Topology.from_settings(
        replace(worker_settings.broker, prefix=f"{worker_settings.broker.prefix}.demo")
    )
    await demo.declare(channel)
    yield demo
    await demo.delete(channel)


async def test_the_demo_fulfills_paid_and_delayed_orders_notifies_failures_and_stops(
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    database_url: str,
    topology: Topology,
    demo_topology: Topology,
    channel: Any,
) -> None:
    # a dead letter from before (an earlier demo): the summary counts only this run's
    await channel.default_exchange.publish(
        aio_pika.Message(sh.body(sh.event()), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        demo_topology.dead_queue,
    )
    env = {
        **worker_env(worker_settings),
        "INGRESS_PORT": str(free_port()),
        "INGRESS_HOST": "127.0.0.1",
        "STANDIN_PORT": str(free_port()),
        "WORKER_METRICS_PORT": str(free_port()),
    }
    env.pop("STRIPE_API_KEY")  # the demo brings its own Stripe
    demo = RoleProcess(["demo", "--workers", "1"], env)
    try:
        await demo.start()
        code = await demo.wait(100)
    finally:
        await demo.stop()

    output = "\n".join(demo.lines)
    assert code == 0, output[-3000:]
    summary = re.search(r"demo summary: (.*)", output)
    assert summary is not None, output[-3000:]
    assert summary.group(1) == (
        "fulfilled 9, emails sent 11, failed payments 2, dead letters 1 "
        "(the dead-letter queue holds 1 more from before)"
    )
    # one table, once (not a terminal: its last state only), every row as expected
    assert output.count("  SESSION ") == 1
    rows = re.findall(r"^demo +\| (\S) (cs_test_\w+) ", output, re.M)
    assert len(rows) == 12 and {mark for mark, _ in rows} == {"✓"}
    # the demo's dead letter is in its own DLQ; the one on-call watches stays empty
    assert await depth(channel, topology.dead_queue) == 0
    assert await depth(channel, demo_topology.dead_queue) == 2
    mails = await asyncio.to_thread(smtp.wait, 11)
    assert len({m["Message-ID"] for m in mails}) == 11
    assert sum(m["Subject"] == "Your payment did not go through" for m in mails) == 2
    # a local run subscribes to the outbound messages and shows each: none went unrouted
    shown = re.findall(r"^out +\| (\S+) fulfillment-id=", output, re.M)
    assert sorted(set(shown)) == ["order.fulfilled", "payment.failed"]
    assert shown.count("order.fulfilled") >= 9 and shown.count("payment.failed") >= 2
    assert "outbound message had no subscriber" not in output


async def test_the_local_mail_sink_shows_each_email_with_its_text() -> None:
    """New-user trial: `up` said it "prints each email", but showed only a summary line, so
    the order's items and total could not be seen anywhere in a local run."""
    from email.message import EmailMessage

    import aiosmtplib

    from devkit.mailsink import start_mail_sink

    lines: list[str] = []
    port = free_port()
    server = await start_mail_sink("127.0.0.1", port, lines.append)
    message = EmailMessage()
    message["From"], message["To"] = "orders@shop.test", "jenny@example.com"
    message["Subject"], message["Message-ID"] = "Your order", "<order.cs_1@shop.test>"
    message.set_content("Hello Jenny,\n\n  2 x T-shirt  40.00 USD\n\nTotal: 40.00 USD\n")
    try:
        await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
    finally:
        server.close()

    assert lines[0] == (
        "to=jenny@example.com subject='Your order' message-id=<order.cs_1@shop.test>"
    )
    assert lines[1:] == [
        "  Hello Jenny,",
        "  ",
        "    2 x T-shirt  40.00 USD",
        "  ",
        "  Total: 40.00 USD",
    ]
