"""The benchmark scripts in ops/ still run end to end and report what they measured.

Tiny runs: these check that the scripts work (every request confirmed, every session
fulfilled, the tables printed, the throwaway database dropped), not how fast
anything is. The figures come from full runs, in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import asyncpg

from tests.conftest import database_url_named

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, env: dict[str, str], timeout_s: float) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "ops" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_ingress_benchmark_reports_confirmed_webhooks_raw_publishes_and_rejections(
    rabbitmq_url: str,
) -> None:
    env = {**os.environ, "RABBITMQ_URL": rabbitmq_url}
    out = run_script(
        "bench_ingress.py",
        "--processes",
        "1",
        "--seconds",
        "1",
        "--concurrency",
        "8",
        "--rate",
        "50",
        "--events",
        "20",
        env=env,
        timeout_s=120,
    )
    results = json.loads(out.strip().splitlines()[-1])
    for run in ("ingress", "raw", "open", "invalid"):
        rate, p50, p99, errors = results[run]
        assert rate > 0 and 0 < p50 <= p99, (run, results[run])
        assert errors == 0, (run, results[run])
    assert re.search(r"ratio ingress / raw publish: \d+\.\d\d", out)
    # every 200 was a message queued (none answered from the replay guard)
    counts = re.search(r"confirmed webhooks: ([\d,]+), messages queued for them: ([\d,]+)", out)
    assert counts and counts.group(1) == counts.group(2) != "0", out
    # the interpreter's build moves these figures by a fifth: the output names it
    assert f"{platform.python_implementation()} {platform.python_version()} from" in out
    for unit in ("confirmed webhook", "raw confirmed publish", "rejected webhook"):
        assert f"| CPU per {unit} | ms | share |" in out


def test_ingress_benchmark_floor_drives_the_bare_stack_in_the_ingress_place(
    rabbitmq_url: str,
) -> None:
    """``--floor``: aiohttp and aio-pika alone, the same confirmed publish of the same
    messages; every 200 still a message queued, and no rejection run (it verifies nothing)."""
    env = {**os.environ, "RABBITMQ_URL": rabbitmq_url}
    out = run_script(
        "bench_ingress.py",
        *("--floor", "--processes", "1", "--seconds", "1", "--concurrency", "8"),
        *("--rate", "50", "--events", "20"),
        env=env,
        timeout_s=120,
    )
    assert out.lstrip().startswith("FLOOR (ops/floor_ingress.py"), out[:300]
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results) == {"ingress", "raw", "open"}
    for run, (rate, _, _, errors) in results.items():
        assert rate > 0 and errors == 0, (run, results[run])
    assert re.search(r"ratio floor / raw publish: \d+\.\d\d", out)
    counts = re.search(r"confirmed webhooks: ([\d,]+), messages queued for them: ([\d,]+)", out)
    assert counts and counts.group(1) == counts.group(2) != "0", out
    assert "| floor server |" in out and "rejected webhook" not in out


async def bench_databases(server_url: str) -> set[str]:
    conn = await asyncpg.connect(server_url)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'fulfillment_bench_%'"
        )
    finally:
        await conn.close()
    return {r["datname"] for r in rows}


def test_end_to_end_benchmark_fulfills_every_session_and_drops_its_database(
    rabbitmq_url: str, postgres_url: str
) -> None:
    server = database_url_named(postgres_url, "postgres")
    before = asyncio.run(bench_databases(server))
    env = {**os.environ, "RABBITMQ_URL": rabbitmq_url, "DATABASE_URL": server}
    out = run_script(
        "bench_e2e.py",
        "--sessions",
        "40",
        "--workers",
        "1",
        "--concurrency",
        "8",
        env=env,
        timeout_s=180,
    )
    assert "| fulfilled sessions (rows / last effect recorded) | 40 / 40 of 40 |" in out
    rate = re.search(r"\| fulfilled sessions/s \| ([\d,]+)/s \|", out)
    assert rate is not None and int(rate.group(1).replace(",", "")) > 0, out
    assert re.search(r"\| peak worker RSS \| \d+ MB \|", out)
    assert "| CPU per fulfilled session | ms | share |" in out
    assert f"{platform.python_implementation()} {platform.python_version()} from" in out
    assert asyncio.run(bench_databases(server)) <= before


def test_checkout_benchmark_counts_the_stripe_calls_of_a_success_page_flood(
    rabbitmq_url: str,
) -> None:
    env = {**os.environ, "RABBITMQ_URL": rabbitmq_url}
    out = run_script("bench_checkout.py", "--requests", "60", "--concurrency", "4", env=env,
                     timeout_s=120)  # fmt: skip
    results = json.loads(out.strip().splitlines()[-1])
    limited = results["made_up_limits_on"]
    # the burst (10), less the token the paid session's first lookup took, plus refills
    calls = limited["stripe_calls"]
    assert 1 <= calls <= 10 and limited["statuses"] == {"404": calls, "429": 60 - calls}
    assert results["made_up_limits_off"]["stripe_calls"] == 60
    reloads = results["reloads_of_a_paid_session"]
    assert reloads["stripe_calls"] == 1 and reloads["queued"] == 1
    assert reloads["statuses"] == {"200": 60}
    assert f"| made-up session ids, limits on | {calls * 1000 / 60:,.1f} |" in out
    assert re.search(r"ingress CPU per refused \(429\) request: \d+\.\d{3} ms", out)
