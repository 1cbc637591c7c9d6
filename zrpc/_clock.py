"""The clock every core is given, so time-driven rules can be tested without sleeping."""

from __future__ import annotations

import time
from typing import Callable

Clock = Callable[[], float]
"""Returns monotonic seconds. Cores take one; loops pass `time.monotonic`."""

monotonic: Clock = time.monotonic


def budget_ms(deadline: float, now: float) -> int:
    """Milliseconds left until `deadline` (never negative): what a hop forwards."""
    left = (deadline - now) * 1000.0
    return int(left + 1e-6) if left > 0 else 0  # truncate, but not float noise


def deadline_from_budget(budget: int, now: float) -> float:
    """Turns a received budget into a local monotonic deadline (clocks need not agree)."""
    return now + budget / 1000.0


def timeout_ms(deadline: float | None, now: float, cap: float | None = None) -> int | None:
    """A poll timeout in ms for the next deadline, optionally capped; None waits forever."""
    if deadline is None:
        return None if cap is None else int(cap * 1000)
    left = max(0.0, deadline - now)
    if cap is not None:
        left = min(left, cap)
    return int(left * 1000) + (1 if left > 0 else 0)
