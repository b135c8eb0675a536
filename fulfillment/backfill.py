"""``fulfillment backfill``: enqueue Stripe events of the handled types not yet processed.

Lists events through Stripe's Events API (``delivery_success=false`` unless ``--all``;
Stripe keeps 30 days), skips those the workers already processed or an earlier backfill
enqueued, and publishes the rest like the ingress would. Running it twice is the same as
running it once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import stripe

from fulfillment.stripe_lists import list_every_page
from shared.broker import event_message, publish_confirmed
from shared.envelope import EventEnvelope
from shared.logging import get_logger
from shared.settings import BrokerSettings
from shared.stripe_client import StripeSettings
from shared.topology import Topology, connect
from shared.vocabulary import STRIPE_HANDLED_TYPES
from worker.db import create_pool

log = get_logger(__name__)


@dataclass
class BackfillResult:
    listed: int = 0
    already_processed: int = 0
    already_enqueued: int = 0
    enqueued: int = 0
    event_ids: list[str] = field(default_factory=list)


async def list_events(
    stripe_settings: StripeSettings, since: datetime, until: datetime | None, everything: bool
) -> list[dict[str, Any]]:
    """Every matching event, oldest first (Stripe lists newest first)."""
    created: dict[str, int] = {"gte": int(since.timestamp())}
    if until is not None:
        created["lt"] = int(until.timestamp())
    params: dict[str, Any] = {"types": list(STRIPE_HANDLED_TYPES), "created": created}
    if not everything:
        params["delivery_success"] = False
    events = await list_every_page(stripe_settings, _events_page, params, noun="events")
    # Stripe filters on its side; checked here too, so an API (or a stand-in) that ignored
    # a filter could not make us enqueue other types or events outside the window.
    kept = [e for e in events if e.get("type") in STRIPE_HANDLED_TYPES and _in_window(e, created)]
    if len(kept) < len(events):
        log.warning(
            "the events API answered events outside the filter; left out",
            count=len(events) - len(kept),
        )
    events = kept
    events.sort(key=lambda e: (e.get("created", 0), e["id"]))
    return events


async def _events_page(client: stripe.StripeClient, params: dict[str, Any]) -> Any:
    """One page of ``GET /v1/events``."""
    return await client.v1.events.list_async(params=params)  # type: ignore[arg-type]


def _in_window(event: dict[str, Any], created: dict[str, int]) -> bool:
    at = event.get("created")
    if not isinstance(at, int):
        return False
    return at >= created["gte"] and ("lt" not in created or at < created["lt"])


async def backfill(
    stripe_settings: StripeSettings,
    broker: BrokerSettings,
    database_url: str,
    *,
    since: datetime,
    until: datetime | None = None,
    everything: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BackfillResult:
    result = BackfillResult()
    events = await list_events(stripe_settings, since, until, everything)
    result.listed = len(events)
    pool = await create_pool(database_url, max_size=2)
    try:
        ids = [e["id"] for e in events]
        processed = {
            r["event_id"]
            for r in await pool.fetch(
                "SELECT event_id FROM processed_events WHERE event_id = ANY($1)", ids
            )
        }
        enqueued = {
            r["event_id"]
            for r in await pool.fetch(
                "SELECT event_id FROM backfilled_events WHERE event_id = ANY($1)", ids
            )
        }
        todo = []
        for event in events:
            if event["id"] in processed:
                result.already_processed += 1
            elif event["id"] in enqueued:
                result.already_enqueued += 1
            else:
                todo.append(event)
        if dry_run or not todo:
            result.event_ids = [e["id"] for e in todo]
            return result
        topology = Topology.from_settings(broker)
        connection = await connect(broker)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            events_exchange = await topology.declare(channel)
            for n, event in enumerate(todo, 1):
                raw = json.dumps(event).encode()
                envelope = EventEnvelope.from_dict(event)
                exchange_name, routing_key = topology.route(envelope.type)
                await publish_confirmed(
                    events_exchange if exchange_name else channel.default_exchange,
                    event_message(raw, envelope, source="fulfillment-backfill"),
                    routing_key,
                    timeout_s=broker.publish_timeout_s,
                )
                await pool.execute(
                    "INSERT INTO backfilled_events (event_id, event_type) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING",
                    envelope.id,
                    envelope.type,
                )
                result.enqueued += 1
                result.event_ids.append(envelope.id)
                log.info("event backfilled", event_id=envelope.id, event_type=envelope.type)
                if progress:
                    progress(n, len(todo))
    finally:
        await pool.close()
    return result
