"""Chaos run: thousands of signed events through the whole pipeline while it is abused.

Everything runs as real processes on 127.0.0.1: the Stripe stand-in (10% 429/500 and
latency spikes), an SMTP sink that records what it accepts, one ingress and N workers.
Meanwhile a random worker is SIGKILLed every few seconds and replaced, RabbitMQ drops all
connections once, PostgreSQL restarts once, the SMTP sink is down for a while and the
ingress is SIGTERMed and started again. The sender retries like Stripe until it gets 200.

Then, after the queues drain, it checks: every acknowledged webhook was processed; one
`fulfillments` row per paid session and none for any other; one email per fulfilled
session and per failed payment; one `order.fulfilled` per fulfilled session; the DLQ holds
exactly the poison events; the delay queues are empty; no unhandled exception in any log.
Repeated external effects are reported with their cause, never hidden.

    .venv/bin/python ops/chaos.py --private-services    # 5,000 events over 1,250 sessions
    .venv/bin/python ops/chaos.py --private-services --events 1200 --sessions 300 --workers 2

With --private-services (what the test suite uses) it starts a throwaway PostgreSQL cluster
and RabbitMQ node of its own (devkit/services.py) and breaks only those: the machine's
services, and whatever else uses them, are left alone. Without it, it uses RABBITMQ_URL /
DATABASE_URL (defaults: the local services) and breaks the machine's own: `rabbitmqctl
close_all_connections` drops every client of that broker, `pg_ctlcluster restart` restarts
the cluster (each fault skipped, and said so, without its program). Only for a machine
nothing else uses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg

from devkit import signing
from devkit.load import HttpConnection, free_port
from devkit.services import (
    PrivatePostgres,
    RabbitNode,
    ServiceUnavailable,
    private_postgres,
    private_rabbitmq,
)
from shared import runtime
from shared.settings import BrokerSettings
from shared.topology import Topology
from worker.db import migrate

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ChaosConfig:
    events: int = 5000
    sessions: int = 1250
    workers: int = 3
    concurrency: int = 16
    poison_fraction: float = 0.01
    stripe_error_rate: float = 0.10
    kill_every_s: float = 3.0
    smtp_outage_s: float = 4.0
    retry_delays: str = "1,2,4,8"
    send_concurrency: int = 24
    send_seconds: float = 15.0  # spread the sending so that the faults hit it too
    timeout_s: float = 600.0
    faults: tuple[str, ...] = ("kill", "rabbitmq", "postgres", "smtp", "ingress", "stripe")
    rabbitmq_url: str = field(
        default_factory=lambda: os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    server_url: str = field(
        default_factory=lambda: os.environ.get(
            "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        )
    )
    seed: int = 7
    # throwaway instances: when given, the broker and database faults hit these, never the
    # machine's services (rabbitmq_url and server_url must then point at them)
    postgres: PrivatePostgres | None = None
    rabbit_node: RabbitNode | None = None


@dataclass
class Report:
    sent: int = 0
    acknowledged: int = 0
    answered_503: int = 0
    connection_errors: int = 0
    paid_sessions: int = 0
    fulfilled: int = 0
    wrong_rows: int = 0
    missing_rows: int = 0
    failed_sessions: int = 0
    failure_notices: int = 0
    emails_missing: int = 0
    outbound_missing: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    dead_lettered: int = 0
    dlq_unexpected: list[str] = field(default_factory=list)
    poison_missing_from_dlq: list[str] = field(default_factory=list)
    delay_queues_left: int = 0
    unhandled_exceptions: list[str] = field(default_factory=list)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    faults_skipped: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.wrong_rows or self.missing_rows or self.emails_missing
            or self.outbound_missing or self.dlq_unexpected or self.poison_missing_from_dlq
            or self.delay_queues_left or self.unhandled_exceptions
            or self.failure_notices != self.failed_sessions
            or any(d.startswith("unexplained") for d in self.duplicates)
        )  # fmt: skip

    def table(self) -> str:
        rows = [
            ("sent (events)", self.sent),
            ("acknowledged (200)", self.acknowledged),
            ("503s (retried by the sender)", self.answered_503),
            ("connection errors (retried)", self.connection_errors),
            ("paid sessions / fulfilled (rows)", f"{self.paid_sessions} / {self.fulfilled}"),
            ("rows for sessions not paid", self.wrong_rows),
            ("failed payments / notices", f"{self.failed_sessions} / {self.failure_notices}"),
            ("duplicate external effects", len(self.duplicates)),
            ("lost", len(self.lost)),
            ("dead-lettered (all poison)", f"{self.dead_lettered}"
             + ("" if not self.dlq_unexpected else f" ({len(self.dlq_unexpected)} NOT poison)")),
            ("left in delay queues", self.delay_queues_left),
            ("unhandled exceptions in logs", len(self.unhandled_exceptions)),
            ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))),
            ("duration", f"{self.duration_s:.0f} s"),
        ]  # fmt: skip
        width = max(len(r[0]) for r in rows)
        lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        if self.faults_skipped:
            lines.append(f"\nfaults skipped: {', '.join(self.faults_skipped)}")
        for duplicate in self.duplicates:
            lines.append(f"duplicate: {duplicate}")
        return "\n".join(lines)


class Fleet:
    """The processes of the pipeline, each logging to its own file."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.workers: list[subprocess.Popen[bytes]] = []
        self.ingress: subprocess.Popen[bytes] | None = None
        self.sink: subprocess.Popen[bytes] | None = None
        self.standin: subprocess.Popen[bytes] | None = None
        self._n = collections.Counter[str]()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self._n[name] += 1
        with open(self.log_dir / f"{name}-{self._n[name]}.log", "wb") as log:
            return subprocess.Popen(  # the child keeps its own handle on the file
                [sys.executable, "-m", *args], env=self.env, cwd=ROOT, stdout=log, stderr=log
            )

    def start_worker(self) -> None:
        self.workers.append(self._spawn("worker", ["fulfillment", "worker"]))

    def start_ingress(self) -> None:
        self.ingress = self._spawn("ingress", ["fulfillment", "ingress"])

    def start_sink(self, port: int, record: Path) -> None:
        self.sink = self._spawn(
            "smtp", ["devkit.mailsink", "--port", str(port), "--record", str(record)]
        )

    def start_standin(self, port: int) -> None:
        self.standin = self._spawn("standin", ["devkit.stripe", "--port", str(port)])

    def all(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (*self.workers, self.ingress, self.sink, self.standin) if p is not None]

    def stop_all(self) -> None:
        for p in self.all():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.all():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Workload:
    events: list[tuple[int, dict[str, Any]]]  # (phase, event)
    paid: set[str]
    delayed_paid: set[str]
    failed: set[str]
    poison_events: set[str]
    seeds: list[dict[str, Any]]


