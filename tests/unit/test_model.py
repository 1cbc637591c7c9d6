"""A model of a whole deployment over the real sans-IO cores, explored by hypothesis.

Two brokers (a BrokerCore each: the broker's policy over its Dispatcher, BinaryStar and
LivenessTracker, its actions carried out as the broker loop carries them out), three workers
(a WorkerCore each, inline and pooled methods, a call of prefetch) and two clients (a Session each)
exchange real ZRPC/1 frames through a network that delivers messages in any
order, loses them, duplicates them, and pauses peers. Hypothesis drives it with worker deaths,
broker crashes and restarts, failovers and clock jumps, and checks after every step:

1. a non-idempotent call executes at most once, across every worker and broker;
2. every call is settled exactly once, and by its deadline (result, error or CallStateUnknown);
3. a settled call's result is the right one;
4. no dispatcher counter or queue gauge goes negative, and what the cores hold is bounded;
5. once the faults stop, an idempotent call to the live service is answered with its result.

Where a rule cannot decide whether a re-sent call already ran, the answer must be
CallStateUnknown: invariant 1 fails on any second run.
"""

from __future__ import annotations

import itertools
import os
import random
from concurrent.futures import Future
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import zrpc
import zrpc.broker._core._dispatch as dispatch
from zrpc import CallStateUnknown, RemoteError, ZrpcError
from zrpc._core._frames import (
    H_IDEMPOTENT,
    Status,
    decode_frames,
)
from zrpc._core._liveness import Backoff
from zrpc._core._serial import pack_result, unpack_call
from zrpc._core._session import Session, Transmit, settle
from zrpc._core._worker import Action as WorkerAction
from zrpc._core._worker import CallFinished, RunHandler, SendReply, WorkerCore
from zrpc._core._worker import Send as WorkerSend
from zrpc.broker._config import BrokerConfig
from zrpc.broker._core._broker import Action, BrokerCore, PublishState, Send, SendCall
from zrpc.broker._core._bstar import BinaryStar, BStar
from zrpc.testing import FakeClock

INTERVAL = 0.25
LIVENESS = 3
TIMEOUT = 3.0  # every call's deadline, seconds
SERVICES = {"svc": {"add": True, "charge": False}}
CAPACITY = 2  # each worker's threads
PREFETCH = 1  # and one call more, waiting: its deadline may pass while it waits
POLL = INTERVAL  # a model broker polls for up to an interval: a gap of more than two is a stall

PROBE_HORIZON = float(os.environ.get("ZRPC_MODEL_HORIZON", "10"))  # 0 breaks rule 4 on purpose
STEPS = int(os.environ.get("ZRPC_MODEL_STEPS", "60"))
EXAMPLES = int(os.environ.get("ZRPC_MODEL_EXAMPLES", "150"))

Node = tuple[str, int]  # ("b", i) broker, ("w", i) worker, ("c", i) client


class Strict:
    """The model's InternalErrors: a bug the core would contain fails the run instead."""

    count = 0
    last: str | None = None
    where = "model"

    def record(self, exc: BaseException, what: str = "a message") -> bool:
        raise exc


