"""A worker's memory of recent calls by (client_id, request_id), so a retried or re-sent call
is answered from the cache or joins the running one, and is never executed twice. Sans-IO.

Three kinds of memory, each bounded on its own:

- running calls: never evicted (bounded by the worker's concurrency);
- finished calls with their reply: bounded by entries, bytes and age (counted from the
  finish, not the start: a long call is remembered as long as a short one);
- tombstones: a non-idempotent call whose reply had to go is not forgotten but reduced to
  "it ran here, the reply is no longer held" for `retention` seconds after it finished, which
  is longer than any probe window. A probe or a retry that finds one is answered
  CALL_STATE_UNKNOWN: never NOT_SEEN, never a second run. Idempotent calls may simply go.

If even the tombstones overflow their (generous) count, probes answer UNKNOWN instead of NEW
until the dropped ones would have expired: a worker that cannot know says so, it never lets
the broker run a call twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from zrpc._core._clock import Clock


@dataclass
class Entry:
    started: float
    status: int | None = None  # None while running
    body: bytes = b""
    waiters: list[Hashable] = field(default_factory=list)  # where to send the reply
    idempotent: bool = False
    finished: float = 0.0  # set when the reply is recorded


NEW, RUNNING, DONE, UNKNOWN = "new", "running", "done", "unknown"
"""UNKNOWN: the call ran here but its reply is gone (a tombstone): answer CALL_STATE_UNKNOWN."""


class ReplyCache:
    """Bounded by entries, total reply bytes and age; running calls are never evicted, and a
    non-idempotent call is remembered (at least as a tombstone) for `retention` seconds."""

    def __init__(self, clock: Clock, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024,
                 max_age: float = 120.0, retention: float = 300.0,
                 max_tombstones: int = 100_000) -> None:
        self._clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.retention = retention
        self.max_tombstones = max_tombstones
        self._running: dict[Hashable, Entry] = {}
        self._done: OrderedDict[Hashable, Entry] = OrderedDict()  # in finish order
        self._tombs: OrderedDict[Hashable, float] = OrderedDict()  # key -> finished, in order
        self._bytes = 0
        self._blind_since = float("-inf")  # latest finish among tombstones dropped for room:
        # until it is `retention` old, a probe cannot say NEW
        self.hits = 0
        self.tombstones_dropped = 0  # dropped before their retention ended (count overflow)

    def begin(self, key: Hashable, reply_to: Hashable, idempotent: bool = False
              ) -> tuple[str, Entry | None]:
        """NEW: run it. RUNNING: a duplicate, its reply will also go to `reply_to`.
        DONE: answer at once with the entry's status and body. UNKNOWN: it ran here, the
        reply is gone: answer CALL_STATE_UNKNOWN, never run it again."""
        self._expire()
        state, e = self._lookup(key, reply_to)
        if state != NEW:
            return state, e
        self._running[key] = Entry(self._clock(), waiters=[reply_to], idempotent=idempotent)
        return NEW, None

    def probe(self, key: Hashable, reply_to: Hashable) -> tuple[str, Entry | None]:
        """Like begin(), but an unknown call is not started: returns (NEW, None) and records
        nothing (the broker only asks whether the call ran here)."""
        self._expire()
        state, e = self._lookup(key, reply_to)
        if state == NEW and self._clock() - self._blind_since < self.retention:
            return UNKNOWN, None  # it may be one of the tombstones we could not keep
        return state, e

    def finish(self, key: Hashable, status: int, body: bytes) -> list[Hashable]:
        """Records the reply; returns every destination waiting for it."""
        e = self._running.pop(key, None)
        if e is None:
            return []
        now = self._clock()
        e.status, e.body, e.finished = status, body, now
        waiters, e.waiters = e.waiters, []
        if len(body) > self.max_bytes:  # would flush every other reply and still not fit
            if not e.idempotent and self.retention > 0:
                self._tombs[key] = now
        else:
            self._done[key] = e
            self._bytes += len(body)
        self._expire()
        return waiters

    def __len__(self) -> int:
        """Calls held with their reply, or running."""
        return len(self._running) + len(self._done)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def tombstones(self) -> int:
        return len(self._tombs)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _lookup(self, key: Hashable, reply_to: Hashable) -> tuple[str, Entry | None]:
        e = self._running.get(key)
        if e is not None:
            self.hits += 1
            if reply_to not in e.waiters:
                e.waiters.append(reply_to)
            return RUNNING, e
        e = self._done.get(key)
        if e is not None:
            self.hits += 1
            return DONE, e
        if key in self._tombs:
            self.hits += 1
            return UNKNOWN, None
        return NEW, None

    def _expire(self) -> None:
        """Ages out replies, then evicts under pressure, then ages out tombstones."""
        now = self._clock()
        done = self._done
        while done:
            key, e = next(iter(done.items()))
            if (now - e.finished < self.max_age and len(done) <= self.max_entries
                    and self._bytes <= self.max_bytes):
                break
            done.popitem(last=False)
            self._bytes -= len(e.body)
            if not e.idempotent and now - e.finished < self.retention:
                self._tombs[key] = e.finished
        tombs = self._tombs
        while tombs:
            key, finished = next(iter(tombs.items()))
            if now - finished < self.retention and len(tombs) <= self.max_tombstones:
                break
            tombs.popitem(last=False)
            if now - finished < self.retention:  # dropped for room, not because it expired
                self.tombstones_dropped += 1
                self._blind_since = max(self._blind_since, finished)