def build_workload(cfg: ChaosConfig, rng: random.Random, token: str) -> Workload:
    """Sessions and their events: duplicates, both success events, delayed, failed, poison."""
    seeds, events = [], []
    paid, delayed, failed, poison = set(), set(), set(), set()
    n_poison = max(1, int(cfg.events * cfg.poison_fraction))
    for i in range(cfg.sessions):
        sid = f"cs_test_chaos_{token}_{i:05d}"
        kind = rng.random()
        email = f"buyer{i}@example.com"
        if kind < 0.70:
            seeds.append({"id": sid, "payment_status": "paid", "customer_email": email})
            paid.add(sid)
            events.append(
                (1, signing.event("checkout.session.completed", signing.checkout_session(sid)))
            )
            if rng.random() < 0.3:
                events.append(
                    (
                        1,
                        signing.event(
                            "checkout.session.async_payment_succeeded",
                            signing.checkout_session(sid),
                        ),
                    )
                )
        elif kind < 0.85:
            seeds.append({"id": sid, "payment_status": "unpaid", "customer_email": email})
            delayed.add(sid)
            unpaid = signing.checkout_session(sid, payment_status="unpaid")
            events.append((1, signing.event("checkout.session.completed", unpaid)))
            events.append(
                (
                    2,
                    signing.event(
                        "checkout.session.async_payment_succeeded", signing.checkout_session(sid)
                    ),
                )
            )
        else:
            seeds.append({"id": sid, "payment_status": "unpaid", "customer_email": email})
            failed.add(sid)
            unpaid = signing.checkout_session(sid, payment_status="unpaid")
            events.append((1, signing.event("checkout.session.completed", unpaid)))
            events.append((2, signing.event("checkout.session.async_payment_failed", unpaid)))
    for i in range(n_poison):
        event = signing.event(
            "checkout.session.completed", signing.checkout_session(f"cs_test_poison_{token}_{i}")
        )
        poison.add(event["id"])
        events.append((1, event))
    # exact duplicates (Stripe redelivers) until the event count is reached
    base = [e for e in events if e[1]["id"] not in poison]
    while len(events) < cfg.events:
        events.append(rng.choice(base))
    rng.shuffle(events)  # any order
    events.sort(key=lambda e: e[0])  # but a delayed payment resolves after checkout
    return Workload(events, paid, delayed, failed, poison, seeds)


