"""The broker topology, declared from one place by every component; all names from one prefix.

Declaring is idempotent: every component (ingress, worker, tools) calls ``declare`` on
start, and a deployment may also run ``fulfillment topology`` ahead of time.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from shared.errors import BrokerUnavailable, ConfigError, FulfillmentError
from shared.settings import BrokerSettings
from shared.vocabulary import WORK_BINDINGS

KEPT_DELIVERY_LIMIT = 1_000_000_000


def topic_matches(pattern: str, key: str) -> bool:
    """Whether a topic exchange routes ``key`` along a binding ``pattern``: dot-separated
    words, ``*`` standing for one word and ``#`` for any number."""

    def match(words: list[str], at: int, key_words: list[str], k: int) -> bool:
        if at == len(words):
            return k == len(key_words)
        if words[at] == "#":
            return any(match(words, at + 1, key_words, i) for i in range(k, len(key_words) + 1))
        if k == len(key_words) or words[at] not in ("*", key_words[k]):
            return False
        return match(words, at + 1, key_words, k + 1)

    return match(pattern.split("."), 0, key.split("."), 0)


@functools.lru_cache(maxsize=256)
def handled(event_type: str) -> bool:
    """Whether the work queue is bound for this event type (a Stripe type or our own)."""
    return any(topic_matches(binding, event_type) for binding in WORK_BINDINGS)


def _delay_label(delay_s: float) -> str:
    if delay_s >= 3600 and delay_s % 3600 == 0:
        return f"{int(delay_s // 3600)}h"
    if delay_s >= 60 and delay_s % 60 == 0:
        return f"{int(delay_s // 60)}m"
    if delay_s == int(delay_s):
        return f"{int(delay_s)}s"
    return f"{int(delay_s * 1000)}ms"


