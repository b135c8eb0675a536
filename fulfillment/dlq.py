"""Dead letters: list, show, replay and purge, without ever losing one.

Reading uses basic.get without ack on a channel of its own; whatever is not acked (moved
or purged) goes back when the channel closes. A replayed copy is confirmed by the broker
before the dead one is acked.

Nothing here relies on a dead letter's place in the queue: a quorum queue does not keep
returned messages in their places (RabbitMQ 3.10 moved each letter that a peek returned
behind others), so letters are shown and replayed oldest failure first, and the oldest is
found by reading them all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from shared.broker import copy_message, publish_confirmed
from shared.errors import FulfillmentError
from shared.logging import get_logger
from shared.settings import BrokerSettings
from shared.topology import Topology, connect
from shared.vocabulary import (
    HEADER_ATTEMPT,
    HEADER_DEAD_LETTER_REASON,
    HEADER_ERROR_MESSAGE,
    HEADER_ERROR_TYPE,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_REPLAYED_FROM,
    HEADER_WORKER_ID,
)

log = get_logger(__name__)

# Headers that describe a failed attempt; a replayed copy starts without them.
_FAILURE_HEADERS = (
    HEADER_ATTEMPT,
    HEADER_DEAD_LETTER_REASON,
    HEADER_FIRST_FAILED_AT,
    HEADER_LAST_FAILED_AT,
    HEADER_ERROR_TYPE,
    HEADER_ERROR_MESSAGE,
    HEADER_WORKER_ID,
)


def _iso(ts: Any) -> str | None:
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts).isoformat(timespec="seconds")
        except ValueError:
            return None
    if isinstance(ts, int | float):
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    if isinstance(ts, datetime):
        return ts.astimezone(UTC).isoformat(timespec="seconds")
    return None


@dataclass
class DeadLetter:
    """One dead letter as people read it."""

    event_id: str
    event_type: str
    attempts: int
    error_type: str
    error: str
    first_failed_at: str | None
    last_failed_at: str | None
    worker_id: str | None
    checkout_session_id: str | None  # what it was about, when its body says
    headers: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)
    # the worker's reason (permanent, retries_exhausted, stripe_not_found); None for the
    # broker's own dead letters and for older ones
    reason: str | None = None

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, *, delivery_limit: int) -> DeadLetter:
        """``delivery_limit``: the work queue's, for dead letters the broker moved itself."""
        headers: dict[str, Any] = dict(message.headers or {})
        deaths = headers.get("x-death") or []
        death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
        doc = _body(message.body)
        # A body with no event id (published by something other than the ingress) is named
        # by its message: unique per copy, so `show`, `replay` and `purge` can still pick it.
        event_id = str(
            headers.get(HEADER_EVENT_ID)
            or doc.get("id")
            or (f"msg:{message.message_id}" if message.message_id else "?")
        )
        event_type = str(headers.get(HEADER_EVENT_TYPE) or doc.get("type") or message.type or "?")
        earlier_attempts = _int(headers.get(HEADER_ATTEMPT), 0)
        if death:
            # Moved here by the broker itself: the copies workers publish (retries, dead
            # letters) never carry x-death (shared.broker.copy_message), so its presence means
            # the broker's own dead-lettering came last, whatever failure headers an earlier
            # attempt left on the message (one that went through a delay queue, then crashed
            # its workers, is a crash: the old SMTP outage is only what came before).
            reason = str(death.get("reason", "unknown"))
            error_type = f"broker:{reason}"
            error = (
                "delivery limit reached: workers took it and never finished (crash, kill or hang)"
                if reason == "delivery_limit"
                else f"dead-lettered by the broker ({reason})"
            )
            if HEADER_ERROR_TYPE in headers:
                error += (
                    f"; before that, attempt {earlier_attempts} failed with "
                    f"{headers[HEADER_ERROR_TYPE]}: {headers.get(HEADER_ERROR_MESSAGE, '')}"
                )
            # Not x-delivery-count: on a message in the DLQ that is the DLQ's own count, and
            # every `dlq list` or `show` (a get, then a requeue) adds one. The work queue
            # dead-letters a message once it was delivered more often than its limit.
            attempts = earlier_attempts + (delivery_limit + 1 if reason == "delivery_limit" else 1)
            last = _iso(death.get("time"))
            first = _iso(headers.get(HEADER_FIRST_FAILED_AT)) or last
            worker_id = None  # no worker gave up on it
        else:
            error_type = str(headers.get(HEADER_ERROR_TYPE, "unknown"))
            error = str(
                headers.get(HEADER_ERROR_MESSAGE)
                if HEADER_ERROR_TYPE in headers
                else "no failure headers: put here by neither a worker nor the broker"
            )
            attempts = max(earlier_attempts, 1)
            first = _iso(headers.get(HEADER_FIRST_FAILED_AT))
            last = _iso(headers.get(HEADER_LAST_FAILED_AT))
            worker_id = str(headers[HEADER_WORKER_ID]) if HEADER_WORKER_ID in headers else None
        return cls(
            event_id=event_id,
            event_type=event_type,
            attempts=attempts,
            error_type=error_type,
            error=error,
            first_failed_at=first,
            last_failed_at=last,
            worker_id=worker_id,
            checkout_session_id=_session_id(doc),
            headers=headers,
            body=message.body,
            reason=None if death else _text_or_none(headers.get(HEADER_DEAD_LETTER_REASON)),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "attempts": self.attempts,
            "error_type": self.error_type,
            "error": self.error,
            "first_failed_at": self.first_failed_at,
            "last_failed_at": self.last_failed_at,
            "worker_id": self.worker_id,
            "checkout_session_id": self.checkout_session_id,
            "reason": self.reason,
        }


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _session_id(doc: dict[str, Any]) -> str | None:
    """The Checkout Session an event is about (``data.object.id``), if it says."""
    data = doc.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _body(body: bytes) -> dict[str, Any]:
    """The dead letter's event as a dict, parsed once; empty if it is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


Held = list[tuple[DeadLetter, AbstractIncomingMessage]]


async def declared_queue(
    connection: AbstractConnection, name: str
) -> aiormq.spec.Queue.DeclareOk | None:
    """The queue's depth and consumers (a passive declare), or None if there is no such
    queue. On a channel of its own: the broker closes the channel of a passive declare
    that finds nothing."""
    channel = await connection.channel()
    try:
        return await (await channel.get_underlay_channel()).queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def existing_queue(
    connection: AbstractConnection, name: str, settings: BrokerSettings
) -> aiormq.spec.Queue.DeclareOk:
    """The queue's depth and consumers; a clear error if it was never declared."""
    found = await declared_queue(connection, name)
    if found is None:
        raise FulfillmentError(
            f"queue {name} does not exist on {settings.display_url}: "
            "run `fulfillment topology`, or check BROKER_PREFIX"
        )
    return found