async def send_all(
    port: int,
    secret: str,
    events: list[dict[str, Any]],
    report: Report,
    concurrency: int,
    deadline: float,
    seconds: float,
) -> set[str]:
    """Send each event until it is answered 200, as Stripe retries; the acknowledged ids."""
    acknowledged: set[str] = set()
    deliveries: collections.Counter[str] = collections.Counter()  # per event id: attempts
    todo = list(enumerate(events))[::-1]
    start = time.monotonic()
    interval = seconds / max(len(events), 1)

    async def sender() -> None:
        conn = HttpConnection("127.0.0.1", port)
        while todo:
            i, event = todo.pop()
            wait = start + i * interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            raw = signing.body(event)
            report.sent += 1
            delay = 0.05
            while time.monotonic() < deadline:
                # Stripe signs every delivery anew; the same signed content twice would be
                # a replay, absorbed by the ingress instead of testing the workers' dedupe
                deliveries[event["id"]] += 1
                signed_at = int(time.time()) - deliveries[event["id"]]
                headers = {"Stripe-Signature": signing.signature_header(raw, secret, timestamp=signed_at),
                           "Content-Type": "application/json"}  # fmt: skip
                try:
                    status = await asyncio.wait_for(conn.post("/webhooks/stripe", raw, headers), 15)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    report.connection_errors += 1
                    conn.close()
                    conn = HttpConnection("127.0.0.1", port)
                    status = 0
                if status == 200:
                    report.acknowledged += 1
                    acknowledged.add(event["id"])
                    break
                if status == 503:
                    report.answered_503 += 1
                elif status:
                    raise RuntimeError(f"ingress answered {status} to a valid event")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        conn.close()

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return acknowledged


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0


Fault = Callable[[], bool]


def _infrastructure_faults(cfg: ChaosConfig, report: Report) -> tuple[Fault | None, Fault | None]:
    """How to drop every broker connection and restart PostgreSQL, each True when done: on
    the throwaway instances when the config has them, else on the machine's own services."""
    node, server = cfg.rabbit_node, cfg.postgres
    if (node is None) != (server is None):
        # half private would break the machine's other service
        raise ValueError("give both throwaway services (postgres and rabbit_node) or neither")
    versions = sorted(os.listdir("/etc/postgresql")) if Path("/etc/postgresql").is_dir() else []

    def drop_private() -> bool:
        assert node is not None
        return _succeeds(node.ctl, "close_all_connections", "chaos")

    def drop_machines() -> bool:
        return _run("rabbitmqctl", "close_all_connections", "chaos")

    def restart_private() -> bool:
        assert server is not None
        return _succeeds(server.restart)

    def restart_machines() -> bool:
        return _run("pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart")

    drop: Fault | None = None
    restart: Fault | None = None
    if "rabbitmq" in cfg.faults:
        if node is not None:
            drop = drop_private
        elif shutil.which("rabbitmqctl"):
            drop = drop_machines
        else:
            report.faults_skipped.append("rabbitmq (no rabbitmqctl)")
    if "postgres" in cfg.faults:
        if server is not None:
            restart = restart_private
        elif shutil.which("pg_ctlcluster") and versions:
            restart = restart_machines
        else:
            report.faults_skipped.append("postgres (no pg_ctlcluster)")
    return drop, restart


