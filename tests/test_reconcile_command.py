"""``fulfillment reconcile``: paid sessions whose events never arrived, found in Stripe's list
of Checkout Sessions, and each fulfilled once; through Stripe's blips, a broker that refuses,
and webhooks that arrive meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from devkit.mailsink import SmtpSink
from devkit.stripe import StripeStandIn
from fulfillment import reconcile as reconcile_module
from fulfillment.reconcile import ReconcileSettings
from shared.vocabulary import HEADER_CHECKOUT_SESSION_ID, HEADER_EVENT_ID
from tests.conftest import db_fetch, depth, free_port, wait_for
from tests.pipeline import COMPLETED, Pipeline
from tests.processes import RoleProcess, broker_env, fresh_metrics, run_fulfillment, worker_env
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)

HOUR = 3600
DAY = 86400
RETRYING = "listing Stripe Checkout Sessions failed; retrying"


@pytest.fixture(autouse=True)
async def no_reconcile_rows(database_url: str) -> AsyncIterator[None]:
    """Each test starts without a cursor: the test database is the whole session's."""
    await db_fetch(database_url, "DELETE FROM reconcile_accounts")
    yield


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc

    @property
    def error(self) -> str:
        """The last line on stderr: the command's one-line reason."""
        return self.stderr.strip().splitlines()[-1]


async def reconcile(settings: WorkerSettings, *args: str, **env: str) -> Run:
    """``fulfillment reconcile ARGS`` as a process, on the test's Stripe, broker and database."""
    import asyncio

    full = {**os.environ, **worker_env(settings), "LOG_FORMAT": "json", **env}
    done: subprocess.CompletedProcess[str] = await asyncio.to_thread(
        run_fulfillment, "reconcile", *args, env=full
    )
    return Run(done.returncode, done.stdout, done.stderr)


async def cursor(pipeline: Pipeline, account: str = "") -> Any:
    rows = await pipeline.rows("SELECT * FROM reconcile_accounts WHERE account = $1", account)
    return rows[0] if rows else None


