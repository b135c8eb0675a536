"""One backoff function, pure: exponential, capped, with optional full jitter."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before try number ``attempt`` (1-based): base·2^(attempt-1), capped.

    With ``jitter`` the delay is drawn uniformly from [delay/2, delay] so that many clients
    that failed together do not retry together.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    delay = min(max_s, base_s * 2.0 ** min(attempt - 1, 62))
    if jitter:
        delay = (rng or random).uniform(delay / 2, delay)
    return delay