def _succeeds(action: Callable[..., object], *args: str) -> bool:
    try:
        action(*args)
    except (ServiceUnavailable, subprocess.TimeoutExpired):
        return False
    return True


async def inject_faults(  # noqa: C901 - one loop over every kind of fault
    cfg: ChaosConfig,
    fleet: Fleet,
    report: Report,
    rng: random.Random,
    standin: str,
    stop: asyncio.Event,
    sink_port: int,
    record: Path,
) -> None:
    """Abuse the pipeline until ``stop``: each fault at its moment, kills all along."""
    plan = []
    drop_connections, restart_postgres = _infrastructure_faults(cfg, report)
    if drop_connections is not None:
        plan.append((6.0, "rabbitmq"))
    if restart_postgres is not None:
        plan.append((10.0, "postgres"))
    if "smtp" in cfg.faults:
        plan.append((3.0, "smtp"))
    if "ingress" in cfg.faults:
        plan.append((8.0, "ingress"))
    plan.sort()
    started = time.monotonic()
    next_kill = started + cfg.kill_every_s
    spike_until = 0.0
    async with aiohttp.ClientSession() as http:
        if "stripe" in cfg.faults:
            await http.post(f"{standin}/_standin/faults", json={"fail_rate": cfg.stripe_error_rate})
            report.faults["stripe 429/500 rate"] = int(cfg.stripe_error_rate * 100)
        while not stop.is_set():
            now = time.monotonic()
            if "kill" in cfg.faults and now >= next_kill and fleet.workers:
                victim = rng.choice([w for w in fleet.workers if w.poll() is None] or fleet.workers)
                victim.kill()
                await asyncio.to_thread(victim.wait)
                fleet.workers.remove(victim)
                fleet.start_worker()
                report.faults["worker SIGKILL"] += 1
                next_kill = now + cfg.kill_every_s
            if "stripe" in cfg.faults and now > spike_until and rng.random() < 0.05:
                await http.post(f"{standin}/_standin/faults", json={"latency_s": 0.3})
                spike_until = now + 1.0
                report.faults["stripe latency spike"] += 1
            elif spike_until and now > spike_until:
                await http.post(f"{standin}/_standin/faults", json={"latency_s": 0.0})
                spike_until = 0.0
            while plan and now - started >= plan[0][0]:
                _, fault = plan.pop(0)
                if fault == "rabbitmq" and drop_connections is not None:
                    if await asyncio.to_thread(drop_connections):
                        report.faults["rabbitmq connections dropped"] += 1
                elif fault == "postgres" and restart_postgres is not None:
                    if await asyncio.to_thread(restart_postgres):
                        report.faults["postgresql restart"] += 1
                elif fault == "smtp" and fleet.sink is not None:
                    fleet.sink.kill()
                    fleet.sink.wait()
                    await asyncio.sleep(cfg.smtp_outage_s)
                    fleet.start_sink(sink_port, record)
                    report.faults[f"smtp down {cfg.smtp_outage_s:g}s"] += 1
                elif fault == "ingress" and fleet.ingress is not None:
                    old = fleet.ingress
                    old.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(old.wait, 30)
                    fleet.start_ingress()
                    report.faults["ingress SIGTERM + restart"] += 1
            await asyncio.sleep(0.1)
        await http.post(f"{standin}/_standin/faults", json={"clear": True})


