"""Ingress benchmark: signed ~3 KB Stripe events (2.9 KB) through real HTTP into a real RabbitMQ.

Prints, from one run on one broker:
  * verified + confirmed webhooks/s at fixed concurrency (closed loop), p50/p99;
  * the raw aio-pika publish-with-confirm rate for the same messages at the same concurrency,
    and the ratio between the two;
  * p50/p99 latency at a fixed offered rate (open loop, default 1,000 requests/s);
  * rejections/s for invalid signatures;
  * where the machine's CPU went, per confirmed webhook, per raw publish and per rejection.

``--floor`` drives ops/floor_ingress.py in the ingress's place: aiohttp and aio-pika doing
the same confirmed publish with none of our code (no signature check, no JSON, no metrics),
so that a run beside a normal one shows how much of the rate the chosen stack allows.

    .venv/bin/python ops/bench_ingress.py [--processes 2] [--concurrency 64] [--seconds 10]

Uses RABBITMQ_URL (default local broker) and a throwaway BROKER_PREFIX it deletes at the end.
All traffic goes to 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import aiohttp

from devkit import signing
from devkit.load import HttpConnection, cpu_snapshot, free_port, pct, pids_named, print_cpu
from shared import runtime
from shared.broker import event_message
from shared.envelope import EventEnvelope
from shared.settings import BrokerSettings
from shared.topology import Topology

ROOT = Path(__file__).resolve().parent.parent

# Fields of the fixture session left out so an event is about 3 KB, a typical size.
_TRIM = (
    "after_expiration",
    "custom_text",
    "invoice_creation",
    "consent_collection",
    "automatic_tax",
    "payment_method_configuration_details",
    "saved_payment_method_options",
    "shipping_cost",
    "total_details",
    "shipping_address_collection",
    "phone_number_collection",
    "consent",
)


def make_events(n: int) -> list[bytes]:
    """Stripe-shaped checkout.session.completed events of about 3 KB each."""
    bodies = []
    for _ in range(n):
        session = signing.checkout_session()
        for key in _TRIM:
            session.pop(key, None)
        bodies.append(signing.body(signing.event("checkout.session.completed", session)))
    return bodies


async def closed_loop(
    call: Callable[[int], Awaitable[bool]], concurrency: int, seconds: float, max_requests: int
) -> tuple[float, list[float], int]:
    """Run ``call`` from ``concurrency`` tasks for ``seconds``; rate, sorted latencies, errors."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds

    async def runner() -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline and counter < max_requests:
            i = counter
            counter += 1
            started = time.perf_counter()
            ok = await call(i)
            latencies.append(time.perf_counter() - started)
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, sorted(latencies), errors


async def open_loop(
    call: Callable[[int], Awaitable[bool]], rate: float, seconds: float
) -> tuple[float, list[float], int]:
    """Offer ``rate`` requests/s for ``seconds`` regardless of answers; latencies from send."""
    latencies: list[float] = []
    errors = 0
    tasks = []
    total = int(rate * seconds)

    async def one(i: int) -> None:
        nonlocal errors
        started = time.perf_counter()
        ok = await call(i)
        latencies.append(time.perf_counter() - started)
        errors += not ok

    start = time.perf_counter()
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return total / (time.perf_counter() - start), sorted(latencies), errors


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"ingress not ready at {url}")


