"""End-to-end benchmark: signed events into the ingress, to fulfilled sessions.

Starts, all on 127.0.0.1: the Stripe stand-in (its latency configurable), an SMTP sink,
one ingress and N worker processes on a throwaway broker prefix and database. Seeds K paid
sessions, sends one signed ``checkout.session.completed`` per session through the ingress,
and waits until every session's last effect (the confirmation email) is recorded.

Prints fulfilled sessions/s, p50/p99 end-to-end latency (webhook sent → last effect
recorded), peak worker RSS, and the raw aio-pika consume-and-ack rate on the same broker
with the ratio.

    .venv/bin/python ops/bench_e2e.py --sessions 3000 --workers 2 --concurrency 32
    .venv/bin/python ops/bench_e2e.py --sessions 3000 --workers 1 --concurrency 64 --stripe-latency-ms 100

Uses RABBITMQ_URL and DATABASE_URL (a server; the bench creates and drops its own database).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg

from devkit import signing
from devkit.load import HttpConnection, cpu_snapshot, free_port, pct, pids_named, print_cpu
from shared import runtime
from shared.settings import BrokerSettings
from shared.topology import Topology
from worker.db import migrate
from worker.flow import FULFILLED_STEPS

ROOT = Path(__file__).resolve().parent.parent
LAST_STEP = FULFILLED_STEPS[-1]  # a session is done when its last effect is recorded


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"not up: {url}")


async def raw_consume_rate(url: str, n: int, prefetch: int, body: bytes) -> float:
    """Publish n messages to a fresh quorum queue, then consume and ack them all; msgs/s."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        name = f"bench.raw.{secrets.token_hex(4)}"
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        for _ in range(n):
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), name
            )
        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=prefetch)
        q = await consumer_channel.get_queue(name)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count >= n:
                done.set()

        started = time.perf_counter()
        tag = await q.consume(on_message)
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - started
        await q.cancel(tag)
        await channel.queue_delete(name)
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="per worker")
    parser.add_argument("--stripe-latency-ms", type=float, default=0.0)
    parser.add_argument("--send-concurrency", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()

    rabbit = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    server = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    token = secrets.token_hex(4)
    db_name = f"fulfillment_bench_{token}"
    db_url = urlsplit(server)._replace(path=f"/{db_name}").geturl()
    await migrate(db_url)
    topology = Topology.from_settings(BrokerSettings(url=rabbit, prefix=f"bench.{token}"))
    subscriber = topology.named("subscriber")

    standin_port, smtp_port, ingress_port = free_port(), free_port(), free_port()
    secret = signing.new_secret()
    env = {
        **os.environ,
        "RABBITMQ_URL": rabbit,
        "BROKER_PREFIX": topology.prefix,
        "DATABASE_URL": db_url,
        "STRIPE_WEBHOOK_SECRETS": secret,
        "STRIPE_API_KEY": "sk_test_bench",
        "STRIPE_API_BASE": f"http://127.0.0.1:{standin_port}",
        "SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        "INGRESS_HOST": "127.0.0.1",
        "INGRESS_PORT": str(ingress_port),
        "WORKER_CONCURRENCY": str(args.concurrency),
        "WORKER_METRICS_PORT": "0",
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        "LOG_FORMAT": "json",
    }
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT, "env": env}
    py = sys.executable
    procs = [
        subprocess.Popen(
            [
                py,
                "-m",
                "devkit.stripe",
                "--port",
                str(standin_port),
                "--latency-s",
                str(args.stripe_latency_ms / 1000),
            ],
            **quiet,
        ),  # type: ignore[call-overload]
        subprocess.Popen(
            [
                py,
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                f"127.0.0.1:{smtp_port}",
                "-c",
                "aiosmtpd.handlers.Sink",
            ],
            **quiet,
        ),  # type: ignore[call-overload]
        subprocess.Popen([py, "-m", "fulfillment", "ingress"], **quiet),  # type: ignore[call-overload]
    ]
    workers = [
        subprocess.Popen([py, "-m", "fulfillment", "worker"], **quiet)  # type: ignore[call-overload]
        for _ in range(args.workers)
    ]
    try:
        await wait_http(f"http://127.0.0.1:{standin_port}/_standin/stats")
        await wait_http(f"http://127.0.0.1:{ingress_port}/readyz")
        session_ids = [f"cs_test_bench_{token}_{i:06d}" for i in range(args.sessions)]
        async with aiohttp.ClientSession() as http:
            for sid in session_ids:
                async with http.post(
                    f"http://127.0.0.1:{standin_port}/_standin/sessions",
                    json={"id": sid, "line_items": [["T-shirt", 2, 2000], ["Mug", 1, 1250]]},
                ) as r:
                    assert r.status == 201
        await asyncio.sleep(2)  # workers connected and consuming (and the topology declared)
        # a subscriber's queue, as a deployment has one: unbound, every order.fulfilled would
        # be returned by the broker (and warned about); kept short, nobody reads it here
        async with await aio_pika.connect(rabbit) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                subscriber, durable=True, arguments={"x-max-length": 1000}
            )
            await queue.bind(topology.out_exchange, routing_key="#")
        bodies = []
        for sid in session_ids:
            raw = signing.body(
                signing.event("checkout.session.completed", signing.checkout_session(sid))
            )
            bodies.append(
                (
                    raw,
                    {
                        "Stripe-Signature": signing.signature_header(raw, secret),
                        "Content-Type": "application/json",
                    },
                )
            )

        sent_at: dict[str, float] = {}
        queue = list(range(len(bodies)))

        async def sender() -> None:
            conn = HttpConnection("127.0.0.1", ingress_port)
            while queue:
                i = queue.pop()
                raw, headers = bodies[i]
                sent_at[session_ids[i]] = time.time()
                status = await conn.post("/webhooks/stripe", raw, headers)
                if status != 200:
                    raise SystemExit(f"ingress answered {status}")

        components = {
            "workers (ours)": lambda: [w.pid for w in workers],
            "ingress (ours)": lambda: [procs[2].pid],
            "RabbitMQ": lambda: pids_named("beam.smp"),
            "PostgreSQL": lambda: pids_named("postgres"),
            "Stripe stand-in (test double)": lambda: [procs[0].pid],
            "SMTP sink (test double)": lambda: [procs[1].pid],
            "load generator (this script)": lambda: [os.getpid()],
        }
        cpu_before = cpu_snapshot(components)
        started = time.time()
        await asyncio.gather(*(sender() for _ in range(args.send_concurrency)))
        sent_done = time.time()

        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        assert pool is not None
        deadline = time.monotonic() + args.timeout_s
        while True:
            done = await pool.fetchval(
                "SELECT count(*) FROM fulfillment_steps WHERE step = $1", LAST_STEP
            )
            if done >= args.sessions or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        cpu_after = cpu_snapshot(components)
        rows = await pool.fetch(
            "SELECT checkout_session_id, extract(epoch FROM done_at) AS t FROM fulfillment_steps "
            "WHERE step = $1",
            LAST_STEP,
        )
        fulfillments = await pool.fetchval("SELECT count(*) FROM fulfillments")
        await pool.close()
        rss = [peak_rss_mb(w.pid) for w in workers]
    finally:
        for p in [*workers, *procs]:
            p.send_signal(signal.SIGTERM)
        for p in [*workers, *procs]:
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
        admin = await asyncpg.connect(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await admin.close()
        connection = await aio_pika.connect(rabbit)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(subscriber)
            await topology.delete(channel)

    finished = max(float(r["t"]) for r in rows) if rows else time.time()
    latencies = sorted(float(r["t"]) - sent_at[r["checkout_session_id"]] for r in rows)
    rate = len(rows) / (finished - started)
    raw_rate = await raw_consume_rate(
        rabbit, min(args.sessions, 20000), args.concurrency, bodies[0][0]
    )
    bound = (
        args.workers * args.concurrency / (args.stripe_latency_ms / 1000)
        if args.stripe_latency_ms
        else None
    )

    print(
        f"\nEnd-to-end benchmark: {args.sessions} sessions, {args.workers} worker process(es) x "
        f"concurrency {args.concurrency}, Stripe latency {args.stripe_latency_ms:g} ms, "
        f"{os.cpu_count()} cores shared by everything, event loop {runtime.loop_name()} "
        f"(all processes), {runtime.interpreter()}\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| fulfilled sessions (rows / last effect recorded) | {fulfillments} / {len(rows)} of {args.sessions} |"
    )
    print(f"| webhooks sent in | {sent_done - started:.1f} s |")
    print(f"| fulfilled sessions/s | {rate:,.0f}/s |")
    if bound:
        print(
            f"| bound from Stripe latency (workers x concurrency / latency) | {bound:,.0f}/s ({rate / bound:.0%} reached) |"
        )
    print(
        f"| end-to-end latency p50 / p99 | {pct(latencies, 0.5):.2f} s / {pct(latencies, 0.99):.2f} s |"
    )
    print(f"| peak worker RSS | {', '.join(f'{r:.0f} MB' for r in rss)} |")
    print(
        f"| raw aio-pika consume-and-ack, same broker, prefetch {args.concurrency} | {raw_rate:,.0f}/s |"
    )
    print(f"| ratio fulfilled / raw consume | {rate / raw_rate:.3f} |")

    print_cpu(cpu_before, cpu_after, len(rows), finished - started, "fulfilled session")


if __name__ == "__main__":
    runtime.run(main())