class BrokerNode:
    """A broker: the real BrokerCore, its actions carried out over the model's network as
    broker/_loop.py carries them out over sockets."""

    def __init__(self, model: Deployment, index: int) -> None:
        self.m = model
        self.index = index
        self.role = "primary" if index == 0 else "backup"
        self.up = True
        self.paused = False
        self.boot()

    def boot(self) -> None:
        clock = self.m.clock
        config = BrokerConfig(frontend=f"model://b{self.index}", role=self.role,
                              state=f"model://s{self.index}", peer_state=f"model://s{1 - self.index}",
                              service_grace=1.0, heartbeat_interval=INTERVAL, liveness=LIVENESS)
        self.core = BrokerCore(config, clock, Strict(), dispatcher=dispatch.Dispatcher(
            clock, service_grace=1.0, default_timeout=TIMEOUT, probe_horizon=PROBE_HORIZON))
        self.last_tick = clock()
        self.execute(self.core.start())  # a pair member starts deactivated

    @property
    def node(self) -> Node:
        return ("b", self.index)

    @property
    def dispatcher(self) -> dispatch.Dispatcher:
        return self.core.dispatcher

    @property
    def bstar(self) -> BinaryStar:
        b = self.core.bstar
        assert b is not None
        return b

    def on_frames(self, src: Node, frames: list[bytes]) -> None:
        if src[0] == "s":  # the peer's state link
            self.execute(self.core.peer_state_received([frames]))
        else:
            self.execute(self.core.frames_received(self.m.ident(src), frames))

    def tick(self) -> None:
        """One iteration of the loop: its poll waited (POLL at most: more is a stall of its
        own, as a paused broker's is), it read the backlog if nothing is left, then timers."""
        now = self.m.clock()
        waited, self.last_tick = now - self.last_tick, now
        self.execute(self.core.checkpoint(min(waited, POLL)))
        if not any(dst == self.node for _, dst, _ in self.m.net):
            self.core.drained()
        self.execute(self.core.tick())

    def execute(self, actions: list[Action]) -> None:
        for a in actions:
            if type(a) is Send:
                self.send(self.m.node_of(a.peer), a.frames)
            elif type(a) is SendCall:
                self.send(self.m.node_of(a.worker), a.frames)
            elif type(a) is PublishState:
                self.m.post(("s", self.index), ("b", 1 - self.index), a.frames)

    def send(self, dst: Node | None, frames: list[bytes]) -> None:
        if dst is not None:
            self.m.post(self.node, dst, frames)


SVC = zrpc.Service("svc")  # what the model's workers serve; the handlers run in finish()
SVC.method(name="add", inline=True)(lambda a, b: a + b)  # both kinds of admission: inline ...
SVC.method(name="charge", idempotent=False)(lambda token, cents: token)  # ... and the pool
assert {"svc": SVC.spec()} == SERVICES


class WorkerNode:
    """A worker: the real WorkerCore, its actions carried out over the model's network as
    zrpc/_io/_worker.py carries them out over sockets; a handler it starts runs until the
    model finishes it."""

    def __init__(self, model: Deployment, index: int) -> None:
        self.m = model
        self.index = index
        self.up = True
        self.paused = False
        self.core = WorkerCore(model.clock, {"svc": SVC}, ["model://b0", "model://b1"], name=f"w{index}",
                               concurrency=CAPACITY, prefetch=PREFETCH, heartbeat_interval=INTERVAL,
                               liveness=LIVENESS, rng=random.Random(index))
        self.running: dict[tuple[bytes, int], RunHandler] = {}
        self.execute(self.core.start())

    @property
    def node(self) -> Node:
        return ("w", self.index)

    def on_frames(self, src: Node, frames: list[bytes]) -> None:
        b = src[1]
        if self.core.links[b].open:  # a ROUTER cannot reach a closed socket: it is lost
            self.execute(self.core.frames_received(b, frames))

    def finish(self, key: tuple[bytes, int]) -> None:
        call = self.running.pop(key)
        args, _ = unpack_call(call.request.body)
        result = args[0] + args[1] if call.method.name == "add" else args[0]
        self.execute(self.core.handle(CallFinished(call, Status.OK, pack_result(result))))

    def tick(self) -> None:
        self.execute(self.core.tick())

    def execute(self, actions: list[WorkerAction]) -> None:
        for a in actions:
            if type(a) is RunHandler:
                req = a.request
                self.running[(req.client_id, req.request_id)] = a
                args, _ = unpack_call(req.body)
                idempotent = req.headers.get(H_IDEMPOTENT) is True and a.method.idempotent
                self.m.executed(a.method.name, args, idempotent)
            elif type(a) is SendReply:
                if a.links:  # the first open link takes it (the model's pipes never fill)
                    self.m.post(self.node, ("b", a.links[0]), a.frames)
            elif type(a) is WorkerSend:
                if self.core.links[a.link].open:
                    self.m.post(self.node, ("b", a.link), a.frames)


