"""``fulfillment dlq``: list, show, replay and purge dead letters, and what each letter says."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from devkit import signing as sh
from shared.broker import event_message
from shared.envelope import EventEnvelope
from shared.topology import Topology
from shared.vocabulary import (
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_EVENT_ID,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_REPLAYED_FROM,
)
from tests.conftest import depth, depth_is, drain, wait_for
from tests.pipeline import Pipeline
from tests.processes import acli, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)


async def test_dlq_list_shows_why_oldest_failure_first_and_leaves_every_dead_letter(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    events = await pipeline.dead_letter_unknown_sessions(3)

    first = await acli(worker_settings, "dlq", "list", "--json")
    second = await acli(worker_settings, "dlq", "list", "--json", "--limit", "2")
    table = await acli(worker_settings, "dlq", "list")

    assert first.returncode == 0, first.stderr
    letters = json.loads(first.stdout)
    listed = [d["event_id"] for d in letters]
    # the worker handles the three concurrently, so they die in any order (and within
    # one second: the order by failure time is tested with letters minutes apart, below)
    assert sorted(listed) == sorted(e["id"] for e in events)
    assert {d["error_type"] for d in letters} == {"StripeNotFound"}
    assert all(d["attempts"] == 1 and d["first_failed_at"] and d["worker_id"] for d in letters)
    sessions = {e["id"]: e["data"]["object"]["id"] for e in events}
    assert {d["event_id"]: d["checkout_session_id"] for d in letters} == sessions
    assert [d["event_id"] for d in json.loads(second.stdout)] == listed[:2]
    assert listed[0] in table.stdout and "StripeNotFound" in table.stdout
    remaining = await pipeline.dead_letters()
    assert sorted(m.headers[HEADER_EVENT_ID] for m in remaining) == sorted(listed)


async def test_status_and_list_find_the_oldest_dead_letter_however_often_they_read(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    """Regression: status peeked at the queue's head, and RabbitMQ 3.10 put each peeked
    letter back behind the others, so the "oldest" age changed with every run (12m, 7m,
    12m) and the listing's order rotated. The oldest is now found by reading them all."""
    now = time.time()
    ages_s = {"evt_7m": 420, "evt_12m": 720, "evt_1m": 60}  # queue order is not age order
    for event_id, age in ages_s.items():
        at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - age))
        await channel.default_exchange.publish(
            aio_pika.Message(
                sh.body(sh.event(event_id=event_id)),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={
                    HEADER_EVENT_ID: event_id,
                    HEADER_ERROR_TYPE: "StripeNotFound",
                    HEADER_ERROR_MESSAGE: "No such checkout.session",
                    HEADER_FIRST_FAILED_AT: at,
                    HEADER_LAST_FAILED_AT: at,
                },
            ),
            topology.dead_queue,
        )

    for _ in range(3):
        status = json.loads((await acli(worker_settings, "status", "--json")).stdout)
        assert 715 <= status["oldest_dead_letter_age_s"] < 780
        assert status["oldest_dead_letter_partial"] is False
        listed = json.loads((await acli(worker_settings, "dlq", "list", "--json")).stdout)
        assert [d["event_id"] for d in listed] == ["evt_12m", "evt_7m", "evt_1m"]
    assert len(await drain(channel, topology.dead_queue)) == 3


