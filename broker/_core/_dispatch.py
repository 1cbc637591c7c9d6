"""Dispatcher: matches calls to workers with spare capacity, queues, expires and retries them.

Sans-IO: fed with events and an injected clock, it returns actions for the loop to carry out.
It never decodes a call's body; it only holds it (for queueing and idempotent retries).
"""

# Theory of operation (DESIGN.md §4, docs/protocol.md §7-8)
# ==========================================================
#
# A call is what one client asked, under its key (client id, request id). While the broker
# holds it, it is in one CallState (broker/_core/_records.py):
#
#     arrival ──> INFLIGHT | QUEUED | PROBING | answered
#     QUEUED   ──> HELD (a slot freed) ──> INFLIGHT | PROBING | answered
#     QUEUED   ──> answered (deadline, grace over, deactivated)
#     PROBING  ──> INFLIGHT | QUEUED (no worker ran it) | answered
#     INFLIGHT ──> answered (reply, expiry) | HELD (worker lost) ──> INFLIGHT | QUEUED | answered
#
# "answered" is DONE: the call is out of every structure. Every rule below is enforced where
# the code says "rule N", and nowhere else.
#
# Rule 1: a held call is in exactly one place, as its state says: its service's queue
#   (QUEUED), the probing list (PROBING) or one worker's calls (INFLIGHT); and in `_calls`
#   under its key, counted against its client. HELD lasts one step, inside one event.
#
# Rule 2: one copy per key. A request for a key the broker holds is a duplicate and is
#   dropped: the held copy will be answered.
#
# Rule 3: some requests are turned away before they are held: any while this broker is not
#   active (NotActive), one from a client holding `max_inflight_per_client` calls
#   (Overloaded), one whose budget is spent (Timeout).
#
# Rule 4: idempotency is what the workers announced in READY. A method any worker of the
#   service called non-idempotent stays so until the service has no worker; a method not
#   (yet) known is non-idempotent. A client may lower it (`idempotent: false`), never raise
#   it. A queued call's idempotency is decided again when it starts.
#
# Rule 5: a call goes to a worker of its service with a free slot (outstanding < capacity)
#   that is not leaving; an ejected worker only when no other one can take it. The strategy
#   chooses among those. The worker is sent the remaining budget, the idempotency decided
#   here and the attempt number; a client's `probe` header is dropped (only the broker
#   probes).
#
# Rule 6: with no free slot the call waits in its service's queue, bounded in calls
#   (`queue_limit` per service) and in bytes (`queue_bytes` over all queues); past either
#   bound it is answered Overloaded at once. A retried call goes to the front, over the
#   bounds (it was held already). A freed slot takes the oldest queued call among the
#   worker's services.
#
# Rule 7: every held call has exactly one live timer. A queued or probing call is answered
#   Timeout at its deadline. A call still in flight `inflight_grace` after its deadline (its
#   reply was lost) is answered Timeout if idempotent, CallStateUnknown if not, and its
#   slot is freed.
#
# Rule 8: a service no worker serves (none registered, or all leaving) keeps its calls until
#   `service_grace` after the broker started or after the service lost its last serving
#   worker, then answers ServiceUnavailable (CallStateUnknown for a re-sent non-idempotent
#   call: it may have run through the broker the client lost). Once the grace is over, a call
#   for it is answered at once.
#
# Rule 9: a call for a method its serving service does not have is answered MethodNotFound,
#   on arrival or when it leaves the queue.
#
# Rule 10: a lost worker's idempotent calls are retried elsewhere (same request id, attempt
#   + 1), oldest first, while attempt + 1 < `max_attempts`, before the deadline, and while
#   the broker-wide retry budget has a token (each accepted request adds `retry_ratio`, up to
#   `retry_tokens`); otherwise ServiceUnavailable. Its non-idempotent calls are answered
#   CallStateUnknown: they may have run. Nothing else is ever retried.
#
# Rule 11: at most once. A non-idempotent call this broker already sent to run, or one that
#   was re-sent (it may have run elsewhere), is never run again once answered: a request for
#   it is answered CallStateUnknown, unless it is re-sent again and never ran here (then it
#   is probed, rule 12). What is known of answered calls (ran here, was re-sent, workers
#   given it) is remembered for the last `recent_limit` calls.
#
# Rule 12: a re-sent (`resent: true`) non-idempotent call may have run through a broker that
#   is gone. It is probed at every serving worker of its service (an empty body: a worker
#   answers from its reply cache). The first answer other than NOT_SEEN decides it. It runs
#   (once) only when every asked worker said NOT_SEEN and the view was complete: the broker
#   was up, and no worker of the service joined, was lost or started leaving, for
#   `probe_horizon` before the probe began, and none joined during it (one that does is
#   probed too). Otherwise it is answered CallStateUnknown, as it is when an asked worker
#   goes before it answers. A cluster member (`run_unseen=False`) never runs it on NOT_SEEN
#   alone: every member serves, so the member the client left may be up and still hold the
#   call in its queue, to start it later; the answer is CallStateUnknown.
#
# Rule 13: while deactivated (Binary Star left ACTIVE) nothing new starts here: queued and
#   probing calls, new requests and a lost worker's idempotent calls are answered NotActive
#   (the client sends them to the peer); queues are not drained; in-flight calls complete
#   and reach their clients.
#
# Rule 14: a leaving worker (DISCONNECT) is acknowledged, gets no new call, completes the
#   ones it has, and is removed once it has none. A worker that left or was refused is not
#   asked to register again for `left_memory`.
#
# Rule 15: a worker may answer only the calls it was given (to run or to probe). An answer
#   from a worker the call moved away from is dropped (`late_replies`); any other is dropped
#   and counted (`foreign_replies`, and `orphan_replies` for a call never seen here). A
#   status the protocol does not define, or NOT_SEEN to a call it ran, reaches the client
#   as ProtocolError.
#
# Rule 16: a held call ends in one place, `_settle`: out of every structure, counted once,
#   remembered (rule 11), answered exactly once.
#
# Rule 17: a worker that announces READY again keeps its calls in flight; a service it no
#   longer lists has lost it, one it newly lists has gained it (rules 8, 12).
#
# Rule 18: memory is bounded. A READY that would make the broker hold more than
#   `max_services` services is refused; a service with no worker and nothing queued is
#   forgotten after its grace; per-client calls, queues (calls and bytes), remembered answers,
#   departed workers, dead timer entries and dead queue entries are all bounded.
#
# Rule 19: an elected broker (`--elect`) stamps its epoch (`epoch`, set by BrokerCore) on every
#   call and probe it sends; a client's `epoch` header is never forwarded. A worker that has
#   seen a newer epoch answers NOT_ACTIVE without running the call: it is passed to the client
#   (which sends it to the active broker) and counted `not_active_calls`, not as a worker's
#   error or latency.
#
# Rule 20: a hedged call (`hedge_after_ms`) that is idempotent and has had no reply
#   `hedge_after` after its latest copy went out gets another copy (same request id, attempt
#   + 1) at a worker with a free slot that does not run it already, while it has run fewer
#   than `max_attempts` copies in all (2 unless the client says, at most 5), before its
#   deadline, while this broker is active and the retry budget has a token (rule 10: a copy
#   costs one). Without a token or such a worker it tries again later, waiting twice as long
#   each time (from `hedge_after`, and never less than HEDGE_FLOOR: a client asking for 1 ms
#   must not make the broker wake a thousand times a second per call). A call
#   that is not idempotent (rule 4, decided again each time) is never hedged: the header is
#   ignored (`hedges_ignored`). A call asking for redundancy too is redundant, not hedged.
#
# Rule 21: a call may run on several workers at once (rules 20, 22), INFLIGHT on each (rule
#   1: `worker`, then `others`). The first reply answers it (rule 16): every copy's slot is
#   freed at once, and the others are cancelled at the broker: their replies are dropped
#   (`cancelled_replies`) or compared (rule 22) when they come. A lost worker's copy is
#   dropped while another copy runs; the last copy of a call is retried as rule 10 says. What
#   is awaited of cancelled copies is kept until the call's deadline plus `inflight_grace`,
#   for the last `recent_limit` calls.
#
# Rule 22: a redundant call (`redundant: k`) runs at once on k different workers with a free
#   slot, each copy past the first costing a retry token; with fewer workers or tokens, on as
#   many as there are (`redundant_short`). The first reply goes to the client; each later one
#   is compared with it, when both are OK or ERROR (other statuses say a copy did not run the
#   call): a different status, or OK with another body, is a Notice("result_mismatch")
#   naming both workers. A redundant call that is not idempotent is answered ProtocolError
#   and never runs; so is a malformed `hedge_after_ms`, `max_attempts` or `redundant`
#   header (`copies_refused`).

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Union

