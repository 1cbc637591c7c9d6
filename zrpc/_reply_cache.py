"""A worker's memory of recent calls by (client_id, request_id), so a retried or re-sent call
is answered from the cache or joins the running one, and is never executed twice. Sans-IO."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

from ._clock import Clock


@dataclass
class Entry:
    started: float
    status: int | None = None  # None while running
    body: bytes = b""
    waiters: list[Hashable] = field(default_factory=list)  # where to send the reply


NEW, RUNNING, DONE = "new", "running", "done"


class ReplyCache:
    """Bounded by entries, total reply bytes and age; running calls are never evicted."""

    def __init__(self, clock: Clock, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024,
                 max_age: float = 120.0) -> None:
        self._clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._bytes = 0
        self._running = 0
        self.hits = 0

    def begin(self, key: Hashable, reply_to: Hashable) -> tuple[str, Entry | None]:
        """NEW: run it. RUNNING: a duplicate, its reply will also go to `reply_to`.
        DONE: answer at once with the entry's status and body."""
        e = self._entries.get(key)
        if e is None:
            self._entries[key] = Entry(self._clock(), waiters=[reply_to])
            self._running += 1
            self._evict()
            return NEW, None
        self.hits += 1
        if e.status is None:
            if reply_to not in e.waiters:
                e.waiters.append(reply_to)
            return RUNNING, e
        return DONE, e

    def probe(self, key: Hashable, reply_to: Hashable) -> tuple[str, Entry | None]:
        """Like begin(), but an unknown call is not started: returns (NEW, None) and records
        nothing (the broker only asks whether the call ran here)."""
        if key not in self._entries:
            return NEW, None
        return self.begin(key, reply_to)

    def finish(self, key: Hashable, status: int, body: bytes) -> list[Hashable]:
        """Records the reply; returns every destination waiting for it."""
        e = self._entries.get(key)
        if e is None or e.status is not None:
            return []
        self._running -= 1
        e.status, e.body = status, body
        self._bytes += len(body)
        self._entries.move_to_end(key)
        waiters, e.waiters = e.waiters, []
        self._evict()
        return waiters

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _evict(self) -> None:
        now = self._clock()
        entries = self._entries
        skipped = 0
        while entries and skipped <= self._running:
            key, e = next(iter(entries.items()))
            too_many = len(entries) > self.max_entries or self._bytes > self.max_bytes
            if not too_many and now - e.started <= self.max_age:
                return
            if e.status is None:  # running calls are never evicted
                entries.move_to_end(key)
                skipped += 1
                continue
            del entries[key]
            self._bytes -= len(e.body)