@dataclass(frozen=True)
class Topology:
    """Names and arguments of every exchange and queue, derived from the broker settings."""

    prefix: str
    retry_delays_s: tuple[float, ...]
    delivery_limit: int

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> Topology:
        return cls(settings.prefix, settings.retry_delays_s, settings.delivery_limit)

    def named(self, base: str) -> str:
        """A broker name made from the prefix: every name of ours, ``up``'s local ones too."""
        return f"{self.prefix}.{base}" if self.prefix else base

    @property
    def events_exchange(self) -> str:
        return self.named("stripe.events")

    @property
    def unrouted_exchange(self) -> str:
        return self.named("stripe.events.unrouted")

    @property
    def unrouted_queue(self) -> str:
        return self.named("stripe.events.unrouted")

    @property
    def unrouted_handled_exchange(self) -> str:
        """Behind the unrouted fanout exchange: picks out the handled types among what no
        queue took, which only a publisher not using ``route`` can leave there."""
        return self.named("stripe.events.unrouted.handled")

    @property
    def unrouted_handled_queue(self) -> str:
        return self.named("stripe.events.unrouted.handled")

    @property
    def work_queue(self) -> str:
        return self.named("fulfillment")

    def route(self, event_type: str) -> tuple[str, str]:
        """Where an event of this type is published: (exchange name, routing key).

        A type the work queue is bound for goes straight to it through the default exchange
        (""), so that a mandatory publish while the queue is gone comes back to its publisher
        (who answers 503) instead of being kept by the events exchange's alternate exchange,
        where no worker looks. Any other type goes to the events exchange, which keeps it in
        the unrouted queue. The work queue's bindings stay, for other publishers."""
        if handled(event_type):
            return "", self.work_queue
        return self.events_exchange, event_type

    @property
    def dead_queue(self) -> str:
        return self.named("fulfillment.dead")

    @property
    def out_exchange(self) -> str:
        return self.named("fulfillment.out")

    @property
    def readiness_queue(self) -> str:
        """Where the ingress's /readyz publishes when webhooks' publishes go unconfirmed: a
        quorum queue like the work queue (its confirm waits for the same replicated write),
        keeping nothing (every message expires at once)."""
        return self.named("ingress.readiness")

    @property
    def retry_queue_prefix(self) -> str:
        """What every delay queue's name starts with, whatever its delay."""
        return self.named("fulfillment.retry.")

    @property
    def retry_queues(self) -> tuple[str, ...]:
        """One delay queue per configured delay (per-message TTL expires only at the head)."""
        return tuple(f"{self.retry_queue_prefix}{_delay_label(d)}" for d in self.retry_delays_s)

    def retry_queue_for(self, attempt: int, at_least_s: float = 0.0) -> tuple[str, float]:
        """The delay queue and delay for retry number ``attempt`` (1-based), capped at the last;
        a longer one if the other side asked for a wait of ``at_least_s`` (a Retry-After):
        the shortest delay at least that long, else the longest there is."""
        index = min(max(attempt, 1), len(self.retry_delays_s)) - 1
        delays = self.retry_delays_s
        if delays[index] < at_least_s:
            long_enough = [i for i, d in enumerate(delays) if d >= at_least_s]
            if long_enough:
                index = min(long_enough, key=lambda i: delays[i])
            else:
                index = max(range(len(delays)), key=lambda i: delays[i])
        return self.retry_queues[index], delays[index]

    @property
    def all_queues(self) -> tuple[str, ...]:
        return (
            self.work_queue,
            *self.retry_queues,
            self.dead_queue,
            self.unrouted_queue,
            self.unrouted_handled_queue,
            self.readiness_queue,
        )

    def _quorum(self, **extra: Any) -> dict[str, Any]:
        return {"x-queue-type": "quorum", **extra}

    def _kept(self) -> dict[str, Any]:
        # Queues whose messages wait for people (dead letters, unrouted events). RabbitMQ 4
        # gives every quorum queue a delivery limit of 20 and drops past it; each
        # `dlq list` returns what it read, which counts as a delivery. Never drop here.
        return self._quorum(**{"x-delivery-limit": KEPT_DELIVERY_LIMIT})

    def _dead_lettering(self, target_queue: str) -> dict[str, Any]:
        # At-least-once dead-lettering through the default exchange straight to the target;
        # it requires reject-publish overflow (RabbitMQ quorum queues, 3.10+).
        return {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def declare(self, channel: AbstractChannel) -> AbstractExchange:
        """Declare everything (idempotently) and return the events exchange.

        ConfigError when an exchange or queue already exists with other arguments: every
        component must use the same DELIVERY_LIMIT (an argument of the work queue). Other
        RETRY_DELAYS_S or BROKER_PREFIX values name other queues and clash with nothing.
        """
        try:
            return await self._declare(channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"broker topology mismatch: {exc}. Every component must run with the same "
                "DELIVERY_LIMIT and version of this project (or delete the old queue)"
            ) from None

    async def _declare(self, channel: AbstractChannel) -> AbstractExchange:
        unrouted = await channel.declare_exchange(
            self.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        unrouted_queue = await channel.declare_queue(
            self.unrouted_queue, durable=True, arguments=self._kept()
        )
        await unrouted_queue.bind(unrouted)
        await self._declare_unrouted_handled(channel, unrouted)

        events = await channel.declare_exchange(
            self.events_exchange,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": self.unrouted_exchange},
        )
        await channel.declare_queue(self.dead_queue, durable=True, arguments=self._kept())
        await self.declare_work_queue(channel, events)
        for name, delay_s in zip(self.retry_queues, self.retry_delays_s, strict=True):
            await channel.declare_queue(
                name,
                durable=True,
                arguments=self._quorum(
                    **{"x-message-ttl": int(delay_s * 1000)},
                    **self._dead_lettering(self.work_queue),
                ),
            )
        await channel.declare_exchange(self.out_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_queue(
            self.readiness_queue,
            durable=True,
            arguments=self._quorum(**{"x-message-ttl": 0, "x-max-length": 1}),
        )
        return events

    async def declare_work_queue(
        self, channel: AbstractChannel, events: AbstractExchange
    ) -> AbstractQueue:
        """The work queue and its bindings on the events exchange (declared already). A
        worker consumes from the queue object this returns: on a robust channel it is
        declared again, bindings and all, when the broker cancels the consumer because the
        queue was deleted."""
        work = await channel.declare_queue(
            self.work_queue,
            durable=True,
            arguments=self._quorum(
                **{"x-delivery-limit": self.delivery_limit},
                **self._dead_lettering(self.dead_queue),
            ),
        )
        for binding in WORK_BINDINGS:
            await work.bind(events, routing_key=binding)
        return work

    async def _declare_unrouted_handled(
        self, channel: AbstractChannel, unrouted: AbstractExchange
    ) -> None:
        """A copy of every handled-type event no queue took (an alert watches its depth):
        a topic exchange bound to the unrouted fanout exchange, which stays as it was (a
        declared object is only ever added to, never changed: PRECONDITION_FAILED)."""
        picker = await channel.declare_exchange(
            self.unrouted_handled_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await picker.bind(unrouted)
        queue = await channel.declare_queue(
            self.unrouted_handled_queue, durable=True, arguments=self._kept()
        )
        for binding in WORK_BINDINGS:
            await queue.bind(picker, routing_key=binding)

    def describe(self) -> str:
        """The declared names, one per line, for people."""
        lines = [
            f"exchange {self.events_exchange} (topic, alternate {self.unrouted_exchange})",
            f"exchange {self.unrouted_exchange} (fanout) -> queue {self.unrouted_queue}, "
            f"and exchange {self.unrouted_handled_exchange}",
            f"exchange {self.unrouted_handled_exchange} (topic, bound {', '.join(WORK_BINDINGS)}) "
            f"-> queue {self.unrouted_handled_queue} (handled types no queue took: replay them)",
            f"exchange {self.out_exchange} (topic: order.fulfilled, payment.failed)",
            f"queue {self.work_queue} (quorum, where handled types are published; "
            f"bound {', '.join(WORK_BINDINGS)}, "
            f"delivery limit {self.delivery_limit}, dead letters -> {self.dead_queue})",
            *(
                f"queue {name} (delay {delay:g}s, then back to {self.work_queue})"
                for name, delay in zip(self.retry_queues, self.retry_delays_s, strict=True)
            ),
            f"queue {self.dead_queue} (quorum, dead letters)",
            f"queue {self.readiness_queue} (quorum, keeps nothing: the ingress's readiness probe)",
        ]
        return "\n".join(lines)

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove everything ``declare`` made (tests and teardown only)."""
        for name in self.all_queues:
            await channel.queue_delete(name)
        for name in (
            self.events_exchange,
            self.unrouted_exchange,
            self.unrouted_handled_exchange,
            self.out_exchange,
        ):
            await channel.exchange_delete(name)


# How long the tools (status, dlq, backfill, topology) wait for the broker to answer.
CONNECT_TIMEOUT_S = 10


async def connect(settings: BrokerSettings) -> aio_pika.abc.AbstractConnection:
    """A plain connection, or the error ``connect_error`` makes of the failure."""
    try:
        return await aio_pika.connect(settings.url, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:
        raise connect_error(settings, exc) from None


def connect_error(settings: BrokerSettings, exc: Exception) -> FulfillmentError:
    """Why a first connection failed, naming the broker (password masked): ConfigError when
    the broker answered and refused RABBITMQ_URL's credentials or virtual host (waiting
    will not help), else BrokerUnavailable (down, unreachable, not answering)."""
    where = settings.display_url
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return ConfigError(
            f"RABBITMQ_URL: the broker at {where} refused the user name or password ({exc})"
        )
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # aiormq's word for the broker closing the connection while it was being opened:
        # RabbitMQ does that for a virtual host that does not exist or the user may not use
        return ConfigError(
            f"RABBITMQ_URL: the broker at {where} closed the connection while opening its "
            "virtual host: does it exist, and may this user use it? (its log says why)"
        )
    parts = urlsplit(settings.url)
    default_port = 5671 if parts.scheme == "amqps" else 5672
    port = parts.port or default_port
    if getattr(exc, "errno", None) == errno.ECONNREFUSED and port != default_port:
        # RabbitMQ may well run, on its own port: "start it" would send people astray
        return BrokerUnavailable(
            f"RabbitMQ is not reachable at {where}: nothing is listening on "
            f"{parts.hostname}:{port} — is RabbitMQ there, or is the port wrong?"
        )
    why = str(exc) or f"no answer within {CONNECT_TIMEOUT_S}s"  # a timeout says nothing
    return BrokerUnavailable(
        f"RabbitMQ is not reachable at {where} ({type(exc).__name__}: {why}); "
        "is it running? (rabbitmq-server -detached)"
    )


async def declare_on_broker(settings: BrokerSettings) -> Topology:
    """Connect, declare the whole topology, disconnect."""
    topology = Topology.from_settings(settings)
    connection = await connect(settings)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel)
    return topology
