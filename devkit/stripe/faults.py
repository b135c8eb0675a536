"""Fault injection: latency, dropped connections, Stripe's errors and foreign answers."""

from __future__ import annotations

import fnmatch
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from aiohttp import web

from devkit.stripe.errors import StripeError


class Faults:
    """What the next requests suffer; the stand-in asks per request, in this order:
    ``latency_s`` sleep, then a pending :meth:`drop_next`, then :meth:`fail_for`'s window,
    then a pending :meth:`fail_next` or :meth:`answer_next`, then :meth:`fail_rate`'s dice."""

    def __init__(self, *, seed: int | None = None, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self._rng = random.Random(seed)
        # (path glob or None for any request, the answer to give instead of Stripe's)
        self._fail_queue: deque[tuple[str | None, Callable[[], web.Response]]] = deque()
        self._fail_fraction = 0.0
        self._fail_statuses: tuple[int, ...] = (429, 500)
        self._drops = 0
        self._failing_until = 0.0  # time.monotonic() until which every request fails
        self._failing_status = 500

    def fail_next(
        self,
        n: int,
        status: int = 500,
        *,
        should_retry: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        """The next ``n`` requests answer ``status`` with Stripe's error JSON (queued after
        earlier calls). ``should_retry`` sets ``Stripe-Should-Retry``, which stripe-python's
        retry loop obeys (without it, it retries 409 and 5xx but never 429). ``retry_after``
        sets ``Retry-After`` (Stripe sends none; a gateway in front of it may)."""
        error = StripeError.injected(status, should_retry, retry_after)
        self._fail_queue.extend([(None, error.response)] * n)

    def answer_next(
        self,
        n: int,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "text/html",
        headers: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        """The next ``n`` requests get this answer instead of Stripe's (queued with
        ``fail_next``): what a proxy or gateway in front of Stripe may send, such as an
        HTML error page (with a ``Retry-After``) or a body that is not a JSON object.
        ``path`` (a glob, e.g. ``*/line_items``): only requests to it; others pass."""

        def answer() -> web.Response:
            return web.Response(
                body=body, status=status, content_type=content_type, headers=headers
            )

        self._fail_queue.extend([(path, answer)] * n)

    def fail_for(self, seconds: float, status: int = 500) -> None:
        """Every request answers ``status`` with Stripe's error JSON for the next ``seconds``
        (a 404 for every session while a key of another account is in use, a 5xx incident):
        a window of time, where ``fail_next`` counts requests. Checked before the others."""
        self._failing_until = time.monotonic() + seconds
        self._failing_status = status

    def fail_rate(self, fraction: float, statuses: Sequence[int] = (429, 500)) -> None:
        """Fail each request with probability ``fraction``, status drawn from ``statuses``
        (seeded by the constructor's ``seed``). ``fail_rate(0)`` turns it off."""
        self._fail_fraction = fraction
        self._fail_statuses = tuple(statuses)

    def drop_next(self, n: int) -> None:
        """Close the connection of the next ``n`` requests without answering.

        Note aiohttp's client (stripe-python's ``AIOHTTPClient``) itself resends an idempotent
        request once after a server disconnect, so it takes two drops to fail one GET there.
        """
        self._drops += n

    def clear_faults(self) -> None:
        self._fail_queue.clear()
        self._fail_fraction = 0.0
        self._drops = 0
        self._failing_until = 0.0
        self.latency_s = 0.0

    def take_drop(self) -> bool:
        """Whether this request's connection is to be dropped (one pending drop used)."""
        if self._drops <= 0:
            return False
        self._drops -= 1
        return True

    def injected_answer(self, path: str) -> web.Response | None:
        """The fault's answer for this request, if one is due."""
        if time.monotonic() < self._failing_until:
            return StripeError.injected(self._failing_status).response()
        if self._fail_queue:
            only, answer = self._fail_queue[0]
            if only is None or fnmatch.fnmatchcase(path, only):
                self._fail_queue.popleft()
                return answer()
        if self._fail_fraction > 0 and self._rng.random() < self._fail_fraction:
            return StripeError.injected(self._rng.choice(self._fail_statuses)).response()
        return None
