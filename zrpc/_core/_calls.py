"""CallTable: a client's calls in flight, matched by request id, with deadlines. Sans-IO;
shared by Client and AsyncClient so both follow the same rules."""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Iterator
from typing import Any

from zrpc._core._clock import Clock, budget_ms
from zrpc._core._frames import (
    H_ATTEMPT,
    H_BUDGET,
    H_HEDGE,
    H_IDEMPOTENT,
    H_REDUNDANT,
    H_TRACE,
    MAX_BUDGET_MS,
    ClientRequest,
    encode,
)
from zrpc._core._serial import outcome, pack_call
from zrpc._errors import ProtocolError, Timeout, ZrpcError

COMPACT_FACTOR = 4
COMPACT_MIN = 256
"""The deadline heap keeps an entry per answered call until its deadline; it is rebuilt when
dead entries outnumber live ones COMPACT_FACTOR to one (and there are more than COMPACT_MIN),
so its size follows the calls in flight, not rate x timeout. Amortised O(1) per call."""

H_HEDGE_MAX = "max_attempts"
"""Header (client -> broker, with `hedge_after_ms`): the most copies of a hedged call, the
first included (docs/protocol.md §4)."""
HEDGE_COPIES = 2
"""Copies of a hedged call when the client does not say: the first and one hedge."""
MAX_COPIES = 5
"""The most copies of one call, hedged or redundant: each is a worker's time."""


def check_copies(hedge_after: float | None, max_attempts: int | None, redundant: int | None,
                 timeout: float | None = None) -> None:
    """Raises ValueError unless the options of a hedged or redundant call make sense
    (`timeout`, when known, bounds `hedge_after`)."""
    if hedge_after is not None:
        if isinstance(hedge_after, bool) or not isinstance(hedge_after, (int, float)) or not (
                0 < hedge_after < MAX_BUDGET_MS / 1000):
            raise ValueError("hedge_after must be a positive number of seconds")
        if timeout is not None and not hedge_after < timeout:
            raise ValueError(f"hedge_after ({hedge_after:g}s) must be less than the call's "
                             f"timeout ({timeout:g}s): the copy would never be sent")
        if redundant is not None:
            raise ValueError("hedge_after and redundant exclude each other: a redundant call "
                             "runs on several workers at once already")
    elif max_attempts is not None:
        raise ValueError("max_attempts counts the copies of a hedged call: it needs hedge_after")
    for name, n in (("max_attempts", max_attempts), ("redundant", redundant)):
        if n is not None and (type(n) is not int or not 2 <= n <= MAX_COPIES):
            raise ValueError(f"{name} must be an integer from 2 to {MAX_COPIES}")


def copy_headers(hedge_after: float | None, max_attempts: int | None, redundant: int | None
                 ) -> dict[str, int]:
    """The headers of checked options (docs/protocol.md §4): whole milliseconds, at least 1."""
    headers: dict[str, int] = {}
    if hedge_after is not None:
        headers[H_HEDGE] = max(1, round(hedge_after * 1000))
        if max_attempts is not None:
            headers[H_HEDGE_MAX] = max_attempts
    if redundant is not None:
        headers[H_REDUNDANT] = redundant
    return headers


class PendingCall:
    __slots__ = ("request_id", "service", "method", "headers", "body", "deadline", "future",
                 "broker", "sent_at", "bounces", "unserved")

    def __init__(self, request_id: int, service: str, method: str, headers: dict[str, Any],
                 body: bytes, deadline: float, future: Any) -> None:
        self.request_id = request_id
        self.service = service
        self.method = method
        self.headers = headers
        self.body = body
        self.deadline = deadline
        self.future = future
        self.broker = -1
        self.sent_at = 0.0
        self.bounces = 0
        self.unserved: set[int] | None = None  # spread: brokers that said no worker serves it

    def fail(self, exc: BaseException) -> None:
        f = self.future
        if not f.done():
            try:
                f.set_exception(exc)
            except Exception:  # cancelled meanwhile (asyncio or concurrent InvalidStateError)
                pass

    def resolve(self, status: int, body: bytes) -> None:
        """Completes the future with the result, or the exception the status stands for."""
        try:
            result = outcome(status, body)
        except ZrpcError as exc:
            self.fail(exc)
            return
        except Exception as exc:  # noqa: BLE001 - any body a broker sends settles the call
            self.fail(ProtocolError(f"undecodable reply body: {type(exc).__name__}"))
            return
        f = self.future
        if not f.done():
            try:
                f.set_result(result)
            except Exception:
                pass

    def __repr__(self) -> str:
        return (f"<PendingCall {self.service}.{self.method} id={self.request_id}"
                f" broker={self.broker} bounces={self.bounces}>")

    def timed_out(self) -> None:
        self.fail(Timeout(f"{self.service}.{self.method}: no reply before the deadline"))

    def encode(self, now: float) -> list[bytes]:
        """Frames for (re)sending, carrying the budget left at `now` (DESIGN.md §3)."""
        self.headers[H_BUDGET] = min(budget_ms(self.deadline, now), MAX_BUDGET_MS)  # a day at most
        return encode(ClientRequest(self.request_id, self.service, self.method, self.headers, self.body))


