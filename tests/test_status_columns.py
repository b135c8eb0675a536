"""``fulfillment status``: unacked messages and rates where RabbitMQ's management API answers
(a '-' and a one-line hint where it does not), a DLQ holding letters in red on a terminal,
and ``--watch``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import pytest

from devkit.services import RabbitNode, ServiceUnavailable, private_rabbitmq
from fulfillment.status import render
from shared.settings import BrokerSettings
from shared.topology import Topology
from shared.vocabulary import HEADER_LAST_FAILED_AT
from tests.conftest import _unavailable, drain, free_port, wait_for
from tests.processes import broker_env, run_fulfillment
from tests.tcp_proxy import TcpProxy
from tests.terminal import Terminal

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def managed_node() -> Iterator[RabbitNode]:
    """A throwaway RabbitMQ node with the management plugin (the machine's may have none)."""
    with contextlib.ExitStack() as stack:
        try:
            rabbit = stack.enter_context(private_rabbitmq(1, prefix="status", management=True))
        except ServiceUnavailable as exc:
            _unavailable(f"a throwaway RabbitMQ node ({exc})")
        yield rabbit.nodes[0]


@pytest.fixture
async def declared(managed_node: RabbitNode) -> AsyncIterator[Topology]:
    topology = Topology.from_settings(BrokerSettings(url=managed_node.url, prefix="st"))
    connection = await aio_pika.connect(managed_node.url)
    async with connection:
        await topology.declare(await connection.channel())
    yield topology
    connection = await aio_pika.connect(managed_node.url)
    async with connection:
        await topology.delete(await connection.channel())


def _status_env(broker_url: str, prefix: str, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **broker_env(BrokerSettings(url=broker_url, prefix=prefix)),
        "DATABASE_URL": database_url,
        **extra,
    }


async def test_status_shows_what_consumers_hold_unacked_and_the_rates_from_the_management_api(
    managed_node: RabbitNode, declared: Topology, database_url: str
) -> None:
    connection = await aio_pika.connect(managed_node.url)
    async with connection:
        channel = await connection.channel()
        for _ in range(5):
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), declared.work_queue)
        holder = await connection.channel()
        await holder.set_qos(prefetch_count=2)
        held: list[Any] = []

        async def hold(message: Any) -> None:  # a consumer busy with two messages
            held.append(message)

        await (await holder.get_queue(declared.work_queue)).consume(hold)
        await wait_for(lambda: len(held) == 2)

        async def keep_publishing() -> None:  # something coming in, for a rate above 0
            while True:
                await channel.default_exchange.publish(aio_pika.Message(b"{}"), declared.dead_queue)
                await asyncio.sleep(0.05)

        publisher = asyncio.create_task(keep_publishing())
        env = _status_env(
            managed_node.url,
            "st",
            database_url,
            RABBITMQ_MANAGEMENT_URL=str(managed_node.management_url),
        )
        try:

            async def measured() -> dict[str, Any] | None:
                result = await asyncio.to_thread(run_fulfillment, "status", "--json", env=env)
                assert result.returncode == 0, result.stderr
                report: dict[str, Any] = json.loads(result.stdout)
                rates = report["rates"]
                ready = rates[declared.work_queue]["unacked"] == 2
                return report if ready and rates[declared.dead_queue]["in_per_s"] > 0 else None

            report = await wait_for(measured, timeout_s=30, interval_s=0.5)
            text = await asyncio.to_thread(run_fulfillment, "status", env=env)
        finally:
            publisher.cancel()

    assert report["queues"][declared.work_queue] == {"messages": 3, "consumers": 1}
    assert report["rates"][declared.work_queue]["unacked"] == 2
    assert "management_error" not in report and "***" in report["management"]
    [line] = [x for x in text.stdout.splitlines() if x.startswith(declared.work_queue + " ")]
    assert line.split()[1:4] == ["3", "1", "2"]  # READY, CONSUMERS, UNACKED
    assert "management API" not in text.stdout


async def test_without_the_management_api_the_columns_say_unknown_and_one_line_says_why(
    broker_settings: BrokerSettings, topology: Topology, database_url: str
) -> None:
    env = _status_env(
        broker_settings.url,
        broker_settings.prefix,
        database_url,
        RABBITMQ_MANAGEMENT_URL=f"http://guest:guest@127.0.0.1:{free_port()}/",
    )

    result = await asyncio.to_thread(run_fulfillment, "status", env=env)

    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith(topology.work_queue + " ")]
    assert line.split()[1:] == ["0", "0", "-", "-", "-"]
    hints = [x for x in result.stdout.splitlines() if "management API" in x]
    assert len(hints) == 1 and "nothing answers on 127.0.0.1:" in hints[0]
    assert "rabbitmq-plugins enable rabbitmq_management" in hints[0]
    assert "guest" not in result.stdout.replace("amqp://guest:***", "")


def _report(dead: int) -> dict[str, Any]:
    return {
        "broker": "amqp://guest:***@localhost:5672/",
        "dead_queue": "fulfillment.dead",
        "queues": {
            "fulfillment": {"messages": 0, "consumers": 2},
            "fulfillment.dead": {"messages": dead, "consumers": 0},
        },
        "oldest_dead_letter_age_s": 30.0 if dead else None,
        "fulfillments_last_hour": 4,
    }