async def test_dlq_show_prints_the_headers_and_the_pretty_body(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    [event] = await pipeline.dead_letter_unknown_sessions(1)

    shown = await acli(worker_settings, "dlq", "show", event["id"])
    missing = await acli(worker_settings, "dlq", "show", "evt_not_there")

    assert shown.returncode == 0, shown.stderr
    assert '"fulfillment-error-type": "StripeNotFound"' in shown.stdout
    assert f'"id": "{event["id"]}"' in shown.stdout
    # exit 1, as replay and purge of an id not in the DLQ (2 is a usage error)
    assert missing.returncode == 1 and "not in the DLQ: evt_not_there" in missing.stderr
    assert len(await pipeline.dead_letters()) == 1


async def test_a_dead_letter_without_an_event_id_is_named_by_its_message_and_can_be_picked(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    """Something other than the ingress published a body that is no event: its dead letter
    has no event id to name it by, so it is named msg:<message id>, and only it is picked."""
    await pipeline.start()
    await pipeline.publish(b"not json at all")
    await pipeline.publish(b"[1, 2, 3]")

    async def two_dead() -> bool:
        return await depth(pipeline.channel, pipeline.topology.dead_queue) == 2

    await wait_for(two_dead, timeout_s=20)
    listed = json.loads((await acli(worker_settings, "dlq", "list", "--json")).stdout)
    names = [letter["event_id"] for letter in listed]
    assert len(set(names)) == 2 and all(name.startswith("msg:") for name in names)

    shown = await acli(worker_settings, "dlq", "show", names[0])
    purged = await acli(worker_settings, "dlq", "purge", names[0], "--yes")

    assert shown.returncode == 0, shown.stderr
    assert '"fulfillment-error-type": "MalformedEvent"' in shown.stdout
    assert purged.returncode == 0, purged.stderr
    [left] = await pipeline.dead_letters()
    assert left.message_id == names[1].removeprefix("msg:")


async def test_replay_after_a_fix_fulfills_and_replaying_a_fulfilled_session_is_a_no_op(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    [event] = await pipeline.dead_letter_unknown_sessions(1)
    sid = event["data"]["object"]["id"]
    pipeline.standin.add_session(sid)  # the cause is fixed: Stripe knows the session now

    dry = await acli(worker_settings, "dlq", "replay", "--all", "--dry-run")
    assert "1 dead letter(s) would be replayed" in dry.stdout
    replayed = await acli(worker_settings, "dlq", "replay", event["id"])
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout

    worker = await pipeline.start()
    await pipeline.fulfilled(sid)
    await pipeline.mails(1)

    # the same event dead again (say a worker crashed after fulfilling): replaying changes nothing
    copy = aio_pika.Message(
        json.dumps(event).encode(),
        headers={HEADER_EVENT_ID: event["id"], "stripe-event-type": event["type"]},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await pipeline.channel.default_exchange.publish(copy, pipeline.topology.dead_queue)
    again = await acli(worker_settings, "dlq", "replay", "--type", "checkout.session.completed")
    assert "replayed 1 of 1" in again.stdout
    await wait_for(
        lambda: pipeline.rows(
            "SELECT 1 FROM processed_events WHERE event_id = $1 "
            "AND last_outcome = 'already_fulfilled' AND outcome = 'fulfilled'",
            event["id"],
        )
    )
    await worker.stop(grace_s=2)
    assert len(await pipeline.fulfillments(sid)) == 1
    assert len(pipeline.mails_for(sid)) == 1
    assert await pipeline.dead_letters() == []


async def test_a_replayed_copy_starts_over_and_says_where_it_came_from(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    [event] = await pipeline.dead_letter_unknown_sessions(1)

    assert (await acli(worker_settings, "dlq", "replay", event["id"])).returncode == 0

    [message] = await pipeline.queued()
    assert message.headers[HEADER_REPLAYED_FROM] == pipeline.topology.dead_queue
    assert "fulfillment-attempt" not in message.headers
    assert "fulfillment-error-type" not in message.headers
    assert json.loads(message.body)["id"] == event["id"]


async def test_purge_refuses_without_yes_and_removes_only_what_it_is_told_with_yes(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    events = await pipeline.dead_letter_unknown_sessions(2)

    refused = await acli(worker_settings, "dlq", "purge", "--all")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    purged = await acli(worker_settings, "dlq", "purge", events[0]["id"], "--yes")

    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead letter(s)" in purged.stdout
    assert any(
        log.get("event") == "dead letter purged" and log.get("event_id") == events[0]["id"]
        for log in map(json.loads, filter(None, purged.stderr.splitlines()))
    )
    remaining = await pipeline.dead_letters()
    assert [m.headers[HEADER_EVENT_ID] for m in remaining] == [events[1]["id"]]


async def test_replay_and_purge_of_event_ids_not_in_the_dlq_say_so_and_exit_1(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    [event] = await pipeline.dead_letter_unknown_sessions(1)

    dry = await acli(worker_settings, "dlq", "replay", event["id"], "evt_typo", "--dry-run")
    purge_typo = await acli(worker_settings, "dlq", "purge", "evt_typo", "--yes")
    replay_typo = await acli(worker_settings, "dlq", "replay", "evt_typo")

    for result in (dry, purge_typo, replay_typo):
        assert result.returncode == 1, result
        assert "not in the DLQ: evt_typo" in result.stderr
        assert "running at the same time" in result.stderr  # letters it holds look missing
    assert "1 dead letter(s) would be replayed" in dry.stdout and event["id"] in dry.stdout
    assert "purged 0" in purge_typo.stdout and "replayed 0 of 0" in replay_typo.stdout
    assert [m.headers[HEADER_EVENT_ID] for m in await pipeline.dead_letters()] == [event["id"]]


async def put_dead_letters(
    channel: AbstractChannel, topology: Topology, *event_types: str
) -> list[dict[str, Any]]:
    """One dead letter per type, as a worker leaves it (event headers and failure headers),
    put straight into the DLQ; the events, in order."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    events = [sh.event(event_type) for event_type in event_types]
    for event in events:
        raw = sh.body(event)
        failure = {
            HEADER_ERROR_TYPE: "StripeNotFound",
            HEADER_ERROR_MESSAGE: "no such checkout session",
            HEADER_FIRST_FAILED_AT: at,
            HEADER_LAST_FAILED_AT: at,
        }
        message = event_message(raw, EventEnvelope.parse(raw), source="test", headers=failure)
        await channel.default_exchange.publish(message, topology.dead_queue)
    return events


async def dead_ids(channel: AbstractChannel, topology: Topology) -> list[str]:
    return [m.headers[HEADER_EVENT_ID] for m in await drain(channel, topology.dead_queue)]


async def test_a_replay_the_broker_does_not_take_keeps_the_dead_letter_and_exits_1(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    """The dead copy goes only once the new one is confirmed: with the work queue gone (the
    publish is returned), nothing is lost and the command fails."""
    [event] = await put_dead_letters(channel, topology, "checkout.session.completed")
    await channel.queue_delete(topology.work_queue)

    result = await acli(worker_settings, "dlq", "replay", event["id"])

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "1 failed" in result.stdout
    assert "replay failed; dead letter kept" in result.stderr
    assert await dead_ids(channel, topology) == [event["id"]]


async def test_dlq_list_and_replay_by_type_pick_only_that_type(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    completed, failed = await put_dead_letters(
        channel,
        topology,
        "checkout.session.completed",
        "checkout.session.async_payment_failed",
    )

    listed = await acli(
        worker_settings, "dlq", "list", "--json", "--type", "checkout.session.completed"
    )
    replayed = await acli(worker_settings, "dlq", "replay", "--type", "checkout.session.completed")

    assert [letter["event_id"] for letter in json.loads(listed.stdout)] == [completed["id"]]
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout
    assert await dead_ids(channel, topology) == [failed["id"]]
    queued = await drain(channel, topology.work_queue)
    assert [m.headers[HEADER_EVENT_ID] for m in queued] == [completed["id"]]


async def test_replay_at_a_rate_spaces_the_replays_out(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    """--rate 5: five replays take at least four fifths of a second from first to last."""
    await put_dead_letters(channel, topology, *["checkout.session.completed"] * 5)

    result = await acli(worker_settings, "dlq", "replay", "--all", "--rate", "5")

    assert result.returncode == 0, result.stderr
    times = [
        datetime.fromisoformat(log["timestamp"])
        for log in (json.loads(line) for line in result.stderr.splitlines() if line[:1] == "{")
        if log.get("event") == "dead letter replayed"
    ]
    assert len(times) == 5
    assert (times[-1] - times[0]).total_seconds() >= 0.7, times


async def test_purge_at_a_terminal_asks_first_and_only_a_yes_purges(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    [event] = await put_dead_letters(channel, topology, "checkout.session.completed")
    env = {**os.environ, **worker_env(worker_settings), "LOG_FORMAT": "json"}

    def at_a_terminal(answer: str) -> subprocess.CompletedProcess[str]:
        controller, terminal = os.openpty()
        os.write(controller, answer.encode() + b"\n")
        try:
            return subprocess.run(
                [sys.executable, "-m", "fulfillment", "dlq", "purge", "--all"],
                stdin=terminal,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
        finally:
            os.close(terminal)
            os.close(controller)

    for answer in ("n", "", "maybe"):
        kept = await asyncio.to_thread(at_a_terminal, answer)
        assert kept.returncode == 1, (answer, kept.stdout, kept.stderr)
        assert "nothing purged" in kept.stdout
    yes = await asyncio.to_thread(at_a_terminal, "y")

    assert yes.returncode == 0, (yes.stdout, yes.stderr)
    assert "purged 1 dead letter(s)" in yes.stdout
    assert await dead_ids(channel, topology) == []
    assert event["id"] in yes.stderr  # each removed letter is logged


async def test_piping_dlq_output_into_head_is_quiet(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    await pipeline.dead_letter_unknown_sessions(40)
    env = {**os.environ, **worker_env(worker_settings)}

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    fulfillment = f"{sys.executable} -m fulfillment dlq list"
    head = await asyncio.to_thread(run, f"{fulfillment} | head -1")
    # a reader gone before anything was written (`true` exits at once): always a broken pipe
    gone = await asyncio.to_thread(run, f"{fulfillment} | true")

    assert head.stdout.startswith("EVENT ID")
    for result in (head, gone):
        assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert head.returncode in (0, 141)  # whether head left before the last write or not
    assert gone.returncode == 141  # as any command cut off by its reader


def test_the_dlq_table_keeps_one_line_per_letter_whatever_its_headers_hold() -> None:
    """A letter may come from anywhere (a replayed copy, another publisher); a line break
    in its event id split the table (black-box trial)."""
    import io

    from fulfillment.dlq import DeadLetter, print_table

    letter = DeadLetter(
        event_id="evt_a\r\nX-Evil: 1",
        event_type="checkout.session.completed\x00",
        attempts=1,
        error_type="MalformedEvent",
        error="bad\tthing\nhere",
        first_failed_at=None,
        last_failed_at="2026-11-29T18:00:00\n",
        worker_id=None,
        checkout_session_id=None,
        headers={},
        body=b"",
    )
    out = io.StringIO()

    print_table([letter, replace(letter, event_id="evt_plain")], out)

    _header, first, second = out.getvalue().splitlines()
    assert first.startswith("evt_a\\r\\nX-Evil: 1 ")
    assert "checkout.session.completed\\x00" in first and "2026-11-29T18:00:00\\n" in first
    assert first.endswith("MalformedEvent: bad\\tthing here")
    assert second.startswith("evt_plain ")


async def test_a_retried_message_that_then_crashes_its_workers_is_shown_as_the_delivery_limit(
    worker_settings: WorkerSettings,
    amqp: AbstractRobustConnection,
    channel: AbstractChannel,
    topology: Topology,
) -> None:
    """Black-box trial: a message back from a delay queue still carries its earlier
    failure's headers; when it then hit the delivery limit, `dlq list` and `show` reported
    that old SMTP outage (attempts 1, its worker) instead of the crash loop."""
    from fulfillment.dlq import list_dead_letters, show_dead_letter

    doc = sh.event("checkout.session.completed", sh.checkout_session())
    earlier = {
        "fulfillment-attempt": 1,
        HEADER_ERROR_TYPE: "TransientError",
        HEADER_ERROR_MESSAGE: "SMTP unavailable: ConnectionRefusedError",
        HEADER_FIRST_FAILED_AT: "2026-11-29T10:00:00+00:00",
        HEADER_LAST_FAILED_AT: "2026-11-29T10:00:00+00:00",
        "fulfillment-worker-id": "w-smtp",
    }
    raw = sh.body(doc)
    message = event_message(raw, EventEnvelope.parse(raw), source="test", headers=earlier)
    # the retry copy a worker made: into a delay queue, back to the work queue when it expires
    await channel.default_exchange.publish(message, routing_key=topology.retry_queues[0])
    await wait_for(lambda: depth_is(channel, topology.work_queue, 1))
    deliveries = 0
    async with amqp.channel() as crashing:
        queue = await crashing.get_queue(topology.work_queue, ensure=False)
        while taken := await queue.get(fail=False):  # taken, never finished, as by crashes
            deliveries += 1
            await taken.nack(requeue=True)
    assert deliveries == topology.delivery_limit + 1

    [letter] = await wait_for(lambda: list_dead_letters(worker_settings.broker), timeout_s=10)
    shown = await show_dead_letter(worker_settings.broker, doc["id"])

    assert shown is not None and shown.error_type == letter.error_type
    assert letter.error_type == "broker:delivery_limit"
    assert letter.attempts == 1 + topology.delivery_limit + 1
    assert letter.error.startswith("delivery limit reached")
    assert "before that, attempt 1 failed with TransientError: SMTP unavailable" in letter.error
    assert letter.first_failed_at == "2026-11-29T10:00:00+00:00"  # its first failure
    assert letter.last_failed_at is not None and letter.last_failed_at > "2026-11-29T11"
    assert letter.worker_id is None  # no worker gave up on it
    # the broker's record of its journey: the delivery limit last, the delay queue before
    assert [d["reason"] for d in letter.headers["x-death"]] == ["delivery_limit", "expired"]


async def test_a_letter_the_broker_moved_for_another_reason_is_listed_with_that_reason(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    """Not only the delivery limit: a message that expired on the work queue (a TTL set by
    whoever published it) is the broker's dead letter too, one attempt, no worker."""
    from fulfillment.dlq import list_dead_letters

    doc = sh.event("checkout.session.completed", sh.checkout_session())
    raw = sh.body(doc)
    message = event_message(raw, EventEnvelope.parse(raw), source="test")
    message.expiration = 0.001
    await channel.default_exchange.publish(message, routing_key=topology.work_queue)

    [letter] = await wait_for(lambda: list_dead_letters(worker_settings.broker), timeout_s=10)

    assert letter.event_id == doc["id"]
    assert letter.error_type == "broker:expired"
    assert letter.error == "dead-lettered by the broker (expired)"
    assert letter.attempts == 1 and letter.worker_id is None
    assert letter.last_failed_at is not None and letter.first_failed_at == letter.last_failed_at


async def test_a_letter_neither_a_worker_nor_the_broker_put_there_is_listed_as_such(
    worker_settings: WorkerSettings, channel: AbstractChannel, topology: Topology
) -> None:
    """Something else published straight into the DLQ: no failure headers, no x-death."""
    from fulfillment.dlq import list_dead_letters

    stray = aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await channel.default_exchange.publish(stray, routing_key=topology.dead_queue)

    [letter] = await wait_for(lambda: list_dead_letters(worker_settings.broker))

    assert (letter.error_type, letter.attempts) == ("unknown", 1)
    assert letter.error == "no failure headers: put here by neither a worker nor the broker"
    assert letter.worker_id is None and letter.last_failed_at is None
