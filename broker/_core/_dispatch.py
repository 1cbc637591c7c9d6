"""Dispatcher: matches calls to workers with spare capacity, queues, expires and retries them.

Sans-IO: fed with events and an injected clock, it returns actions for the loop to carry out.
It never decodes a call's body; it only holds it (for queueing and idempotent retries).
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Union

from zrpc._core._clock import Clock, budget_ms, deadline_from_budget
from zrpc._core._frames import (
    H_ATTEMPT,
    H_BUDGET,
    H_IDEMPOTENT,
    H_PROBE,
    H_RESENT,
    ClientRequest,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
)
from zrpc.broker._core._lb import Strategy, make_strategy
from zrpc._core._serial import pack_error
from zrpc.broker._core._monitor import ewma

# --- events (inputs) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestArrived:
    client_id: bytes
    request: ClientRequest


@dataclass(frozen=True, slots=True)
class WorkerReady:
    worker_id: bytes
    ready: Ready


@dataclass(frozen=True, slots=True)
class ReplyArrived:
    worker_id: bytes
    reply: WorkerReply


@dataclass(frozen=True, slots=True)
class WorkerLeaving:
    """The worker sent DISCONNECT: no new calls, its in-flight ones will still be replied."""

    worker_id: bytes


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """The worker is dead or hung (liveness expired, or the socket refused it)."""

    worker_id: bytes
    reason: str = "silent"


@dataclass(frozen=True, slots=True)
class Activated:
    """This broker serves clients (a lone broker always; a pair member once ACTIVE)."""


@dataclass(frozen=True, slots=True)
class Deactivated:
    """This broker left ACTIVE: its peer may be serving, so nothing new may start here."""


Event = Union[RequestArrived, WorkerReady, ReplyArrived, WorkerLeaving, WorkerLost, Activated,  # noqa: UP007
              Deactivated]

# --- actions (outputs) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToWorker:
    worker_id: bytes
    message: WorkerRequest


@dataclass(frozen=True, slots=True)
class ReplyToClient:
    client_id: bytes
    request_id: int
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class AckLeave:
    """Tell the worker its DISCONNECT was seen: nothing more will be sent to it."""

    worker_id: bytes


@dataclass(frozen=True, slots=True)
class Notice:
    """Something an operator should hear of (worker_joined, worker_lost, call_retried,
    worker_refused...)."""

    name: str
    subject: str
    detail: dict[str, Any] = field(default_factory=dict)


Action = Union[SendToWorker, ReplyToClient, AckLeave, Notice]  # noqa: UP007

# --- state ----------------------------------------------------------------------------------

QUEUED, INFLIGHT, DONE, PROBING, HELD = 0, 1, 2, 3, 4
"""HELD: between two places (taken off a queue, or off a lost worker), for one step only."""

_ANSWERS = frozenset(int(s) for s in Status) - {int(Status.NOT_SEEN)}
"""Statuses a worker may answer a call with (NOT_SEEN answers probes only)."""

_Key = tuple[bytes, int]
_RAN_HERE, _WAS_RESENT = 1, 2  # what is remembered of an answered call


class Call:
    """One client call while the broker holds it."""

    __slots__ = (
        "arrived", "attempt", "body", "client_id", "client_idem", "deadline", "expires",
        "given", "headers", "idempotent", "method", "probed", "probes", "ran", "request_id",
        "resent", "sent_at", "service", "state", "timer", "view_ok", "worker",
    )

    def __init__(self, client_id: bytes, req: ClientRequest, deadline: float, now: float) -> None:
        self.client_id = client_id
        self.request_id = req.request_id
        self.service = req.service
        self.method = req.method
        self.headers = req.headers
        self.body = req.body
        self.deadline = deadline
        self.expires = deadline
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

    @property
    def key(self) -> _Key:
        return (self.client_id, self.request_id)


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
        self.outstanding = 0
        self.ewma = 0.0
        self.calls: dict[_Key, Call] = {}
        self.leaving = False
        self.joined = now
        self.served = 0
        self.errors = 0
        self.ejected = False  # an outlier kept out of dispatch for a while


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, float("inf"))
"""Upper bounds (seconds) of the per-service latency histogram (Prometheus-style buckets)."""


class ServiceState:
    __slots__ = ("buckets", "latency_sum", "calls", "changed_at", "empty_since", "errors", "max_workers",
                 "methods", "name", "queue", "queued", "strategy", "workers")

    def __init__(self, name: str, strategy: Strategy, empty_since: float, now: float) -> None:
        self.name = name
        self.workers: list[WorkerState] = []
        self.queue: deque[Call] = deque()
        self.queued = 0  # live entries in queue (answered ones are removed lazily)
        self.methods: dict[str, bool] = {}
        self.strategy = strategy
        self.empty_since = empty_since  # no worker takes its calls since then
        self.changed_at = now  # a worker last joined, left or was lost then
        self.calls = 0  # replies from workers
        self.errors = 0  # of which not OK
        self.buckets = [0] * len(LATENCY_BUCKETS)  # latency histogram (not cumulative)
        self.latency_sum = 0.0  # seconds, for Prometheus' _sum (average = sum / count)
        self.max_workers = 0  # most workers seen at once: redundancy is judged against it


class Dispatcher:
    """Least-outstanding (or another strategy) dispatch with bounded queues and deadlines.

    Rules (DESIGN.md §4, docs/protocol.md §7-8):

    1. A call goes to a worker with spare capacity, else waits in its service's bounded queue
       until its deadline; a full queue answers Overloaded at once. A service no worker
       serves (none registered, or all leaving) answers ServiceUnavailable once `service_grace`
       has passed since the broker started or the service lost its last serving worker.
    2. Idempotency is what the workers announced in READY: a method any worker of the
       service called non-idempotent stays so until the service has no worker, and a method
       not (yet) known is non-idempotent. A client may lower it, never raise it.
    3. A lost worker's idempotent calls are retried elsewhere (same request id, attempt + 1,
       within the deadline and a broker-wide retry budget); non-idempotent ones are answered
       CallStateUnknown. A call still in flight `inflight_grace` after its deadline (its reply
       was lost) is answered Timeout, or CallStateUnknown if not idempotent, and its slot freed.
    4. A re-sent (`resent: true`) non-idempotent call may have run already through a broker
       that is gone. It is probed at every worker of its service (an empty body: a worker
       answers from its reply cache). A worker answering anything but NOT_SEEN decides it.
       It runs only when every asked worker said NOT_SEEN and this broker's view of the
       service is complete: the broker has been up, and no worker of the service was lost,
       started leaving or joined, for at least `probe_horizon` before the probe began, and
       no worker joined during the probe (one that does is probed too). Otherwise it is
       answered CallStateUnknown: a worker this broker did not ask may have run it.
    5. A non-idempotent call that this broker already sent to run, or that may have run
       elsewhere, is never run again: a duplicate is answered CallStateUnknown.
    6. While deactivated (Binary Star left ACTIVE) nothing new starts: queued and probing
       calls and new requests are answered NotActive (the client sends them to the peer), a
       lost worker's idempotent calls too; in-flight calls complete and reach their clients.
    7. A worker may answer only the calls it was given (run or probed); other replies are
       dropped and counted (`foreign_replies`), including replies for calls never seen here.
    8. Memory is bounded: services with no worker are forgotten after their grace, a READY
       that would hold more than `max_services` is refused, per-client calls, queues (calls
       and bytes), recent answers, departed workers and timers are all bounded.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        strategy: str = "least-outstanding",
        queue_limit: int = 1000,
        queue_bytes: int = 32 * 1024 * 1024,
        service_grace: float = 1.0,
        default_timeout: float = 10.0,
        max_attempts: int = 3,
        retry_ratio: float = 0.2,
        retry_tokens: float = 50.0,
        ewma_alpha: float = 0.2,
        recent_limit: int = 100_000,
        max_inflight_per_client: int = 10_000,
        probe_horizon: float | None = None,
        inflight_grace: float = 2.0,
        max_services: int = 10_000,
        left_memory: float = 60.0,
        left_limit: int = 10_000,
    ) -> None:
        make_strategy(strategy)  # validate early
        self._clock = clock
        self._strategy_name = strategy
        self._queue_limit = queue_limit
        self._queue_bytes_limit = queue_bytes
        self._queued_bytes = 0  # bodies waiting in all queues: memory is bounded, not just count
        self._grace = service_grace
        self._default_budget = int(default_timeout * 1000)
        # the longest a call may live (its budget) bounds how long ago it can have been
        # dispatched through another broker: the view must be stable for that long
        self._horizon = max(default_timeout, 10.0) if probe_horizon is None else probe_horizon
        self._inflight_grace = inflight_grace
        self._max_attempts = max_attempts
        self._retry_ratio = retry_ratio
        self._retry_max = retry_tokens
        self._retry_tokens = retry_tokens
        self._alpha = ewma_alpha
        self._started = clock()
        self._active = True
        self._services: dict[str, ServiceState] = {}
        self._max_services = max_services
        self._forget: deque[tuple[float, str]] = deque()  # (when, service) to look at again
        self._workers: dict[bytes, WorkerState] = {}
        self._calls: dict[_Key, Call] = {}
        self._probing: dict[_Key, Call] = {}
        self._per_client: dict[bytes, int] = {}  # calls held per client
        self._client_limit = max_inflight_per_client
        self._timers: list[tuple[float, int, Call]] = []
        self._seq = itertools.count()
        # answered calls: (RAN_HERE | WAS_RESENT, workers given it), or None for a call no
        # worker was given and no client re-sent
        self._recent: OrderedDict[_Key, tuple[int, tuple[bytes, ...]] | None] = OrderedDict()
        self._recent_limit = recent_limit
        self._left: OrderedDict[bytes, float] = OrderedDict()  # workers gone on purpose, when
        self._left_memory = left_memory
        self._left_limit = left_limit
        self.counters: dict[str, int] = dict.fromkeys(
            ("requests", "replies", "duplicates", "late_replies", "orphan_replies", "retries",
             "overloaded", "timeouts", "unavailable", "state_unknown", "method_not_found",
             "probes", "foreign_replies", "not_active_calls", "inflight_expired",
             "workers_refused", "bad_statuses"), 0)

    # --- the three verbs -----------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if type(event) is RequestArrived:  # the hot two first, by exact type
            return self._on_request(event.client_id, event.request)
        if type(event) is ReplyArrived:
            return self._on_reply(event.worker_id, event.reply)
        if isinstance(event, WorkerReady):
            return self._on_ready(event.worker_id, event.ready)
        if isinstance(event, WorkerLeaving):
            return self._on_leaving(event.worker_id)
        if isinstance(event, WorkerLost):
            return self._on_lost(event.worker_id, event.reason)
        if isinstance(event, Activated):
            return self._on_activated()
        if isinstance(event, Deactivated):
            return self._on_deactivated()
        raise TypeError(f"unknown event {event!r}")

    def tick(self) -> list[Action]:
        """Expires queued, probing and in-flight calls whose time has come; forgets services
        nobody serves any more."""
        now = self._clock()
        out: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, seq, call = heapq.heappop(timers)
            if call.timer != seq:
                continue  # superseded: the call moved on, or was answered
            call.timer = -1
            if call.state == QUEUED:
                out.extend(self._queued_due(call, now))
            elif call.state == PROBING:
                self.counters["timeouts"] += 1
                out.append(self._answer(call, Status.TIMEOUT, "deadline passed while asking the "
                                        "workers whether this re-sent call already ran"))
            elif call.state == INFLIGHT:
                out.extend(self._inflight_due(call, now))
        self._forget_services(now)
        return out

    def next_deadline(self) -> float | None:
        """When `tick()` has something to do: a call's deadline (queued, probing, or in
        flight plus `inflight_grace`), a grace's end, or a service to forget."""
        timers = self._timers
        while timers and timers[0][2].timer != timers[0][1]:
            heapq.heappop(timers)
        nxt = timers[0][0] if timers else None
        if self._forget and (nxt is None or self._forget[0][0] < nxt):
            nxt = self._forget[0][0]
        return nxt

    # --- read-only views -----------------------------------------------------------------

    @property
    def workers(self) -> dict[bytes, WorkerState]:
        return dict(self._workers)

    @property
    def active(self) -> bool:
        return self._active

    def set_ejected(self, worker_id: bytes, ejected: bool) -> None:
        """Outlier ejection: an ejected worker gets calls only when no other worker can."""
        w = self._workers.get(worker_id)
        if w is not None:
            w.ejected = ejected

    @property
    def inflight(self) -> int:
        """Calls the broker holds (queued, probing or running)."""
        return len(self._calls)

    def worker_ids(self) -> list[bytes]:
        return list(self._workers)

    def has_worker(self, worker_id: bytes) -> bool:
        return worker_id in self._workers

    def wants_register(self, worker_id: bytes) -> bool:
        """Should an unknown worker be asked to send READY? Not one that left on purpose
        (DISCONNECT) or was refused within `left_memory`: it would only come back to leave,
        or be refused, again."""
        if worker_id in self._workers:
            return False
        t = self._left.get(worker_id)
        return t is None or self._clock() - t >= self._left_memory

    def snapshot(self) -> dict[str, Any]:
        """Plain data for `zrpc.status` and metrics."""
        services = [
            {
                "name": s.name,
                "workers": sum(1 for w in s.workers if not w.leaving),
                "outstanding": sum(w.outstanding for w in s.workers),
                "queued": s.queued,
                "methods": sorted(s.methods),
                "calls": s.calls,
                "errors": s.errors,
                "latency_buckets": list(s.buckets),
                "latency_sum": s.latency_sum,
                "max_workers": s.max_workers,
            }
            for s in sorted(self._services.values(), key=lambda s: s.name)
        ]
        workers = [
            {
                "id": w.id.hex(),
                "name": w.name,
                "services": list(w.services),
                "capacity": w.capacity,
                "outstanding": w.outstanding,
                "weight": w.weight,
                "ewma_ms": round(w.ewma * 1000, 3),
                "served": w.served,
                "errors": w.errors,
                "leaving": w.leaving,
                "ejected": w.ejected,
                **{k: v for k, v in w.info.items() if k in ("host", "pid")},
            }
            for w in sorted(self._workers.values(), key=lambda w: w.name)
        ]
        return {"services": services, "workers": workers, "counters": dict(self.counters),
                "lb": self._strategy_name, "inflight": len(self._calls),
                "queued_bytes": self._queued_bytes, "active": self._active}

    def services_map(self) -> dict[str, dict[str, bool]]:
        return {s.name: dict(s.methods) for s in self._services.values() if s.workers}

    # --- requests ------------------------------------------------------------------------

    def _on_request(self, client_id: bytes, req: ClientRequest) -> list[Action]:
        now = self._clock()
        key = (client_id, req.request_id)
        if key in self._calls:  # a client re-sent a call we still hold: one copy is enough
            self.counters["duplicates"] += 1
            return []
        if req.headers.get(H_RESENT):  # answered before it is held: still, it may have run
            self._remember_key(key, _WAS_RESENT, ())
        if not self._active:
            self.counters["not_active_calls"] += 1
            return [ReplyToClient(client_id, req.request_id, Status.NOT_ACTIVE, pack_error(
                "NotActive", "this broker is not active: send the call to its peer"))]
        if self._per_client.get(client_id, 0) >= self._client_limit:
            self.counters["overloaded"] += 1
            return [ReplyToClient(client_id, req.request_id, Status.OVERLOADED, pack_error(
                "Overloaded", f"this client already has {self._client_limit} calls in flight"))]
        self.counters["requests"] += 1
        self._retry_tokens = min(self._retry_max, self._retry_tokens + self._retry_ratio)
        budget = req.headers.get(H_BUDGET)
        if budget is None:
            budget = self._default_budget
        if budget <= 0:
            self.counters["timeouts"] += 1
            return [ReplyToClient(client_id, req.request_id, Status.TIMEOUT,
                                  pack_error("Timeout", "deadline passed before dispatch"))]
        svc = self._services.get(req.service)
        call = Call(client_id, req, deadline_from_budget(budget, now), now)
        call.idempotent = idem = call.client_idem and svc is not None and svc.methods.get(req.method, False)
        if not idem and self._may_have_run(key, call.resent):
            # answered here already; running it again could charge twice
            self.counters["duplicates"] += 1
            return [self._answer(call, Status.CALL_STATE_UNKNOWN,
                                 "this call was already answered; its reply may have been lost")]
        if svc is None or not _serving(svc):
            if not self._in_grace(svc, now):
                return [self._unavailable(call)]
            if svc is None:
                if len(self._services) >= self._max_services:
                    self.counters["unavailable"] += 1
                    return [self._answer(call, Status.SERVICE_UNAVAILABLE,
                                         f"no worker serves {req.service!r}")]
                svc = self._new_service(req.service, -math.inf, now)
            return self._enqueue(svc, call)
        if req.method not in svc.methods:
            self.counters["method_not_found"] += 1
            return [self._answer(call, Status.METHOD_NOT_FOUND,
                                 f"service {req.service!r} has no method {req.method!r}")]
        if call.resent and not idem:
            return self._probe(svc, call, now)
        worker = self._pick(svc)
        if worker is not None:
            return [self._send(call, worker, now)]
        return self._enqueue(svc, call)

    def _idempotent(self, svc: ServiceState | None, call: Call) -> bool:
        return call.client_idem and svc is not None and svc.methods.get(call.method, False)

    def _may_have_run(self, key: _Key, resent: bool) -> bool:
        """Was this call, answered already, run here or perhaps elsewhere? A call re-sent
        again that never ran here is probed again instead (a worker's cache may know)."""
        prev = self._recent.get(key)
        if prev is None:
            return False
        return bool(prev[0] & _RAN_HERE or (prev[0] & _WAS_RESENT and not resent))

    def _in_grace(self, svc: ServiceState | None, now: float) -> bool:
        if svc is None:
            return now < self._started + self._grace
        return now < self._grace_end(svc)

    def _grace_end(self, svc: ServiceState) -> float:
        return max(self._started, svc.empty_since) + self._grace

    def _new_service(self, name: str, empty_since: float, now: float, served: bool = False
                     ) -> ServiceState:
        svc = self._services[name] = ServiceState(
            name, make_strategy(self._strategy_name), empty_since, now)
        if not served:
            self._forget.append((now + self._grace, name))  # forgotten then unless it is served
        return svc

    # --- probing re-sent calls -----------------------------------------------------------

    def _probe(self, svc: ServiceState, call: Call, now: float) -> list[Action]:
        """A re-sent non-idempotent call may already have run on some worker (dispatched by a
        broker that is gone): ask every worker's reply cache before running it anywhere."""
        self.counters["probes"] += 1
        targets = [w.id for w in svc.workers if not w.leaving]
        call.state = PROBING
        call.worker = None
        call.probes = set(targets)
        call.given += tuple(w for w in targets if w not in call.given)
        call.view_ok = now - max(self._started, svc.changed_at) >= self._horizon
        self._hold(call)
        self._probing[call.key] = call
        self._arm(call, call.deadline)
        msg = self._probe_message(call, now)
        return [SendToWorker(w, msg) for w in targets]

    def _probe_message(self, call: Call, now: float) -> WorkerRequest:
        headers = dict(call.headers)
        headers[H_BUDGET] = budget_ms(call.deadline, now)
        headers[H_IDEMPOTENT] = False
        headers[H_PROBE] = True
        # no body: a worker answers from its reply cache, so a probe never copies arguments
        return WorkerRequest(call.client_id, call.request_id, call.service, call.method, headers, b"")

    def _probe_answered(self, worker_id: bytes, call: Call, reply: WorkerReply) -> list[Action]:
        call.probes.discard(worker_id)
        if reply.status != Status.NOT_SEEN:  # it ran (or runs) there: that is the answer
            call.ran = True
            self.counters["replies"] += 1
            status, body = self._checked_status(reply)
            return [self._settle(call, status, body)]
        if call.probes:
            return []
        if not call.view_ok:
            self.counters["state_unknown"] += 1
            return [self._answer(call, Status.CALL_STATE_UNKNOWN,
                                 "cannot tell whether it already ran: a worker this broker did "
                                 "not ask may have run it (workers joined or were lost lately)")]
        return self._dispatch_probed(call, self._clock())

    def _unavailable(self, call: Call) -> ReplyToClient:
        """No worker serves the service. A re-sent call that is not known to be idempotent may
        have run through the broker the client lost, so "no worker" would mislead: its fate is
        unknown."""
        if call.resent and not call.idempotent:
            self.counters["state_unknown"] += 1
            return self._answer(call, Status.CALL_STATE_UNKNOWN,
                                f"no worker serves {call.service!r} here to ask whether this "
                                "re-sent call already ran")
        self.counters["unavailable"] += 1
        return self._answer(call, Status.SERVICE_UNAVAILABLE, f"no worker serves {call.service!r}")

    def _dispatch_probed(self, call: Call, now: float) -> list[Action]:
        """No worker has seen it and every worker that could have was asked: it never ran, so
        running it once is safe."""
        del self._probing[call.key]
        call.probed = True
        svc = self._services.get(call.service)
        if svc is None or not _serving(svc):
            self.counters["unavailable"] += 1
            return [self._answer(call, Status.SERVICE_UNAVAILABLE,
                                 f"no worker serves {call.service!r}")]
        worker = self._pick(svc)
        if worker is not None:
            return [self._send(call, worker, now)]
        return self._enqueue(svc, call)

    def _joined(self, svc: ServiceState, worker: WorkerState, now: float) -> list[Action]:
        """A worker now serves `svc`: the view changed. A call being probed asks it too, and
        can no longer be run on NOT_SEEN alone (the newcomer may be the one that ran it)."""
        svc.changed_at = now
        out: list[Action] = []
        for call in self._probing.values():
            if call.service != svc.name:
                continue
            call.view_ok = False
            if worker.id not in call.probes:
                call.probes.add(worker.id)
                if worker.id not in call.given:
                    call.given += (worker.id,)
                out.append(SendToWorker(worker.id, self._probe_message(call, now)))
        return out

    def _view_changed(self, svc: ServiceState, now: float) -> None:
        svc.changed_at = now
        for call in self._probing.values():
            if call.service == svc.name:
                call.view_ok = False

    # --- queues and timers ---------------------------------------------------------------

    def _enqueue(self, svc: ServiceState, call: Call, front: bool = False) -> list[Action]:
        if not front and svc.queued >= self._queue_limit:
            self.counters["overloaded"] += 1
            return [self._answer(call, Status.OVERLOADED,
                                 f"queue of {svc.name!r} is full ({self._queue_limit} calls)")]
        if not front and self._queued_bytes + len(call.body) > self._queue_bytes_limit:
            self.counters["overloaded"] += 1
            return [self._answer(call, Status.OVERLOADED,
                                 f"queued calls hold {self._queued_bytes} bytes, the limit")]
        if call.state == PROBING:
            self._probing.pop(call.key, None)
        self._queued_bytes += len(call.body)
        call.state = QUEUED
        call.worker = None
        self._hold(call)
        if front:
            svc.queue.appendleft(call)
        else:
            svc.queue.append(call)
        svc.queued += 1
        self._arm(call, call.deadline if _serving(svc) else min(call.deadline, self._grace_end(svc)))
        return []

    def _unqueue(self, call: Call) -> None:
        """Takes a QUEUED call out of the gauges; its queue entry is dropped lazily."""
        svc = self._services[call.service]
        svc.queued -= 1
        self._queued_bytes -= len(call.body)
        call.state = HELD
        if len(svc.queue) > 2 * svc.queued + 64:  # answered entries piled up behind a live one
            svc.queue = deque(c for c in svc.queue if c.state == QUEUED)

    def _queued_due(self, call: Call, now: float) -> list[Action]:
        svc = self._services[call.service]
        if now < call.deadline:
            if _serving(svc):  # queued in a grace, and a worker came: wait for the deadline
                self._arm(call, call.deadline)
                return []
            end = self._grace_end(svc)
            if now < end:
                self._arm(call, min(call.deadline, end))
                return []
            return [self._unavailable(call)]
        self.counters["timeouts"] += 1
        return [self._answer(call, Status.TIMEOUT, "deadline passed while queued")]

    def _inflight_due(self, call: Call, now: float) -> list[Action]:
        """Its reply never came (too large for the socket, dropped on a full pipe, lost by the
        worker): the client has timed out already; free the slot, and say what is known."""
        worker = call.worker
        self.counters["inflight_expired"] += 1
        if call.idempotent:
            self.counters["timeouts"] += 1
            out: list[Action] = [self._answer(call, Status.TIMEOUT,
                                              "the worker did not reply by the deadline")]
        else:
            self.counters["state_unknown"] += 1
            out = [self._answer(call, Status.CALL_STATE_UNKNOWN,
                                "the worker did not reply by the deadline; the call may have run")]
        if worker is not None:
            out.extend(self._slot_freed(worker, now))
        return out

    def _arm(self, call: Call, when: float) -> None:
        """Gives `call` one live timer at `when`; older entries of it become dead."""
        seq = next(self._seq)
        call.expires = when
        call.timer = seq
        timers = self._timers
        heapq.heappush(timers, (when, seq, call))
        if len(timers) > 2 * len(self._calls) + 1024:  # mostly dead: answered calls' entries
            timers[:] = [e for e in timers if e[2].timer == e[1]]
            heapq.heapify(timers)

    def _forget_services(self, now: float) -> None:
        forget = self._forget
        while forget and forget[0][0] <= now:
            _, name = forget.popleft()
            svc = self._services.get(name)
            if svc is not None and not svc.workers and svc.queued == 0 and now >= self._grace_end(svc):
                del self._services[name]

    # --- dispatch ------------------------------------------------------------------------

    def _pick(self, svc: ServiceState) -> WorkerState | None:
        ws = svc.workers
        if len(ws) == 1:
            w = ws[0]
            return w if w.outstanding < w.capacity and not w.leaving else None
        cands = [w for w in ws if w.outstanding < w.capacity and not w.leaving and not w.ejected]
        if not cands:  # ejected workers still serve rather than leave a call waiting
            cands = [w for w in ws if w.outstanding < w.capacity and not w.leaving]
        if not cands:
            return None
        return svc.strategy.choose(cands)  # type: ignore[return-value]

    def _send(self, call: Call, worker: WorkerState, now: float) -> SendToWorker:
        call.state = INFLIGHT
        call.worker = worker
        call.sent_at = now
        call.ran = True
        if not call.given:
            call.given = (worker.id,)
        elif worker.id not in call.given:
            call.given += (worker.id,)
        key = call.key
        self._hold(call)
        worker.calls[key] = call
        worker.outstanding += 1
        self._arm(call, call.deadline + self._inflight_grace)
        headers = dict(call.headers)
        headers[H_BUDGET] = budget_ms(call.deadline, now)
        headers[H_IDEMPOTENT] = call.idempotent
        headers[H_ATTEMPT] = call.attempt
        headers.pop(H_PROBE, None)  # only the broker asks a probe; a client's is dropped
        return SendToWorker(worker.id, WorkerRequest(call.client_id, call.request_id, call.service,
                                                     call.method, headers, call.body))

    def _drain(self, worker: WorkerState, now: float) -> list[Action]:
        """Fills a worker's free slots from the queues of its services, oldest call first."""
        out: list[Action] = []
        if not self._active:
            return out
        while worker.outstanding < worker.capacity and not worker.leaving:
            best: ServiceState | None = None
            for name in worker.services:
                svc = self._services.get(name)
                if svc is None:
                    continue
                q = svc.queue
                while q and q[0].state != QUEUED:
                    q.popleft()
                if q and (best is None or q[0].arrived < best.queue[0].arrived):
                    best = svc
            if best is None:
                break
            call = best.queue.popleft()
            self._unqueue(call)
            out.extend(self._start(best, call, worker, now))
        return out

    def _start(self, svc: ServiceState, call: Call, worker: WorkerState, now: float) -> list[Action]:
        """A call off the queue, for `worker`: its method and idempotency are known now."""
        if call.method not in svc.methods:
            self.counters["method_not_found"] += 1
            return [self._answer(call, Status.METHOD_NOT_FOUND,
                                 f"service {svc.name!r} has no method {call.method!r}")]
        call.idempotent = self._idempotent(svc, call)
        if call.resent and not call.idempotent and not call.probed:
            return self._probe(svc, call, now)  # it may have run before this broker started
        return [self._send(call, worker, now)]

    def _slot_freed(self, worker: WorkerState, now: float) -> list[Action]:
        if worker.leaving:
            return self._remove(worker, now) if worker.outstanding == 0 else []
        return self._drain(worker, now) if self._active else []

    # --- answers and bookkeeping ---------------------------------------------------------

    def _answer(self, call: Call, status: int, message: str) -> ReplyToClient:
        return self._settle(call, status,
                            pack_error(Status(status).name.title().replace("_", ""), message))

    def _settle(self, call: Call, status: int, body: bytes) -> ReplyToClient:
        """The one way a call ends: out of every structure, remembered, answered once."""
        state = call.state
        if state == QUEUED:
            self._unqueue(call)
        elif state == INFLIGHT and call.worker is not None:
            w = call.worker
            del w.calls[call.key]
            w.outstanding -= 1
        elif state == PROBING:
            self._probing.pop(call.key, None)
        call.state = DONE
        call.worker = None
        call.timer = -1
        call.body = b""  # a DONE call may linger in a heap or queue: not its arguments
        key = call.key
        self._drop(key)
        self._remember_key(key, (_RAN_HERE if call.ran else 0) | (_WAS_RESENT if call.resent else 0),
                           call.given)
        return ReplyToClient(call.client_id, call.request_id, status, body)

    def _hold(self, call: Call) -> None:
        key = call.key
        if key not in self._calls:
            self._per_client[call.client_id] = self._per_client.get(call.client_id, 0) + 1
        self._calls[key] = call

    def _drop(self, key: _Key) -> None:
        if self._calls.pop(key, None) is not None:
            n = self._per_client[key[0]] - 1
            if n:
                self._per_client[key[0]] = n
            else:
                del self._per_client[key[0]]

    def _remember_key(self, key: _Key, flags: int, given: tuple[bytes, ...]) -> None:
        """What is known of an answered call, added to what was known of it before."""
        recent = self._recent
        prev = recent.pop(key, None) if key in recent else None
        if prev is not None:
            flags |= prev[0]
            given = prev[1] + tuple(w for w in given if w not in prev[1])
        recent[key] = (flags, given) if flags or given else None
        if len(recent) > self._recent_limit:
            recent.popitem(last=False)

    # --- replies -------------------------------------------------------------------------

    def _checked_status(self, reply: WorkerReply) -> tuple[int, bytes]:
        if reply.status in _ANSWERS:
            return reply.status, reply.body
        self.counters["bad_statuses"] += 1
        return Status.PROTOCOL_ERROR, pack_error(
            "ProtocolError", f"worker sent undefined status {reply.status}"
            if reply.status != Status.NOT_SEEN else "worker answered a call with NOT_SEEN")

    def _on_reply(self, worker_id: bytes, reply: WorkerReply) -> list[Action]:
        now = self._clock()
        key = (reply.client_id, reply.request_id)
        worker = self._workers.get(worker_id)
        call = worker.calls.get(key) if worker is not None else None
        if worker is not None and call is not None:  # the answer to a call it was given
            lat = now - call.sent_at
            worker.ewma = ewma(worker.ewma, lat, self._alpha)
            worker.served += 1
            svc = self._services.get(call.service)
            if svc is not None:
                svc.calls += 1
                svc.buckets[bisect_left(LATENCY_BUCKETS, lat)] += 1
                svc.latency_sum += lat
            if reply.status != Status.OK:
                worker.errors += 1
                if svc is not None:
                    svc.errors += 1
            self.counters["replies"] += 1
            if reply.status in _ANSWERS:
                out: list[Action] = [self._settle(call, reply.status, reply.body)]
            else:
                out = [self._settle(call, *self._checked_status(reply))]
            out.extend(self._slot_freed(worker, now))
            return out
        held = self._calls.get(key)
        if held is not None and held.state == PROBING and worker_id in held.probes:
            return self._probe_answered(worker_id, held, reply)
        if held is not None:
            given: tuple[bytes, ...] = held.given
        else:
            remembered = self._recent.get(key)
            given = remembered[1] if remembered is not None else ()
        if worker_id in given:
            # its call once: retried elsewhere after it was lost, expired, or settled by
            # another worker's answer to a probe
            if reply.status != Status.NOT_SEEN:
                self.counters["late_replies"] += 1
            return []
        # not its call: a worker answers only what it was given (the client would take it)
        self.counters["foreign_replies"] += 1
        if held is None and key not in self._recent:
            self.counters["orphan_replies"] += 1  # a call this broker never saw
        return []

    # --- workers -------------------------------------------------------------------------

    def _on_ready(self, worker_id: bytes, ready: Ready) -> list[Action]:
        now = self._clock()
        worker = self._workers.get(worker_id)
        new = sum(1 for name in ready.services if name not in self._services)
        if new and len(self._services) + new > self._max_services:
            self.counters["workers_refused"] += 1
            if worker is None:
                self._remember_left(worker_id, now)  # asking it again would be refused again
            return [Notice("worker_refused", ready.worker_id, {
                "reason": f"the broker holds {len(self._services)} services, at most "
                          f"{self._max_services}", "services": len(ready.services)})]
        out: list[Action] = []
        old: set[str] = set()
        was_serving = False
        if worker is None:
            self._left.pop(worker_id, None)
            worker = self._workers[worker_id] = WorkerState(worker_id, ready, now)
            out.append(Notice("worker_joined", ready.worker_id,
                              {"services": sorted(ready.services), "capacity": ready.capacity}))
        else:  # re-announced (reconnect, new settings): keep its in-flight calls
            old, was_serving = set(worker.services), not worker.leaving
            for name in worker.services:
                svc = self._services.get(name)
                if svc is not None and worker in svc.workers:
                    svc.workers.remove(worker)
                    if name not in ready.services:
                        self._left_service(svc, was_serving, now)
            worker.name, worker.services = ready.worker_id, tuple(ready.services)
            worker.capacity, worker.weight, worker.info = ready.capacity, ready.weight, ready.info
            worker.leaving = False
        for name, methods in ready.services.items():
            svc = self._services.get(name) or self._new_service(name, now, now, served=True)
            svc.workers.append(worker)
            known = svc.methods
            for m, idem in methods.items():  # one worker saying "not idempotent" is enough
                known[m] = known.get(m, True) and idem
            svc.max_workers = max(svc.max_workers, len(svc.workers))
            if name not in old or not was_serving:
                out.extend(self._joined(svc, worker, now))
        out.extend(self._drain(worker, now))
        return out

    def _on_leaving(self, worker_id: bytes) -> list[Action]:
        now = self._clock()
        out: list[Action] = [AckLeave(worker_id)]
        self._remember_left(worker_id, now)
        worker = self._workers.get(worker_id)
        if worker is None:
            return out
        if not worker.leaving:
            worker.leaving = True
            for name in worker.services:
                svc = self._services.get(name)
                if svc is not None:
                    self._view_changed(svc, now)
                    if not _serving(svc):
                        self._emptied(svc, now)
        out.append(Notice("worker_leaving", worker.name, {"outstanding": worker.outstanding}))
        if worker.outstanding == 0:
            out.extend(self._remove(worker, now))
        return out

    def _remember_left(self, worker_id: bytes, now: float) -> None:
        left = self._left
        left.pop(worker_id, None)
        left[worker_id] = now
        while left and (len(left) > self._left_limit
                        or now - next(iter(left.values())) >= self._left_memory):
            left.popitem(last=False)

    def _emptied(self, svc: ServiceState, now: float) -> None:
        """No worker takes the service's calls from now on: the grace starts, and queued
        calls wait for it rather than for their deadlines."""
        svc.empty_since = now
        end = now + self._grace
        for call in svc.queue:
            if call.state == QUEUED and call.expires > min(call.deadline, end):
                self._arm(call, min(call.deadline, end))

    def _remove(self, worker: WorkerState, now: float) -> list[Action]:
        self._workers.pop(worker.id, None)
        out: list[Action] = []
        for name in worker.services:
            svc = self._services.get(name)
            if svc is None or worker not in svc.workers:
                continue
            svc.workers.remove(worker)
            self._left_service(svc, not worker.leaving, now)
        for call in [c for c in self._probing.values() if worker.id in c.probes]:
            # it might be the one that ran it: its fate cannot be known
            self.counters["state_unknown"] += 1
            out.append(self._answer(call, Status.CALL_STATE_UNKNOWN,
                                    "a worker was gone before it said whether this call ran there"))
        return out

    def _left_service(self, svc: ServiceState, was_serving: bool, now: float) -> None:
        """A worker no longer serves `svc` (it is already off the service's list)."""
        if was_serving:
            self._view_changed(svc, now)
            if not _serving(svc):
                self._emptied(svc, now)
        if not svc.workers:
            svc.methods.clear()
            self._forget.append((now + self._grace, svc.name))

    def _on_lost(self, worker_id: bytes, reason: str) -> list[Action]:
        worker = self._workers.get(worker_id)
        if worker is None:
            return []
        now = self._clock()
        out: list[Action] = [Notice("worker_lost", worker.name,
                                    {"reason": reason, "inflight": len(worker.calls),
                                     "services": sorted(worker.services)})]
        calls = sorted(worker.calls.values(), key=lambda c: c.arrived)
        worker.calls.clear()
        worker.outstanding = 0
        for call in calls:
            call.worker = None
            call.state = HELD
        out.extend(self._remove(worker, now))
        for call in calls:
            out.extend(self._retry(call, now))
        return out

    def _retry(self, call: Call, now: float) -> list[Action]:
        """A lost worker's call: retry it if that is safe and affordable, else say why not."""
        if not call.idempotent:
            self.counters["state_unknown"] += 1
            return [self._answer(call, Status.CALL_STATE_UNKNOWN,
                                 f"worker running {call.service}.{call.method} was lost; "
                                 "the call is not idempotent, so it was not retried")]
        if not self._active:
            self.counters["not_active_calls"] += 1
            return [self._answer(call, Status.NOT_ACTIVE,
                                 "worker lost and this broker is no longer active: send the "
                                 "call to its peer")]
        if call.attempt + 1 >= self._max_attempts or now >= call.deadline or self._retry_tokens < 1:
            why = ("deadline passed" if now >= call.deadline else
                   "retry budget exhausted" if self._retry_tokens < 1 else "too many attempts")
            self.counters["unavailable"] += 1
            return [self._answer(call, Status.SERVICE_UNAVAILABLE,
                                 f"worker lost and the call was not retried: {why}")]
        self._retry_tokens -= 1
        self.counters["retries"] += 1
        call.attempt += 1
        notice = Notice("call_retried", call.service,
                        {"method": call.method, "attempt": call.attempt})
        svc = self._services.get(call.service)
        if svc is not None and _serving(svc):
            worker = self._pick(svc)
            if worker is not None:
                return [notice, self._send(call, worker, now)]
        if svc is None:
            svc = self._new_service(call.service, now, now)
        return [notice, *self._enqueue(svc, call, front=True)]

    # --- activation ----------------------------------------------------------------------

    def _on_activated(self) -> list[Action]:
        if self._active:
            return []
        self._active = True
        now = self._clock()
        out: list[Action] = []
        for worker in list(self._workers.values()):
            out.extend(self._drain(worker, now))
        return out

    def _on_deactivated(self) -> list[Action]:
        """The peer may be serving now: whatever has not started must not start here."""
        if not self._active:
            return []
        self._active = False
        out: list[Action] = []
        for call in [c for c in self._calls.values() if c.state in (QUEUED, PROBING)]:
            self.counters["not_active_calls"] += 1
            out.append(self._answer(call, Status.NOT_ACTIVE,
                                    "this broker stepped down: send the call to its peer"))
        return out

    # --- self-check ----------------------------------------------------------------------

    def _check(self) -> None:
        """Raises AssertionError when the books do not balance: every counter and gauge
        non-negative, gauges equal to what is held. Tests call it after every step."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise AssertionError(what)

        for name, n in self.counters.items():
            need(n >= 0, f"counter {name} is {n}")
        need(self._queued_bytes >= 0, f"queued_bytes is {self._queued_bytes}")
        queued_bytes = 0
        queued: set[_Key] = set()
        for name, svc in self._services.items():
            need(svc.name == name, f"service {name} filed as {svc.name}")
            live = [c for c in svc.queue if c.state == QUEUED]
            need(svc.queued >= 0, f"{name}: queued is {svc.queued}")
            need(len(live) == svc.queued, f"{name}: queued {svc.queued}, live entries {len(live)}")
            need(len({id(c) for c in live}) == len(live), f"{name}: a call queued twice")
            for c in live:
                need(c.service == name and self._calls.get(c.key) is c, f"{name}: stray {c.key}")
                queued_bytes += len(c.body)
                queued.add(c.key)
            need(len({id(w) for w in svc.workers}) == len(svc.workers), f"{name}: worker twice")
            for w in svc.workers:
                need(self._workers.get(w.id) is w and name in w.services, f"{name}: stray worker")
        need(queued_bytes == self._queued_bytes,
             f"queued_bytes {self._queued_bytes}, queued bodies hold {queued_bytes}")
        need(Counter(k[0] for k in self._calls) == Counter(self._per_client),
             "per-client counts differ from the calls held")
        need(all(n > 0 for n in self._per_client.values()), "a per-client count of 0 is kept")
        live_timers = {e[1] for e in self._timers if e[2].timer == e[1]}
        for key, c in self._calls.items():
            need(c.key == key, f"call filed as {key} is {c.key}")
            need(c.state in (QUEUED, INFLIGHT, PROBING), f"{key} held in state {c.state}")
            need(c.timer in live_timers, f"{key} has no live timer")
            if c.state == QUEUED:
                need(key in queued, f"{key} QUEUED but in no queue")
            elif c.state == INFLIGHT:
                need(c.worker is not None and c.worker.calls.get(key) is c, f"{key} not on its worker")
            else:
                need(self._probing.get(key) is c, f"{key} probing but not listed")
        for key, c in self._probing.items():
            need(self._calls.get(key) is c and c.state == PROBING, f"{key} listed as probing")
        for wid, w in self._workers.items():
            need(w.id == wid, "worker filed under another id")
            need(w.outstanding == len(w.calls), f"{w.name}: outstanding {w.outstanding}, "
                 f"{len(w.calls)} calls")
            for key, c in w.calls.items():
                need(self._calls.get(key) is c and c.worker is w, f"{w.name}: stray call {key}")
            for name in w.services:
                of = self._services.get(name)
                need(of is not None and w in of.workers, f"{w.name}: not listed in {name}")
        need(len(self._recent) <= self._recent_limit, "recent answers over their bound")
        need(len(self._left) <= self._left_limit, "departed workers over their bound")


def _serving(svc: ServiceState) -> bool:
    """Does a worker take new calls of `svc` (registered and not leaving)?"""
    ws = svc.workers
    return bool(ws) and (not ws[0].leaving or any(not w.leaving for w in ws))
