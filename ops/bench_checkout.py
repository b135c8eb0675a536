"""Checkout success-page benchmark: what a flood of success-page requests costs Stripe.

One `fulfillment ingress` process with the Checkout routes on, Stripe stood in for by the
stand-in (in this process), which counts every call. At full speed, from one client:

  * N made-up session ids (what a stranger sends), with the per-client limits on (their
    defaults) and then off: the Stripe calls per 1,000 requests, and the answers;
  * N reloads of one paid session's page: the Stripe calls and the requests queued;
  * the ingress's CPU per refused (429) request, read from /proc.

    .venv/bin/python ops/bench_checkout.py [--requests 1000] [--concurrency 32]

Uses RABBITMQ_URL (default local broker) and a throwaway BROKER_PREFIX it deletes at the end.
All traffic goes to 127.0.0.1 and every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika

from devkit.load import free_port, process_cpu_s
from devkit.stripe import StripeStandIn, serve
from shared import runtime
from shared.settings import BrokerSettings
from shared.topology import Topology

ROOT = Path(__file__).resolve().parent.parent


async def get(host: str, port: int, path: str, conns: list[Any]) -> int:
    """GET on a kept-alive connection of ``conns`` (a lean client: the load costs little)."""
    reader, writer = conns.pop() if conns else await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    conns.append((reader, writer))
    return int(head[9:12])


async def flood(
    port: int, paths: list[str], concurrency: int
) -> tuple[collections.Counter[int], float]:
    """Every path once, ``concurrency`` at a time; the answers by status and the seconds."""
    statuses: collections.Counter[int] = collections.Counter()
    todo = iter(paths)
    conns: list[Any] = []

    async def runner() -> None:
        for path in todo:
            statuses[await get("127.0.0.1", port, path, conns)] += 1

    started = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    for _, writer in conns:
        writer.close()
    return statuses, elapsed


def start_ingress(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fulfillment", "ingress"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if await get("127.0.0.1", port, "/readyz", []) == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("ingress not ready")


def made_up(n: int) -> list[str]:
    return [f"/checkout/success?session_id=cs_test_{secrets.token_hex(16)}" for _ in range(n)]


async def run(args: argparse.Namespace, standin: StripeStandIn, base_env: dict[str, str],
              channel: Any, topo: Topology) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    paid = standin.add_session(payment_status="paid")["id"]
    for limits in ("on", "off"):
        port = free_port()
        env = {**base_env, "INGRESS_PORT": str(port)}
        if limits == "off":
            env.update(CHECKOUT_LOOKUP_PER_MIN="0", CHECKOUT_CREATE_PER_MIN="0")
        process = start_ingress(env)
        try:
            await wait_ready(port)
            if limits == "on":  # first: the client's bucket is full
                calls = standin.request_count
                reload = [f"/checkout/success?session_id={paid}"] * args.requests
                statuses, elapsed = await flood(port, reload, args.concurrency)
                queue = await channel.get_queue(topo.work_queue, ensure=True)
                queued = (await queue.purge()).message_count or 0
                results["reloads_of_a_paid_session"] = {
                    "stripe_calls": standin.request_count - calls,
                    "statuses": dict(statuses),
                    "seconds": elapsed,
                    "queued": queued,
                }
            calls = standin.request_count
            cpu = process_cpu_s(process.pid)
            statuses, elapsed = await flood(port, made_up(args.requests), args.concurrency)
            cpu = process_cpu_s(process.pid) - cpu
            results[f"made_up_limits_{limits}"] = {
                "stripe_calls": standin.request_count - calls,
                "statuses": dict(statuses),
                "seconds": elapsed,
                "ingress_cpu_s": cpu,
            }
        finally:
            stop(process)
    return results


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    per = 1000 / args.requests
    print(
        f"\nCheckout success-page benchmark: {args.requests:,} requests per run from one "
        f"client, concurrency {args.concurrency}, one ingress process, default limits "
        f"(lookups 20/min, burst 10), {os.cpu_count()} cores, {runtime.interpreter()}\n"
    )
    print("| run | Stripe calls per 1,000 requests | answers | requests/s |")
    print("|---|---|---|---|")
    names = {
        "made_up_limits_on": "made-up session ids, limits on",
        "made_up_limits_off": "made-up session ids, limits off",
        "reloads_of_a_paid_session": "reloads of one paid session",
    }
    for key, name in names.items():
        r = results[key]
        answers = ", ".join(f"{n:,} x {s}" for s, n in sorted(r["statuses"].items()))
        rate = sum(r["statuses"].values()) / r["seconds"]
        print(f"| {name} | {r['stripe_calls'] * per:,.1f} | {answers} | {rate:,.0f} |")
    reloads = results["reloads_of_a_paid_session"]
    print(f"\nfulfillment requests queued by {args.requests:,} reloads: {reloads['queued']}")
    on = results["made_up_limits_on"]
    refused = on["statuses"].get(429, 0)
    if refused:
        # the run's CPU over its refusals: the few answered from Stripe are in it too
        ms = on["ingress_cpu_s"] * 1000 / refused
        print(f"ingress CPU per refused (429) request: {ms:.3f} ms ({refused:,} refused)")
    off = results["made_up_limits_off"]
    answered = sum(off["statuses"].values())
    ms = off["ingress_cpu_s"] * 1000 / max(answered, 1)
    print(f"ingress CPU per request answered from Stripe (limits off): {ms:.3f} ms")
    print(json.dumps(results))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    prefix = f"bench.{secrets.token_hex(4)}"
    topo = Topology.from_settings(BrokerSettings(url=url, prefix=prefix))
    standin = StripeStandIn()
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await topo.declare(channel)
    try:
        async with serve(standin) as stripe_base:
            env = {
                **os.environ,
                "RABBITMQ_URL": url,
                "BROKER_PREFIX": prefix,
                "STRIPE_WEBHOOK_SECRETS": "whsec_" + secrets.token_hex(16),
                "STRIPE_API_KEY": "sk_test_" + secrets.token_hex(8),
                "STRIPE_API_BASE": stripe_base,
                "CHECKOUT_PRICE": "price_bench",
                "INGRESS_HOST": "127.0.0.1",
                "INGRESS_METRICS_PORT": "0",
                "LOG_LEVEL": "ERROR",
            }
            results = await run(args, standin, env, channel, topo)
    finally:
        await topo.delete(channel)
        await connection.close()
    report(args, results)


if __name__ == "__main__":
    runtime.run(main())
