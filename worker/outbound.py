"""The worker's outbound messages (order.fulfilled, payment.failed): built, then published."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange

from shared.broker import JSON, publish_confirmed
from shared.envelope import EventEnvelope
from shared.errors import ConfirmTimeout, Unroutable
from shared.logging import get_logger
from shared.vocabulary import (
    HEADER_CHECKOUT_SESSION_ID,
    HEADER_DEDUPE_ID,
    HEADER_EVENT_ID,
    ORDER_FULFILLED,
    OUTBOUND_PAYMENT_FAILED,
)
from worker import metrics
from worker.order import Order

log = get_logger(__name__)


def dedupe_id(kind: str, order: Order) -> str:
    """The id every copy of one outbound message carries, for receivers to deduplicate on."""
    return f"{kind}:{order.session_id}"


def order_fulfilled_body(order: Order) -> dict[str, Any]:
    """What order.fulfilled says beyond the fields every outbound message has."""
    return {
        "items": [
            {
                "id": i.id,
                "description": i.description,
                "price": i.price_id,
                "quantity": i.quantity,
                "amount_subtotal": i.amount_subtotal,
                "amount_total": i.amount_total,
                "currency": i.currency,
            }
            for i in order.items
        ],
        "customer": order.customer_id,
        "customer_email": order.customer_email,
        "mode": order.mode,
        "subscription": order.subscription,
        "amount_subtotal": order.amount_subtotal,
        "total_details": {
            "amount_discount": order.amount_discount,
            "amount_shipping": order.amount_shipping,
            "amount_tax": order.amount_tax,
        },
    }


def payment_failed_body(order: Order) -> dict[str, Any]:
    """What payment.failed says beyond the fields every outbound message has."""
    return {"customer_email": order.customer_email}


def build_message(
    kind: str, event: EventEnvelope, order: Order, extra: dict[str, Any]
) -> aio_pika.Message:
    """One outbound message. ``fulfillment-id`` is the same on every copy (receivers
    deduplicate on it); ``stripe-event-id`` names the event being handled when it was
    published (after a crash, the event that resumed the fulfillment)."""
    same_every_time = dedupe_id(kind, order)
    body = {
        "id": same_every_time,
        "type": kind,
        "checkout_session_id": order.session_id,
        "amount_total": order.amount_total,
        "currency": order.currency,
        "livemode": order.livemode,
        "account": order.account,
        "created": int(time.time()),
        **extra,
    }
    return aio_pika.Message(
        json.dumps(body).encode(),
        content_type=JSON,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        type=kind,
        app_id="fulfillment-worker",
        headers={
            HEADER_DEDUPE_ID: same_every_time,
            HEADER_EVENT_ID: event.id,
            HEADER_CHECKOUT_SESSION_ID: order.session_id,
        },
    )


# How long aiormq's ready() may take to say the connection is not blocked.
_BLOCKED_PROBE_S = 0.05


class Outbound:
    """Publishes outbound messages, confirmed; each call returns the detail its step records.

    While the broker blocks publishers (connection.blocked: a memory or disk alarm) it
    neither takes nor confirms a publish: the wait for a confirm pauses until
    connection.unblocked instead of timing out, since a publish given up on then may well
    go out, and its retry would be a second copy."""

    def __init__(
        self,
        exchange: AbstractExchange,
        *,
        publish_timeout_s: float,
        channel: AbstractChannel | None = None,
    ) -> None:
        """``channel``: the exchange's, whose connection says when the broker blocks us."""
        self._out = exchange
        self._publish_timeout_s = publish_timeout_s
        self._channel = channel
        self._waiting_unblocked = 0

    async def order_fulfilled(self, event: EventEnvelope, order: Order) -> str:
        return await self._publish(ORDER_FULFILLED, event, order, order_fulfilled_body(order))

    async def payment_failed(self, event: EventEnvelope, order: Order) -> str:
        return await self._publish(
            OUTBOUND_PAYMENT_FAILED, event, order, payment_failed_body(order)
        )

    async def _publish(
        self, kind: str, event: EventEnvelope, order: Order, extra: dict[str, Any]
    ) -> str:
        message = build_message(kind, event, order, extra)
        fulfillment_id = dedupe_id(kind, order)
        # Subscribers bind their own queues (pub/sub). Mandatory: with none bound for it the
        # broker returns it rather than dropping it unseen, and that is said and recorded.
        try:
            await self._confirmed(message, kind)
        except Unroutable:
            metrics.UNROUTED.labels(kind).inc()
            log.warning(
                "outbound message had no subscriber: no queue is bound for it, so nobody got "
                "it; recorded as such",
                checkout_session_id=order.session_id,
                fulfillment_id=fulfillment_id,
                exchange=self._out.name,
            )
            return f"unrouted {fulfillment_id}: no queue was bound for {kind} on {self._out.name}"
        except ConfirmTimeout:
            # Its fate is unknown (a stalled broker may yet deliver it) and it is not
            # recorded, so the retry publishes it again: a repeat, with the same id
            metrics.UNCONFIRMED.labels(kind).inc()
            log.warning(
                "outbound message not confirmed in time; it may have gone out and will be "
                "published again",
                checkout_session_id=order.session_id,
                fulfillment_id=fulfillment_id,
            )
            raise
        return f"published {fulfillment_id}"

    async def _confirmed(self, message: aio_pika.Message, routing_key: str) -> None:
        """publish_confirmed within PUBLISH_TIMEOUT_S, not counting the time the broker
        blocks publishers; ConfirmTimeout otherwise."""
        await self._while_blocked()
        publish = asyncio.ensure_future(
            publish_confirmed(self._out, message, routing_key, timeout_s=None)
        )
        try:
            while True:
                done, _ = await asyncio.wait({publish}, timeout=self._publish_timeout_s)
                if done:
                    return publish.result()
                if not await self._while_blocked():
                    raise ConfirmTimeout(
                        f"no publisher confirm within {self._publish_timeout_s:g}s"
                    )
        finally:
            if not publish.done():
                publish.cancel()
                await asyncio.wait({publish})

    async def _while_blocked(self) -> bool:
        """Wait while the broker blocks this connection (aiormq's ready() returns once
        connection.unblocked came); whether it did. Said once per blocking."""
        if self._channel is None:
            return False
        try:  # (a connection being restored is not blocked: the publish fails by itself)
            underlay = await asyncio.wait_for(
                self._channel.get_underlay_channel(), _BLOCKED_PROBE_S
            )
        except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError):
            return False
        connection = underlay.connection
        if not connection.is_opened:
            return False
        ready = asyncio.ensure_future(connection.ready())
        done, _ = await asyncio.wait({ready}, timeout=_BLOCKED_PROBE_S)
        if done:
            return False
        if self._waiting_unblocked == 0:
            metrics.BROKER_BLOCKED.set(1)
            log.warning(
                "broker blocks publishers (a memory or disk alarm); outbound messages wait "
                "for it to unblock rather than being published again"
            )
        self._waiting_unblocked += 1
        try:
            await asyncio.wait({ready, connection.closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            self._waiting_unblocked -= 1
            if self._waiting_unblocked == 0:
                metrics.BROKER_BLOCKED.set(0)
                log.info("broker unblocked publishers")
        return True
