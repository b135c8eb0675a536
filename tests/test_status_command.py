"""``fulfillment status``: queue depths, consumers, dead letters, recent fulfillments."""

from __future__ import annotations

import json
from dataclasses import replace

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.topology import Topology
from tests.conftest import StartWorker, db_fetch, free_port
from tests.pipeline import Pipeline
from tests.processes import acli
from worker.db import migrate
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)


async def test_status_reports_queue_depths_consumers_dead_letters_and_recent_fulfillments(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    topology = pipeline.topology
    await pipeline.dead_letter_unknown_sessions(1)
    worker = await pipeline.start()
    sid = await pipeline.complete()
    await pipeline.fulfilled(sid)

    result = await acli(worker_settings, "status", "--json")
    text = await acli(worker_settings, "status")
    await worker.stop(grace_s=2)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queues"][topology.dead_queue]["messages"] == 1
    assert report["queues"][topology.work_queue]["consumers"] == 1
    assert set(report["queues"]) == set(topology.all_queues)
    assert report["fulfillments_last_hour"] >= 1
    assert 0 <= report["oldest_dead_letter_age_s"] < 120
    assert "oldest dead letter:" in text.stdout and topology.dead_queue in text.stdout
    assert len(await pipeline.dead_letters()) == 1  # peeking kept it


async def test_status_counts_the_work_queues_consumers_waiting_sessions_and_the_last_hour(
    worker_settings: WorkerSettings,
    channel: AbstractChannel,
    topology: Topology,
    unmigrated_database_url: str,
) -> None:
    url = unmigrated_database_url
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO checkout_sessions (checkout_session_id, state) VALUES
               ('cs_recent', 'fulfilled'), ('cs_old', 'fulfilled'),
               ('cs_waiting', 'awaiting_payment'), ('cs_failed', 'payment_failed'),
               ('cs_new', 'new')"""
        )
        await conn.execute(
            """INSERT INTO fulfillments (checkout_session_id, amount_total, currency,
                                         payment_status, created_at) VALUES
               ('cs_recent', 100, 'usd', 'paid', now() - interval '5 minutes'),
               ('cs_old', 100, 'usd', 'paid', now() - interval '2 hours')"""
        )
    finally:
        await conn.close()

    async def hold(message: AbstractIncomingMessage) -> None:  # one worker, as the broker sees it
        pass

    work = await channel.get_queue(topology.work_queue)
    tag = await work.consume(hold)
    try:
        result = await acli(replace(worker_settings, database_url=url), "status", "--json")
    finally:
        await work.cancel(tag)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["consumers"] == 1
    assert report["queues"][topology.dead_queue]["consumers"] == 0
    assert report["fulfillments_last_hour"] == 1
    assert report["awaiting_payment"] == 1


async def test_status_against_a_schema_from_before_delay_queues_still_counts_fulfillments(
    worker_settings: WorkerSettings, topology: Topology, unmigrated_database_url: str
) -> None:
    """A database last migrated by an older release (no ``delay_queues`` table yet): the
    other schedules' queues are unknown, but the rest of the report is whole."""
    url = unmigrated_database_url
    await migrate(url)
    await db_fetch(url, "DROP TABLE delay_queues")
    await db_fetch(
        url, "INSERT INTO checkout_sessions (checkout_session_id, state) VALUES ('cs_w', 'new')"
    )
    await db_fetch(
        url,
        "INSERT INTO fulfillments (checkout_session_id, amount_total, currency, payment_status)"
        " VALUES ('cs_w', 100, 'usd', 'paid')",
    )

    result = await acli(replace(worker_settings, database_url=url), "status", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fulfillments_last_hour"] == 1 and "database_error" not in report
    assert set(report["queues"]) == set(topology.all_queues)


async def test_status_shows_the_delay_queues_of_every_schedule_the_workers_declared(
    worker_settings: WorkerSettings,
    start_worker: StartWorker,
    channel: AbstractChannel,
    topology: Topology,
) -> None:
    """Black-box trial: workers with another RETRY_DELAYS_S declare delay queues of their
    own (a rolling change of schedule), and status showed only its own schedule's, so
    messages waiting in the others were invisible; a delay queue of its own schedule that
    no worker had declared yet made it fail outright."""
    # a schedule may repeat a delay: one queue, recorded once
    other = replace(worker_settings.broker, retry_delays_s=(3600.0, 0.5, 3600.0))
    other_topology = Topology.from_settings(other)
    other_queue = other_topology.retry_queues[0]
    assert other_queue not in topology.retry_queues
    try:
        first = await start_worker(worker_settings)
        await start_worker(replace(worker_settings, broker=other))
        await first.stop(grace_s=1)
        waiting = aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(waiting, routing_key=other_queue)
        # a deployment of another prefix sharing the database: not this one's
        foreign = f"x{worker_settings.broker.prefix}.fulfillment.retry.1h"
        await channel.declare_queue(foreign, auto_delete=True)
        await db_fetch(
            worker_settings.database_url,
            "INSERT INTO delay_queues (name, delay_s) VALUES ($1, 3600)",
            foreign,
        )
        mine = replace(worker_settings.broker, retry_delays_s=(*topology.retry_delays_s, 7.0))
        mine_topology = Topology.from_settings(mine)

        result = await acli(replace(worker_settings, broker=mine), "status", "--json")
        text = await acli(replace(worker_settings, broker=mine), "status")
    finally:
        await channel.queue_delete(other_queue)
        await channel.queue_delete(f"x{worker_settings.broker.prefix}.fulfillment.retry.1h")

    assert result.returncode == 0, result.stderr
    queues = json.loads(result.stdout)["queues"]
    assert queues[other_queue] == {"messages": 1, "consumers": 0, "other_schedule": True}
    never = mine_topology.retry_queues[-1]
    assert queues[never] == {"messages": None, "consumers": None, "missing": True}
    assert all("other_schedule" not in queues[q] for q in mine_topology.all_queues)
    assert list(queues)[: len(mine_topology.all_queues)] == list(mine_topology.all_queues)
    assert set(queues) == {*mine_topology.all_queues, other_queue}  # 0.5 s: one of ours
    assert text.returncode == 0, text.stderr
    [line] = [x for x in text.stdout.splitlines() if x.startswith(other_queue)]
    assert line.split()[1:3] == ["1", "0"] and "another RETRY_DELAYS_S" in line
    assert "not declared yet" in next(x for x in text.stdout.splitlines() if x.startswith(never))


async def test_status_without_its_database_shows_the_broker_and_exits_1(
    worker_settings: WorkerSettings, topology: Topology
) -> None:
    from dataclasses import replace

    no_database = replace(
        worker_settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )
    text = await acli(no_database, "status")
    as_json = await acli(no_database, "status", "--json")

    assert (text.returncode, as_json.returncode) == (1, 1)
    assert topology.work_queue in text.stdout and "READY" in text.stdout
    assert "fulfillments in the last hour: unknown" in text.stdout and "None" not in text.stdout
    assert json.loads(as_json.stdout)["fulfillments_last_hour"] is None
    [reason] = text.stderr.strip().splitlines()
    assert reason.startswith("fulfillment status: database: ")
