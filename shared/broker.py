"""Messages and confirmed publishing, the same for the ingress, the worker and the tools."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, HeadersType

from shared.envelope import EventEnvelope
from shared.errors import BrokerUnavailable, ConfirmTimeout, Unroutable
from shared.vocabulary import (
    HEADER_ACCOUNT,
    HEADER_API_VERSION,
    HEADER_CREATED,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_LIVEMODE,
    HEADER_RECEIVED_AT,
)

JSON = "application/json"


def utc_now_iso() -> str:
    """Now, as header values carry times: an ISO 8601 string.

    Not a float: pamqp encodes Python floats as 32-bit, which rounds a Unix time by a minute.
    """
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def event_message(
    raw: bytes,
    event: EventEnvelope,
    *,
    source: str,
    headers: Mapping[str, object] | None = None,
    message_id: str | None = None,
) -> aio_pika.Message:
    """A persistent message carrying a Stripe event's raw body and its routing fields;
    ``message_id`` unique per publish unless given (one that stands for the content,
    which its publisher then never has in flight twice)."""
    all_headers: HeadersType = {
        HEADER_EVENT_ID: event.id,
        HEADER_EVENT_TYPE: event.type,
        HEADER_LIVEMODE: event.livemode,
        HEADER_CREATED: event.created,
        HEADER_RECEIVED_AT: utc_now_iso(),
    }
    if event.api_version is not None:
        all_headers[HEADER_API_VERSION] = event.api_version
    if event.account is not None:
        all_headers[HEADER_ACCOUNT] = event.account
    if headers:
        all_headers.update(headers)  # type: ignore[arg-type]
    return aio_pika.Message(
        raw,
        content_type=JSON,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        # unique per publish: aiormq matches returned messages by message_id
        message_id=message_id or uuid.uuid4().hex,
        type=event.type,
        app_id=source,
        headers=all_headers,
    )


async def publish_confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    *,
    timeout_s: float | None,
    mandatory: bool = True,
) -> None:
    """Publish mandatory and wait for the broker's confirm (``timeout_s``; None: as long as
    it takes), or raise BrokerUnavailable.

    The channel must have publisher confirms on and ``on_return_raises=True``, so an
    unroutable message (no queue and no alternate exchange) is an error, not a silent drop.
    """
    try:
        await exchange.publish(message, routing_key, mandatory=mandatory, timeout=timeout_s)
    except TimeoutError:
        raise ConfirmTimeout(f"no publisher confirm within {timeout_s or 0:g}s") from None
    except aiormq.exceptions.PublishError:
        raise Unroutable(f"broker returned the message as unroutable ({routing_key})") from None
    except aiormq.exceptions.DeliveryError:
        raise BrokerUnavailable("broker refused the message (nack)") from None
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
        raise BrokerUnavailable(f"broker connection unusable: {type(exc).__name__}") from None


def copy_message(
    message: AbstractIncomingMessage, headers: Mapping[str, object]
) -> aio_pika.Message:
    """A persistent copy of a received message with extra headers and a new message_id.

    Broker-managed headers (``x-death``, ``x-delivery-count``, …) are left behind: they
    describe the old copy's journey, and RabbitMQ 4 ignores client-set ``x-death``.
    """
    kept: HeadersType = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
    kept.update(headers)  # type: ignore[arg-type]
    return aio_pika.Message(
        message.body,
        content_type=message.content_type or JSON,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        type=message.type,
        app_id=message.app_id,
        headers=kept,
    )


def bare_copy(message: AbstractIncomingMessage, headers: Mapping[str, object]) -> aio_pika.Message:
    """A persistent copy of a received message's body with only ``headers``: for a message
    whose own properties could not be sent again as they came."""
    return aio_pika.Message(
        message.body,
        content_type=JSON,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        headers=dict(headers),  # type: ignore[arg-type]
    )