from zrpc import _defaults as D
from zrpc._core._calls import H_HEDGE_MAX, HEDGE_COPIES, MAX_COPIES
from zrpc._core._clock import Clock, budget_ms, deadline_from_budget
from zrpc._core._frames import (
    H_ATTEMPT,
    H_BUDGET,
    H_EPOCH,
    H_HEDGE,
    H_IDEMPOTENT,
    H_PROBE,
    H_REDUNDANT,
    H_RESENT,
    MAX_BUDGET_MS,
    NO_WORKER,
    ClientRequest,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
)
from zrpc._core._serial import pack_error
from zrpc.broker._core._lb import make_strategy
from zrpc.broker._core._records import (
    DONE,
    HELD,
    INFLIGHT,
    PROBING,
    QUEUED,
    RAN_HERE,
    WAS_RESENT,
    Call,
    CallState,
    Copies,
    CopyPlan,
    Key,
    ServiceState,
    WorkerState,
    serving,
)
from zrpc.broker._core._stats import LATENCY_BUCKETS, new_counters, record_reply, snapshot

__all__ = [
    "LATENCY_BUCKETS",
    "AckLeave",
    "Action",
    "Activated",
    "Call",
    "CallState",
    "Deactivated",
    "Dispatcher",
    "Event",
    "Notice",
    "ReplyArrived",
    "ReplyToClient",
    "RequestArrived",
    "SendToWorker",
    "ServiceState",
    "WorkerLeaving",
    "WorkerLost",
    "WorkerReady",
    "WorkerState",
]

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
    worker_refused, result_mismatch...)."""

    name: str
    subject: str
    detail: dict[str, Any] = field(default_factory=dict)


Action = Union[SendToWorker, ReplyToClient, AckLeave, Notice]  # noqa: UP007

HEDGE_FLOOR = 0.01
"""Seconds between two looks at a hedged call, at least (rule 20)."""
HEDGE_BACKOFF_MAX = 6
"""A hedge that keeps finding no token or worker waits up to 2**6 times its interval."""

_ANSWERS = frozenset(int(s) for s in Status) - {int(Status.NOT_SEEN)}
"""Statuses a worker may answer a call with (NOT_SEEN answers probes only)."""

_RESULTS = frozenset({int(Status.OK), int(Status.ERROR)})
"""Rule 22: the statuses of a handler's outcome, the ones compared between copies."""


def _digest(status: int, body: bytes) -> bytes:
    """Rule 22: what is compared of a reply: an OK body's hash (never decoded, rule 1 of
    docs/protocol.md §7); an ERROR's status alone (its message and traceback may name the
    worker's own paths and objects)."""
    return hashlib.blake2b(body, digest_size=16).digest() if status == Status.OK else b""


def _error(status: int, why: str) -> bytes:
    """The error body of a status the broker answers itself (CALL_STATE_UNKNOWN ->
    CallStateUnknown: the name the client's exception has)."""
    return pack_error(Status(status).name.title().replace("_", ""), why)


