"""Per-client limits on the public Checkout routes: a token bucket per client, in memory.

Each ingress process keeps its own table (no new service to run): a client spread over N
processes gets N times the rate, still a bound. The table is bounded, its least recently
seen client going first, and a client's entry is dropped once its bucket is full again,
since a full bucket is what a client never seen gets anyway.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# Clients remembered per route at most. A flood of distinct addresses (IPv6 ones are
# counted per /64, see ingress/clients.py) pushes the oldest out rather than growing.
MAX_CLIENTS = 20_000


class ClientBuckets:
    """A token bucket per client: ``burst`` requests at once, refilled at ``per_min`` a
    minute. ``per_min`` 0 turns the limit off."""

    def __init__(
        self,
        per_min: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_s = per_min / 60
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        # client -> (tokens left, when counted), least recently seen first
        self._clients: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def off(self) -> bool:
        return self.per_s <= 0

    def __len__(self) -> int:
        return len(self._clients)

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0.0 if it may go ahead now, else the seconds until
        it may (nothing is taken then)."""
        if self.off:
            return 0.0
        now = self._clock()
        self._forget_full(now)
        tokens, since = self._clients.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - since) * self.per_s)
        wait_s = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait_s = (1 - tokens) / self.per_s
        self._clients[client] = (tokens, now)
        if len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
        return wait_s

    def _forget_full(self, now: float) -> None:
        """Drop the entries whose bucket has refilled: the least recently seen are first,
        so the walk stops at the first one that may not have."""
        refill_s = self.burst / self.per_s
        while self._clients:
            _, since = next(iter(self._clients.values()))
            if now - since < refill_s:
                return
            self._clients.popitem(last=False)
