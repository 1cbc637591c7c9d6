"""The clock every core is given, so time-driven rules can be tested without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns monotonic seconds. Cores take one; loops pass `time.monotonic`."""

monotonic: Clock = time.monotonic


MAX_MS = 2**63 - 1
"""The largest millisecond count a poll or a header can carry."""


def _ms(seconds: float) -> float:
    """Seconds as milliseconds, clamped to [0, MAX_MS] (NaN and negatives are 0)."""
    ms = seconds * 1000.0
    if not ms > 0.0:
        return 0.0
    return ms if ms < MAX_MS else float(MAX_MS)


def budget_ms(deadline: float, now: float) -> int:
    """Milliseconds left until `deadline` (never negative): what a hop forwards."""
    left = _ms(deadline - now)
    return min(int(left + 1e-6), MAX_MS) if left > 0 else 0  # truncate, but not float noise


def deadline_from_budget(budget: int, now: float) -> float:
    """Turns a received budget into a local monotonic deadline (clocks need not agree)."""
    return now + budget / 1000.0


def timeout_ms(deadline: float | None, now: float, cap: float | None = None) -> int | None:
    """A poll timeout in ms for the next deadline, optionally capped; None waits forever.
    Never negative: a negative poll timeout would wait forever."""
    if deadline is None:
        return None if cap is None else min(int(_ms(cap)), MAX_MS)
    left = max(0.0, deadline - now)
    if cap is not None:
        left = min(left, max(0.0, cap))
    ms = _ms(left)
    return min(int(ms) + (1 if ms > 0 else 0), MAX_MS)
