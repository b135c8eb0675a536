"""``fulfillment backfill``: events the workers missed, enqueued once, through Stripe's blips."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from aio_pika.abc import AbstractChannel

from devkit import signing as sh
from devkit.stripe import StripeStandIn
from shared.topology import Topology
from shared.vocabulary import HEADER_EVENT_ID
from tests.conftest import drain, wait_for
from tests.pipeline import Pipeline
from tests.processes import acli, cli
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)


async def test_backfill_waits_out_stripes_429s_and_5xxs_and_stops_at_its_verdicts(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    channel: AbstractChannel,
    topology: Topology,
) -> None:
    """Black-box trial: the first 429 or 500 from the events API ended the run (exit 2),
    though a long backfill shares the account's rate limit with busy workers."""
    now = int(time.time())
    event = standin.add_session_event(standin.add_session()["id"], created=now - 3600)
    since = time.strftime("%Y-%m-%d", time.gmtime(now - 86400))

    standin.fail_next(2, 429)
    standin.fail_next(1, 500)
    blips = await acli(worker_settings, "backfill", "--since", since)
    standin.fail_next(1, 400)  # Stripe's verdict on the request: no use asking again
    verdict = await acli(worker_settings, "backfill", "--since", since, "--dry-run")
    standin.fail_next(5, 503)  # down for longer than the tries: one line, exit 2
    down = await acli(worker_settings, "backfill", "--since", since, "--dry-run")

    assert blips.returncode == 0, blips.stderr
    assert "enqueued 1" in blips.stdout
    assert blips.stderr.count("listing Stripe events failed; retrying") == 3
    [queued] = await drain(channel, topology.work_queue)
    assert queued.headers[HEADER_EVENT_ID] == event["id"]
    assert verdict.returncode == 2 and "retrying" not in verdict.stderr
    assert verdict.stderr.strip().splitlines()[-1].startswith("fulfillment backfill: Stripe")
    assert down.returncode == 2
    assert down.stderr.count("listing Stripe events failed; retrying") == 4
    assert "(503)" in down.stderr.strip().splitlines()[-1]
    assert "Traceback" not in blips.stderr + verdict.stderr + down.stderr


async def test_a_backfill_stops_at_an_empty_page_that_says_it_has_more(
    standin: StripeStandIn, worker_settings: WorkerSettings
) -> None:
    """A page with no events cannot name the next one (``starting_after`` is the last
    event's id): the listing ends there, rather than failing on it or asking for ever."""
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    empty = b'{"object": "list", "data": [], "has_more": true, "url": "/v1/events"}'
    standin.answer_next(1, empty, content_type="application/json", path="/v1/events")

    done = await acli(worker_settings, "backfill", "--since", since, "--dry-run")

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert standin.requests.count(("GET", "/v1/events")) == 1