async def purge(channel: aio_pika.abc.AbstractChannel, topo: Topology) -> int:
    queue = await channel.get_queue(topo.work_queue, ensure=True)
    result = await queue.purge()
    return int(result.message_count or 0)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2, help="ingress processes (SO_REUSEPORT)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="offered rate for the latency run"
    )
    parser.add_argument("--events", type=int, default=2000, help="distinct signed bodies to cycle")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="drive ops/floor_ingress.py instead of the ingress: the stack alone "
        "(aiohttp + aio-pika, the same confirmed publish), none of our code",
    )
    args = parser.parse_args()

    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    prefix = f"bench.{secrets.token_hex(4)}"
    settings = BrokerSettings(url=url, prefix=prefix)
    topo = Topology.from_settings(settings)
    secret = signing.new_secret()
    bodies = make_events(args.events)
    # A distinct event for every request, signed when sent: the same signed content twice is
    # a replay, answered 200 but not queued again. Each request takes a body with its own
    # event id (same length, so the same size), then signs it as Stripe would.
    event_ids = [json.loads(b)["id"].encode() for b in bodies]
    sent = itertools.count()
    confirmed, queued = [0], [0]  # 200s answered, messages found on the queue

    def signed() -> tuple[bytes, dict[str, str]]:
        n = next(sent)
        j = n % len(bodies)
        body = bodies[j].replace(event_ids[j], b"evt_%024x" % n, 1)
        header = signing.signature_header(body, secret)
        return body, {"Stripe-Signature": header, "Content-Type": "application/json"}

    bad_headers = [
        {"Stripe-Signature": signing.signature_header(b, signing.new_secret())} for b in bodies
    ]
    size = sum(map(len, bodies)) // len(bodies)

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await topo.declare(channel)

    port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_URL": url,
        "BROKER_PREFIX": prefix,
        "STRIPE_WEBHOOK_SECRETS": secret,
        "INGRESS_PORT": str(port),
        "INGRESS_HOST": "127.0.0.1",
        "LOG_FORMAT": "json",
    }
    server = (
        [str(ROOT / "ops" / "floor_ingress.py")] if args.floor else ["-m", "fulfillment", "ingress"]
    )
    procs = [
        subprocess.Popen(
            [sys.executable, *server],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(args.processes)
    ]
    base = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {}
    cpu: dict[str, tuple[dict[str, float], dict[str, float], int]] = {}
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, base + "/readyz")
            await asyncio.sleep(0.5 * args.processes)  # every process connected

            idle: list[HttpConnection] = []

            async def send(body: bytes, h: dict[str, str]) -> int:
                conn = idle.pop() if idle else HttpConnection("127.0.0.1", port)
                try:
                    status = await conn.post("/webhooks/stripe", body, h)
                except (OSError, asyncio.IncompleteReadError):
                    return 0
                idle.append(conn)
                return status

            async def webhook(i: int) -> bool:
                body, headers = signed()
                if await send(body, headers) != 200:
                    return False
                confirmed[0] += 1
                return True

            async def invalid(i: int) -> bool:
                j = i % len(bodies)
                return await send(bodies[j], bad_headers[j]) == 400

            components = {
                "floor server" if args.floor else "ingress (ours)": lambda: [p.pid for p in procs],
                "RabbitMQ": lambda: pids_named("beam.smp"),
                "load generator (this script)": lambda: [os.getpid()],
            }
            await closed_loop(webhook, args.concurrency, 1.0, 10**9)  # warm-up
            cpu_before = cpu_snapshot(components)
            rate, lat, errors = await closed_loop(webhook, args.concurrency, args.seconds, 10**7)
            cpu["accepted"] = (cpu_before, cpu_snapshot(components), len(lat))
            results["ingress"] = (rate, pct(lat, 0.5), pct(lat, 0.99), errors)
            queued[0] += await purge(channel, topo)

            orate, olat, oerrors = await open_loop(webhook, args.rate, args.seconds)
            results["open"] = (orate, pct(olat, 0.5), pct(olat, 0.99), oerrors)
            queued[0] += await purge(channel, topo)

            if not args.floor:  # the floor verifies nothing, so it rejects nothing
                cpu_before = cpu_snapshot(components)
                irate, ilat, ierrors = await closed_loop(
                    invalid, args.concurrency, args.seconds / 2, 10**7
                )
                cpu["rejected"] = (cpu_before, cpu_snapshot(components), len(ilat))
                results["invalid"] = (irate, pct(ilat, 0.5), pct(ilat, 0.99), ierrors)

        # Raw aio-pika publish-with-confirm, same messages, same concurrency, same broker.
        pub_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events = await pub_channel.get_exchange(topo.events_exchange)
        envelopes = [EventEnvelope.parse(b) for b in bodies]
        routes = [topo.route(e.type) for e in envelopes]  # as the ingress publishes

        async def raw_publish(i: int) -> bool:
            j = i % len(bodies)
            exchange_name, routing_key = routes[j]
            await (events if exchange_name else pub_channel.default_exchange).publish(
                event_message(bodies[j], envelopes[j], source="bench"),
                routing_key,
                mandatory=True,
                timeout=5,
            )
            return True

        raw_components = {
            "aio-pika publisher (this script)": lambda: [os.getpid()],
            "RabbitMQ": lambda: pids_named("beam.smp"),
        }
        await closed_loop(raw_publish, args.concurrency, 1.0, 10**9)
        cpu_before = cpu_snapshot(raw_components)
        prate, plat, perrors = await closed_loop(raw_publish, args.concurrency, args.seconds, 10**7)
        cpu["raw"] = (cpu_before, cpu_snapshot(raw_components), len(plat))
        results["raw"] = (prate, pct(plat, 0.5), pct(plat, 0.99), perrors)
        await purge(channel, topo)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        await topo.delete(channel)
        await connection.close()

    report(args, size, results, cpu, confirmed[0], queued[0])