class Dispatcher:
    """Least-outstanding (or another strategy) dispatch with bounded queues and deadlines.

    It follows the rules at the top of this module. `handle(event)` and `tick()` return the
    actions for the loop; `next_deadline()` says when `tick()` has work.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        strategy: str = "least-outstanding",
        queue_limit: int = D.QUEUE_LIMIT,
        queue_bytes: int = D.QUEUE_BYTES,
        service_grace: float = D.SERVICE_GRACE,
        default_timeout: float = D.CALL_TIMEOUT,
        max_attempts: int = 3,
        retry_ratio: float = 0.2,
        retry_tokens: float = 50.0,
        ewma_alpha: float = 0.2,
        recent_limit: int = 100_000,
        max_inflight_per_client: int = D.MAX_INFLIGHT_PER_CLIENT,
        probe_horizon: float | None = None,
        inflight_grace: float = 2.0,
        max_services: int = 10_000,
        left_memory: float = 60.0,
        left_limit: int = 10_000,
        run_unseen: bool = True,
    ) -> None:
        make_strategy(strategy)  # validate early
        self._run_unseen = run_unseen  # rule 12
        self._clock = clock
        self._strategy_name = strategy
        self._queue_limit = queue_limit
        self._queue_bytes_limit = queue_bytes
        self._queued_bytes = 0  # bodies waiting in all queues: memory is bounded, not just count
        self._grace = service_grace
        self._default_budget = int(default_timeout * 1000)
        # rule 12: the longest a call may live (its budget; a client's default is
        # CALL_TIMEOUT) bounds how long ago it can have been dispatched through another
        # broker: the view must be stable for that long
        self._horizon = (max(default_timeout, D.CALL_TIMEOUT) if probe_horizon is None
                         else probe_horizon)
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
        self._calls: dict[Key, Call] = {}  # rule 1: every held call
        self._probing: dict[Key, Call] = {}
        self._per_client: dict[bytes, int] = {}  # calls held per client
        self._client_limit = max_inflight_per_client
        self._timers: list[tuple[float, int, Call]] = []  # (when, seq, call); seq == call.timer is live
        self._seq = itertools.count()
        # rule 11: answered calls: (RAN_HERE | WAS_RESENT, workers given it), or None for a
        # call no worker was given and no client re-sent
        self._recent: OrderedDict[Key, tuple[int, tuple[bytes, ...]] | None] = OrderedDict()
        self._recent_limit = recent_limit
        # rule 21: answered calls' copies still running, by key, oldest first
        self._copies_out: OrderedDict[Key, Copies] = OrderedDict()
        self._left: OrderedDict[bytes, float] = OrderedDict()  # workers gone on purpose, when
        self._left_memory = left_memory
        self._left_limit = left_limit
        self.counters: dict[str, int] = new_counters()
        self.epoch: int | None = None
        """Rule 19: the epoch stamped on calls and probes (None: none, as for Binary Star)."""

    def __repr__(self) -> str:
        """`<Dispatcher ACTIVE workers=3 inflight=5 queued=2>`: calls running at workers and
        waiting in queues (`probing=N` follows while re-sent calls are being probed)."""
        running = sum(w.outstanding for w in self._workers.values())
        queued = sum(s.queued for s in self._services.values())
        probing = f" probing={len(self._probing)}" if self._probing else ""
        return (f"<Dispatcher {'ACTIVE' if self._active else 'INACTIVE'} "
                f"workers={len(self._workers)} inflight={running} queued={queued}{probing}>")

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
            state = call.state
            if state is QUEUED:
                out.extend(self._queued_due(call, now))
            elif state is PROBING:  # rule 7
                out.append(self._settle(call, Status.TIMEOUT, "timeouts", why=(
                    "deadline passed while asking the workers whether this re-sent call "
                    "already ran")))
            elif state is INFLIGHT:
                out.extend(self._inflight_due(call, now))
        self._forget_services(now)
        copies = self._copies_out
        while copies and next(iter(copies.values())).expires <= now:  # rule 21
            copies.popitem(last=False)
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
        or be refused, again (rule 14)."""
        if worker_id in self._workers:
            return False
        t = self._left.get(worker_id)
        return t is None or self._clock() - t >= self._left_memory

    def snapshot(self) -> dict[str, Any]:
        """Plain data for `zrpc.status` and metrics."""
        return snapshot(self._services.values(), self._workers.values(), self.counters,
                        lb=self._strategy_name, inflight=len(self._calls),
                        queued_bytes=self._queued_bytes, active=self._active)

    def services_map(self) -> dict[str, dict[str, bool]]:
        return {s.name: dict(s.methods) for s in self._services.values() if s.workers}

    # --- requests ------------------------------------------------------------------------

    def _on_request(self, client_id: bytes, req: ClientRequest) -> list[Action]:
        now = self._clock()
        key = (client_id, req.request_id)
        if key in self._calls:  # rule 2: a client re-sent a call we still hold
            self.counters["duplicates"] += 1
            return []
        if req.headers.get(H_RESENT):  # rule 11: answered before it is held, it may have run
            self._remember_key(key, WAS_RESENT, ())
        if not self._active:  # rules 3, 13
            return [self._refuse(client_id, req.request_id, Status.NOT_ACTIVE, "not_active_calls",
                                 "this broker is not active: send the call to its peer")]
        if self._per_client.get(client_id, 0) >= self._client_limit:  # rule 3
            return [self._refuse(client_id, req.request_id, Status.OVERLOADED, "overloaded",
                                 f"this client already has {self._client_limit} calls in flight")]
        self.counters["requests"] += 1
        self._retry_tokens = min(self._retry_max, self._retry_tokens + self._retry_ratio)  # rule 10
        budget = req.headers.get(H_BUDGET)
        if budget is None:
            budget = self._default_budget
        if budget <= 0:  # rule 3
            return [self._refuse(client_id, req.request_id, Status.TIMEOUT, "timeouts",
                                 "deadline passed before dispatch")]
        svc = self._services.get(req.service)
        call = Call(client_id, req, deadline_from_budget(budget, now), now)
        headers = req.headers
        if H_HEDGE in headers or H_REDUNDANT in headers:  # rules 20, 22
            bad = self._read_copies(call, headers)
            if bad:
                return [self._settle(call, Status.PROTOCOL_ERROR, "copies_refused", why=bad)]
        # rule 4 (as `_idempotent`, inline: this is the hot path)
        call.idempotent = idem = call.client_idem and svc is not None and svc.methods.get(req.method, False)
        if not idem and self._may_have_run(key, call.resent):  # rule 11
            return [self._settle(call, Status.CALL_STATE_UNKNOWN, "duplicates", why=(
                "this call was already answered; its reply may have been lost"))]
        if svc is None or not serving(svc):  # rule 8
            if not self._in_grace(svc, now):
                return [self._unavailable(call)]
            if svc is None:
                if len(self._services) >= self._max_services:  # rule 18
                    return [self._settle(call, Status.SERVICE_UNAVAILABLE, "unavailable",
                                         why=f"{NO_WORKER} {req.service!r}")]
                svc = self._new_service(req.service, -math.inf, now)
            return self._enqueue(svc, call)
        if req.method not in svc.methods:  # rule 9
            return [self._settle(call, Status.METHOD_NOT_FOUND, "method_not_found",
                                 why=f"service {req.service!r} has no method {req.method!r}")]
        plan = call.plan
        if plan is not None:
            refused = self._copies_decided(call, plan)  # rules 20, 22
            if refused is not None:
                return [refused]
        if call.resent and not idem:  # rule 12
            return self._probe(svc, call, now)
        worker = self._pick(svc)
        if worker is not None:
            if plan is not None and plan.redundant > 1:
                return self._fan_out(svc, call, plan, worker, now)  # rule 22
            return [self._send(call, worker, now)]
        return self._enqueue(svc, call)

    def _read_copies(self, call: Call, headers: dict[str, Any]) -> str:
        """Rules 20, 22: the client's hedging or redundancy, or why its header is malformed
        ("" when it is not)."""
        r = headers.get(H_REDUNDANT)
        if r is not None and (type(r) is not int or not 1 <= r <= MAX_COPIES):
            return f"header {H_REDUNDANT} must be an integer from 1 to {MAX_COPIES}"
        h = headers.get(H_HEDGE)
        if h is not None and (type(h) is not int or not 0 < h <= MAX_BUDGET_MS):
            return f"header {H_HEDGE} must be an integer from 1 to {MAX_BUDGET_MS} (ms)"
        m = headers.get(H_HEDGE_MAX) if h is not None else None
        if m is not None and (type(m) is not int or not 1 <= m <= MAX_COPIES):
            return f"header {H_HEDGE_MAX} must be an integer from 1 to {MAX_COPIES}"
        if r is not None and r > 1:  # rule 20: redundant and hedged is redundant
            call.plan = CopyPlan(0.0, r, r)
        elif h is not None:
            call.plan = CopyPlan(h / 1000, HEDGE_COPIES if m is None else m, 1)
        return ""

    def _copies_decided(self, call: Call, plan: CopyPlan) -> ReplyToClient | None:
        """Rules 20, 22, once its idempotency is decided (rule 4): a redundant call must be
        idempotent (else it is answered); a hedged one is hedged only if it is."""
        if call.idempotent:
            return None
        if plan.redundant > 1:
            return self._settle(call, Status.PROTOCOL_ERROR, "copies_refused", why=(
                f"{call.service}.{call.method} is not idempotent: a redundant call runs on "
                "several workers, so it was not run"))
        call.plan = None
        self.counters["hedges_ignored"] += 1
        return None

    def _idempotent(self, svc: ServiceState | None, call: Call) -> bool:
        """Rule 4: the workers' word, lowered by the client's."""
        return call.client_idem and svc is not None and svc.methods.get(call.method, False)

    def _may_have_run(self, key: Key, resent: bool) -> bool:
        """Rule 11: was this call, answered already, run here or perhaps elsewhere? A call
        re-sent again that never ran here is probed again instead (a worker's cache may
        know)."""
        prev = self._recent.get(key)
        if prev is None:
            return False
        return bool(prev[0] & RAN_HERE or (prev[0] & WAS_RESENT and not resent))

    def _in_grace(self, svc: ServiceState | None, now: float) -> bool:
        """Rule 8: may a call for a service nobody serves still wait for a worker?"""
        if svc is None:
            return now < self._started + self._grace
        return now < self._grace_end(svc)

    def _grace_end(self, svc: ServiceState) -> float:
        return max(self._started, svc.empty_since) + self._grace

    def _new_service(self, name: str, empty_since: float, now: float, served: bool = False
                     ) -> ServiceState:
        svc = self._services[name] = ServiceState(
            name, make_strategy(self._strategy_name), empty_since, now)
        if not served:  # rule 18: forgotten then unless it is served
            self._forget.append((now + self._grace, name))
        return svc

    def _unavailable(self, call: Call) -> ReplyToClient:
        """Rule 8: no worker serves the service. A re-sent call that is not known to be
        idempotent may have run through the broker the client lost, so "no worker" would
        mislead: its fate is unknown."""
        if call.resent and not call.idempotent:
            return self._settle(call, Status.CALL_STATE_UNKNOWN, "state_unknown", why=(
                f"no worker serves {call.service!r} here to ask whether this re-sent call "
                "already ran"))
        return self._settle(call, Status.SERVICE_UNAVAILABLE, "unavailable",
                            why=f"{NO_WORKER} {call.service!r}")

    # --- probing re-sent calls (rule 12) -------------------------------------------------

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
        self._arm(call, call.deadline)  # rule 7
        msg = self._probe_message(call, now)
        return [SendToWorker(w, msg) for w in targets]

    def _probe_message(self, call: Call, now: float) -> WorkerRequest:
        headers = dict(call.headers)
        headers[H_BUDGET] = budget_ms(call.deadline, now)
        headers[H_IDEMPOTENT] = False
        headers[H_PROBE] = True
        self._stamp(headers)
        # no body: a worker answers from its reply cache, so a probe never copies arguments
        return WorkerRequest(call.client_id, call.request_id, call.service, call.method, headers, b"")

    def _stamp(self, headers: dict[str, Any]) -> None:
        """Rule 19: our epoch, never a client's."""
        if self.epoch is None:
            headers.pop(H_EPOCH, None)
        else:
            headers[H_EPOCH] = self.epoch

    def _probe_answered(self, worker_id: bytes, call: Call, reply: WorkerReply) -> list[Action]:
        call.probes.discard(worker_id)
        if reply.status != Status.NOT_SEEN:  # it ran (or runs) there: that is the answer
            call.ran = True
            status, body = self._checked_status(reply)
            return [self._settle(call, status, "replies", body=body)]
        if call.probes:
            return []
        if not call.view_ok:
            return [self._settle(call, Status.CALL_STATE_UNKNOWN, "state_unknown", why=(
                "cannot tell whether it already ran: a worker this broker did not ask may "
                "have run it (workers joined or were lost lately)"))]
        if not self._run_unseen:
            return [self._settle(call, Status.CALL_STATE_UNKNOWN, "state_unknown", why=(
                "no worker has run it, but the cluster member it was first sent to may still "
                "start it from its queue: it is not run here"))]
        return self._dispatch_probed(call, self._clock())

    def _dispatch_probed(self, call: Call, now: float) -> list[Action]:
        """No worker has seen it and every worker that could have was asked: it never ran, so
        running it once is safe."""
        del self._probing[call.key]
        call.probed = True
        svc = self._services.get(call.service)
        if svc is None or not serving(svc):  # rule 8
            return [self._settle(call, Status.SERVICE_UNAVAILABLE, "unavailable",
                                 why=f"{NO_WORKER} {call.service!r}")]
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
        """A worker of `svc` was lost or started leaving: the probe horizon starts again."""
        svc.changed_at = now
        for call in self._probing.values():
            if call.service == svc.name:
                call.view_ok = False

    # --- queues and timers ---------------------------------------------------------------

    def _enqueue(self, svc: ServiceState, call: Call, front: bool = False) -> list[Action]:
        if not front and svc.queued >= self._queue_limit:  # rule 6
            return [self._settle(call, Status.OVERLOADED, "overloaded",
                                 why=f"queue of {svc.name!r} is full ({self._queue_limit} calls)")]
        if not front and self._queued_bytes + len(call.body) > self._queue_bytes_limit:  # rule 6
            return [self._settle(call, Status.OVERLOADED, "overloaded",
                                 why=f"queued calls hold {self._queued_bytes} bytes, the limit")]
        if call.state is PROBING:  # rule 1: out of the probing list, into the queue
            self._probing.pop(call.key, None)
        self._queued_bytes += len(call.body)
        call.state = QUEUED
        call.worker = None
        self._hold(call)
        if front:  # rule 6: a retried call waited already
            svc.queue.appendleft(call)
        else:
            svc.queue.append(call)
        svc.queued += 1
        # rules 7, 8: it waits for its deadline, or for the grace's end if nobody serves
        self._arm(call, call.deadline if serving(svc) else min(call.deadline, self._grace_end(svc)))
        return []

    def _unqueue(self, call: Call) -> None:
        """Takes a QUEUED call out of the gauges; its queue entry is dropped lazily."""
        svc = self._services[call.service]
        svc.queued -= 1
        self._queued_bytes -= len(call.body)
        call.state = HELD
        if len(svc.queue) > 2 * svc.queued + 64:  # rule 18: answered entries piled up
            svc.queue = deque(c for c in svc.queue if c.state is QUEUED)

    def _queued_due(self, call: Call, now: float) -> list[Action]:
        svc = self._services[call.service]
        if now < call.deadline:
            if serving(svc):  # rule 8: queued in a grace, and a worker came: wait for the deadline
                self._arm(call, call.deadline)
                return []
            end = self._grace_end(svc)
            if now < end:
                self._arm(call, min(call.deadline, end))
                return []
            return [self._unavailable(call)]
        return [self._settle(call, Status.TIMEOUT, "timeouts",  # rule 7
                             why="deadline passed while queued")]

    def _inflight_due(self, call: Call, now: float) -> list[Action]:
        """Rule 7: its reply never came (too large for the socket, dropped on a full pipe,
        lost by the worker): the client has timed out already; free the slot, and say what is
        known. Before that, its timer is a hedge's (rule 20)."""
        if now < call.deadline + self._inflight_grace:
            return self._hedge_due(call, now)
        running = call.running()  # rule 21: every copy's slot
        self.counters["inflight_expired"] += 1
        if call.idempotent:
            out: list[Action] = [self._settle(call, Status.TIMEOUT, "timeouts",
                                              why="the worker did not reply by the deadline")]
        else:
            out = [self._settle(call, Status.CALL_STATE_UNKNOWN, "state_unknown",
                                why="the worker did not reply by the deadline; the call may have run")]
        for worker, _ in running:
            out.extend(self._slot_freed(worker, now))
        return out

    def _arm(self, call: Call, when: float) -> None:
        """Rule 7: gives `call` one live timer at `when`; older entries of it become dead."""
        seq = next(self._seq)
        call.expires = when
        call.timer = seq
        timers = self._timers
        heapq.heappush(timers, (when, seq, call))
        if len(timers) > 2 * len(self._calls) + 1024:  # rule 18: mostly dead entries
            timers[:] = [e for e in timers if e[2].timer == e[1]]
            heapq.heapify(timers)

    def _forget_services(self, now: float) -> None:
        """Rule 18: a service with no worker and no queued call is dropped after its grace."""
        forget = self._forget
        while forget and forget[0][0] <= now:
            _, name = forget.popleft()
            svc = self._services.get(name)
            if svc is not None and not svc.workers and svc.queued == 0 and now >= self._grace_end(svc):
                del self._services[name]

    # --- dispatch ------------------------------------------------------------------------

    def _pick(self, svc: ServiceState) -> WorkerState | None:
        """Rule 5: a worker with a free slot, not leaving, not ejected unless it must be."""
        ws = svc.workers
        if len(ws) == 1:
            w = ws[0]
            return w if w.outstanding < w.capacity and not w.leaving else None
        cands = [w for w in ws if w.outstanding < w.capacity and not w.leaving and not w.ejected]
        if not cands:  # ejected workers still serve rather than leave a call waiting
            cands = [w for w in ws if w.outstanding < w.capacity and not w.leaving]
        if not cands:
            return None
        chosen = svc.strategy.choose(cands)
        assert isinstance(chosen, WorkerState)  # one of `cands`: its Protocol says Candidate
        return chosen

    def _send(self, call: Call, worker: WorkerState, now: float) -> SendToWorker:
        call.state = INFLIGHT
        call.worker = worker
        call.sent_at = now
        call.ran = True  # rule 11: from now on it may have run here
        if not call.given:
            call.given = (worker.id,)
        elif worker.id not in call.given:
            call.given += (worker.id,)
        key = call.key
        self._hold(call)
        worker.calls[key] = call
        worker.outstanding += 1
        when = call.deadline + self._inflight_grace  # rule 7
        plan = call.plan
        if plan is not None:
            plan.sent += 1
            if plan.hedge_after:
                when = self._next_hedge(call, plan, now, when)  # rule 20
        self._arm(call, when)
        return SendToWorker(worker.id, self._run_message(call, now))

    def _run_message(self, call: Call, now: float) -> WorkerRequest:
        headers = dict(call.headers)  # rule 5: what the worker is told
        headers[H_BUDGET] = budget_ms(call.deadline, now)
        headers[H_IDEMPOTENT] = call.idempotent
        headers[H_ATTEMPT] = call.attempt
        headers.pop(H_PROBE, None)  # only the broker asks a probe; a client's is dropped
        self._stamp(headers)
        return WorkerRequest(call.client_id, call.request_id, call.service, call.method, headers,
                             call.body)

    # --- copies: hedged and redundant calls (rules 20-22) ---------------------------------

    def _send_copy(self, call: Call, plan: CopyPlan, worker: WorkerState, now: float
                   ) -> SendToWorker:
        """Rule 21: one more copy of an INFLIGHT call, at another worker (same request id,
        attempt + 1), paid with a retry token."""
        self._retry_tokens -= 1  # rules 20, 22: bounded by the retry budget
        call.attempt += 1
        plan.sent += 1
        call.others += ((worker, now),)
        if worker.id not in call.given:
            call.given += (worker.id,)
        worker.calls[call.key] = call
        worker.outstanding += 1
        return SendToWorker(worker.id, self._run_message(call, now))

    def _pick_other(self, svc: ServiceState, call: Call) -> WorkerState | None:
        """Rules 5, 20, 22: a worker with a free slot that does not run this call already."""
        if self._retry_tokens < 1:
            return None
        busy = [w for w, _ in call.running()]
        cands = [w for w in svc.workers
                 if w.outstanding < w.capacity and not w.leaving and w not in busy]
        if not cands:
            return None
        chosen = svc.strategy.choose([w for w in cands if not w.ejected] or cands)
        assert isinstance(chosen, WorkerState)  # one of `cands`
        return chosen

    def _fan_out(self, svc: ServiceState, call: Call, plan: CopyPlan, worker: WorkerState,
                 now: float) -> list[Action]:
        """Rule 22: the first copy to `worker`, the others to as many other workers as the
        call asks for, free slots and retry tokens allow."""
        out: list[Action] = [self._send(call, worker, now)]
        for _ in range(plan.redundant - 1):
            other = self._pick_other(svc, call)
            if other is None:
                self.counters["redundant_short"] += 1
                break
            self.counters["redundant_copies"] += 1
            out.append(self._send_copy(call, plan, other, now))
        return out

    def _next_hedge(self, call: Call, plan: CopyPlan, now: float, when: float) -> float:
        """Rule 20: when its next copy is due (none after the last allowed, or past the
        deadline); returns the call's timer, the earlier of that and `when`."""
        at = now + max(plan.hedge_after, HEDGE_FLOOR) * (1 << min(plan.skips, HEDGE_BACKOFF_MAX))
        if plan.sent < plan.max_copies and at < call.deadline and self._active:
            plan.hedge_at = at
            return min(at, when)
        plan.hedge_at = math.inf
        return when

    def _hedge_due(self, call: Call, now: float) -> list[Action]:
        """Rule 20: no reply `hedge_after` after its latest copy: one more, if it may."""
        out: list[Action] = []
        when = call.deadline + self._inflight_grace  # rule 7
        plan = call.plan
        if plan is None:  # no longer hedged: only the deadline is left
            self._arm(call, when)
            return out
        svc = self._services.get(call.service)
        if svc is None or not self._idempotent(svc, call):  # rule 4: decided again
            call.plan = None
            self.counters["hedges_ignored"] += 1
            self._arm(call, when)
            return out
        if self._active and now < call.deadline:  # rule 13
            worker = self._pick_other(svc, call)
            if worker is None:
                self.counters["hedges_skipped"] += 1
                plan.skips += 1
            else:
                plan.skips = 0
                self.counters["hedges"] += 1
                out.append(self._send_copy(call, plan, worker, now))
        self._arm(call, self._next_hedge(call, plan, now, when))
        return out

    def _drop_copy(self, call: Call, worker: WorkerState) -> None:
        """Rule 21: `worker` (lost) no longer runs `call`; another copy still does."""
        if call.worker is worker:
            (call.worker, call.sent_at), call.others = call.others[0], call.others[1:]
        else:
            call.others = tuple(o for o in call.others if o[0] is not worker)

    def _first_reply(self, worker: WorkerState, call: Call, reply: WorkerReply, now: float
                     ) -> list[Action]:
        """Rule 21: the first reply to a call running on several workers answers it; the
        other copies are cancelled here, their replies awaited only to be dropped or compared."""
        running = call.running()
        sent_at = next(t for w, t in running if w is worker)
        if reply.status == Status.NOT_ACTIVE:  # rule 19
            status, body, counter = int(Status.NOT_ACTIVE), reply.body, "not_active_calls"
        else:
            record_reply(worker, self._services.get(call.service), now - sent_at,
                         reply.status == Status.OK, self._alpha)
            status, body = self._checked_status(reply)
            counter = "replies"
        plan = call.plan
        redundant = plan is not None and plan.redundant > 1
        digest = _digest(reply.status, reply.body) if redundant and reply.status in _RESULTS else None
        pending = {w.id: (w.name, t) for w, t in running if w is not worker}
        self._remember_copies(call.key, Copies(call, worker.name, reply.status, digest, pending,
                                               call.deadline + self._inflight_grace))
        out: list[Action] = [self._settle(call, status, counter, body=body)]
        for w, _ in running:
            out.extend(self._slot_freed(w, now))
        return out

    def _remember_copies(self, key: Key, copies: Copies) -> None:
        """Rules 18, 21: bounded, the oldest forgotten first."""
        out = self._copies_out
        out.pop(key, None)
        out[key] = copies
        if len(out) > self._recent_limit:
            out.popitem(last=False)

    def _copy_replied(self, worker: WorkerState | None, worker_id: bytes, key: Key,
                      copies: Copies, reply: WorkerReply, now: float) -> list[Action]:
        """Rules 21, 22: a cancelled copy's reply: dropped, and compared with the first."""
        name, sent_at = copies.pending.pop(worker_id)
        if not copies.pending:
            del self._copies_out[key]
        self.counters["cancelled_replies"] += 1
        if worker is not None and reply.status in _ANSWERS and reply.status != Status.NOT_ACTIVE:
            # its latency is the worker's (outlier ejection), not the service's: the call was
            # answered already
            record_reply(worker, None, now - sent_at, reply.status == Status.OK, self._alpha)
        if copies.digest is None or reply.status not in _RESULTS:
            return []
        if reply.status == copies.status and _digest(reply.status, reply.body) == copies.digest:
            return []
        self.counters["result_mismatches"] += 1
        return [Notice("result_mismatch", f"{copies.service}.{copies.method}", {
            "service": copies.service, "method": copies.method, "workers": [copies.first, name],
            "request_id": copies.request_id})]

    def _drain(self, worker: WorkerState, now: float) -> list[Action]:
        """Rule 6: fills a worker's free slots from the queues of its services, oldest call
        first."""
        out: list[Action] = []
        if not self._active:  # rule 13
            return out
        while worker.outstanding < worker.capacity and not worker.leaving:  # rules 5, 14
            best: ServiceState | None = None
            for name in worker.services:
                svc = self._services.get(name)
                if svc is None:
                    continue
                q = svc.queue
                while q and q[0].state is not QUEUED:
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
        if call.method not in svc.methods:  # rule 9
            return [self._settle(call, Status.METHOD_NOT_FOUND, "method_not_found",
                                 why=f"service {svc.name!r} has no method {call.method!r}")]
        call.idempotent = self._idempotent(svc, call)  # rule 4
        plan = call.plan
        if plan is not None:
            refused = self._copies_decided(call, plan)  # rules 20, 22
            if refused is not None:
                return [refused]
        if call.resent and not call.idempotent and not call.probed:
            return self._probe(svc, call, now)  # rule 12: it may have run before this broker started
        if plan is not None and plan.redundant > 1:
            return self._fan_out(svc, call, plan, worker, now)  # rule 22
        return [self._send(call, worker, now)]

    def _slot_freed(self, worker: WorkerState, now: float) -> list[Action]:
        if worker.leaving:  # rule 14: gone once its last call is answered
            return self._remove(worker, now) if worker.outstanding == 0 else []
        return self._drain(worker, now) if self._active else []

    # --- the end of a call ---------------------------------------------------------------

    def _settle(self, call: Call, status: int, counter: str, *, body: bytes | None = None,
                why: str = "") -> ReplyToClient:
        """Rule 16, the one way a held call ends: out of every structure, counted under
        `counter`, remembered, answered once with `body` (a worker's), else an error saying
        `why`."""
        state = call.state
        if state is QUEUED:
            self._unqueue(call)
        elif state is INFLIGHT:
            w = call.worker
            if w is not None:
                del w.calls[call.key]
                w.outstanding -= 1
            if call.others:  # rule 21: every copy is cancelled here
                for o, _ in call.others:
                    del o.calls[call.key]
                    o.outstanding -= 1
                call.others = ()
        elif state is PROBING:
            self._probing.pop(call.key, None)
        call.state = DONE
        call.worker = None
        call.timer = -1  # rule 7: its timer entries are dead
        call.body = b""  # a DONE call may linger in a heap or queue: not its arguments
        key = call.key
        self._drop(key)
        self._remember_key(key, (RAN_HERE if call.ran else 0) | (WAS_RESENT if call.resent else 0),
                           call.given)  # rule 11
        self.counters[counter] += 1
        return ReplyToClient(call.client_id, call.request_id, status,
                             _error(status, why) if body is None else body)

    def _refuse(self, client_id: bytes, request_id: int, status: int, counter: str, why: str
                ) -> ReplyToClient:
        """Rule 3: a request turned away before it is held: counted, answered, nothing to
        settle."""
        self.counters[counter] += 1
        return ReplyToClient(client_id, request_id, status, _error(status, why))

    def _hold(self, call: Call) -> None:
        """Rule 1: the call is in `_calls`, counted once against its client."""
        key = call.key
        if key not in self._calls:
            self._per_client[call.client_id] = self._per_client.get(call.client_id, 0) + 1
        self._calls[key] = call

    def _drop(self, key: Key) -> None:
        if self._calls.pop(key, None) is not None:
            n = self._per_client[key[0]] - 1
            if n:
                self._per_client[key[0]] = n
            else:
                del self._per_client[key[0]]

    def _remember_key(self, key: Key, flags: int, given: tuple[bytes, ...]) -> None:
        """Rule 11: what is known of an answered call, added to what was known of it before
        (rule 18: the last `recent_limit` calls)."""
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
        """Rule 15: a status a worker may not answer a call with reaches the client as
        ProtocolError."""
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
            if call.others:
                return self._first_reply(worker, call, reply, now)  # rule 21
            if reply.status == Status.NOT_ACTIVE:  # rule 19: refused by epoch, never ran there
                refused: list[Action] = [self._settle(call, Status.NOT_ACTIVE, "not_active_calls",
                                                      body=reply.body)]
                refused.extend(self._slot_freed(worker, now))
                return refused
            record_reply(worker, self._services.get(call.service), now - call.sent_at,
                         reply.status == Status.OK, self._alpha)
            if reply.status in _ANSWERS:
                out: list[Action] = [self._settle(call, reply.status, "replies", body=reply.body)]
            else:
                status, body = self._checked_status(reply)
                out = [self._settle(call, status, "replies", body=body)]
            out.extend(self._slot_freed(worker, now))
            return out
        held = self._calls.get(key)
        if held is not None and held.state is PROBING and worker_id in held.probes:
            return self._probe_answered(worker_id, held, reply)
        copies = self._copies_out.get(key)
        if copies is not None and worker_id in copies.pending:  # rule 21
            return self._copy_replied(worker, worker_id, key, copies, reply, now)
        if held is not None:
            given: tuple[bytes, ...] = held.given
        else:
            remembered = self._recent.get(key)
            given = remembered[1] if remembered is not None else ()
        if worker_id in given:  # rule 15
            # its call once: retried elsewhere after it was lost, expired, or settled by
            # another worker's answer to a probe
            if reply.status != Status.NOT_SEEN:
                self.counters["late_replies"] += 1
            return []
        # rule 15: not its call: a worker answers only what it was given (the client would take it)
        self.counters["foreign_replies"] += 1
        if held is None and key not in self._recent:
            self.counters["orphan_replies"] += 1  # a call this broker never saw
        return []

    # --- workers -------------------------------------------------------------------------

    def _on_ready(self, worker_id: bytes, ready: Ready) -> list[Action]:
        now = self._clock()
        worker = self._workers.get(worker_id)
        new = sum(1 for name in ready.services if name not in self._services)
        if new and len(self._services) + new > self._max_services:  # rule 18
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
        else:  # rule 17: re-announced (reconnect, new settings): keep its in-flight calls
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
            for m, idem in methods.items():  # rule 4: one worker saying "not idempotent" is enough
                known[m] = known.get(m, True) and idem
            svc.max_workers = max(svc.max_workers, len(svc.workers))
            if name not in old or not was_serving:
                out.extend(self._joined(svc, worker, now))  # rule 12
        out.extend(self._drain(worker, now))
        return out

    def _on_leaving(self, worker_id: bytes) -> list[Action]:
        """Rule 14: acknowledged at once; no new calls; removed when its last is answered."""
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
                    self._view_changed(svc, now)  # rule 12
                    if not serving(svc):
                        self._emptied(svc, now)  # rule 8
        out.append(Notice("worker_leaving", worker.name, {"outstanding": worker.outstanding}))
        if worker.outstanding == 0:
            out.extend(self._remove(worker, now))
        return out

    def _remember_left(self, worker_id: bytes, now: float) -> None:
        """Rules 14, 18: not asked to register again for `left_memory`, at most `left_limit`."""
        left = self._left
        left.pop(worker_id, None)
        left[worker_id] = now
        while left and (len(left) > self._left_limit
                        or now - next(iter(left.values())) >= self._left_memory):
            left.popitem(last=False)

    def _emptied(self, svc: ServiceState, now: float) -> None:
        """Rule 8: no worker takes the service's calls from now on: the grace starts, and
        queued calls wait for it rather than for their deadlines."""
        svc.empty_since = now
        end = now + self._grace
        for call in svc.queue:
            if call.state is QUEUED and call.expires > min(call.deadline, end):
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
            # rule 12: it might be the one that ran it: its fate cannot be known
            out.append(self._settle(call, Status.CALL_STATE_UNKNOWN, "state_unknown", why=(
                "a worker was gone before it said whether this call ran there")))
        return out

    def _left_service(self, svc: ServiceState, was_serving: bool, now: float) -> None:
        """A worker no longer serves `svc` (it is already off the service's list)."""
        if was_serving:
            self._view_changed(svc, now)  # rule 12
            if not serving(svc):
                self._emptied(svc, now)  # rule 8
        if not svc.workers:  # rule 4: its methods are forgotten; rule 18: so is it, later
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
        calls = sorted(worker.calls.values(), key=lambda c: c.arrived)  # rule 10: oldest first
        worker.calls.clear()
        worker.outstanding = 0
        alone: list[Call] = []
        for call in calls:
            if call.others:  # rule 21: another copy runs it still
                self._drop_copy(call, worker)
                continue
            call.worker = None  # rule 1: off the worker, not yet anywhere else
            call.state = HELD
            alone.append(call)
        out.extend(self._remove(worker, now))
        for call in alone:
            out.extend(self._retry(call, now))
        return out

    def _retry(self, call: Call, now: float) -> list[Action]:
        """Rule 10: a lost worker's call: retry it if that is safe and affordable, else say
        why not."""
        if not call.idempotent:
            return [self._settle(call, Status.CALL_STATE_UNKNOWN, "state_unknown", why=(
                f"worker running {call.service}.{call.method} was lost; the call is not "
                "idempotent, so it was not retried"))]
        if not self._active:  # rule 13
            return [self._settle(call, Status.NOT_ACTIVE, "not_active_calls", why=(
                "worker lost and this broker is no longer active: send the call to its peer"))]
        if call.attempt + 1 >= self._max_attempts or now >= call.deadline or self._retry_tokens < 1:
            why = ("deadline passed" if now >= call.deadline else
                   "retry budget exhausted" if self._retry_tokens < 1 else "too many attempts")
            return [self._settle(call, Status.SERVICE_UNAVAILABLE, "unavailable",
                                 why=f"worker lost and the call was not retried: {why}")]
        self._retry_tokens -= 1
        self.counters["retries"] += 1
        call.attempt += 1
        notice = Notice("call_retried", call.service,
                        {"method": call.method, "attempt": call.attempt})
        svc = self._services.get(call.service)
        if svc is not None and serving(svc):
            worker = self._pick(svc)
            if worker is not None:
                return [notice, self._send(call, worker, now)]
        if svc is None:
            svc = self._new_service(call.service, now, now)
        return [notice, *self._enqueue(svc, call, front=True)]

    # --- activation (rule 13) ------------------------------------------------------------

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
        for call in [c for c in self._calls.values() if c.state is QUEUED or c.state is PROBING]:
            out.append(self._settle(call, Status.NOT_ACTIVE, "not_active_calls",
                                    why="this broker stepped down: send the call to its peer"))
        return out

    # --- self-check ----------------------------------------------------------------------

    def _check(self) -> None:
        """Raises AssertionError when the books do not balance (rules 1, 7, 18): every
        counter and gauge non-negative, gauges equal to what is held. Tests call it after
        every step."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise AssertionError(what)

        for name, n in self.counters.items():
            need(n >= 0, f"counter {name} is {n}")
        need(self._queued_bytes >= 0, f"queued_bytes is {self._queued_bytes}")
        need(self._retry_tokens >= 0, f"retry tokens are {self._retry_tokens}")
        queued_bytes = 0
        queued: set[Key] = set()
        for name, svc in self._services.items():
            need(svc.name == name, f"service {name} filed as {svc.name}")
            live = [c for c in svc.queue if c.state is QUEUED]
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
            need(isinstance(c.state, CallState), f"{key} has state {c.state!r}")
            need(c.state in (QUEUED, INFLIGHT, PROBING), f"{key} held in state {c.state.name}")
            need(c.timer in live_timers, f"{key} has no live timer")
            if c.state is QUEUED:
                need(key in queued, f"{key} QUEUED but in no queue")
            elif c.state is INFLIGHT:
                need(c.worker is not None and c.worker.calls.get(key) is c, f"{key} not on its worker")
                running = [w for w, _ in c.running()]
                need(len({id(w) for w in running}) == len(running), f"{key} twice on one worker")
                for w in running:  # rule 21: every copy on a live worker that holds it
                    need(self._workers.get(w.id) is w and w.calls.get(key) is c,
                         f"{key}: a copy on {w.name} that it does not hold")
            else:
                need(self._probing.get(key) is c, f"{key} probing but not listed")
            if c.state is not INFLIGHT:
                need(not c.others, f"{key} has copies running while {c.state.name}")
        for key, c in self._probing.items():
            need(self._calls.get(key) is c and c.state is PROBING, f"{key} listed as probing")
        for wid, w in self._workers.items():
            need(w.id == wid, "worker filed under another id")
            need(w.outstanding == len(w.calls), f"{w.name}: outstanding {w.outstanding}, "
                 f"{len(w.calls)} calls")
            for key, c in w.calls.items():
                need(self._calls.get(key) is c and any(o is w for o, _ in c.running()),
                     f"{w.name}: stray call {key}")
            for name in w.services:
                of = self._services.get(name)
                need(of is not None and w in of.workers, f"{w.name}: not listed in {name}")
        need(len(self._recent) <= self._recent_limit, "recent answers over their bound")
        need(len(self._copies_out) <= self._recent_limit, "cancelled copies over their bound")
        need(len(self._left) <= self._left_limit, "departed workers over their bound")