async def queue_counts(url: str, topo: Topology) -> dict[str, int]:
    connection = await aio_pika.connect(url)
    async with connection:
        underlay = await (await connection.channel()).get_underlay_channel()
        counts = {}
        for name in topo.all_queues:
            counts[name] = (await underlay.queue_declare(name, passive=True)).message_count or 0
        return counts


async def wait_drained(
    cfg: ChaosConfig, topo: Topology, pool: asyncpg.Pool, deadline: float
) -> None:
    """Until nothing is queued or retrying and processing has been still for a while."""
    quiet_needed = max(float(d) for d in cfg.retry_delays.split(",")) + 3
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        counts = await queue_counts(cfg.rabbitmq_url, topo)
        busy = sum(v for k, v in counts.items() if k not in (topo.dead_queue, topo.unrouted_queue))
        processed = await pool.fetchval("SELECT count(*) FROM processed_events")
        if busy or processed != last:
            last, still_since = processed, time.monotonic()
        elif time.monotonic() - still_since > quiet_needed:
            return
        await asyncio.sleep(0.5)


def scan_logs(log_dir: Path, poison: set[str]) -> list[str]:
    """Unhandled exceptions: error lines that are not the poison's dead letters, and raw
    tracebacks outside the JSON log (a crash). Warnings with a handled exception attached
    (asyncpg reconnecting during the database restart) are not counted."""
    found = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                if "Traceback" in line or "was never retrieved" in line:
                    found.append(f"{path.name}: {line[:200]}")
                continue
            if not isinstance(doc, dict) or doc.get("level") not in ("error", "critical"):
                continue
            if doc.get("event") == "dead-lettered" and doc.get("event_id") in poison:
                continue
            found.append(f"{path.name}: {line[:300]}")
    return found


