"""Dispatcher: matches calls to workers with spare capacity, queues, expires and retries them.

Sans-IO: fed with events and an injected clock, it returns actions for the loop to carry out.
It never decodes a call's body; it only holds it (for queueing and idempotent retries).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Union

from zrpc._clock import Clock, budget_ms, deadline_from_budget
from zrpc._frames import (
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
from zrpc._lb import Strategy, make_strategy
from zrpc._serial import pack_error

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


Event = Union[RequestArrived, WorkerReady, ReplyArrived, WorkerLeaving, WorkerLost]

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
    """Something an operator should hear of (worker_joined, worker_lost, call_retried...)."""

    name: str
    subject: str
    detail: dict[str, Any] = field(default_factory=dict)


Action = Union[SendToWorker, ReplyToClient, AckLeave, Notice]

# --- state ----------------------------------------------------------------------------------

QUEUED, INFLIGHT, DONE, PROBING = 0, 1, 2, 3


class Call:
    """One client call while the broker holds it."""

    __slots__ = (
        "client_id", "request_id", "service", "method", "headers", "body", "deadline",
        "expires", "idempotent", "attempt", "arrived", "state", "worker", "sent_at", "answered",
        "probes",
    )

    def __init__(self, client_id: bytes, req: ClientRequest, deadline: float, idempotent: bool,
                 now: float) -> None:
        self.client_id = client_id
        self.request_id = req.request_id
        self.service = req.service
        self.method = req.method
        self.headers = req.headers
        self.body = req.body
        self.deadline = deadline
        self.expires = deadline
        self.idempotent = idempotent
        self.attempt = int(req.headers.get(H_ATTEMPT, 0) or 0)
        self.arrived = now
        self.state = QUEUED
        self.worker: WorkerState | None = None
        self.sent_at = 0.0
        self.answered = False
        self.probes: set[bytes] = set()

    @property
    def key(self) -> tuple[bytes, int]:
        return (self.client_id, self.request_id)


class WorkerState:
    """What the broker knows of one worker; exposes the counters strategies read."""

    __slots__ = (
        "id", "name", "services", "capacity", "weight", "outstanding", "ewma", "calls",
        "leaving", "joined", "served", "errors", "info", "ejected",
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
        self.calls: dict[tuple[bytes, int], Call] = {}
        self.leaving = False
        self.served = 0
        self.errors = 0
        self.ejected = False  # an outlier kept out of dispatch for a while


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, float("inf"))
"""Upper bounds (seconds) of the per-service latency histogram (Prometheus-style buckets)."""


class ServiceState:
    __slots__ = ("name", "workers", "queue", "queued", "methods", "strategy", "empty_since",
                 "calls", "errors", "buckets", "max_workers")

    def __init__(self, name: str, strategy: Strategy, now: float) -> None:
        self.name = name
        self.workers: list[WorkerState] = []
        self.queue: deque[Call] = deque()
        self.queued = 0  # live entries in queue (expired ones are removed lazily)
        self.methods: dict[str, bool] = {}
        self.strategy = strategy
        self.empty_since = now
        self.calls = 0  # replies from workers
        self.errors = 0  # of which not OK
        self.buckets = [0] * len(LATENCY_BUCKETS)  # latency histogram (not cumulative)
        self.max_workers = 0  # most workers seen at once: redundancy is judged against it


class Dispatcher:
    """Least-outstanding (or another strategy) dispatch with bounded queues and deadlines.

    Rules (DESIGN.md §4): a call goes to a worker with spare capacity, else waits in its
    service's bounded queue until its deadline; a full queue answers Overloaded at once; a
    service with no worker answers ServiceUnavailable after `service_grace` seconds (time for
    workers to register after a broker start or a worker restart). When a worker is lost, its
    idempotent calls are retried elsewhere (same request id, attempt + 1, within the deadline
    and a broker-wide retry budget); non-idempotent ones are answered CallStateUnknown.
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
    ) -> None:
        make_strategy(strategy)  # validate early
        self._clock = clock
        self._strategy_name = strategy
        self._queue_limit = queue_limit
        self._queue_bytes_limit = queue_bytes
        self._queued_bytes = 0  # bodies waiting in all queues: memory is bounded, not just count
        self._grace = service_grace
        self._default_budget = int(default_timeout * 1000)
        self._max_attempts = max_attempts
        self._retry_ratio = retry_ratio
        self._retry_max = retry_tokens
        self._retry_tokens = retry_tokens
        self._alpha = ewma_alpha
        self._started = clock()
        self._services: dict[str, ServiceState] = {}
        self._workers: dict[bytes, WorkerState] = {}
        self._calls: dict[tuple[bytes, int], Call] = {}
        self._per_client: dict[bytes, int] = {}  # calls held per client
        self._client_limit = max_inflight_per_client
        self._timers: list[tuple[float, int, Call]] = []
        self._seq = itertools.count()
        self._recent: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self._recent_limit = recent_limit
        self.counters: dict[str, int] = dict.fromkeys(
            ("requests", "replies", "duplicates", "late_replies", "orphan_replies", "retries",
             "overloaded", "timeouts", "unavailable", "state_unknown", "method_not_found",
             "probes"), 0)

    # --- the three verbs -----------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        t = type(event)
        if t is RequestArrived:
            return self._on_request(event.client_id, event.request)  # type: ignore[union-attr]
        if t is ReplyArrived:
            return self._on_reply(event.worker_id, event.reply)  # type: ignore[union-attr]
        if t is WorkerReady:
            return self._on_ready(event.worker_id, event.ready)  # type: ignore[union-attr]
        if t is WorkerLeaving:
            return self._on_leaving(event.worker_id)
        if t is WorkerLost:
            return self._on_lost(event.worker_id, event.reason)  # type: ignore[union-attr]
        raise TypeError(f"unknown event {event!r}")

    def tick(self) -> list[Action]:
        """Expires queued calls whose deadline (or service grace) has passed."""
        now = self._clock()
        out: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, call = heapq.heappop(timers)
            if call.state == PROBING:
                call.state = DONE
                self._drop(call.key)
                self.counters["timeouts"] += 1
                out.append(self._answer(call, Status.TIMEOUT, "deadline passed while asking the "
                                        "workers whether this re-sent call already ran"))
                continue
            if call.state != QUEUED:
                continue
            svc = self._services[call.service]
            svc.queued -= 1
            self._queued_bytes -= len(call.body)
            call.state = DONE
            self._drop(call.key)
            if svc.workers or now >= call.deadline:
                self.counters["timeouts"] += 1
                out.append(self._answer(call, Status.TIMEOUT, "deadline passed while queued"))
            else:
                self.counters["unavailable"] += 1
                out.append(self._answer(call, Status.SERVICE_UNAVAILABLE,
                                        f"no worker serves {call.service!r}"))
        return out

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].state not in (QUEUED, PROBING):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    # --- read-only views -----------------------------------------------------------------

    @property
    def workers(self) -> dict[bytes, WorkerState]:
        return dict(self._workers)

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
                "queued_bytes": self._queued_bytes}

    def services_map(self) -> dict[str, dict[str, bool]]:
        return {s.name: dict(s.methods) for s in self._services.values() if s.workers}

    # --- events --------------------------------------------------------------------------

    def _service(self, name: str, now: float) -> ServiceState:
        svc = self._services.get(name)
        if svc is None:
            svc = self._services[name] = ServiceState(name, make_strategy(self._strategy_name), now)
        return svc

    def _on_request(self, client_id: bytes, req: ClientRequest) -> list[Action]:
        now = self._clock()
        key = (client_id, req.request_id)
        if key in self._calls:  # a client re-sent a call we still hold: one copy is enough
            self.counters["duplicates"] += 1
            return []
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
        idem = req.headers.get(H_IDEMPOTENT)
        if idem is None:
            idem = svc.methods.get(req.method, False) if svc else False
        call = Call(client_id, req, deadline_from_budget(budget, now), idem, now)
        if svc is None or not svc.workers:
            if not self._in_grace(svc, now):
                self.counters["unavailable"] += 1
                return [self._answer(call, Status.SERVICE_UNAVAILABLE,
                                     f"no worker serves {req.service!r}")]
            svc = self._service(req.service, now)
            grace_end = max(self._started, svc.empty_since) + self._grace
            return self._enqueue(svc, call, min(call.deadline, grace_end))
        if req.method not in svc.methods:
            self.counters["method_not_found"] += 1
            return [self._answer(call, Status.METHOD_NOT_FOUND,
                                 f"service {req.service!r} has no method {req.method!r}")]
        if key in self._recent and not idem:
            # answered here already; running it again could charge twice
            self.counters["duplicates"] += 1
            return [self._answer(call, Status.CALL_STATE_UNKNOWN,
                                 "this call was already answered; its reply may have been lost")]
        if req.headers.get(H_RESENT) and not idem:
            return self._probe(svc, call)
        worker = self._pick(svc)
        if worker is not None:
            return [self._send(call, worker, now)]
        return self._enqueue(svc, call, call.deadline)

    def _probe(self, svc: ServiceState, call: Call) -> list[Action]:
        """A re-sent non-idempotent call may already have run on some worker (dispatched by a
        broker that is gone): ask every worker's reply cache before running it anywhere."""
        self.counters["probes"] += 1
        call.state = PROBING
        call.probes = {w.id for w in svc.workers}
        self._hold(call)
        heapq.heappush(self._timers, (call.deadline, next(self._seq), call))
        now = self._clock()
        headers = dict(call.headers)
        headers[H_BUDGET] = budget_ms(call.deadline, now)
        headers[H_IDEMPOTENT] = False
        headers[H_PROBE] = True
        msg = WorkerRequest(call.client_id, call.request_id, call.service, call.method, headers, call.body)
        return [SendToWorker(w.id, msg) for w in svc.workers]

    def _probe_answered(self, worker_id: bytes, call: Call, reply: WorkerReply) -> list[Action]:
        now = self._clock()
        if reply.status != Status.NOT_SEEN:  # it ran (or runs) there: that is the answer
            call.state = DONE
            self._drop(call.key)
            call.answered = True
            self._remember(call.key)
            self.counters["replies"] += 1
            return [ReplyToClient(call.client_id, call.request_id, reply.status, reply.body)]
        call.probes.discard(worker_id)
        if call.probes:
            return []
        return self._dispatch_probed(call, now)

    def _dispatch_probed(self, call: Call, now: float) -> list[Action]:
        """No worker has seen it: it never ran, so running it once is safe."""
        call.state = QUEUED
        self._drop(call.key)
        svc = self._services.get(call.service)
        if svc is not None and svc.workers:
            worker = self._pick(svc)
            if worker is not None:
                return [self._send(call, worker, now)]
            return self._enqueue(svc, call, call.deadline)
        self.counters["unavailable"] += 1
        call.state = DONE
        return [self._answer(call, Status.SERVICE_UNAVAILABLE, f"no worker serves {call.service!r}")]

    def _in_grace(self, svc: ServiceState | None, now: float) -> bool:
        since = self._started if svc is None else max(self._started, svc.empty_since)
        return now < since + self._grace

    def _enqueue(self, svc: ServiceState, call: Call, expires: float, front: bool = False
                 ) -> list[Action]:
        if svc.queued >= self._queue_limit and not front:
            self.counters["overloaded"] += 1
            return [self._answer(call, Status.OVERLOADED,
                                 f"queue of {svc.name!r} is full ({self._queue_limit} calls)")]
        if self._queued_bytes + len(call.body) > self._queue_bytes_limit and not front:
            self.counters["overloaded"] += 1
            return [self._answer(call, Status.OVERLOADED,
                                 f"queued calls hold {self._queued_bytes} bytes, the limit")]
        self._queued_bytes += len(call.body)
        call.state = QUEUED
        call.expires = expires
        call.worker = None
        self._hold(call)
        if front:
            svc.queue.appendleft(call)
        else:
            svc.queue.append(call)
        svc.queued += 1
        heapq.heappush(self._timers, (expires, next(self._seq), call))
        return []

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
        key = call.key
        self._hold(call)
        worker.calls[key] = call
        worker.outstanding += 1
        headers = dict(call.headers)
        headers[H_BUDGET] = budget_ms(call.deadline, now)
        headers[H_IDEMPOTENT] = call.idempotent
        headers[H_ATTEMPT] = call.attempt
        return SendToWorker(worker.id, WorkerRequest(call.client_id, call.request_id, call.service,
                                                     call.method, headers, call.body))

    def _answer(self, call: Call, status: int, message: str) -> ReplyToClient:
        call.answered = True
        self._remember(call.key)
        return ReplyToClient(call.client_id, call.request_id, status,
                             pack_error(Status(status).name.title().replace("_", ""), message))

    def _hold(self, call: Call) -> None:
        key = call.key
        if key not in self._calls:
            self._per_client[call.client_id] = self._per_client.get(call.client_id, 0) + 1
        self._calls[key] = call

    def _drop(self, key: tuple[bytes, int]) -> None:
        if self._calls.pop(key, None) is not None:
            n = self._per_client[key[0]] - 1
            if n:
                self._per_client[key[0]] = n
            else:
                del self._per_client[key[0]]

    def _remember(self, key: tuple[bytes, int]) -> None:
        recent = self._recent
        recent[key] = None
        if len(recent) > self._recent_limit:
            recent.popitem(last=False)

    def _on_reply(self, worker_id: bytes, reply: WorkerReply) -> list[Action]:
        now = self._clock()
        key = (reply.client_id, reply.request_id)
        worker = self._workers.get(worker_id)
        call = worker.calls.pop(key, None) if worker is not None else None
        if call is None:
            held = self._calls.get(key)
            if held is not None and held.state == PROBING:
                return self._probe_answered(worker_id, held, reply)
            if reply.status == Status.NOT_SEEN:
                return []  # a probe answered after the question was settled
        out: list[Action] = []
        if call is not None:
            worker.outstanding -= 1  # type: ignore[union-attr]
            lat = now - call.sent_at
            worker.ewma = lat if worker.ewma == 0.0 else worker.ewma + self._alpha * (lat - worker.ewma)  # type: ignore[union-attr]
            worker.served += 1  # type: ignore[union-attr]
            svc = self._services.get(call.service)
            if svc is not None:
                svc.calls += 1
                svc.buckets[bisect_left(LATENCY_BUCKETS, lat)] += 1
            if reply.status != Status.OK:
                worker.errors += 1  # type: ignore[union-attr]
                if svc is not None:
                    svc.errors += 1
            if self._calls.get(key) is call:
                self._drop(key)
            call.state = DONE
            if not call.answered:
                call.answered = True
                self.counters["replies"] += 1
                self._remember(key)
                out.append(ReplyToClient(reply.client_id, reply.request_id, reply.status, reply.body))
            else:
                self.counters["late_replies"] += 1
            if worker.leaving and worker.outstanding == 0:  # type: ignore[union-attr]
                self._remove(worker, now)  # type: ignore[arg-type]
            else:
                out.extend(self._drain(worker, now))  # type: ignore[arg-type]
        elif key in self._recent or key in self._calls:
            # a reply for a call already answered, or now held by another worker
            self.counters["late_replies"] += 1
        else:
            # a call this broker never saw (it restarted, or its peer took the call): the
            # reply is still the right answer, so pass it on; the client drops duplicates.
            self.counters["orphan_replies"] += 1
            self._remember(key)
            out.append(ReplyToClient(reply.client_id, reply.request_id, reply.status, reply.body))
        return out

    def _drain(self, worker: WorkerState, now: float) -> list[Action]:
        """Fills a worker's free slots from the queues of its services, oldest call first."""
        out: list[Action] = []
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
            best.queued -= 1
            self._queued_bytes -= len(call.body)
            if call.method not in best.methods:
                self.counters["method_not_found"] += 1
                call.state = DONE
                self._drop(call.key)
                out.append(self._answer(call, Status.METHOD_NOT_FOUND,
                                        f"service {best.name!r} has no method {call.method!r}"))
                continue
            out.append(self._send(call, worker, now))
        return out

    def _on_ready(self, worker_id: bytes, ready: Ready) -> list[Action]:
        now = self._clock()
        out: list[Action] = []
        worker = self._workers.get(worker_id)
        if worker is None:
            worker = self._workers[worker_id] = WorkerState(worker_id, ready, now)
            out.append(Notice("worker_joined", ready.worker_id,
                              {"services": sorted(ready.services), "capacity": ready.capacity}))
        else:  # re-announced (reconnect, new settings): keep its in-flight calls
            for name in worker.services:
                svc = self._services.get(name)
                if svc is not None and worker in svc.workers:
                    svc.workers.remove(worker)
            worker.name, worker.services = ready.worker_id, tuple(ready.services)
            worker.capacity, worker.weight, worker.info = ready.capacity, ready.weight, ready.info
            worker.leaving = False
        for name, methods in ready.services.items():
            svc = self._service(name, now)
            svc.workers.append(worker)
            svc.methods.update(methods)
            svc.max_workers = max(svc.max_workers, len(svc.workers))
        out.extend(self._drain(worker, now))
        return out

    def _on_leaving(self, worker_id: bytes) -> list[Action]:
        worker = self._workers.get(worker_id)
        out: list[Action] = [AckLeave(worker_id)]
        if worker is None:
            return out
        worker.leaving = True
        out.append(Notice("worker_leaving", worker.name, {"outstanding": worker.outstanding}))
        if worker.outstanding == 0:
            self._remove(worker, self._clock())
        return out

    def _remove(self, worker: WorkerState, now: float) -> None:
        self._workers.pop(worker.id, None)
        for name in worker.services:
            svc = self._services.get(name)
            if svc is None or worker not in svc.workers:
                continue
            svc.workers.remove(worker)
            if not svc.workers:
                svc.empty_since = now
                svc.methods.clear()

    def _on_lost(self, worker_id: bytes, reason: str) -> list[Action]:
        worker = self._workers.get(worker_id)
        if worker is None:
            return []
        now = self._clock()
        self._remove(worker, now)
        out: list[Action] = [Notice("worker_lost", worker.name,
                                    {"reason": reason, "inflight": len(worker.calls),
                                     "services": sorted(worker.services)})]
        for held in [c for c in self._calls.values() if c.state == PROBING and worker_id in c.probes]:
            # the lost worker might be the one that ran it: its fate cannot be known
            held.state = DONE
            self._drop(held.key)
            self.counters["state_unknown"] += 1
            out.append(self._answer(held, Status.CALL_STATE_UNKNOWN,
                                    "a worker was lost before it said whether this call ran there"))
        calls = sorted(worker.calls.values(), key=lambda c: c.arrived)
        worker.calls.clear()
        worker.outstanding = 0
        for call in calls:
            call.worker = None
            if call.answered:
                self._drop(call.key)
                continue
            out.extend(self._retry(call, now))
        return out

    def _retry(self, call: Call, now: float) -> list[Action]:
        """A lost worker's call: retry it if that is safe and affordable, else say why not."""
        key = call.key
        if not call.idempotent:
            self.counters["state_unknown"] += 1
            self._drop(key)
            call.state = DONE
            return [self._answer(call, Status.CALL_STATE_UNKNOWN,
                                 f"worker running {call.service}.{call.method} was lost; "
                                 "the call is not idempotent, so it was not retried")]
        if call.attempt + 1 >= self._max_attempts or now >= call.deadline or self._retry_tokens < 1:
            why = ("deadline passed" if now >= call.deadline else
                   "retry budget exhausted" if self._retry_tokens < 1 else "too many attempts")
            self._drop(key)
            call.state = DONE
            self.counters["unavailable"] += 1
            return [self._answer(call, Status.SERVICE_UNAVAILABLE,
                                 f"worker lost and the call was not retried: {why}")]
        self._retry_tokens -= 1
        self.counters["retries"] += 1
        call.attempt += 1
        svc = self._services.get(call.service)
        notice = Notice("call_retried", call.service,
                        {"method": call.method, "attempt": call.attempt})
        if svc is not None and svc.workers:
            worker = self._pick(svc)
            if worker is not None:
                return [notice, self._send(call, worker, now)]
        svc = self._service(call.service, now)
        return [notice, *self._enqueue(svc, call, call.deadline, front=True)]

