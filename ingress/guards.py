"""Flow control beside the app: the memory bound on request bodies, the replay memory and
the drain of requests in flight at shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict


class BodyBudget:
    """The bytes of request bodies held at once, bounded: each slow upload holds its body
    until read or timed out, so many at once could otherwise grow a process without limit.

    Only bytes received count, and only beyond each body's first ``FREE_BYTES``: a webhook
    (a few KB) never waits on it, and a client must send real bytes to use it up (counting
    what a request declares would let header-only connections refuse every webhook). A
    body that would pass the bound is refused with 503, and its connection closed."""

    FREE_BYTES = 64 * 1024

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class BodyAllowance:
    """One request's share of the budget: what its body took beyond the free bytes."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.taken = 0

    def cover(self, size: int) -> bool:
        """The body is now ``size`` bytes long: take what it needs; False if the budget
        cannot cover it (the body is then refused)."""
        more = size - BodyBudget.FREE_BYTES - self.taken
        if more > 0:
            if not self.budget.take(more):
                return False
            self.taken += more
        return True

    def release(self) -> None:
        self.budget.give_back(self.taken)
        self.taken = 0


class ReplayGuard:
    """What Stripe signed (timestamp and body) for the events this process queued lately.

    Stripe signs every delivery attempt anew (a new timestamp, so a new signature), so the
    same signed content twice is not Stripe retrying but a captured request replayed: it is
    answered 200 (the event was queued) without queuing it again, since each replay would
    cost the workers a Stripe API read. Bounded memory: the oldest are forgotten first;
    each process has its own, so a replay spread over N processes can still be queued N
    times, harmlessly (the workers are idempotent).
    """

    def __init__(self, window_s: float, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._until: OrderedDict[bytes, float] = OrderedDict()  # digest -> forget at

    @staticmethod
    def key(timestamp: int, raw: bytes) -> bytes:
        """What Stripe signed (``"{t}.{body}"``), not the header: extra ``v1=`` entries
        or separators make a new header that still verifies."""
        signed = hashlib.blake2b(f"{timestamp}.".encode(), digest_size=16)
        signed.update(raw)
        return signed.digest()

    def seen(self, key: bytes) -> bool:
        now = time.monotonic()
        while self._until and next(iter(self._until.values())) <= now:
            self._until.popitem(last=False)
        return key in self._until

    def remember(self, key: bytes) -> None:
        self._until.pop(key, None)  # to the end: the dict stays in order of expiry
        self._until[key] = time.monotonic() + self.window_s
        if len(self._until) > self.max_entries:
            self._until.popitem(last=False)


class Drain:
    """The requests being handled, so that a stopping ingress can let each finish, its
    body included, before it closes connections: aiohttp's own shutdown closes every
    connection first, dropping the rest of a body still arriving."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait(self, timeout_s: float) -> bool:
        """Stop (later answers close their connections) and wait until nothing is in
        flight; False if some request still was after ``timeout_s``."""
        self.stopping = True
        try:
            async with asyncio.timeout(timeout_s):
                while self.in_flight:  # one may have come in before this woke up
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True