async def run_chaos(cfg: ChaosConfig, log_dir: Path | None = None) -> Report:
    rng = random.Random(cfg.seed)
    token = secrets.token_hex(3)
    report = Report()
    started = time.monotonic()
    deadline = started + cfg.timeout_s
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    record = log_dir / "mail.tsv"
    record.touch()

    db_name = f"fulfillment_chaos_{token}"
    db_url = urlsplit(cfg.server_url)._replace(path=f"/{db_name}").geturl()
    await migrate(db_url)
    prefix = f"chaos.{token}"
    broker = BrokerSettings(
        url=cfg.rabbitmq_url, prefix=prefix,
        retry_delays_s=tuple(float(d) for d in cfg.retry_delays.split(",")),
    )  # fmt: skip
    topo = Topology.from_settings(broker)
    connection = await aio_pika.connect(cfg.rabbitmq_url)
    channel = await connection.channel()
    await topo.declare(channel)
    capture = await channel.declare_queue(f"{prefix}.outbound-capture", durable=True,
                                          arguments={"x-queue-type": "quorum"})  # fmt: skip
    await capture.bind(topo.out_exchange, routing_key="#")
    await connection.close()

    standin_port, smtp_port, ingress_port = free_port(), free_port(), free_port()
    secret = signing.new_secret()
    env = {
        **os.environ,
        "RABBITMQ_URL": cfg.rabbitmq_url, "BROKER_PREFIX": prefix, "RETRY_DELAYS_S": cfg.retry_delays,
        "DATABASE_URL": db_url, "STRIPE_WEBHOOK_SECRETS": secret, "STRIPE_API_KEY": "sk_test_chaos",
        "STRIPE_API_BASE": f"http://127.0.0.1:{standin_port}", "STRIPE_TIMEOUT_S": "5",
        "SMTP_URL": f"smtp://127.0.0.1:{smtp_port}", "SMTP_TIMEOUT_S": "3",
        "INGRESS_HOST": "127.0.0.1", "INGRESS_PORT": str(ingress_port), "WORKER_METRICS_PORT": "0",
        "WORKER_CONCURRENCY": str(cfg.concurrency), "WORKER_GRACE_S": "5",
        "WORKER_QUICK_RETRIES": "2", "LOG_FORMAT": "json",
    }  # fmt: skip
    fleet = Fleet(env, log_dir)
    standin = f"http://127.0.0.1:{standin_port}"
    workload = build_workload(cfg, rng, token)
    try:
        fleet.start_standin(standin_port)
        fleet.start_sink(smtp_port, record)
        fleet.start_ingress()
        for _ in range(cfg.workers):
            fleet.start_worker()
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{standin}/_standin/stats") as r, \
                            http.get(f"http://127.0.0.1:{ingress_port}/readyz") as ready:  # fmt: skip
                        if r.status == 200 and ready.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            for seed in workload.seeds:
                async with http.post(f"{standin}/_standin/sessions", json=seed) as r:
                    assert r.status == 201, await r.text()

        stop = asyncio.Event()
        faults = asyncio.create_task(
            inject_faults(cfg, fleet, report, rng, standin, stop, smtp_port, record)
        )
        acknowledged: set[str] = set()
        for phase in (1, 2):
            if phase == 2:  # the delayed payments resolve
                async with aiohttp.ClientSession() as http:
                    for sid in workload.delayed_paid:
                        await http.post(f"{standin}/_standin/sessions/{sid}/payment_status",
                                        json={"payment_status": "paid"})  # fmt: skip
            batch = [e for p, e in workload.events if p == phase]
            acknowledged |= await send_all(ingress_port, secret, batch, report,
                                           cfg.send_concurrency, deadline, cfg.send_seconds / 2)  # fmt: skip
        await asyncio.sleep(min(10.0, cfg.kill_every_s * 3))  # abuse the processing too
        stop.set()
        await faults
        if not [w for w in fleet.workers if w.poll() is None]:
            fleet.start_worker()

        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        assert pool is not None
        await wait_drained(cfg, topo, pool, deadline)
        await check(cfg, workload, acknowledged, pool, topo, record, report)
        await pool.close()
    finally:
        fleet.stop_all()
        report.unhandled_exceptions = scan_logs(log_dir, workload.poison_events)
        report.duration_s = time.monotonic() - started
        connection = await aio_pika.connect(cfg.rabbitmq_url)
        async with connection:
            ch = await connection.channel()
            await ch.queue_delete(f"{prefix}.outbound-capture")
            await topo.delete(ch)
        # the server's maintenance database: DATABASE_URL may name one that is not there
        admin = await asyncpg.connect(urlsplit(cfg.server_url)._replace(path="/postgres").geturl())
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await admin.close()
    return report


