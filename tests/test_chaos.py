"""The chaos run, smaller, in the suite: faults during load, nothing lost, nothing doubled.

It breaks a throwaway PostgreSQL cluster and RabbitMQ node of its own (devkit/services.py),
never the machine's services: tests/test_services_isolation.py runs it while holding a
connection to each of those and checks that neither noticed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.services import PrivatePostgres, RabbitNode, ServiceUnavailable
from devkit.services import private_postgres as start_private_postgres
from devkit.services import private_rabbitmq as start_private_rabbitmq
from tests.conftest import _unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ops"))

from chaos import ChaosConfig, run_chaos

pytestmark = [pytest.mark.timeout(600), pytest.mark.disruptive]


@pytest.fixture
def private_services() -> Iterator[tuple[PrivatePostgres, RabbitNode]]:
    with contextlib.ExitStack() as stack:
        try:
            postgres = stack.enter_context(start_private_postgres())
            rabbit = stack.enter_context(start_private_rabbitmq(1, prefix="chaos"))
        except ServiceUnavailable as exc:
            _unavailable(f"a throwaway PostgreSQL cluster and RabbitMQ node ({exc})")
        yield postgres, rabbit.nodes[0]


async def test_under_kills_outages_and_restarts_every_acknowledged_webhook_is_fulfilled_once(
    private_services: tuple[PrivatePostgres, RabbitNode], tmp_path: Path
) -> None:
    postgres, node = private_services
    config = ChaosConfig(
        events=1500, sessions=360, workers=2, kill_every_s=2.5, send_seconds=14,
        rabbitmq_url=node.url, server_url=postgres.url, postgres=postgres, rabbit_node=node,
        timeout_s=240,
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
    # the infrastructure faults happened, to the throwaway instances
    assert report.faults["rabbitmq connections dropped"] == 1, report.faults_skipped
    assert report.faults["postgresql restart"] == 1, report.faults_skipped
    assert report.ok