def failed_at(dl: DeadLetter) -> float:
    """When it last failed (Unix time); letters that do not say sort first."""
    return datetime.fromisoformat(dl.last_failed_at).timestamp() if dl.last_failed_at else 0.0


def source_queue(topology: Topology, *, unrouted: bool = False) -> str:
    """The DLQ, or (``unrouted``) the queue of handled events no queue took, which are
    listed and replayed as dead letters are."""
    return topology.unrouted_handled_queue if unrouted else topology.dead_queue


@contextlib.asynccontextmanager
async def dead_letters(
    settings: BrokerSettings, *, at_most: int | None = None, unrouted: bool = False
) -> AsyncIterator[tuple[AbstractChannel, Topology, Held]]:
    """The dead letters now in the DLQ (or ``source_queue``'s other one), ``at_most`` of
    them, held unacked, oldest failure first; unacked ones go back on exit."""
    topology = Topology.from_settings(settings)
    source = source_queue(topology, unrouted=unrouted)
    connection = await connect(settings)
    async with connection:
        declared = await existing_queue(connection, source, settings)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.get_queue(source, ensure=False)
        count = declared.message_count or 0
        if at_most is not None:
            count = min(count, at_most)
        held: Held = []
        for _ in range(count):  # only what was there when we looked: newcomers wait
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(
                (DeadLetter.from_message(message, delivery_limit=topology.delivery_limit), message)
            )
        held.sort(key=lambda pair: failed_at(pair[0]))  # stable: ties keep the queue's order
        try:
            yield channel, topology, held
        finally:
            await channel.close()  # returns every message not acked


def _matcher(
    event_ids: Sequence[str], event_type: str | None, everything: bool
) -> Callable[[DeadLetter], bool]:
    if everything:
        return lambda dl: True
    if event_type:
        return lambda dl: dl.event_type == event_type
    wanted = set(event_ids)
    return lambda dl: dl.event_id in wanted


@dataclass
class Selection:
    """The dead letters a filter picked, and what the DLQ held: how many of each type."""

    letters: list[DeadLetter]
    types: collections.Counter[str]


async def select_dead_letters(
    settings: BrokerSettings,
    *,
    event_type: str | None = None,
    limit: int | None = None,
    unrouted: bool = False,
) -> Selection:
    async with dead_letters(settings, unrouted=unrouted) as (_, _, held):
        letters = [dl for dl, _ in held if event_type is None or dl.event_type == event_type]
        types = collections.Counter(dl.event_type for dl, _ in held)
    return Selection(letters[:limit] if limit is not None else letters, types)