class CallTable:
    """Request ids, headers and deadlines for one client; the loop owns the only instance."""

    def __init__(self, clock: Clock, default_timeout: float) -> None:
        if not default_timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self._clock = clock
        self.default_timeout = default_timeout
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "big") << 20)
        self.pending: dict[int, PendingCall] = {}
        self._deadlines: list[tuple[float, int]] = []

    def prepare(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                future: Any, timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None, *, hedge_after: float | None = None,
                max_attempts: int | None = None, redundant: int | None = None) -> PendingCall:
        """Builds a call (safe from any thread: it touches no table state).

        `hedge_after` (seconds, with `max_attempts` copies in all) or `redundant` (workers)
        ask the broker for copies of an idempotent call (docs/protocol.md §7, rules 16-17).
        A hedge that could not go before a deadline inherited from an outer call is dropped;
        against the client's own timeout it is an error.
        """
        if not isinstance(service, str) or not service or not isinstance(method, str) or not method:
            raise ValueError("service and method must be non-empty strings")
        t = self.default_timeout if timeout is None else timeout
        if not t > 0:
            raise ValueError("timeout must be a positive number of seconds")
        headers: dict[str, Any] = {H_ATTEMPT: 0}
        if idempotent is not None:
            headers[H_IDEMPOTENT] = bool(idempotent)
        if trace_id is not None:
            headers[H_TRACE] = trace_id
        if hedge_after is not None or redundant is not None or max_attempts is not None:
            check_copies(hedge_after, max_attempts, redundant,
                         timeout=self.default_timeout if timeout is None else None)
            if hedge_after is not None and not hedge_after < t:  # a shorter, inherited deadline
                hedge_after = max_attempts = None
            headers.update(copy_headers(hedge_after, max_attempts, redundant))
        body = pack_call(args, kwargs)
        return PendingCall(next(self._ids), service, method, headers, body, self._clock() + t, future)

    def add(self, call: PendingCall) -> None:
        self.pending[call.request_id] = call
        heapq.heappush(self._deadlines, (call.deadline, call.request_id))

    def pop(self, request_id: int) -> PendingCall | None:
        """The call a reply answers; None for a late or duplicate reply (dropped)."""
        call = self.pending.pop(request_id, None)
        if call is not None and len(self._deadlines) > COMPACT_MIN + COMPACT_FACTOR * len(self.pending):
            self._compact()
        return call

    def _compact(self) -> None:
        """Drops the heap entries of calls that are no longer pending."""
        pending = self.pending
        self._deadlines = [e for e in self._deadlines if e[1] in pending]
        heapq.heapify(self._deadlines)

    def expired(self) -> list[PendingCall]:
        now = self._clock()
        out = []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, rid = heapq.heappop(dl)
            call = self.pending.pop(rid, None)
            if call is not None:
                out.append(call)
        return out

    def next_deadline(self) -> float | None:
        dl = self._deadlines
        while dl and dl[0][1] not in self.pending:
            heapq.heappop(dl)
        return dl[0][0] if dl else None

    def drain(self) -> list[PendingCall]:
        out = list(self.pending.values())
        self.pending.clear()
        self._deadlines.clear()
        return out

    def __len__(self) -> int:
        return len(self.pending)

    def __iter__(self) -> Iterator[PendingCall]:
        """A snapshot: the caller may pop calls while it iterates."""
        return iter(list(self.pending.values()))

    def __repr__(self) -> str:
        nxt = min((c.deadline for c in self.pending.values()), default=None)
        due = "" if nxt is None else f" next_deadline_in={nxt - self._clock():.3f}s"
        return f"<CallTable calls={len(self.pending)}{due} timeout={self.default_timeout:g}s>"
