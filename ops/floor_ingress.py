"""The least an ingress on this stack can do, for `ops/bench_ingress.py --floor`.

aiohttp reads the body and answers; aio-pika publishes it persistent, mandatory and with
a confirm, on the same uvloop, to the same exchange, as the same message the ingress
builds (properties and headers of the same size). Nothing else: no signature check, no
JSON, no checks of the event, no metrics, no replay guard, no drain. Not a server to run
for real: it exists to measure what the chosen stack costs before any of our code runs,
so the benchmark can show how much of the ingress's rate is the stack's and how much ours.

    RABBITMQ_URL=... BROKER_PREFIX=... INGRESS_PORT=... python ops/floor_ingress.py
"""

from __future__ import annotations

import asyncio
import os
import signal

import aio_pika
from aiohttp import web

from shared import runtime
from shared.broker import event_message
from shared.envelope import EventEnvelope
from shared.settings import BrokerSettings
from shared.topology import Topology

# Every benchmark event has this shape; its id's length is the benchmark's (evt_ + 24 hex).
EVENT = EventEnvelope(
    id="evt_" + "0" * 24,
    type="checkout.session.completed",
    livemode=False,
    created=1_700_000_000,
    api_version="2025-09-30.clover",
)
ACCEPTED = b'{"received":true}'


async def serve() -> None:
    settings = BrokerSettings.from_env()
    topology = Topology.from_settings(settings)
    connection = await aio_pika.connect(settings.url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange_name, routing_key = topology.route(EVENT.type)  # as the ingress publishes
    exchange = (
        await channel.get_exchange(exchange_name) if exchange_name else channel.default_exchange
    )

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        message = event_message(body, EVENT, source="fulfillment-ingress")
        await exchange.publish(message, routing_key, mandatory=True, timeout=5)
        return web.Response(body=ACCEPTED, content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    app = web.Application()
    app.router.add_post("/webhooks/stripe", webhook)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(os.environ["INGRESS_PORT"]), reuse_port=True)
    await site.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await connection.close()


if __name__ == "__main__":
    runtime.run(serve())