def report(
    args: argparse.Namespace,
    size: int,
    results: dict[str, object],
    cpu: dict[str, tuple[dict[str, float], dict[str, float], int]],
    confirmed: int,
    queued: int,
) -> None:
    """The tables, then the results as one JSON line (what the tests read)."""

    def row(name: str, key: str) -> str:
        rate, p50, p99, errors = results[key]  # type: ignore[misc]
        return f"| {name} | {rate:,.0f}/s | {p50 * 1000:.1f} ms | {p99 * 1000:.1f} ms | {errors} |"

    ingress_rate = results["ingress"][0]  # type: ignore[index]
    raw_rate = results["raw"][0]  # type: ignore[index]
    what = "FLOOR (ops/floor_ingress.py: aiohttp + aio-pika alone, not the ingress)"
    print(
        f"\n{what if args.floor else 'Ingress'} benchmark: {args.processes} process(es), "
        f"concurrency {args.concurrency}, {size} B events, {args.seconds:g} s per run, "
        f"{os.cpu_count()} cores, broker on this host, event loop {runtime.loop_name()} "
        f"(all processes), {runtime.interpreter()}\n"
    )
    print("| run | rate | p50 | p99 | errors |")
    print("|---|---|---|---|---|")
    verified = "not verified, " if args.floor else "verified + "
    print(row(f"{verified}confirmed webhooks (closed loop)", "ingress"))
    print(row("raw aio-pika publish with confirm", "raw"))
    print(row(f"webhooks at {args.rate:,.0f} req/s offered (open loop)", "open"))
    if "invalid" in results:
        print(row("invalid signatures rejected (closed loop)", "invalid"))
    print(
        f"\nratio {'floor' if args.floor else 'ingress'} / raw publish: {ingress_rate / raw_rate:.2f}"
    )
    # a 200 must mean queued: every confirmed webhook is a message on the queue
    print(f"confirmed webhooks: {confirmed:,}, messages queued for them: {queued:,}")
    before, after, n = cpu["accepted"]
    print_cpu(before, after, n, args.seconds, "confirmed webhook")
    before, after, n = cpu["raw"]
    print_cpu(before, after, n, args.seconds, "raw confirmed publish")
    if "rejected" in cpu:
        before, after, n = cpu["rejected"]
        print_cpu(before, after, n, args.seconds / 2, "rejected webhook")
    print(json.dumps({k: list(v) for k, v in results.items()}))  # type: ignore[call-overload]


if __name__ == "__main__":
    runtime.run(main())
