"""Test helpers: a clock that moves only when told, and process/port helpers for loopback tests."""

from __future__ import annotations

from ._procs import Processes, free_port, wait_until

__all__ = ["FakeClock", "Processes", "free_port", "wait_until"]


class FakeClock:
    """Monotonic seconds that advance only through `advance()`: HA rules tested in microseconds."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time can't go backwards")
        self._now += seconds
        return self._now