async def test_reconcile_queues_exactly_the_paid_sessions_whose_events_never_arrived(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    standin = pipeline.standin
    now = int(time.time())
    ago = now - HOUR
    lost = [
        standin.add_session(created=ago - 1, customer_email="ann@example.com")["id"],
        standin.add_session(created=ago - 2, customer_email="bob@example.com")["id"],
        standin.add_session(
            created=ago - 3, payment_status="no_payment_required", customer_email="cy@example.com"
        )["id"],
    ]
    webhooked = [standin.add_session(created=ago, customer_email=f"w{i}@example.com")["id"]
                 for i in range(2)]  # fmt: skip
    unpaid = standin.add_session(created=ago, payment_status="unpaid")["id"]
    left_alone = [
        unpaid,
        standin.add_session(created=ago, status="open", payment_status="unpaid")["id"],
        standin.add_session(created=ago, status="expired", payment_status="unpaid")["id"],
        standin.add_session(created=ago, mode="setup")["id"],  # saved a card, sold nothing
        standin.add_session(created=now - 4 * DAY)["id"],  # before the window
        standin.add_session(created=now)["id"],  # its webhook is still on its way
        standin.add_session(created=ago, account="acct_elsewhere")["id"],  # not asked for
    ]
    worker = await pipeline.start()
    for sid in [*webhooked, unpaid]:
        await pipeline.send(COMPLETED, sid)
    for sid in webhooked:
        await pipeline.fulfilled(sid)
    await pipeline.settle(worker)
    await worker.stop(grace_s=2)
    await pipeline.mails(2)
    assert len(await pipeline.outbound_messages()) == 2  # the webhooked ones'

    dry = await reconcile(pipeline.settings, "--dry-run", "--json")
    dry_text = await reconcile(pipeline.settings, "--dry-run")

    assert dry.code == 0, dry.stderr
    assert (
        dry.json["checked"] == 7
    )  # complete, created in the window: lost, webhooked, unpaid, setup
    assert dry.json["missing"] == 3 and dry.json["queued"] == 0
    assert sorted(dry.json["sessions"]) == sorted(lost)
    assert dry.json["dry_run"] is True
    assert dry_text.code == 0, dry_text.stderr
    assert "3 paid without a fulfillment: would queue 3" in dry_text.stdout
    assert all(sid in dry_text.stdout for sid in lost)
    assert await depth(pipeline.channel, pipeline.topology.work_queue) == 0
    assert await pipeline.rows("SELECT * FROM reconcile_accounts") == []  # nothing changed
    assert (
        await pipeline.rows(
            "SELECT * FROM reconciled_sessions WHERE checkout_session_id = ANY($1)", lost
        )
        == []
    )

    first = await reconcile(pipeline.settings, "--json")

    assert first.code == 0, first.stderr
    assert first.json["queued"] == 3 and sorted(first.json["sessions"]) == sorted(lost)
    assert first.json["accounts"][0]["from_cursor"] is False
    assert await depth(pipeline.channel, pipeline.topology.work_queue) == 3
    worker = await pipeline.start()
    for sid in lost:
        await pipeline.fulfilled(sid)
    await pipeline.mails(5)
    await pipeline.settle(worker)
    for sid in lost:
        [row] = await pipeline.fulfillments(sid)
        assert row["event_id"] == f"reconcile:{sid}"  # reconcile's request did it
        assert len(pipeline.mails_for(sid)) == 1
    for sid in webhooked:
        assert len(pipeline.mails_for(sid)) == 1
    assert len(pipeline.smtp.messages) == 5
    announced = [
        str(m.headers[HEADER_CHECKOUT_SESSION_ID]) for m in await pipeline.outbound_messages()
    ]
    assert sorted(announced) == sorted(lost)
    for sid in left_alone:
        assert await pipeline.fulfillments(sid) == []
    handled = await pipeline.rows(
        "SELECT event_type, outcome FROM processed_events WHERE event_id = ANY($1)",
        [f"reconcile:{sid}" for sid in lost],
    )
    assert [(r["event_type"], r["outcome"]) for r in handled] == [
        ("fulfillment.requested", "fulfilled")
    ] * 3
    assert await pipeline.dead_letters() == []

    second = await reconcile(pipeline.settings, "--json")

    assert second.code == 0, second.stderr
    assert (second.json["checked"], second.json["missing"], second.json["queued"]) == (7, 0, 0)
    assert second.json["accounts"][0]["from_cursor"] is True
    assert await depth(pipeline.channel, pipeline.topology.work_queue) == 0
    platform = await cursor(pipeline)
    assert (platform["missing_total"], platform["last_missing"]) == (3, 0)


async def test_a_session_whose_webhook_arrives_while_reconcile_queues_it_is_fulfilled_once(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found without a fulfillment, then Stripe's event arrives before (``first``) or
    together with (``together``) reconcile's request: one order, one email, one message."""
    standin = pipeline.standin
    ago = int(time.time()) - HOUR
    first = standin.add_session(created=ago, customer_email="first@example.com")["id"]
    together = standin.add_session(created=ago, customer_email="together@example.com")["id"]
    worker = await pipeline.start()
    publish = reconcile_module.publish_request

    async def webhook_meanwhile(*args: Any, **kwargs: Any) -> None:
        sid = args[2]["data"]["object"]["id"]
        await pipeline.send(COMPLETED, sid)
        if sid == first:
            await pipeline.fulfilled(sid)
        await publish(*args, **kwargs)

    monkeypatch.setattr(reconcile_module, "publish_request", webhook_meanwhile)

    result = await reconcile_module.reconcile(
        pipeline.settings.stripe,
        pipeline.settings.broker,
        pipeline.database_url,
        ReconcileSettings(),
    )

    assert result.summary()["queued"] == 2
    await pipeline.mails(2)
    await pipeline.settle(worker)
    for sid in (first, together):
        assert len(await pipeline.fulfillments(sid)) == 1
        assert len(pipeline.mails_for(sid)) == 1
        outcomes = await pipeline.rows(
            "SELECT outcome FROM processed_events WHERE checkout_session_id = $1", sid
        )
        assert sorted(r["outcome"] for r in outcomes) == ["already_fulfilled", "fulfilled"]
    announced = [
        str(m.headers[HEADER_CHECKOUT_SESSION_ID]) for m in await pipeline.outbound_messages()
    ]
    assert sorted(announced) == sorted([first, together])
    assert await pipeline.dead_letters() == []


def fail_from_second_page(
    standin: StripeStandIn, monkeypatch: pytest.MonkeyPatch, *answers: tuple[int, int]
) -> None:
    """Once the first page of sessions was answered, the next requests get ``answers``:
    (how many, status) in turn."""
    pages = 0
    injected = standin.injected_answer

    def mid_listing(path: str) -> Any:
        nonlocal pages
        if path == "/v1/checkout/sessions":
            pages += 1
            if pages == 2:
                for count, status in answers:
                    standin.fail_next(count, status)
        return injected(path)

    monkeypatch.setattr(standin, "injected_answer", mid_listing)


async def test_stripes_429s_and_5xxs_mid_listing_are_waited_out_or_end_the_run_cursor_kept(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = pipeline.standin
    ago = int(time.time()) - HOUR
    lost = [standin.add_session(created=ago - i)["id"] for i in range(150)]  # two pages

    fail_from_second_page(standin, monkeypatch, (2, 429), (1, 503))
    blips = await reconcile(pipeline.settings, "--json")

    assert blips.code == 0, blips.stderr
    assert blips.stderr.count(RETRYING) == 3
    assert blips.json["queued"] == 150
    queued = await pipeline.queued()
    assert sorted(str(m.headers[HEADER_EVENT_ID]) for m in queued) == sorted(
        f"reconcile:{sid}" for sid in lost
    )
    kept = await cursor(pipeline)
    assert kept["resume_from"] is not None

    late = standin.add_session(created=ago)["id"]
    fail_from_second_page(standin, monkeypatch, (5, 503))  # down for longer than the tries
    down = await reconcile(pipeline.settings, "--json")

    assert down.code == 2 and down.stdout == ""
    assert down.stderr.count(RETRYING) == 4
    assert down.error.startswith("fulfillment reconcile: Stripe") and "(503)" in down.error
    assert "Traceback" not in blips.stderr + down.stderr
    assert dict(await cursor(pipeline)) == dict(kept)  # not moved, figures unchanged
    assert await depth(pipeline.channel, pipeline.topology.work_queue) == 0

    standin.fail_next(1, 400)  # Stripe's verdict on the request: no use asking again
    verdict = await reconcile(pipeline.settings)
    assert verdict.code == 2 and RETRYING not in verdict.stderr
    assert dict(await cursor(pipeline)) == dict(kept)

    monkeypatch.undo()
    again = await reconcile(pipeline.settings, "--json")
    assert again.code == 0, again.stderr
    # the 150 queued less than an hour ago are not queued again; the late one is
    assert late in again.json["sessions"] and again.json["missing"] == 151
    assert again.json["queued"] == 1 and len(again.json["recently_queued"]) == 150
    [queued_late] = await pipeline.queued()
    assert queued_late.headers[HEADER_EVENT_ID] == f"reconcile:{late}"


async def test_a_broker_that_refuses_or_is_away_ends_the_run_and_the_next_one_queues_the_rest(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The refusal: a full queue the run publishes to instead of the work queue nacks.)"""
    from shared.errors import BrokerUnavailable
    from shared.topology import Topology

    ago = int(time.time()) - HOUR
    lost = [pipeline.standin.add_session(created=ago - i)["id"] for i in range(2)]
    away = await reconcile(pipeline.settings, RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/")
    full = await pipeline.channel.declare_queue(
        f"{pipeline.topology.prefix}.full",
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    monkeypatch.setattr(Topology, "route", lambda self, event_type: ("", full.name))
    s = pipeline.settings
    with pytest.raises(BrokerUnavailable, match="nack"):
        await reconcile_module.reconcile(s.stripe, s.broker, s.database_url, ReconcileSettings())
    monkeypatch.undo()

    assert away.code == 2 and "RabbitMQ is not reachable" in away.error
    assert (await cursor(pipeline))["resume_from"] is None  # neither run finished
    again = await reconcile(pipeline.settings, "--json")
    assert again.code == 0, again.stderr
    assert again.json["queued"] == 2  # neither was remembered as queued
    queued = {m.headers[HEADER_EVENT_ID] for m in await pipeline.queued()}
    assert queued == {f"reconcile:{sid}" for sid in lost}
    assert (await cursor(pipeline))["resume_from"] is not None


async def test_stripe_or_postgresql_out_of_reach_is_one_line_and_exit_2(
    pipeline: Pipeline,
) -> None:
    stripe_away = await reconcile(pipeline.settings, STRIPE_API_BASE="http://127.0.0.1:1")
    database_away = await reconcile(
        pipeline.settings, DATABASE_URL="postgresql://postgres@127.0.0.1:1/fulfillment"
    )

    assert stripe_away.code == 2 and "APIConnectionError" in stripe_away.error
    assert stripe_away.stderr.count(RETRYING) == 4
    assert database_away.code == 2 and "cannot reach PostgreSQL" in database_away.error
    for run in (stripe_away, database_away):
        assert run.stdout == "" and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("args", "env", "reason"),
    [
        (["--since", "0m"], {}, "must be longer than 0"),
        (["--since", "3 days"], {}, "not a duration: '3 days'"),
        (["--since", "-3d"], {}, "expected one argument"),
        (["--since", "99999w"], {}, "reaches back before 1970"),
        (["--since", "2m"], {}, "RECONCILE_GRACE_S"),
        (["--account", "acct-1"], {}, "not a connected account id"),
        ([], {"RECONCILE_GRACE_S": "soon"}, "RECONCILE_GRACE_S must be a number"),
        ([], {"RECONCILE_OVERLAP_S": "60"}, "RECONCILE_OVERLAP_S (60) must be at least"),
        ([], {"STRIPE_API_KEY": "pk_test_1"}, "STRIPE_API_KEY must start with sk_ or rk_"),
    ],
)
async def test_bad_input_is_refused_in_one_line_before_anything_is_done(
    pipeline: Pipeline, args: list[str], env: dict[str, str], reason: str
) -> None:
    pipeline.standin.add_session(created=int(time.time()) - HOUR)

    refused = await reconcile(pipeline.settings, *args, **env)

    assert refused.code == 2
    assert reason in refused.error and len(refused.stderr.strip().splitlines()) == 1
    assert pipeline.standin.request_count == 0
    assert await cursor(pipeline) is None


async def test_a_connected_accounts_sessions_are_reconciled_on_its_behalf_when_asked(
    pipeline: Pipeline,
) -> None:
    ago = int(time.time()) - HOUR
    sid = pipeline.standin.add_session(created=ago, account="acct_shop1")["id"]

    platform_only = await reconcile(pipeline.settings, "--json")
    with_shop = await reconcile(pipeline.settings, "--json", "--account", "acct_shop1")

    assert platform_only.json["checked"] == 0 and platform_only.json["queued"] == 0
    assert with_shop.code == 0, with_shop.stderr
    [platform, shop] = with_shop.json["accounts"]
    assert platform["account"] is None and platform["missing"] == 0
    assert shop["account"] == "acct_shop1" and shop["sessions"] == [sid] and shop["queued"] == 1
    worker = await pipeline.start()
    [row] = await pipeline.fulfilled(sid)
    await pipeline.settle(worker)
    assert row["stripe_account"] == "acct_shop1"  # read on the account's behalf
    assert (await cursor(pipeline, "acct_shop1"))["missing_total"] == 1


async def test_a_run_resumes_from_the_cursor_and_finds_a_session_completed_after_the_last_run(
    pipeline: Pipeline,
) -> None:
    standin = pipeline.standin
    now = int(time.time())
    sid = standin.add_session(created=now - 2 * HOUR, status="open", payment_status="unpaid")["id"]

    first = await reconcile(pipeline.settings, "--json")
    after_first = (await cursor(pipeline))["resume_from"].timestamp()
    standin.sessions[sid].update(status="complete", payment_status="paid")  # paid since
    second = await reconcile(pipeline.settings, "--json")
    after_second = (await cursor(pipeline))["resume_from"].timestamp()
    narrower = await reconcile(pipeline.settings, "--json", "--since", "30m")
    after_narrower = (await cursor(pipeline))["resume_from"].timestamp()
    shorter = await reconcile(pipeline.settings, "--json", RECONCILE_OVERLAP_S="600")
    after_shorter = (await cursor(pipeline))["resume_from"].timestamp()
    wider = await reconcile(pipeline.settings, "--json", "--since", "7d")

    assert first.json["missing"] == 0 and first.json["accounts"][0]["from_cursor"] is False
    assert abs(after_first - (now - DAY)) < 60  # the overlap: a session lives up to a day
    assert second.json["accounts"][0]["from_cursor"] is True
    assert second.json["sessions"] == [sid] and second.json["queued"] == 1
    assert after_first <= after_second < after_first + 60  # moved on with the clock
    # a window that did not reach back to the cursor does not move it
    assert narrower.json["accounts"][0]["from_cursor"] is False
    assert after_narrower == after_second
    assert shorter.json["accounts"][0]["from_cursor"] is True
    assert abs(after_shorter - (now - 600)) < 60
    # nor does a wider window move it back
    assert wider.code == 0 and (await cursor(pipeline))["resume_from"].timestamp() == after_shorter


async def test_up_reconciles_on_its_schedule_with_the_local_stripe_stand_in(
    smtp: SmtpSink, worker_settings: WorkerSettings, database_url: str
) -> None:
    standin_port = free_port()
    env = {
        **broker_env(worker_settings.broker),
        "DATABASE_URL": database_url,
        "SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
        "INGRESS_PORT": str(free_port()),
        "INGRESS_HOST": "127.0.0.1",
        "WORKER_METRICS_PORT": str(free_port()),
        "STANDIN_PORT": str(standin_port),
        "RECONCILE_INTERVAL_S": "1",
    }
    up = RoleProcess(["up", "--workers", "1"], env)
    up.env = {k: v for k, v in up.env.items() if not k.startswith("STRIPE_")}  # local mode
    await up.start()
    try:
        await wait_for(lambda: any("worker consuming" in line for line in up.lines), timeout_s=30)
        async with aiohttp.ClientSession() as http:
            seeded = {"created": int(time.time()) - HOUR, "customer_email": "lost@example.com"}
            url = f"http://127.0.0.1:{standin_port}/_standin/sessions"
            async with http.post(url, json=seeded) as answer:
                sid = (await answer.json())["id"]

        rows = await wait_for(
            lambda: db_fetch(
                database_url,
                "SELECT event_id FROM fulfillments WHERE checkout_session_id = $1",
                sid,
            ),
            timeout_s=20,
        )
        await wait_for(lambda: smtp.for_session(sid))
    finally:
        await up.stop()
    assert rows[0]["event_id"] == f"reconcile:{sid}"
    assert "Traceback" not in "\n".join(up.lines)


async def test_workers_export_what_reconcile_found_for_prometheus(
    pipeline: Pipeline, worker_settings: WorkerSettings
) -> None:
    async def scraped() -> str:
        port = free_port()
        env = {**worker_env(worker_settings), "WORKER_METRICS_PORT": str(port)}
        return await fresh_metrics(["worker"], env, "worker metrics listening", port)

    before = await scraped()
    ago = int(time.time()) - HOUR
    for i in range(2):
        pipeline.standin.add_session(created=ago - i)
    assert (await reconcile(pipeline.settings)).code == 0
    after = await scraped()

    assert 'reconcile_sessions_missing_total{account="platform"} 0.0' in before
    assert "reconcile_last_run_sessions_missing{" not in before
    assert 'reconcile_sessions_missing_total{account="platform"} 2.0' in after
    assert 'reconcile_last_run_sessions_missing{account="platform"} 2.0' in after
    assert 'reconcile_last_run_timestamp_seconds{account="platform"}' in after
