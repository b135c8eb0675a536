"""A crafted message (someone with access to the broker) cannot wedge a worker: every header
the worker reads is parsed defensively, a copy that cannot be sent falls back to a cleaned
dead letter or to the queue's own dead-lettering, and `dlq show` escapes what it prints."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import struct
from typing import Any

import aio_pika
import pamqp.encode
import pytest

from devkit import signing as sh
from shared.broker import event_message
from shared.envelope import EventEnvelope
from shared.topology import Topology
from shared.vocabulary import (
    HEADER_ATTEMPT,
    HEADER_CREATED,
    HEADER_ERROR_TYPE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_FIRST_FAILED_AT,
    HEADER_LIVEMODE,
)
from tests.conftest import depth, drain, wait_for
from tests.pipeline import COMPLETED, Pipeline
from tests.processes import run_fulfillment, worker_env
from worker import consumer, retry
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


class Double(float):
    """A header value sent as AMQP's 64-bit double ('d'), as other clients may: pamqp reads
    it back as a float, and writes floats as 32-bit, where 1e300 does not fit."""


@pytest.fixture
def doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pamqp.encode.encode_table_value

    def encode(value: Any) -> bytes:
        if isinstance(value, Double):
            return b"d" + struct.pack(">d", value)
        return original(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", encode)


# --- reading headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "attempt"),
    [
        (None, 1),
        (2, 3),
        ("2", 3),
        (b"4", 5),
        ("99999999999999999999", retry.MAX_ATTEMPT),
        (10**30, retry.MAX_ATTEMPT),
        (1e300, retry.MAX_ATTEMPT),
        (3.0, 4),
        ("9" * 5000, 1),  # not parsed at all: past any count we write
        ("ten", 1),
        ("-3", 1),
        (-3, 1),
        (2.5, 1),
        (float("nan"), 1),
        (float("inf"), 1),
        (True, 1),
        ({"n": 2}, 1),
        ([2], 1),
    ],
)
def test_the_attempt_header_is_read_defensively_and_clamped(value: Any, attempt: int) -> None:
    assert retry.attempt_of({HEADER_ATTEMPT: value} if value is not None else {}) == attempt


def test_a_copy_keeps_the_first_failure_time_only_when_it_is_one() -> None:
    now = "2026-11-30T12:00:00.000+00:00"
    error = RuntimeError("x")
    for crafted in (1e300, "x" * 10_000, "not a time", {"a": 1}, b"2026-11-30"):
        headers = retry.failure_headers(
            error, 2, received={HEADER_FIRST_FAILED_AT: crafted}, worker_id="w", now=now
        )
        assert headers[HEADER_FIRST_FAILED_AT] == now
    kept = retry.failure_headers(
        error, 2, received={HEADER_FIRST_FAILED_AT: "2026-11-29T00:00:00"}, worker_id="w", now=now
    )
    assert kept[HEADER_FIRST_FAILED_AT] == "2026-11-29T00:00:00"


def test_cleaned_headers_keep_only_ours_of_the_type_we_write() -> None:
    received = {
        HEADER_EVENT_ID: "evt_1",
        HEADER_EVENT_TYPE: "t" * 300,  # longer than we ever write
        HEADER_LIVEMODE: "yes",
        HEADER_CREATED: 1_700_000_000,
        "traceparent": "00-abc",
        "note": 1e300,
    }
    assert retry.cleaned_headers(received) == {
        HEADER_EVENT_ID: "evt_1",
        HEADER_CREATED: 1_700_000_000,
    }


# --- a worker against crafted messages --------------------------------------------------------


async def publish_crafted(
    amqp: Any, topology: Topology, doc: dict[str, Any], headers: dict[str, Any]
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(topology.events_exchange)
    raw = json.dumps(doc).encode()
    message = event_message(raw, EventEnvelope.parse(raw), source="crafted", headers=headers)
    await exchange.publish(message, COMPLETED)
    await channel.close()


CRAFTED = {
    "attempt-huge-string": {HEADER_ATTEMPT: "99999999999999999999"},
    "attempt-huge-double": {HEADER_ATTEMPT: Double(1e300)},
    "attempt-malformed": {HEADER_ATTEMPT: "ten"},
    "first-failure-huge-double": {HEADER_FIRST_FAILED_AT: Double(1e300)},
    "other-header-huge-double": {"note": Double(1e300)},
    "event-type-header-junk": {HEADER_EVENT_TYPE: "x" * 5000},
}


async def test_crafted_messages_are_dead_lettered_and_the_next_order_goes_through(
    doubles: None, pipeline: Pipeline, amqp: Any
) -> None:
    worker = await pipeline.start(dataclasses.replace(pipeline.settings, concurrency=2))
    for n, (name, headers) in enumerate(CRAFTED.items()):
        # about a session Stripe does not know: a permanent failure, so a dead letter
        session = sh.checkout_session(f"cs_test_crafted_{n}")
        event = sh.event(COMPLETED, session, event_id=f"evt_{name}")
        await publish_crafted(amqp, pipeline.topology, event, headers)
    sid = pipeline.standin.add_session()["id"]
    await publish_crafted(amqp, pipeline.topology, pipeline.event(COMPLETED, sid), {})

    await pipeline.fulfilled(sid, timeout_s=20)
    dead = await wait_for(lambda: _all_dead(pipeline, len(CRAFTED)), timeout_s=20, interval_s=0.2)
    assert {m.headers[HEADER_EVENT_ID] for m in dead} == {f"evt_{name}" for name in CRAFTED}
    for message in dead:
        assert message.headers[HEADER_ERROR_TYPE] == "StripeNotFound", message.headers
        assert "x-death" not in message.headers  # moved by the worker, not left to the broker
        assert isinstance(message.headers[HEADER_ATTEMPT], int)
    await wait_for(lambda: worker.in_flight == 0)


async def _all_dead(pipeline: Pipeline, count: int) -> list[Any]:
    """Every dead letter, once there are ``count``."""
    if await depth(pipeline.channel, pipeline.topology.dead_queue) < count:
        return []
    return await pipeline.dead_letters()


async def test_when_no_copy_can_be_sent_the_message_goes_to_the_queues_own_dead_lettering(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the broker's tables cannot hold this")  # not a broker outage

    monkeypatch.setattr(consumer, "publish_confirmed", refused)
    worker = await pipeline.start()
    await pipeline.publish(sh.event(COMPLETED, sh.checkout_session("cs_test_nocopy")))

    [message] = await wait_for(pipeline.dead_letters, timeout_s=20)
    assert message.headers["x-death"][0]["reason"] == "rejected"  # nacked: the broker moved it
    await wait_for(lambda: worker.in_flight == 0)


async def test_a_handling_task_that_fails_unexpectedly_still_settles_its_message(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in the retry policy")

    monkeypatch.setattr(retry, "decide", broken)
    worker = await pipeline.start()
    await pipeline.publish(sh.event(COMPLETED, sh.checkout_session("cs_test_bug")))

    [message] = await wait_for(pipeline.dead_letters, timeout_s=20)
    assert message.headers["x-death"][0]["reason"] == "rejected"
    await wait_for(lambda: worker.in_flight == 0)


# --- dlq show ---------------------------------------------------------------------------------


async def test_dlq_show_escapes_control_characters_in_headers_and_body(
    worker_settings: WorkerSettings, amqp: Any, topology: Topology
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    body = b"not json \x1b[2J\x1b[31mRED\r\x07 ok\nsecond line \xe2\x80\xae"
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            headers={
                HEADER_EVENT_ID: "evt_ctl",
                "note": "a\x1b]0;title\x07b",
                "raw": bytearray(b"\x1b[H"),
            },
        ),
        topology.dead_queue,
    )
    env = {**os.environ, **worker_env(worker_settings)}
    result = await asyncio.to_thread(run_fulfillment, "dlq", "show", "evt_ctl", env=env)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    for raw in ("\x1b", "\x07", "\r", "\u202e"):
        assert raw not in out
    assert "\\x1b[2J" in out and "\\x07" in out and "\\r" in out and "\\u202e" in out
    assert "second line" in out.split("\n")[-2]  # a body's own line breaks are kept


async def test_replaying_a_letter_whose_headers_cannot_be_sent_again_keeps_it(
    doubles: None, worker_settings: WorkerSettings, amqp: Any, channel: Any, topology: Topology
) -> None:
    """A letter the broker dead-lettered itself keeps its own headers (a double, here):
    replay says it failed and keeps it, and replays the others."""
    publisher = await amqp.channel(publisher_confirms=True)
    for event_id, headers in (("evt_double", {"note": Double(1e300)}), ("evt_fine", {})):
        body = json.dumps(sh.event(event_id=event_id)).encode()
        await publisher.default_exchange.publish(
            aio_pika.Message(body, headers={HEADER_EVENT_ID: event_id, **headers}),
            topology.dead_queue,
        )
    env = {**os.environ, **worker_env(worker_settings)}
    result = await asyncio.to_thread(run_fulfillment, "dlq", "replay", "--all", env=env)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "replayed 1 of 2 matching dead letter(s); 1 failed and stayed in the DLQ" in result.stdout
    )
    [kept] = await drain(channel, topology.dead_queue)
    assert kept.headers[HEADER_EVENT_ID] == "evt_double"
    [replayed] = await drain(channel, topology.work_queue)
    assert replayed.headers[HEADER_EVENT_ID] == "evt_fine"
