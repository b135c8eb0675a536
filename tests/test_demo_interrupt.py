"""``fulfillment demo`` on a terminal: one table redrawn in place, and Ctrl-C honoured at
once (exit 130, as a shell expects of a command it interrupted), through a real pty."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from devkit.mailsink import SmtpSink
from shared.topology import Topology
from tests.conftest import free_port
from tests.processes import worker_env
from tests.terminal import Terminal
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def demo_topology(
    worker_settings: WorkerSettings, channel: Any, topology: Topology
) -> AsyncIterator[Topology]:
    """The demo's own queues, under the test's prefix, deleted afterwards."""
    yield Topology.from_settings(
        replace(worker_settings.broker, prefix=f"{worker_settings.broker.prefix}.demo")
    )
    await Topology.from_settings(
        replace(worker_settings.broker, prefix=f"{worker_settings.broker.prefix}.demo")
    ).delete(channel)


def demo_env(worker_settings: WorkerSettings) -> dict[str, str]:
    ports = iter(range(free_port(4), 65536))
    env = {
        **os.environ,
        **worker_env(worker_settings),
        "INGRESS_PORT": str(next(ports)),
        "INGRESS_HOST": "127.0.0.1",
        "STANDIN_PORT": str(next(ports)),
        "WORKER_METRICS_PORT": str(next(ports)),
    }
    env.pop("STRIPE_API_KEY")
    env.pop("NO_COLOR", None)
    return env


async def test_ctrl_c_stops_the_demo_at_once_with_130_and_nothing_is_drawn_after_it(
    worker_settings: WorkerSettings, smtp: SmtpSink, demo_topology: Topology
) -> None:
    terminal = Terminal(["demo", "--workers", "1"], demo_env(worker_settings))
    try:
        # the stack is up and the demo is sending its events (the "Ctrl-C at 1 s")
        await asyncio.to_thread(terminal.wait_for, "Ctrl-C stops everything")
        await asyncio.sleep(0.3)
        started = time.monotonic()
        terminal.ctrl_c()
        code = await asyncio.to_thread(terminal.wait, 30)
        took = time.monotonic() - started
    finally:
        terminal.close()

    output = terminal.output
    print(f"Ctrl-C to exit: {took:.2f}s")
    assert code == 130, output[-3000:]
    assert took < 1.5, f"{took:.2f}s"  # the bar is a second; this host is shared
    stopping = output.split("up       | stopping:", 1)[1]
    assert "SESSION" not in stopping and "demo summary" not in output
    assert "up       | stopped" in stopping
    assert "Traceback" not in output


async def test_on_a_terminal_the_demo_is_one_table_redrawn_in_place_with_marks(
    worker_settings: WorkerSettings, smtp: SmtpSink, demo_topology: Topology
) -> None:
    terminal = Terminal(["demo", "--workers", "1"], demo_env(worker_settings))
    try:
        code = await asyncio.to_thread(terminal.wait, 100)
    finally:
        terminal.close()

    output = terminal.output
    assert code == 0, output[-3000:]
    # each drawing after the first starts by going back over the table's 13 lines
    drawings = output.count("  SESSION ")
    assert drawings >= 2 and output.count("\x1b[13F\x1b[J") >= drawings - 1
    last = output[output.rindex("  SESSION ") :]
    marks = re.findall(r"\| (?:\x1b\[32m)?(\S)(?:\x1b\[0m)? cs_test_", last)
    assert marks == ["✓"] * 12, last
    assert "\x1b[32m✓\x1b[0m" in last  # coloured on a terminal
    assert re.search(r"demo summary: fulfilled 9, emails sent 11, failed payments 2", output)
