"""What the Dispatcher holds: one record per call, worker and service, and the call's state.

Plain data with slots: the Dispatcher (broker/_core/_dispatch.py) changes them, and its rules
say when; nothing here decides anything.
"""

from __future__ import annotations

import enum
import math
from collections import deque

from zrpc._core._frames import H_ATTEMPT, H_IDEMPOTENT, H_RESENT, ClientRequest, Ready
from zrpc.broker._core._lb import Strategy
from zrpc.broker._core._stats import LATENCY_BUCKETS

Key = tuple[bytes, int]
"""A call's identity: (client id, request id)."""

RAN_HERE, WAS_RESENT = 1, 2
"""Flags remembered of an answered call: a worker was sent it to run; a client re-sent it."""


class CallState(enum.Enum):
    """Where a call is while the broker holds it (the Dispatcher's rule 1)."""

    HELD = "held"
    """Between two places (taken off a queue, or off a lost worker), for one step only."""
    QUEUED = "queued"
    """Waiting in its service's queue for a free worker slot."""
    PROBING = "probing"
    """A re-sent non-idempotent call: workers are asked whether it already ran."""
    INFLIGHT = "inflight"
    """Sent to one worker to run; its reply is awaited."""
    DONE = "done"
    """Answered: out of every structure (an entry may linger in a heap or queue, dead)."""


# Module-level names for the hot path: a global read is several times faster than an Enum
# class attribute (`CallState.QUEUED` goes through the metaclass), and the members are the same.
HELD = CallState.HELD
QUEUED = CallState.QUEUED
PROBING = CallState.PROBING
INFLIGHT = CallState.INFLIGHT
DONE = CallState.DONE


class Call:
    """One client call while the broker holds it."""

    __slots__ = (
        "arrived", "attempt", "body", "client_id", "client_idem", "deadline", "expires",
        "given", "headers", "idempotent", "method", "others", "plan", "probed", "probes", "ran",
        "request_id", "resent", "sent_at", "service", "state", "timer", "view_ok", "worker",
    )

    def __init__(self, client_id: bytes, req: ClientRequest, deadline: float, now: float) -> None:
        self.client_id = client_id
        self.request_id = req.request_id
        self.service = req.service
        self.method = req.method
        self.headers = req.headers
        self.body = req.body
        self.deadline = deadline
        self.expires = deadline  # when its live timer fires (deadline, grace end, or later)
        self.timer = -1  # sequence number of its live timer entry, -1 when none
        # a client may lower idempotency, never raise it: the worker's announcement decides
        self.client_idem = req.headers.get(H_IDEMPOTENT) is not False
        self.idempotent = False
        self.resent = bool(req.headers.get(H_RESENT))
        self.attempt = int(req.headers.get(H_ATTEMPT, 0) or 0)
        self.arrived = now
        self.state = HELD
        self.worker: WorkerState | None = None
        self.sent_at = 0.0
        self.given: tuple[bytes, ...] = ()  # workers sent this call or a probe for it
        self.ran = False  # sent to run at least once (not only probed)
        self.probes: set[bytes] = set()  # probed workers that have not answered yet
        self.view_ok = False  # while probing: every worker that could have run it was asked
        self.probed = False  # a probe found it never ran: it may now run once
        self.plan: CopyPlan | None = None  # hedged or redundant (the Dispatcher's rules 20-22)
        self.others: tuple[tuple[WorkerState, float], ...] = ()  # further copies: (worker, sent at)

    @property
    def key(self) -> Key:
        return (self.client_id, self.request_id)

    def running(self) -> list[tuple[WorkerState, float]]:
        """Every worker running it now, with when it was sent there (INFLIGHT: the first is
        `worker`)."""
        w = self.worker
        return [(w, self.sent_at), *self.others] if w is not None else list(self.others)

    def __repr__(self) -> str:
        return (f"<Call {self.service}.{self.method} {self.client_id.hex()}:{self.request_id} "
                f"{self.state.name}>")


