"""The chaos run, smaller, in the suite: faults during load, nothing lost, nothing doubled."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ops"))

from chaos import ChaosConfig, run_chaos

pytestmark = [pytest.mark.timeout(600), pytest.mark.disruptive]


async def test_under_kills_outages_and_restarts_every_acknowledged_webhook_is_fulfilled_once(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    server = urlsplit(postgres_url)._replace(path="/postgres").geturl()
    config = ChaosConfig(
        events=1500, sessions=360, workers=2, kill_every_s=2.5, send_seconds=14,
        rabbitmq_url=rabbitmq_url, server_url=server, timeout_s=240,
    )  # fmt: skip

    report = await run_chaos(config, tmp_path / "logs")

    print(report.table())
    assert report.acknowledged == report.sent - 0 and report.acknowledged > 0
    assert report.lost == []
    assert report.fulfilled == report.paid_sessions and report.missing_rows == 0
    assert report.wrong_rows == 0
    assert report.failure_notices == report.failed_sessions > 0
    assert report.emails_missing == 0 and report.outbound_missing == 0
    assert report.dlq_unexpected == [] and report.poison_missing_from_dlq == []
    assert report.dead_lettered >= 1
    assert report.delay_queues_left == 0
    assert report.unhandled_exceptions == []
    assert not [d for d in report.duplicates if d.startswith("unexplained")]
    assert report.faults["worker SIGKILL"] >= 2
    assert report.ok
