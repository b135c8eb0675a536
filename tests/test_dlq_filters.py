"""A ``dlq`` filter says what it matched: one that matches nothing names what the DLQ holds
(a typo must not read as all clear), and a dry run names the letters it would touch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

import pytest

from devkit import signing as sh
from shared.broker import event_message
from shared.envelope import EventEnvelope
from shared.settings import BrokerSettings
from shared.topology import Topology
from shared.vocabulary import (
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_LAST_FAILED_AT,
)
from tests.conftest import depth
from tests.processes import broker_env, run_fulfillment

pytestmark = pytest.mark.timeout(60)


async def dead_letters(channel: Any, topology: Topology, *event_types: str) -> list[dict[str, Any]]:
    """One dead letter per type, as a worker leaves it, put straight into the DLQ."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    events = [sh.event(event_type) for event_type in event_types]
    for event in events:
        raw = sh.body(event)
        failure = {HEADER_ERROR_TYPE: "StripeNotFound", HEADER_ERROR_MESSAGE: "no such session",
                   HEADER_LAST_FAILED_AT: at}  # fmt: skip
        message = event_message(raw, EventEnvelope.parse(raw), source="test", headers=failure)
        await channel.default_exchange.publish(message, topology.dead_queue)
    return events


async def dlq(broker: BrokerSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **broker_env(broker)}
    return await asyncio.to_thread(run_fulfillment, "dlq", *args, env=env)


COMPLETED = "checkout.session.completed"
FAILED = "checkout.session.async_payment_failed"


async def test_a_type_typo_names_the_types_present_with_their_counts_and_exits_1(
    broker_settings: BrokerSettings, topology: Topology, channel: Any
) -> None:
    await dead_letters(channel, topology, COMPLETED, COMPLETED, COMPLETED, FAILED)
    typo = "checkout.session.complete"

    listed = await dlq(broker_settings, "list", "--type", typo)
    as_json = await dlq(broker_settings, "list", "--json", "--type", typo)
    replayed = await dlq(broker_settings, "replay", "--type", typo, "--dry-run")

    said = (
        f"no dead letter of type {typo} (did you mean {COMPLETED}?); the DLQ holds: "
        f"{COMPLETED} (3), {FAILED} (1)"
    )
    assert (listed.returncode, listed.stdout) == (1, "")
    assert listed.stderr == f"fulfillment dlq list: {said}\n"
    assert as_json.returncode == 1 and as_json.stdout.strip() == "[]"
    assert as_json.stderr == f"fulfillment dlq list: {said}\n"
    assert (replayed.returncode, replayed.stdout) == (1, "")
    assert replayed.stderr == f"fulfillment dlq replay: {said}\n"
    assert await depth(channel, topology.dead_queue) == 4  # nothing touched


async def test_a_type_that_matches_in_an_empty_dlq_says_there_is_nothing_at_all(
    broker_settings: BrokerSettings, topology: Topology
) -> None:
    listed = await dlq(broker_settings, "list", "--type", COMPLETED)
    everything = await dlq(broker_settings, "list")

    assert listed.returncode == 1
    assert "no dead letters (none of type checkout.session.completed, nor of any other)" in (
        listed.stderr
    )
    assert (everything.returncode, everything.stdout) == (0, "no dead letters\n")


async def test_a_dry_run_names_each_letter_it_would_replay_and_replays_none(
    broker_settings: BrokerSettings, topology: Topology, channel: Any
) -> None:
    completed, failed = await dead_letters(channel, topology, COMPLETED, FAILED)

    dry = await dlq(broker_settings, "replay", "--type", FAILED, "--dry-run")

    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == "dry run: 1 dead letter(s) would be replayed:"
    assert lines[1].split()[:3] == ["EVENT", "ID", "TYPE"]
    [row] = lines[2:]
    assert row.split()[:2] == [failed["id"], FAILED]
    assert "StripeNotFound: no such session" in row
    assert completed["id"] not in dry.stdout
    assert await depth(channel, topology.dead_queue) == 2