class CopyPlan:
    """What a client asked of a call's copies (the Dispatcher's rules 20, 22), and how far
    the broker is with them."""

    __slots__ = ("hedge_after", "hedge_at", "max_copies", "redundant", "sent", "skips")

    def __init__(self, hedge_after: float, max_copies: int, redundant: int) -> None:
        self.hedge_after = hedge_after  # seconds without a reply before another copy; 0: none
        self.hedge_at = math.inf  # when the next hedged copy is due
        self.max_copies = max_copies  # a hedged call runs at most this many copies in all
        self.redundant = redundant  # workers a redundant call runs on at once (1: not redundant)
        self.sent = 0  # copies sent to run (the first, retries, hedges, redundant ones)
        self.skips = 0  # hedges due in a row that found no token or worker (rule 20 backs off)

    def __repr__(self) -> str:
        what = (f"redundant={self.redundant}" if self.redundant > 1 else
                f"hedge_after={self.hedge_after:g}s max={self.max_copies}")
        return f"<CopyPlan {what} sent={self.sent}>"


class Copies:
    """The copies of an answered call still running at other workers (rule 21): their
    replies are dropped, or compared with the first one (a redundant call)."""

    __slots__ = ("digest", "expires", "first", "method", "pending", "request_id", "service",
                 "status")

    def __init__(self, call: Call, first: str, status: int, digest: bytes | None,
                 pending: dict[bytes, tuple[str, float]], expires: float) -> None:
        self.service = call.service
        self.method = call.method
        self.request_id = call.request_id
        self.first = first  # the name of the worker whose reply was forwarded
        self.status = status
        self.digest = digest  # of the forwarded reply's body; None: nothing to compare
        self.pending = pending  # worker id -> (name, sent at), for the copies not yet replied
        self.expires = expires  # forgotten then (the call's deadline and in-flight grace)

    def __repr__(self) -> str:
        return f"<Copies {self.service}.{self.method} {self.request_id} pending={len(self.pending)}>"


class WorkerState:
    """What the broker knows of one worker; exposes the counters strategies read."""

    __slots__ = (
        "calls", "capacity", "ejected", "errors", "ewma", "id", "info", "joined", "leaving",
        "name", "outstanding", "served", "services", "weight",
    )

    def __init__(self, wid: bytes, ready: Ready, now: float) -> None:
        self.id = wid
        self.name = ready.worker_id
        self.services: tuple[str, ...] = tuple(ready.services)
        self.capacity = ready.capacity
        self.weight = ready.weight
        self.info = ready.info
        self.outstanding = 0  # == len(calls); kept apart because strategies read it
        self.ewma = 0.0  # reply latency, seconds
        self.calls: dict[Key, Call] = {}  # the calls it runs (INFLIGHT)
        self.leaving = False  # it sent DISCONNECT: no new calls
        self.joined = now
        self.served = 0
        self.errors = 0
        self.ejected = False  # an outlier kept out of dispatch for a while

    def __repr__(self) -> str:
        flags = " leaving" if self.leaving else ""
        flags += " ejected" if self.ejected else ""
        return f"<WorkerState {self.name} {self.outstanding}/{self.capacity}{flags}>"


class ServiceState:
    """One service: the workers serving it, its queue, its methods, and its statistics."""

    __slots__ = ("buckets", "latency_sum", "calls", "changed_at", "empty_since", "errors", "max_workers",
                 "methods", "name", "queue", "queued", "strategy", "workers")

    def __init__(self, name: str, strategy: Strategy, empty_since: float, now: float) -> None:
        self.name = name
        self.workers: list[WorkerState] = []
        self.queue: deque[Call] = deque()
        self.queued = 0  # live entries in queue (answered ones are removed lazily)
        self.methods: dict[str, bool] = {}  # method -> idempotent, as the workers announced
        self.strategy = strategy
        self.empty_since = empty_since  # no worker takes its calls since then
        self.changed_at = now  # a worker last joined, left or was lost then
        self.calls = 0  # replies from workers
        self.errors = 0  # of which not OK
        self.buckets = [0] * len(LATENCY_BUCKETS)  # latency histogram (not cumulative)
        self.latency_sum = 0.0  # seconds, for Prometheus' _sum (average = sum / count)
        self.max_workers = 0  # most workers seen at once: redundancy is judged against it

    def __repr__(self) -> str:
        return f"<ServiceState {self.name} workers={len(self.workers)} queued={self.queued}>"


def serving(svc: ServiceState) -> bool:
    """Does a worker take new calls of `svc` (registered and not leaving)?"""
    ws = svc.workers
    return bool(ws) and (not ws[0].leaving or any(not w.leaving for w in ws))
