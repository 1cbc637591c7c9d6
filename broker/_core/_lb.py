"""Load-balancing strategies: pure functions of the candidates' counters (no I/O, no clock).

Each strategy picks one of the workers that still have spare capacity; the dispatcher has
already filtered out full, leaving or ejected workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol


class Candidate(Protocol):
    outstanding: int
    capacity: int
    weight: float
    ewma: float  # latency EWMA in seconds (0.0 until measured)


class Strategy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Candidate]) -> Candidate: ...


class LeastOutstanding:
    """Lowest outstanding/capacity; ties go round-robin so equal workers share the load."""

    name = "least-outstanding"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        best = min(c.outstanding / c.capacity for c in candidates)
        ties = [c for c in candidates if c.outstanding / c.capacity == best]
        self._turn += 1
        return ties[self._turn % len(ties)]


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class Random:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[self._rng.randrange(len(candidates))]


class Weighted:
    """Smooth weighted round-robin (as nginx): shares follow the workers' announced weights."""

    name = "weighted"

    def __init__(self) -> None:
        self._current: dict[int, float] = {}

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        total = 0.0
        best: Candidate | None = None
        for c in candidates:
            key = id(c)
            cur = self._current.get(key, 0.0) + c.weight
            self._current[key] = cur
            total += c.weight
            if best is None or cur > self._current[id(best)]:
                best = c
        assert best is not None
        self._current[id(best)] -= total
        if len(self._current) > 4 * len(candidates) + 64:  # forget departed workers
            live = {id(c) for c in candidates}
            self._current = {k: v for k, v in self._current.items() if k in live}
        return best


class P2CEwma:
    """Power of two choices on latency EWMA x (outstanding + 1): cheap, and shuns slow workers."""

    name = "p2c-ewma"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        ca, cb = candidates[a], candidates[b]
        return ca if self._cost(ca) <= self._cost(cb) else cb

    @staticmethod
    def _cost(c: Candidate) -> float:
        return (c.ewma or 1e-3) * (c.outstanding + 1) / c.weight


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "least-outstanding": LeastOutstanding,
    "round-robin": RoundRobin,
    "random": Random,
    "weighted": Weighted,
    "p2c-ewma": P2CEwma,
}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
