"""Keeping the worker's consumer alive when its queue is deleted under it.

The broker cancels a consumer whose queue is deleted. The worker consumes from the queue
object it declared (``Topology.declare_work_queue``) on a robust channel, so aio-pika
declares that queue again, with its bindings, and consumes again under the same tag; the
watch says so in one warning line.

The broker does not always say so: when the queue is declared again right after it was
deleted (by another worker, the ingress, an operator), RabbitMQ may leave the consumer
registered but never deliver to it. So an idle worker also checks, every
``CHECK_INTERVAL_S``, that nothing waits in the queue while it has room and receives
nothing; twice in a row, and it cancels that consumer and consumes again (one warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)

from shared.logging import get_logger

log = get_logger(__name__)

# How long a cancelled consumer may take to come back before that is said as an error.
RESTORE_WARN_S = 15.0
# How often an idle worker checks that its consumer is served.
CHECK_INTERVAL_S = 2.0
_POLL_S = 0.05

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[Any]]


class ConsumerWatch:
    """One worker's consumer of the work queue: started, watched, consumed again."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        on_message: OnMessage,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._queue = queue
        self._on_message = on_message
        self._has_room: Callable[[], bool] = lambda: True
        self.tag: str | None = None
        self._last_delivery = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: asyncio.Task[None] | None = None
        self._probe: AbstractChannel | None = None

    async def start(self, has_room: Callable[[], bool]) -> str:
        """Consume; the consumer tag. ``has_room``: whether the worker could take another
        message now (its prefetch is not used up)."""
        self._has_room = has_room
        self.tag = await self._queue.consume(self._delivered)
        await self._hook()
        # a reconnection brings a new underlying channel, without our callback
        self._channel.reopen_callbacks.add(self._rehook)
        self._spawn(self._check_served())
        return self.tag

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching and cancel the consumer (bounded: the broker may be away)."""
        tag, self.tag = self.tag, None
        for task in self._tasks:
            task.cancel()
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._probe.close(), timeout=timeout_s)
        if tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue.cancel(tag), timeout=timeout_s)

    async def _delivered(self, message: AbstractIncomingMessage) -> None:
        self._last_delivery = time.monotonic()
        await self._on_message(message)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the broker said so ---------------------------------------------------------------

    async def _rehook(self, *_: Any) -> None:
        await self._hook()

    async def _hook(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._cancelled)

    def _cancelled(self, frame: Any) -> None:
        tag = self.tag
        if tag is None or frame.consumer_tag != tag:
            return
        if self._waiting is None or self._waiting.done():
            self._waiting = self._spawn(self._until_consuming(tag, time.monotonic()))

    async def _until_consuming(self, tag: str, since: float) -> None:
        said_late = False
        while self.tag == tag:
            underlay = await self._channel.get_underlay_channel()
            if tag in getattr(underlay, "consumers", ()):  # aiormq.Channel's, by tag
                log.warning(
                    "work queue consumer cancelled by the broker (queue deleted?); the queue "
                    "is declared again and the worker consumes again",
                    queue=self._queue.name,
                    after_s=round(time.monotonic() - since, 2),
                )
                return
            if not said_late and time.monotonic() - since > RESTORE_WARN_S:
                said_late = True
                log.error(
                    "work queue consumer cancelled by the broker and not back yet; still "
                    "trying to declare the queue again",
                    queue=self._queue.name,
                    after_s=round(time.monotonic() - since, 2),
                )
            await asyncio.sleep(_POLL_S)

    # --- the broker did not say so ----------------------------------------------------------

    async def _check_served(self) -> None:
        unserved = 0
        while self.tag is not None:
            await asyncio.sleep(CHECK_INTERVAL_S)
            idle_since = self._last_delivery
            if time.monotonic() - idle_since < CHECK_INTERVAL_S or not self._has_room():
                unserved = 0
                continue
            waiting = await self._waiting_messages()
            if not waiting or self._last_delivery != idle_since:
                unserved = 0
                continue
            unserved += 1
            if unserved >= 2:
                unserved = 0
                await self._consume_again(waiting)

    async def _waiting_messages(self) -> int:
        """Ready messages in the queue (0 when it cannot be asked, or is missing), asked on a
        channel of the watch's own: a passive declare of a missing queue closes its channel."""
        try:
            if self._probe is None or self._probe.is_closed:
                self._probe = await self._connection.channel(publisher_confirms=False)
            underlay = await self._probe.get_underlay_channel()
            declared = await underlay.queue_declare(self._queue.name, passive=True, timeout=5)
            return int(declared.message_count or 0)
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError):
            return 0  # reconnecting (aio-pika restores the consumer), or no queue

    async def _consume_again(self, waiting: int) -> None:
        tag = self.tag
        if tag is None:
            return
        log.warning(
            "work queue consumer receives nothing though messages wait and the worker has "
            "room (its queue was deleted and declared again?); consuming again",
            queue=self._queue.name,
            waiting=waiting,
        )
        try:
            with contextlib.suppress(aiormq.exceptions.AMQPError, TimeoutError):
                await self._queue.cancel(tag, timeout=5)
            await self._queue.declare(timeout=5)
            self.tag = await self._queue.consume(self._delivered, timeout=5)
        except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError, RuntimeError) as exc:
            # tried again at the next checks, while messages still wait
            log.warning("consuming again failed", error=f"{type(exc).__name__}: {exc}")
