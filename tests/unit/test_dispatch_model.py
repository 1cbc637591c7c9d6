"""The Dispatcher alone, driven by hypothesis through any order of events on a fake clock.

Requests (idempotent or not, re-sent or not, tiny budgets, repeated ids), READY and re-READY,
replies (from the right worker, the wrong one, twice, NOT_SEEN, undefined statuses, for calls
never made), workers leaving and lost, activation and deactivation, clock jumps and ticks.
After every step:

1. the dispatcher's own books balance (`Dispatcher._check`: no negative counter or gauge,
   queue gauges equal to what is queued, per-client counts equal to the calls held);
2. every call gets exactly one answer: a call the dispatcher no longer holds has been
   answered once per time it was accepted, a held one once less;
3. a non-idempotent call is sent to run (a SendToWorker that is not a probe) at most once,
   across every worker, attempt and re-send;
4. a probe carries no body;
5. while deactivated nothing is sent to a worker (neither a call nor a probe) and nothing
   waits (queued or probing): it was answered NOT_ACTIVE;
6. a non-idempotent call that arrived re-sent (it may have run through another broker) is
   probed before it runs;
7. hedged and redundant calls (some with malformed headers) are in the mix: a redundant
   non-idempotent call never runs; copies beyond the first, with retries, never exceed what
   the retry budget allowed; a `result_mismatch` names two different workers given the call.

At the end the clock runs past every deadline: nothing is held, everything was answered.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zrpc._core._frames import ClientRequest, Ready, Status, WorkerReply
from zrpc.broker._core._dispatch import (
    Activated,
    Deactivated,
    Dispatcher,
    Event,
    Notice,
    ReplyArrived,
    ReplyToClient,
    RequestArrived,
    SendToWorker,
    WorkerLeaving,
    WorkerLost,
    WorkerReady,
)
from zrpc.testing import FakeClock

WORKERS = [b"w1", b"w2", b"w3", b"w4"]
CLIENTS = [b"c1", b"c2"]
SERVICES = {"calc": {"add": True, "charge": False}, "other": {"add": True}}
METHODS = ["add", "charge", "nope"]  # "nope" is announced by no worker
COPIES: dict[str, dict[str, object]] = {  # hedged and redundant calls, and malformed asks
    "none": {}, "hedge": {"hedge_after_ms": 5}, "hedge3": {"hedge_after_ms": 100, "max_attempts": 3},
    "redundant2": {"redundant": 2}, "redundant3": {"redundant": 3},
    "both": {"redundant": 2, "hedge_after_ms": 5}, "bad": {"redundant": "2"},
}
TOKENS, RATIO = 3.0, 0.2


class DispatcherModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        # small bounds, so that they are reached; a short probe horizon, so that probes are
        # decided both ways within a few steps
        self.d = Dispatcher(self.clock, service_grace=1.0, default_timeout=3.0, queue_limit=6,
                            queue_bytes=120, max_inflight_per_client=8, retry_tokens=TOKENS,
                            retry_ratio=RATIO, max_attempts=3, inflight_grace=1.0, recent_limit=10**6,
                            probe_horizon=0.25)
        self.accepted: Counter[tuple[bytes, int]] = Counter()
        self.answered: Counter[tuple[bytes, int]] = Counter()
        self.runs: Counter[tuple[bytes, int]] = Counter()
        self.calls: dict[tuple[bytes, int], tuple[str, str, bool | None, str]] = {}
        self.redundant: set[tuple[bytes, int]] = set()  # asked to run on several workers
        self.non_idempotent: set[tuple[bytes, int]] = set()
        self.given: list[tuple[bytes, tuple[bytes, int]]] = []  # (worker, call) sent or probed
        self.probed: dict[tuple[bytes, int], set[bytes]] = {}  # call -> workers probed for it
        self.resent_unprobed: set[tuple[bytes, int]] = set()  # arrived re-sent, not probed yet
        self.steps = 0

    # --- glue ----------------------------------------------------------------------------

    def run(self, actions: Sequence[object], inactive: bool = False) -> None:
        for a in actions:
            assert not (inactive and isinstance(a, SendToWorker)), f"sent while deactivated: {a}"
            if isinstance(a, ReplyToClient):
                self.answered[(a.client_id, a.request_id)] += 1
            elif isinstance(a, SendToWorker):
                key = (a.message.client_id, a.message.request_id)
                self.given.append((a.worker_id, key))
                if a.message.headers.get("probe"):
                    assert a.message.body == b"", "a probe carried a body"
                    self.probed.setdefault(key, set()).add(a.worker_id)
                    self.resent_unprobed.discard(key)
                elif key in self.non_idempotent:
                    assert key not in self.resent_unprobed, f"{key} re-sent, run without a probe"
                    assert key not in self.redundant, f"{key} redundant and not idempotent: run"
                    self.runs[key] += 1
            elif isinstance(a, Notice) and a.name == "result_mismatch":
                rid = a.detail["request_id"]
                workers = [w.encode() for w in a.detail["workers"]]
                assert len(set(workers)) == 2, a
                assert any(all((w, (c, rid)) in self.given for w in workers) for c in CLIENTS), a
        self.steps += 1

    def feed(self, event: Event) -> None:
        inactive = not self.d.active
        self.run(self.d.handle(event), inactive=inactive)

    # --- rules ---------------------------------------------------------------------------

    @rule(client=st.sampled_from(CLIENTS), rid=st.integers(0, 30),
          service=st.sampled_from(["calc", "calc", "other", "ghost"]),
          method=st.sampled_from(METHODS), idem=st.sampled_from([None, True, False]),
          resent=st.booleans(), budget=st.sampled_from([None, 0, 1, 50, 400, 2500]),
          size=st.integers(0, 16),
          copies=st.sampled_from(["none", "none", "none", *sorted(COPIES)]))
    def request(self, client: bytes, rid: int, service: str, method: str, idem: bool | None,
                resent: bool, budget: int | None, size: int, copies: str = "none") -> None:
        key = (client, rid)
        # a request id names one call: a repeat is the same call (same service, method, flag,
        # copies)
        service, method, idem, copies = self.calls.setdefault(key, (service, method, idem, copies))
        if idem is False or method != "add":
            self.non_idempotent.add(key)
        if copies in ("redundant2", "redundant3", "both"):
            self.redundant.add(key)
        headers: dict[str, object] = dict(COPIES[copies])
        if budget is not None:
            headers["budget_ms"] = budget
        if idem is not None:
            headers["idempotent"] = idem
        if resent:
            headers["resent"] = True
        held = key in self.d._calls
        if not held and resent and key in self.non_idempotent:
            self.resent_unprobed.add(key)
        self.feed(RequestArrived(client, ClientRequest(rid, service, method, headers, b"x" * size)))
        if not held:
            self.accepted[key] += 1

    @rule(rid=st.integers(100, 102), resent=st.booleans())
    def request_charge(self, rid: int, resent: bool) -> None:
        """The calls that matter most: non-idempotent ones, often repeated or re-sent."""
        self.request(CLIENTS[0], rid, "calc", "charge", None, resent, 2500, 4)

    @rule(rid=st.integers(200, 205), copies=st.sampled_from(sorted(COPIES)))
    def request_copies(self, rid: int, copies: str) -> None:
        """Calls that may run on several workers: hedged, redundant, or asking for either
        on a method that is not idempotent."""
        method = "charge" if rid == 205 else "add"
        self.request(CLIENTS[1], rid, "calc", method, None, False, 2500, 4, copies)
    @rule(worker=st.sampled_from(WORKERS), capacity=st.integers(1, 4),
          services=st.sampled_from([{"calc"}, {"calc"}, {"calc", "other"}, {"other"}]))
    def ready(self, worker: bytes, capacity: int, services: set[str]) -> None:
        ready = Ready(worker.decode(), {s: SERVICES[s] for s in sorted(services)}, capacity)
        self.feed(WorkerReady(worker, ready))

    @rule(first=st.sampled_from(WORKERS), second=st.sampled_from(WORKERS))
    def two_calc_workers(self, first: bytes, second: bytes) -> None:
        """Room for copies: two workers of the service (READY again, if they were)."""
        for worker in {first, second}:
            self.feed(WorkerReady(worker, Ready(worker.decode(), {"calc": SERVICES["calc"]}, 3)))

    @rule(data=st.data(), status=st.sampled_from([Status.OK, Status.OK, Status.ERROR,
                                                  Status.NOT_SEEN, Status.NOT_SEEN, 42]))
    def reply_as_given(self, data: st.DataObject, status: int) -> None:
        """A worker answers something it was sent (maybe again, maybe long after); the
        latest sends most often."""
        if not self.given:
            return
        worker, key = data.draw(st.sampled_from(self.given[-3:]) | st.sampled_from(self.given))
        self.feed(ReplyArrived(worker, WorkerReply(key[0], key[1], status, b"r")))

    @rule(data=st.data())
    def probes_not_seen(self, data: st.DataObject) -> None:
        """Every worker probed for a call says it never saw it (the common case)."""
        if not self.probed:
            return
        key = data.draw(st.sampled_from(sorted(self.probed)))
        for worker in sorted(self.probed.pop(key)):
            self.feed(ReplyArrived(worker, WorkerReply(key[0], key[1], Status.NOT_SEEN, b"")))

    @rule(worker=st.sampled_from([*WORKERS, b"stranger"]), client=st.sampled_from(CLIENTS),
          rid=st.integers(0, 20), status=st.sampled_from([Status.OK, Status.NOT_SEEN, 200]))
    def reply_anything(self, worker: bytes, client: bytes, rid: int, status: int) -> None:
        """Any worker answers any call, its own or not, known or not."""
        self.feed(ReplyArrived(worker, WorkerReply(client, rid, status, b"r")))

    @rule(worker=st.sampled_from(WORKERS), lost=st.booleans())
    def worker_goes(self, worker: bytes, lost: bool) -> None:
        self.feed(WorkerLost(worker) if lost else WorkerLeaving(worker))

    @rule(deactivate=st.sampled_from([True, False, False]))
    def activation(self, deactivate: bool) -> None:
        if deactivate:  # less often: a broker that is mostly inactive explores little
            self.feed(Deactivated())
        else:
            self.run(self.d.handle(Activated()))  # it may start what waits at once

    @rule(dt=st.sampled_from([0.0, 0.0, 0.005, 0.01, 0.01, 0.1, 0.3, 1.0, 2.5, 11.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.run(self.d.tick(), inactive=not self.d.active)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        self.d._check()

    @invariant()
    def every_call_answered_exactly_once(self) -> None:
        for key in self.accepted.keys() | self.answered.keys():
            owed = self.accepted[key] - (1 if key in self.d._calls else 0)
            assert self.answered[key] == owed, (key, self.accepted[key], self.answered[key])

    @invariant()
    def non_idempotent_calls_run_at_most_once(self) -> None:
        twice = [k for k in self.non_idempotent if self.runs[k] > 1]
        assert not twice, twice

    @invariant()
    def copies_are_bounded_by_the_retry_budget(self) -> None:
        c = self.d.counters
        extra = c["hedges"] + c["redundant_copies"] + c["retries"]
        assert extra <= TOKENS + RATIO * c["requests"] + 1e-9, dict(c)

    @invariant()
    def nothing_waits_while_deactivated(self) -> None:
        if not self.d.active:
            waiting = [k for k, c in self.d._calls.items() if c.worker is None]
            assert not waiting, waiting

    def teardown(self) -> None:
        for _ in range(3):
            self.clock.advance(100.0)
            self.run(self.d.tick())
        self.d._check()
        assert self.d.inflight == 0
        assert all(w.outstanding == 0 for w in self.d._workers.values())
        self.every_call_answered_exactly_once()


DispatcherModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("ZRPC_DISPATCH_EXAMPLES", "200")),
    stateful_step_count=int(os.environ.get("ZRPC_DISPATCH_STEPS", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDispatcherModel = DispatcherModel.TestCase
