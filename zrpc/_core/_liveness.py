"""Paranoid Pirate liveness, sans-IO: who has been silent too long, when to heartbeat, and
how long to wait before reconnecting. Any traffic from a peer counts as a heartbeat."""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Generic, TypeVar

from zrpc._core._clock import Clock
from zrpc._defaults import HEARTBEAT_INTERVAL, LIVENESS

P = TypeVar("P", bound=Hashable)


class LivenessTracker(Generic[P]):
    """A peer silent for `interval * liveness` seconds is dead (DESIGN.md §4).

    Deadlines, not poll ticks: the verdict does not depend on how often the loop wakes.
    """

    def __init__(self, clock: Clock, interval: float = HEARTBEAT_INTERVAL, liveness: int = LIVENESS) -> None:
        self._clock = clock
        self._last: dict[P, float] = {}
        self._shifted: dict[P, float] = {}  # peers a pause moved on, not heard since
        self._next_beat = clock()
        self.configure(interval, liveness)

    def configure(self, interval: float, liveness: int) -> None:
        if not interval > 0 or liveness < 1:
            raise ValueError("interval must be > 0 and liveness >= 1")
        self.interval = interval
        self.liveness = liveness
        self.timeout = interval * liveness

    def seen(self, peer: P) -> None:
        self._last[peer] = self._clock()
        if self._shifted:  # empty but for a moment after a stall of our own
            self._shifted.pop(peer, None)

    def forget(self, peer: P) -> None:
        """The peer left (or was declared lost elsewhere): stop watching it."""
        self._last.pop(peer, None)
        self._shifted.pop(peer, None)

    def pause(self, seconds: float) -> None:
        """Our own loop did not run for `seconds` (stopped, or stuck in a long step): our
        silence is no evidence against peers, so every peer's last-seen moves on by as much
        (never past now). Messages they sent meanwhile may still be waiting to be read.

        Once per sighting: a peer not heard since an earlier pause is not moved again, so a
        loop that stalls over and over still finds a peer that really died."""
        if not seconds > 0:  # also NaN
            return
        now = self._clock()
        last, shifted = self._last, self._shifted
        for p, t in last.items():
            if p in shifted:
                continue  # moved on already, and not heard since
            last[p] = shifted[p] = min(t + seconds, now)

    def __repr__(self) -> str:
        now = self._clock()
        quiet = f" most_silent={now - min(self._last.values()):.3f}s" if self._last else ""
        return (f"<LivenessTracker peers={len(self._last)}{quiet} timeout={self.timeout:g}s"
                f" ({self.interval:g}s x {self.liveness})>")

    def __contains__(self, peer: object) -> bool:
        return peer in self._last

    def silence(self, peer: P) -> float:
        """Seconds since the peer was last heard (inf if never)."""
        last = self._last.get(peer)
        return float("inf") if last is None else self._clock() - last

    def expired(self) -> list[P]:
        """Peers silent too long; they are forgotten (report each death once)."""
        limit = self._clock() - self.timeout
        dead = [p for p, t in self._last.items() if t <= limit]
        for p in dead:
            del self._last[p]
            self._shifted.pop(p, None)
        return dead

    def beat(self) -> bool:
        """True once per interval: time to send heartbeats."""
        now = self._clock()
        if now < self._next_beat:
            return False
        self._next_beat = now + self.interval
        return True

    def next_deadline(self) -> float:
        """The earlier of the next heartbeat and the next possible expiry."""
        nxt = self._next_beat
        if self._last:
            nxt = min(nxt, min(self._last.values()) + self.timeout)
        return nxt


class Backoff:
    """Exponential reconnect delay with jitter: 250 ms doubling to 8 s (DESIGN.md §4)."""

    def __init__(self, initial: float = 0.25, maximum: float = 8.0, jitter: float = 0.2,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._next = initial

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self.maximum, self._next * 2)
        return base * (1 + self._rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._next = self.initial

    def __repr__(self) -> str:
        return (f"<Backoff next={self._next:g}s initial={self.initial:g}s maximum={self.maximum:g}s"
                f" jitter={self.jitter:.0%}>")