async def check(
    cfg: ChaosConfig,
    workload: Workload,
    acknowledged: set[str],
    pool: asyncpg.Pool,
    topo: Topology,
    record: Path,
    report: Report,
) -> None:
    paid = workload.paid | workload.delayed_paid
    report.paid_sessions, report.failed_sessions = len(paid), len(workload.failed)
    rows = {
        r["checkout_session_id"]
        for r in await pool.fetch("SELECT checkout_session_id FROM fulfillments")
    }
    report.fulfilled = len(rows & paid)
    report.wrong_rows = len(rows - paid)
    report.missing_rows = len(paid - rows)
    processed = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM processed_events")}

    mails = collections.Counter(
        line.split("\t")[0] for line in record.read_text().splitlines() if line.strip()
    )
    order_ids = {f"<order.{sid}@localhost>" for sid in paid}
    failed_ids = {f"<payment-failed.{sid}@localhost>" for sid in workload.failed}
    report.emails_missing = len(order_ids - set(mails))
    report.failure_notices = len(failed_ids & set(mails))
    steps = await pool.fetch("SELECT checkout_session_id, step, done_at FROM fulfillment_steps")
    recorded = {(r["checkout_session_id"], r["step"]) for r in steps}
    for message_id, count in sorted(mails.items()):
        if count > 1:
            report.duplicates.append(
                f"email {message_id} x{count}: sent, then not recorded (the worker was killed, "
                "or PostgreSQL was restarting), so sent again with the same Message-ID"
            )
    for message_id in set(mails) - order_ids - failed_ids:
        report.duplicates.append(f"unexplained email {message_id}")

    connection = await aio_pika.connect(cfg.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{topo.prefix}.outbound-capture")
        outbound: collections.Counter[str] = collections.Counter()
        while (m := await queue.get(no_ack=True, fail=False)) is not None:
            outbound[str((m.headers or {}).get("fulfillment-id"))] += 1
        dead_queue = await channel.get_queue(topo.dead_queue)
        dead: list[str] = []
        while (m := await dead_queue.get(no_ack=True, fail=False)) is not None:
            dead.append(str((m.headers or {}).get("stripe-event-id")))
        counts = await queue_counts(cfg.rabbitmq_url, topo)
    wanted_out = {f"order.fulfilled:{sid}" for sid in paid}
    wanted_out |= {f"payment.failed:{sid}" for sid in workload.failed}
    report.outbound_missing = len(wanted_out - set(outbound))
    steps_of = {
        "order.fulfilled": "order_fulfilled_message",
        "payment.failed": "payment_failed_message",
    }
    for dedupe_id in set(outbound) - wanted_out:
        report.duplicates.append(f"unexplained outbound message {dedupe_id}")
    for dedupe_id, count in sorted(outbound.items()):
        if count > 1:
            kind, _, sid = dedupe_id.partition(":")
            cause = ("published, then not recorded (worker killed, database restarting, or the "
                     "broker connection lost before its confirm), so published again"
                     if (sid, steps_of.get(kind)) in recorded else "unexplained")  # fmt: skip
            report.duplicates.append(f"{cause}: {dedupe_id} x{count} (same fulfillment-id header)")
    report.dead_lettered = len(dead)
    report.dlq_unexpected = sorted(set(dead) - workload.poison_events)
    report.poison_missing_from_dlq = sorted((workload.poison_events & acknowledged) - set(dead))
    report.delay_queues_left = sum(counts[q] for q in topo.retry_queues) + counts[topo.work_queue]
    report.lost = sorted(acknowledged - processed - set(dead))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=1250)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--logs", type=Path, help="keep the processes' logs here")
    parser.add_argument(
        "--private-services", action="store_true",
        help="break a throwaway PostgreSQL cluster and RabbitMQ node, not the machine's",
    )  # fmt: skip
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        cfg = ChaosConfig(
            events=args.events, sessions=args.sessions, workers=args.workers, seed=args.seed
        )
        if args.private_services:
            print("starting a throwaway PostgreSQL cluster and RabbitMQ node...", flush=True)
            postgres, node = _private(stack)
            cfg.rabbitmq_url, cfg.server_url = node.url, postgres.url
            cfg.postgres, cfg.rabbit_node = postgres, node
        report = runtime.run(run_chaos(cfg, args.logs))
    print(f"\nChaos run: {cfg.events} events over {cfg.sessions} sessions, {cfg.workers} workers\n")
    print(report.table())
    for line in report.unhandled_exceptions[:20]:
        print(f"unhandled: {line}")
    if report.lost:
        print(f"lost: {report.lost[:20]}")
    if report.dlq_unexpected:
        print(f"dead-lettered but not poison: {report.dlq_unexpected[:20]}")
    print("\nRESULT:", "PASS" if report.ok else "FAIL")
    raise SystemExit(0 if report.ok else 1)


def _private(stack: contextlib.ExitStack) -> tuple[PrivatePostgres, RabbitNode]:
    postgres = stack.enter_context(private_postgres())
    rabbit = stack.enter_context(private_rabbitmq(1, prefix="chaos"))
    return postgres, rabbit.nodes[0]


if __name__ == "__main__":
    main()