class ClientNode:
    def __init__(self, model: Deployment, index: int) -> None:
        self.m = model
        self.index = index
        self.session = Session(model.clock, 2, TIMEOUT, interval=INTERVAL, liveness=LIVENESS)
        self.session.table._ids = itertools.count(1000 * (index + 1))  # replayable request ids

    @property
    def node(self) -> Node:
        return ("c", self.index)

    def apply(self, outputs: list[Any]) -> None:
        for o in outputs:
            if type(o) is Transmit:
                self.m.post(self.node, ("b", o.broker), o.frames)
            else:
                self.m.settled(o)
                settle(o)

    def on_frames(self, src: Node, frames: list[bytes]) -> None:
        self.apply(self.session.received(src[1], decode_frames(frames)))

    def tick(self) -> None:
        self.apply(self.session.tick())


class Deployment(RuleBasedStateMachine):
    """The whole system; rules are faults and traffic, invariants are the guarantees."""

    calls = Bundle("calls")

    @initialize()
    def boot(self) -> None:
        self.clock = FakeClock()
        self.net: list[tuple[Node, Node, list[bytes]]] = []
        self.ids: dict[Node, bytes] = {}
        self.nodes_by_id: dict[bytes, Node] = {}
        self.brokers = [BrokerNode(self, 0), BrokerNode(self, 1)]
        self.workers: list[WorkerNode] = []
        self.clients = [ClientNode(self, 0), ClientNode(self, 1)]
        for _ in range(3):
            self.spawn_worker()
        self.tokens = 0
        self.executions: dict[str, int] = {}  # charge token -> times run
        self.expected: dict[int, tuple[Any, float, bool, str]] = {}  # id(future) -> (result, deadline, idem, token)
        self.futures: list[Future[Any]] = []
        self.settlements: dict[int, int] = {}  # id(future) -> settle outputs seen
        self.faults = 0

    # --- plumbing -----------------------------------------------------------------------

    def ident(self, node: Node) -> bytes:
        if node not in self.ids:
            ident = f"{node[0]}{node[1]}-{len(self.ids)}".encode()  # deterministic: replayable
            self.ids[node] = ident
            self.nodes_by_id[ident] = node
        return self.ids[node]

    def node_of(self, ident: bytes) -> Node | None:
        return self.nodes_by_id.get(ident)

    def post(self, src: Node, dst: Node, frames: list[bytes]) -> None:
        if len(self.net) < 2000:  # a full pipe drops, as a high-water mark does
            self.net.append((src, dst, frames))

    def target(self, dst: Node) -> Any:
        kind, i = dst
        if kind == "b":
            b = self.brokers[i]
            return b if b.up else None
        if kind == "w":
            w = self.workers[i]
            return w if w.up else None
        return self.clients[i]

    def executed(self, method: str, args: list[Any], idempotent: bool) -> None:
        if method == "charge":
            token = args[0]
            self.executions[token] = self.executions.get(token, 0) + 1

    def settled(self, output: Any) -> None:
        fut = output.call.future
        self.settlements[id(fut)] = self.settlements.get(id(fut), 0) + 1

    def spawn_worker(self) -> None:
        w = WorkerNode(self, len(self.workers))
        self.ident(w.node)
        self.workers.append(w)

    def deliver_one(self, index: int) -> None:
        src, dst, frames = self.net.pop(index % len(self.net))
        node = self.target(dst)
        if node is None or getattr(node, "paused", False):
            if node is not None:  # a paused peer reads it later
                self.net.append((src, dst, frames))
            return
        node.on_frames(src, frames)

    def tick_all(self) -> None:
        for b in self.brokers:
            if b.up and not b.paused:
                b.tick()
        for w in self.workers:
            if w.up and not w.paused:
                w.tick()
        for c in self.clients:
            c.tick()

    # --- traffic ------------------------------------------------------------------------

    @rule(client=st.integers(0, 1), a=st.integers(0, 100), b=st.integers(0, 100))
    def call_add(self, client: int, a: int, b: int) -> None:
        self._submit(client, "add", (a, b), a + b, True, "")

    @rule(client=st.integers(0, 1))
    def call_charge(self, client: int) -> None:
        self.tokens += 1
        token = f"t{self.tokens}"
        self._submit(client, "charge", (token,), token, False, token)

    def _submit(self, client: int, method: str, args: tuple[Any, ...], result: Any, idem: bool,
                token: str) -> None:
        c = self.clients[client]
        fut: Future[Any] = Future()
        call = c.session.table.prepare("svc", method, args, {}, fut)
        self.futures.append(fut)
        self.expected[id(fut)] = (result, call.deadline, idem, token)
        c.apply(c.session.submit(call))

    @precondition(lambda self: self.net)
    @rule(index=st.integers(0, 10_000), times=st.integers(1, 20))
    def deliver(self, index: int, times: int) -> None:
        for i in range(times):
            if not self.net:
                return
            self.deliver_one(index + i * 7919)

    @precondition(lambda self: any(w.running for w in self.workers if w.up and not w.paused))
    @rule(index=st.integers(0, 10_000))
    def finish_call(self, index: int) -> None:
        busy = [w for w in self.workers if w.up and not w.paused and w.running]
        w = busy[index % len(busy)]
        keys = list(w.running)
        w.finish(keys[index % len(keys)])

    @rule(dt=st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5, 1.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.tick_all()

    # --- faults -------------------------------------------------------------------------

    @precondition(lambda self: self.net)
    @rule(index=st.integers(0, 10_000))
    def lose(self, index: int) -> None:
        self.net.pop(index % len(self.net))
        self.faults += 1

    @precondition(lambda self: self.net)
    @rule(index=st.integers(0, 10_000))
    def duplicate(self, index: int) -> None:
        self.post(*self.net[index % len(self.net)])
        self.faults += 1

    @precondition(lambda self: sum(w.up for w in self.workers) > 1)
    @rule(index=st.integers(0, 100))
    def kill_worker(self, index: int) -> None:
        live = [w for w in self.workers if w.up]
        w = live[index % len(live)]
        w.up = False
        self.faults += 1
        if len(self.workers) < 8:
            self.spawn_worker()

    @precondition(lambda self: sum(w.up for w in self.workers) > 1
                  and any(w.running for w in self.workers if w.up))
    @rule(index=st.integers(0, 100))
    def kill_busy_worker(self, index: int) -> None:
        """The worst moment: a worker dies holding calls it has run."""
        busy = [w for w in self.workers if w.up and w.running]
        busy[index % len(busy)].up = False
        self.faults += 1
        if len(self.workers) < 8:
            self.spawn_worker()

    @rule(index=st.integers(0, 100), paused=st.booleans())
    def pause_worker(self, index: int, paused: bool) -> None:
        live = [w for w in self.workers if w.up]
        if live:
            live[index % len(live)].paused = paused
            self.faults += 1

    @rule(index=st.integers(0, 1))
    def crash_broker(self, index: int) -> None:
        b = self.brokers[index]
        if b.up and self.brokers[1 - index].up:
            b.up = False
            self.faults += 1

    @rule(index=st.integers(0, 1))
    def restart_broker(self, index: int) -> None:
        b = self.brokers[index]
        if not b.up:
            b.boot()
            b.up = True
            b.paused = False

    @rule(index=st.integers(0, 1), paused=st.booleans())
    def pause_broker(self, index: int, paused: bool) -> None:
        self.brokers[index].paused = paused
        self.faults += 1

    # --- the guarantees -----------------------------------------------------------------

    @invariant()
    def at_most_once(self) -> None:
        twice = {t: n for t, n in self.executions.items() if n > 1}
        assert not twice, f"non-idempotent calls executed more than once: {twice}"

    @invariant()
    def settled_once_and_right(self) -> None:
        now = self.clock()
        for fut in getattr(self, "futures", []):
            result, deadline, idem, token = self.expected[id(fut)]
            assert self.settlements.get(id(fut), 0) <= 1, "a call was settled twice"
            # the clients tick after every clock step, so a passed deadline is settled
            assert fut.done() or now < deadline, "a call outlived its deadline"
            if fut.done():
                exc = fut.exception()
                if exc is None:
                    assert fut.result() == result
                    if token:
                        assert self.executions.get(token) == 1, f"{token} answered but never ran"
                else:
                    assert isinstance(exc, ZrpcError) and not isinstance(exc, RemoteError), exc

    @invariant()
    def counters_and_memory(self) -> None:
        for b in getattr(self, "brokers", []):
            if not b.up:
                continue
            d = b.dispatcher
            snap = d.snapshot()
            assert all(v >= 0 for v in snap["counters"].values()), snap["counters"]
            assert snap["queued_bytes"] >= 0
            assert all(s["queued"] >= 0 and s["outstanding"] >= 0 for s in snap["services"])
            assert all(0 <= w["outstanding"] <= w["capacity"] for w in snap["workers"])
            assert d.inflight <= len(self.futures)
            check = getattr(d, "_check", None)
            if check is not None:
                check()
        for w in getattr(self, "workers", []):
            assert len(w.core.cache) <= len(self.futures)

    def teardown(self) -> None:
        """The faults stop: everything heals, and a new idempotent call must succeed."""
        if not hasattr(self, "clock"):
            return
        for w in self.workers:
            w.paused = False
        for b in self.brokers:
            b.paused = False
            if not b.up:
                b.boot()
                b.up = True
        # let everything settle, with no loss: a worker that reconnected into silence for a
        # while waits out its backoff (up to 8 s, jittered) before it reopens a link
        backoff = Backoff()
        for _ in range(int((backoff.maximum * (1 + backoff.jitter) + 2 * TIMEOUT) / 0.05)):
            self.clock.advance(0.05)
            self.tick_all()
            while self.net:
                self.deliver_one(0)
                for w in self.workers:
                    while w.up and w.running:
                        w.finish(next(iter(w.running)))
        self.at_most_once()
        self.settled_once_and_right()
        outcomes = [type(f.exception()).__name__ if f.exception() else "ok" for f in self.futures]
        for name in sorted(set(outcomes)):
            event(f"outcome {name}")
        event(f"resent calls: {min(3, sum(1 for c in self.clients for _ in range(c.session.switches)))}")
        assert all(f.done() for f in self.futures), "a call was never settled"
        fut: Future[Any] = Future()
        c = self.clients[0]
        call = c.session.table.prepare("svc", "add", (20, 22), {}, fut)
        c.apply(c.session.submit(call))
        for _ in range(int(TIMEOUT / 0.05)):
            if fut.done():
                break
            self.clock.advance(0.05)
            self.tick_all()
            while self.net:
                self.deliver_one(0)
                for w in self.workers:
                    while w.up and w.running:
                        w.finish(next(iter(w.running)))
        assert fut.done() and fut.exception() is None and fut.result() == 42, (
            f"after healing, an idempotent call got {fut.exception() if fut.done() else 'nothing'}")


def test_a_charge_whose_worker_and_broker_die_is_never_run_again() -> None:
    """The scenario rule 4 exists for: a charge runs on a worker, that worker and the active
    broker die, the client re-sends to the backup, which may ask only the survivors."""
    m = Deployment()
    m.boot()

    def pump() -> None:
        for _ in range(500):
            if not m.net:
                return
            m.deliver_one(0)

    for _ in range(8):
        m.advance(0.25)
        pump()
    assert [b.bstar.state for b in m.brokers] == [BStar.ACTIVE, BStar.PASSIVE]
    m.call_charge(0)
    pump()
    (busy,) = [w for w in m.workers if w.running]
    assert m.executions == {"t1": 1}
    busy.up = False
    m.brokers[0].up = False
    for _ in range(16):
        m.advance(0.25)
        pump()
    m.at_most_once()
    (fut,) = m.futures
    assert fut.done() and isinstance(fut.exception(), CallStateUnknown)


Deployment.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestDeployment = pytest.mark.timeout(900)(Deployment.TestCase)  # shrinking a failure is slow