async def test_a_backfill_the_broker_refuses_leaves_its_events_for_the_next_run(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    channel: AbstractChannel,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event is remembered as enqueued only once the broker confirmed it: after a nack,
    the next run enqueues it, rather than skipping it for good. (The nack comes from a full
    queue the first run publishes to instead of the work queue.)"""
    from fulfillment.backfill import backfill
    from shared.errors import BrokerUnavailable

    now = int(time.time())
    event = standin.add_session_event(standin.add_session()["id"], created=now - 3600)
    full = await channel.declare_queue(
        f"{topology.prefix}.full",
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    since = time.strftime("%Y-%m-%d", time.gmtime(now - 86400))

    monkeypatch.setattr(Topology, "route", lambda self, event_type: ("", full.name))
    with pytest.raises(BrokerUnavailable, match="nack"):
        await backfill(
            worker_settings.stripe,
            worker_settings.broker,
            worker_settings.database_url,
            since=datetime.fromtimestamp(now - 86400, UTC),
        )
    monkeypatch.undo()
    again = await acli(worker_settings, "backfill", "--since", since)

    assert again.returncode == 0, again.stderr
    assert "0 already enqueued by a backfill, enqueued 1" in again.stdout
    queued = await drain(channel, topology.work_queue)
    assert [m.headers[HEADER_EVENT_ID] for m in queued] == [event["id"]]


@pytest.mark.parametrize(
    ("window", "reason"),
    [
        (("--since", "2026-11-20", "--until", "2026-11-19"), "is not after --since"),
        (("--since", "2026-11-20", "--until", "2026-11-20"), "the window is empty"),
        (("--since", "2099-01-01"), "is in the future"),
        (("--since", "2026-11-20T11:30+01:00", "--until", "2026-11-20T10:05Z"), "not after"),
    ],
)
def test_backfill_refuses_an_empty_window_rather_than_finding_nothing_in_it(
    worker_settings: WorkerSettings, window: tuple[str, ...], reason: str
) -> None:
    result = cli(worker_settings, "backfill", *window, "--dry-run")
    assert result.returncode == 2
    assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_backfill_enqueues_only_missing_events_across_pages_and_twice_is_once(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    standin = pipeline.standin
    now = int(time.time())
    missing = [
        standin.add_session_event(standin.add_session()["id"], created=now - 3600 - i)["id"]
        for i in range(105)
    ]
    delivered = standin.add_session_event(
        standin.add_session()["id"], created=now - 3600, delivery_success=True
    )
    too_old = standin.add_session_event(standin.add_session()["id"], created=now - 10 * 86400)
    other = standin.add_event(
        sh.event("customer.created", sh.fixture_object("customer"), created=now - 3600)
    )
    processed_sid = standin.add_session()["id"]
    processed = standin.add_session_event(processed_sid, created=now - 3600)
    worker = await pipeline.start()
    await pipeline.publish(processed)
    await wait_for(
        lambda: pipeline.rows("SELECT 1 FROM processed_events WHERE event_id = $1", processed["id"])
    )
    await worker.stop(grace_s=2)
    since = time.strftime("%Y-%m-%d", time.gmtime(now - 2 * 86400))

    dry = await acli(worker_settings, "backfill", "--since", since, "--dry-run")
    first = await acli(worker_settings, "backfill", "--since", since)
    second = await acli(worker_settings, "backfill", "--since", since)

    assert dry.returncode == 0, dry.stderr
    assert "would enqueue 105" in dry.stdout
    assert first.returncode == 0, first.stderr
    assert "enqueued 105" in first.stdout and "1 already processed" in first.stdout
    assert "enqueued 0" in second.stdout and "105 already enqueued" in second.stdout
    queued = await pipeline.queued()
    assert sorted(m.headers[HEADER_EVENT_ID] for m in queued) == sorted(missing)
    for skipped in (delivered["id"], too_old["id"], other["id"]):
        assert skipped not in {m.headers[HEADER_EVENT_ID] for m in queued}
    with_all = await acli(worker_settings, "backfill", "--since", since, "--all")
    assert "enqueued 1" in with_all.stdout  # the delivered one, only with --all
    # a window Stripe no longer lists: said, not silently empty
    assert "30 days" not in dry.stderr
    long_ago = time.strftime("%Y-%m-%d", time.gmtime(now - 40 * 86400))
    old = await acli(worker_settings, "backfill", "--since", long_ago, "--dry-run")
    assert old.returncode == 0, old.stderr
    assert "Stripe lists events of the last 30 days only" in old.stderr


async def test_backfill_enqueues_only_handled_types_in_the_window_even_if_stripe_ignores_filters(
    standin: StripeStandIn,
    worker_settings: WorkerSettings,
    channel: AbstractChannel,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    day = 86400
    today = int(time.time()) // day * day
    wanted = standin.add_session_event(standin.add_session()["id"], created=today - day - 60)
    too_old = standin.add_session_event(standin.add_session()["id"], created=today - 3 * day)
    too_new = standin.add_session_event(standin.add_session()["id"], created=today + 60)
    # a type the work queue is bound for (checkout.session.*), but not one backfill handles
    expired = standin.add_event(
        sh.event("checkout.session.expired", sh.checkout_session(), created=today - day - 60)
    )
    # an API that answers every event, whatever the query asked for
    every = sorted(standin.events.values(), key=lambda e: e["created"], reverse=True)
    monkeypatch.setattr(standin, "matching_events", lambda query, account=None: every)
    since = time.strftime("%Y-%m-%d", time.gmtime(today - 2 * day))
    until = time.strftime("%Y-%m-%d", time.gmtime(today))

    result = await acli(worker_settings, "backfill", "--since", since, "--until", until)

    assert result.returncode == 0, result.stderr
    assert "enqueued 1" in result.stdout
    queued = {m.headers[HEADER_EVENT_ID] for m in await drain(channel, topology.work_queue)}
    assert queued == {wanted["id"]}
    for left_out in (too_old, too_new, expired):
        assert left_out["id"] not in queued


def test_backfill_waits_as_long_as_asked_between_tries_but_never_over_its_cap() -> None:
    """A Retry-After (a gateway in front of Stripe may send one) is honoured, up to 30 s."""
    from types import SimpleNamespace

    from fulfillment.stripe_lists import PAGE_WAIT_MAX_S, page_wait
    from shared.errors import TransientError

    def wait_after(attempt: int, retry_after_s: float | None) -> float:
        failed = TransientError("429", retry_after_s=retry_after_s)
        outcome = SimpleNamespace(exception=lambda: failed)
        return page_wait(SimpleNamespace(attempt_number=attempt, outcome=outcome))  # type: ignore[arg-type]

    assert 0.25 <= wait_after(1, None) <= 0.5
    assert 4.0 <= wait_after(5, None) <= 8.0  # growing
    assert wait_after(1, 12.0) == 12.0
    assert wait_after(1, 3600.0) == PAGE_WAIT_MAX_S == 30.0