def test_a_dlq_holding_letters_stands_out_in_colour_and_only_then() -> None:
    coloured = render(_report(dead=3), colour=True).splitlines()
    [dead_line] = [x for x in coloured if "fulfillment.dead" in x]

    assert dead_line.startswith("\x1b[1;31m") and dead_line.endswith("\x1b[0m")
    assert "\x1b[" not in "".join(x for x in coloured if x != dead_line)
    assert "\x1b[" not in render(_report(dead=0), colour=True)
    assert "\x1b[" not in render(_report(dead=3), colour=False)


@pytest.mark.parametrize("no_color", [None, "1"])
async def test_status_watch_redraws_in_place_on_a_terminal_until_ctrl_c(
    no_color: str | None, broker_settings: BrokerSettings, topology: Topology, database_url: str
) -> None:
    connection = await aio_pika.connect(broker_settings.url)
    async with connection:
        await (await connection.channel()).default_exchange.publish(
            aio_pika.Message(b"{}"), topology.dead_queue
        )
    env = _status_env(broker_settings.url, broker_settings.prefix, database_url)
    env.pop("NO_COLOR", None)
    if no_color:
        env["NO_COLOR"] = no_color
    terminal = Terminal(["status", "--watch", "0.5"], env)
    try:
        await asyncio.to_thread(terminal.wait_for, "Ctrl-C stops", times=2)  # drawn again
        terminal.ctrl_c()
        code = await asyncio.to_thread(terminal.wait)
    finally:
        terminal.close()

    output = terminal.output
    assert code == 130
    assert output.count("\x1b[H\x1b[2J") >= 2  # the screen cleared before each drawing
    assert output.count("oldest dead letter:") == output.count("\x1b[H\x1b[2J")
    dead_rows = re.findall(rf".*{re.escape(topology.dead_queue)} .*", output)
    assert dead_rows and all(("\x1b[1;31m" in row) == (no_color is None) for row in dead_rows)
    assert "Traceback" not in output


async def test_status_watch_reads_the_dead_letters_again_only_when_their_number_changes(
    broker_settings: BrokerSettings, topology: Topology, database_url: str, channel: Any
) -> None:
    """Reading holds the letters for a moment, unseen by a replay or purge meanwhile: a
    watch every half second must not keep doing that while nothing changes."""
    failed = {HEADER_LAST_FAILED_AT: time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    letter = aio_pika.Message(b"{}", headers=failed)
    await channel.default_exchange.publish(letter, topology.dead_queue)
    env = _status_env(broker_settings.url, broker_settings.prefix, database_url)
    watch = Watch(await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fulfillment", "status", "--watch", "0.2", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    ))  # fmt: skip
    try:
        await watch.until(lambda out: len(re.findall(r"oldest dead letter: \d+s old", out)) >= 5)
    finally:
        await watch.stop()
    [read] = await drain(channel, topology.dead_queue)
    # delivered once before (the first round's read), not once a round
    assert (read.headers or {}).get("x-delivery-count") == 1


async def test_status_watch_says_when_the_broker_goes_away_and_shows_it_again_when_it_is_back(
    broker_settings: BrokerSettings, topology: Topology, database_url: str
) -> None:
    proxy = TcpProxy.in_front_of(broker_settings.url)
    await proxy.start()
    env = _status_env(proxy.url(), broker_settings.prefix, database_url)
    watch = Watch(await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fulfillment", "status", "--watch", "0.3", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    ))  # fmt: skip
    try:
        await watch.until(lambda out: "oldest dead letter:" in out)
        await proxy.cut()  # the broker gone (a closed port)
        await watch.until(lambda _: "RabbitMQ is not reachable" in watch.errors)
        shown_before = watch.output.count("oldest dead letter:")
        await proxy.restore()
        await watch.until(lambda out: out.count("oldest dead letter:") > shown_before)
        assert watch.process.returncode is None  # still watching
    finally:
        code = await watch.stop()
        await proxy.close()

    assert code == 130
    errors = watch.errors.splitlines()
    assert errors and all(" RabbitMQ is not reachable at " in line for line in errors), errors
    assert all(line.startswith("fulfillment status: ") for line in errors)


class Watch:
    """A running ``status --watch`` whose output is read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._out = bytearray()
        self._err = bytearray()
        self._readers = [
            asyncio.ensure_future(self._read(process.stdout, self._out)),
            asyncio.ensure_future(self._read(process.stderr, self._err)),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, into: bytearray) -> None:
        while stream is not None and (chunk := await stream.read(65536)):
            into += chunk

    @property
    def output(self) -> str:
        return self._out.decode(errors="replace")

    @property
    def errors(self) -> str:
        return self._err.decode(errors="replace")

    async def until(self, shown: Callable[[str], bool], timeout_s: float = 60) -> None:
        await wait_for(lambda: shown(self.output), timeout_s=timeout_s)

    async def stop(self) -> int:
        """Ctrl-C, then its exit code once it ended and its output is all read."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*self._readers), 10)
        return code