async def list_dead_letters(
    settings: BrokerSettings,
    *,
    event_type: str | None = None,
    limit: int | None = None,
    unrouted: bool = False,
) -> list[DeadLetter]:
    selection = await select_dead_letters(
        settings, event_type=event_type, limit=limit, unrouted=unrouted
    )
    return selection.letters


async def show_dead_letter(settings: BrokerSettings, event_id: str) -> DeadLetter | None:
    """The dead letter of ``event_id``; None if there is none."""
    async with dead_letters(settings) as (_, _, held):
        for dl, _ in held:
            if dl.event_id == event_id:
                return dl
    return None


@dataclass
class ReplayResult:
    matched: int = 0
    replayed: int = 0
    failed: int = 0
    event_ids: list[str] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)  # those matched
    types: collections.Counter[str] = field(default_factory=collections.Counter)  # in the DLQ


async def replay(
    settings: BrokerSettings,
    event_ids: Sequence[str] = (),
    *,
    event_type: str | None = None,
    everything: bool = False,
    dry_run: bool = False,
    rate_per_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    unrouted: bool = False,
) -> ReplayResult:
    """Move matching dead letters (``unrouted``: handled events no queue took) to the work
    queue with a fresh attempt count."""
    match = _matcher(event_ids, event_type, everything)
    result = ReplayResult()
    async with dead_letters(settings, unrouted=unrouted) as (channel, topology, held):
        chosen = [(dl, m) for dl, m in held if match(dl)]
        result.matched = len(chosen)
        result.letters = [dl for dl, _ in chosen]
        result.types.update(dl.event_type for dl, _ in held)
        for n, (dl, message) in enumerate(chosen, 1):
            result.event_ids.append(dl.event_id)
            if dry_run:
                continue
            source = source_queue(topology, unrouted=unrouted)
            fresh = copy_message(message, {HEADER_REPLAYED_FROM: source})
            for header in _FAILURE_HEADERS:
                fresh.headers.pop(header, None)
            try:
                await publish_confirmed(
                    channel.default_exchange,
                    fresh,
                    topology.work_queue,
                    timeout_s=settings.publish_timeout_s,
                )
            except Exception as exc:  # the broker's, or a header it cannot take back
                result.failed += 1
                log.error(
                    "replay failed; dead letter kept",
                    event_id=dl.event_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            await message.ack()  # only now: the new copy is confirmed
            result.replayed += 1
            log.info("dead letter replayed", event_id=dl.event_id, event_type=dl.event_type)
            if progress:
                progress(n, len(chosen))
            if rate_per_s:
                await asyncio.sleep(1 / rate_per_s)
    return result


async def purge(
    settings: BrokerSettings, event_ids: Sequence[str] = (), *, everything: bool = False
) -> list[DeadLetter]:
    """Remove matching dead letters for good; returns what was removed."""
    match = _matcher(event_ids, None, everything)
    removed = []
    async with dead_letters(settings) as (_, _, held):
        for dl, message in held:
            if match(dl):
                await message.ack()
                removed.append(dl)
                log.warning(
                    "dead letter purged",
                    event_id=dl.event_id,
                    event_type=dl.event_type,
                    error_type=dl.error_type,
                )
    return removed


def print_table(letters: Sequence[DeadLetter], out: Any = sys.stdout) -> None:
    if not letters:
        print("no dead letters", file=out)
        return
    print(f"{'EVENT ID':36} {'TYPE':44} {'ATT':>3}  {'LAST FAILURE':25} ERROR", file=out)
    for dl in letters:
        why = f"{dl.reason}, " if dl.reason else ""  # stripe_not_found, retries_exhausted…
        error = _cell(f"{why}{dl.error_type}: {dl.error}".replace("\n", " "))
        print(
            f"{_cell(dl.event_id):36} {_cell(dl.event_type):44} {dl.attempts:>3}  "
            f"{_cell(dl.last_failed_at or '-'):25} {error[:100]}",
            file=out,
        )


def _cell(text: str) -> str:
    """A table cell on one line: a letter may come from anywhere (not only the ingress, which
    refuses control characters), so line breaks and other unprintables are shown escaped."""
    return shown(text, keep="")


def shown(text: str, keep: str = "\n\t") -> str:
    """``text`` safe for a terminal: every unprintable character but those in ``keep``
    escaped (``\x1b``, ``\r``, ``\u202e``), so a letter's content cannot move the cursor,
    recolour or rewrite what is shown."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)
