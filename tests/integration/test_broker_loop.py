"""The broker's socket loop in this process: a real ROUTER on a free port, a thread running
`Broker.run()`, and raw DEALER sockets speaking ZRPC/1 as a worker or a client written from
docs/protocol.md would. Faults are injected into the loop's own parts (a dispatcher method
that raises, a thread that stalls, a pipe that is full)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import msgpack
import pytest
import zmq

from zrpc._core._frames import (
    CLIENT,
    WORKER,
    ClientReply,
    ClientRequest,
    Disconnect,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, pack_result, unpack_error, unpack_result
from zrpc._io._sockets import Sent
from zrpc.broker import _loop
from zrpc.broker._core._broker import Publish, Send
from zrpc.broker._core._dispatch import RequestArrived, WorkerLost
from zrpc.broker._loop import Broker, BrokerConfig
from zrpc.testing import free_port, wait_until

INTERVAL = 0.1
LIVENESS = 3
SERVICES = {"calc": {"add": True, "charge": False}}


class LoopBroker:
    """A Broker running in a thread; stopped (and its thread joined) on exit."""

    def __init__(self, ctx: zmq.Context, **config: Any) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        config.setdefault("heartbeat_interval", INTERVAL)
        config.setdefault("liveness", LIVENESS)
        self.broker = Broker(BrokerConfig(frontend=self.endpoint, **config), context=ctx)
        self.broker.bind()
        self.thread = threading.Thread(target=self.broker.run, name="broker-under-test", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the broker's loop did not stop"


class Peer:
    """A raw DEALER on a broker's frontend."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self.sock.connect(endpoint)
        self.seq = 0

    def send(self, msg: Any) -> None:
        self.sock.send_multipart(encode(msg))

    def recv(self, timeout: float) -> Any | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return decode_frames(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close(linger=0)


class Client(Peer):
    def request(self, service: str, method: str, args: list[Any], **headers: Any) -> int:
        self.seq += 1
        headers.setdefault("budget_ms", 10_000)
        self.send(ClientRequest(self.seq, service, method, headers, pack_call(tuple(args), {})))
        return self.seq

    def reply(self, rid: int, timeout: float = 10.0) -> ClientReply:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(deadline - time.monotonic())
            if isinstance(msg, ClientReply) and msg.request_id == rid:
                return msg
        raise TimeoutError(f"no reply to request {rid} within {timeout}s")

    def call(self, service: str, method: str, *args: Any, **headers: Any) -> ClientReply:
        return self.reply(self.request(service, method, list(args), **headers))

    def status(self) -> dict[str, Any]:
        r = self.call("zrpc", "status")
        assert r.status == Status.OK
        return unpack_result(r.body)


class FakeWorker(Peer):
    """A worker written from the spec, driven by the test thread: nothing happens unless the
    test calls `pump()`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str = "fake",
                 capacity: int = 4) -> None:
        super().__init__(ctx, endpoint)
        self.name = name
        self.capacity = capacity
        self.requests: list[WorkerRequest] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.acks = 0

    def ready(self) -> None:
        self.send(Ready(self.name, SERVICES, self.capacity))

    def pump(self, timeout: float = 0.0) -> None:
        msg = self.recv(timeout)
        while msg is not None:
            if isinstance(msg, WorkerRequest):
                self.requests.append(msg)
            elif isinstance(msg, Heartbeat):
                self.heartbeats.append(msg.info)
            elif isinstance(msg, Disconnect):
                self.acks += 1
            msg = self.recv(0)

    def answer(self, req: WorkerRequest) -> None:
        args, _ = msgpack.unpackb(req.body, raw=False)
        self.send(WorkerReply(req.client_id, req.request_id, Status.OK, pack_result(sum(args))))


class LiveWorker(threading.Thread):
    """A worker in its own thread: heartbeats every interval, answers `add` at once, and puts
    `info` in its heartbeats."""

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str, info: dict[str, Any] | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.w = FakeWorker(ctx, endpoint, name)
        self.info = info if info is not None else {}
        self.stop = threading.Event()
        self.served = 0

    def run(self) -> None:
        w = self.w
        w.ready()
        next_beat = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                w.send(Heartbeat(WORKER, dict(self.info)))
                next_beat = now + INTERVAL
            w.pump(min(0.02, max(0.0, next_beat - now)))
            while w.requests:
                w.answer(w.requests.pop(0))
                self.served += 1
        w.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(5)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)  # closes what a failed test left open


def spy(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str,
        before: Callable[..., None] | None = None) -> list[tuple[Any, ...]]:
    """Records every call of obj.name (and runs `before` first, which may raise)."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(obj, name)

    def wrapper(*args: Any) -> Any:
        calls.append(args)
        if before is not None:
            before(*args)
        return real(*args)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def workers_of(c: Client) -> list[dict[str, Any]]:
    return c.status()["workers"]


# --- 1. a bug in the loop costs one message ---------------------------------------------------


def test_a_bug_handling_a_request_is_answered_counted_alerted_and_the_broker_serves_on(ctx, monkeypatch):
    mon = f"tcp://127.0.0.1:{free_port()}"
    with LoopBroker(ctx, monitor=mon) as lb, LiveWorker(ctx, lb.endpoint, "w1"):
        alerts = ctx.socket(zmq.SUB)
        alerts.linger = 0
        alerts.setsockopt(zmq.SUBSCRIBE, b"alert.internal_error")
        alerts.connect(mon)
        c = Client(ctx, lb.endpoint)
        wait_until(lambda: len(workers_of(c)) == 1, 10, what="worker registered")
        failed: list[bool] = []

        def boom(event: Any) -> None:
            if isinstance(event, RequestArrived) and not failed:
                failed.append(True)
                raise RuntimeError("a bug in the dispatcher")

        spy(monkeypatch, lb.broker.core.dispatcher, "handle", boom)
        r = c.call("calc", "add", 1, 2)
        assert r.status == Status.ERROR and unpack_error(r.body)["type"] == "InternalError"
        r = c.call("calc", "add", 2, 3)
        assert r.status == Status.OK and unpack_result(r.body) == 5
        st = c.status()
        assert st["counters"]["internal_errors"] == 1
        assert alerts.poll(5000), "no internal_error alert was published"
        topic, body = alerts.recv_multipart()
        event = msgpack.unpackb(body, raw=False)
        assert topic == b"alert.internal_error" and event["detail"]["count"] == 1
        assert "a bug in the dispatcher" in event["detail"]["error"]
        alerts.close()
        c.close()


def test_a_bug_in_a_timer_step_is_contained(ctx, monkeypatch):
    with LoopBroker(ctx) as lb:
        c = Client(ctx, lb.endpoint)
        spy(monkeypatch, lb.broker.core.dispatcher, "tick",
            lambda *a: (_ for _ in ()).throw(ValueError("a bug in a timer")))
        wait_until(lambda: c.status()["counters"]["internal_errors"] >= 3, 10,
                   what="the failing timer counted, the loop still serving")
        assert lb.thread.is_alive()
        c.close()


def test_an_action_that_fails_costs_only_itself(ctx, monkeypatch):
    """A monitor message that cannot go out (here: a bug publishing) costs itself only: the
    replies and heartbeats after it in the same batch still go out, and the bug is counted."""
    broker = Broker(BrokerConfig(frontend=f"tcp://127.0.0.1:{free_port()}",
                                 monitor=f"tcp://127.0.0.1:{free_port()}"), context=ctx)
    broker.bind()
    try:
        def broken(*a: Any) -> None:
            raise RuntimeError("a bug publishing")

        monkeypatch.setattr(_loop.Broker, "_publish", staticmethod(broken))
        sent: list[bytes] = []
        monkeypatch.setattr(broker, "_send", lambda peer, frames: sent.append(peer) or _loop.Sent.OK)
        broker._execute([Publish("metrics", {}), Send(b"client-1", [b"a"]),
                         Publish("alert.x", {}), Send(b"worker-1", [b"b"])])
        assert sent == [b"client-1", b"worker-1"]
        assert broker._errors.count == 2
    finally:
        broker._front.close(linger=0)  # never run: close what bind() opened
        broker._mon.close(linger=0)


# --- 3. a stall of our own is no evidence against workers ----------------------------------------


def test_a_stalled_loop_with_a_big_backlog_loses_no_live_worker(ctx, monkeypatch):
    with LoopBroker(ctx) as lb, LiveWorker(ctx, lb.endpoint, "w1"), LiveWorker(ctx, lb.endpoint, "w2"):
        c = Client(ctx, lb.endpoint)
        wait_until(lambda: len(workers_of(c)) == 2, 10, what="workers registered")
        lost = []
        spy(monkeypatch, lb.broker.core.dispatcher, "handle",
            lambda e: lost.append(e) if isinstance(e, WorkerLost) else None)
        release = threading.Event()
        blocked = threading.Event()

        def stall(*a: Any) -> None:
            if not release.is_set():
                blocked.set()
                release.wait(30)

        spy(monkeypatch, lb.broker.core.dispatcher, "tick", stall)
        assert blocked.wait(5)
        t0 = time.monotonic()
        flood = Client(ctx, lb.endpoint)
        for _ in range(3000):  # a backlog far over one batch, in front of the heartbeats
            flood.request("zrpc", "ping", [])
        # the stall lasts well past the liveness timeout while the workers keep beating
        wait_until(lambda: time.monotonic() - t0 > 4 * INTERVAL * LIVENESS, 10, what="a long stall")
        release.set()
        last = flood.request("zrpc", "ping", [])
        assert flood.reply(last, 30).status == Status.OK  # the whole backlog was read
        st = c.status()
        assert lost == [] and len(st["workers"]) == 2
        assert c.call("calc", "add", 20, 22).status == Status.OK
        flood.close()
        c.close()


def test_a_loop_that_stalls_again_and_again_still_finds_a_dead_worker(ctx, monkeypatch):
    with LoopBroker(ctx) as lb, LiveWorker(ctx, lb.endpoint, "alive"):
        c = Client(ctx, lb.endpoint)
        dead = FakeWorker(ctx, lb.endpoint, "dead")
        dead.ready()  # and never a word after that
        wait_until(lambda: len(workers_of(c)) == 2, 10, what="workers registered")
        lost = spy(monkeypatch, lb.broker.core.dispatcher, "handle")
        slow = threading.Event()
        # every timer step now takes longer than a heartbeat interval: a stall each time
        spy(monkeypatch, lb.broker.core.dispatcher, "tick", lambda *a: slow.wait(1.5 * INTERVAL))
        wait_until(lambda: [e for (e,) in list(lost) if isinstance(e, WorkerLost)], 30,
                   what="the dead worker declared lost")
        assert [e.worker_id for (e,) in list(lost) if isinstance(e, WorkerLost)] == [
            dead.sock.getsockopt(zmq.ROUTING_ID)]
        dead.close()
        c.close()


# --- 5. a worker that left cleanly is not asked back --------------------------------------------


def test_a_worker_that_left_is_not_asked_to_register_again(ctx):
    with LoopBroker(ctx, liveness=100) as lb:  # it leaves; it is never lost for silence
        c = Client(ctx, lb.endpoint)
        w = FakeWorker(ctx, lb.endpoint, "leaver")
        w.ready()
        wait_until(lambda: len(workers_of(c)) == 1, 10, what="worker registered")
        w.send(Disconnect())
        wait_until(lambda: (w.pump(0.05), w.acks)[1], 10, what="DISCONNECT acknowledged")
        assert workers_of(c) == []
        w.heartbeats.clear()
        for i in range(5):  # a worker that still beats while it shuts down
            w.send(Heartbeat(WORKER, {}))
            w.send(ClientRequest(1000 + i, "zrpc", "ping", {}, b""))  # answered after the beat
        pongs = 0
        deadline = time.monotonic() + 10
        while pongs < 5 and time.monotonic() < deadline:
            msg = w.recv(0.1)
            if isinstance(msg, ClientReply):
                pongs += 1
            elif isinstance(msg, Heartbeat):
                w.heartbeats.append(msg.info)
        assert pongs == 5
        assert not [h for h in w.heartbeats if h.get("register")], w.heartbeats
        w.close()
        c.close()


def test_an_unknown_worker_is_asked_to_register(ctx):
    """The other side of the rule: a worker this broker does not know (it restarted) is."""
    with LoopBroker(ctx) as lb:
        w = FakeWorker(ctx, lb.endpoint, "stranger")
        w.send(Heartbeat(WORKER, {}))
        wait_until(lambda: (w.pump(0.05), [h for h in w.heartbeats if h.get("register")])[1], 10,
                   what="register: true")
        w.close()


# --- 6. what workers report, and forgetting workers ----------------------------------------------


def test_worker_internal_errors_raise_an_alert_with_its_name(ctx, monkeypatch):
    with LoopBroker(ctx) as lb:
        notices = spy(monkeypatch, lb.broker.core.monitor, "notice")
        c = Client(ctx, lb.endpoint)
        with LiveWorker(ctx, lb.endpoint, "buggy", {"internal_errors": 0, "active_epoch": 0}) as lw:
            wait_until(lambda: len(workers_of(c)) == 1, 10, what="worker registered")

            def errors() -> list[tuple[str, int]]:
                return [(n.subject, n.detail["count"]) for (n,) in list(notices) if n.name == "internal_error"]

            assert errors() == []
            lw.info["internal_errors"] = 2
            wait_until(errors, 10, what="an internal_error notice")
            beats = lw.w.heartbeats  # the broker's beats to it: time passes in its rhythm
            n = len(beats)
            wait_until(lambda: len(lw.w.heartbeats) >= n + 3, 10, what="more heartbeats")
            assert errors() == [("buggy", 2)]  # the same count again is nothing new
        c.close()


def test_a_removed_worker_is_forgotten_by_the_monitor(ctx, monkeypatch):
    with LoopBroker(ctx) as lb:
        forgotten = spy(monkeypatch, lb.broker.core.monitor, "forget")
        c = Client(ctx, lb.endpoint)
        leaver, silent = FakeWorker(ctx, lb.endpoint, "leaver"), FakeWorker(ctx, lb.endpoint, "silent")
        leaver.ready()
        silent.ready()
        wait_until(lambda: len(workers_of(c)) == 2, 10, what="workers registered")
        ids = {bytes.fromhex(w["id"]) for w in workers_of(c)}
        leaver.send(Disconnect())  # removed at once: nothing in flight
        # the silent one is lost after the liveness timeout
        wait_until(lambda: workers_of(c) == [], 10, what="both workers gone")
        assert {wid for (wid,) in forgotten} == ids
        leaver.close()
        silent.close()
        c.close()


def test_an_active_broker_steps_down_when_a_worker_sees_a_higher_epoch(ctx):
    dead_peer = f"tcp://127.0.0.1:{free_port()}"
    with LoopBroker(ctx, role="primary", state=f"tcp://127.0.0.1:{free_port()}",
                    peer_state=dead_peer) as lb:
        c = Client(ctx, lb.endpoint)
        with LiveWorker(ctx, lb.endpoint, "w", {"internal_errors": 0, "active_epoch": 0}) as lw:
            wait_until(lambda: len(workers_of(c)) == 1, 10, what="worker registered")
            # a lone primary serves once it has heard nothing from its peer for a while: each
            # request is a vote (a service nobody serves: nothing waits on a worker)
            wait_until(lambda: c.call("nothing", "x", budget_ms=200).status != Status.NOT_ACTIVE, 10,
                       what="lone primary active")
            st = c.status()["broker"]
            assert st["state"] == "active" and st["epoch"] == 1
            lw.info["active_epoch"] = 1  # what it hears from us: nothing newer
            wait_until(lambda: len(lw.w.heartbeats) >= 3, 10, what="heartbeats")
            assert c.status()["broker"]["state"] == "active"
            # the worker hears another broker announce itself active with epoch 3: ours is stale
            lw.info["active_epoch"] = 3
            wait_until(lambda: c.status()["broker"]["state"] == "passive", 10, what="stepped down")
            lw.info["active_epoch"] = 0  # the other broker is gone too
            # a later takeover (its peer still silent, a client votes) outbids that epoch
            wait_until(lambda: c.call("nothing", "x", budget_ms=200).status != Status.NOT_ACTIVE, 10,
                       what="active again")
            assert c.status()["broker"]["epoch"] == 4
        c.close()


# --- 7. restarts ----------------------------------------------------------------------------------


def published(batches: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The alert events among the actions the loop carried out."""
    return [a.event for (batch,) in list(batches) for a in batch
            if isinstance(a, Publish) and a.topic.startswith("alert.")]


def test_a_restarted_broker_says_so(ctx, monkeypatch):
    lb = LoopBroker(ctx, restarts=2)
    executed = spy(monkeypatch, lb.broker, "_execute")
    with lb:
        c = Client(ctx, lb.endpoint)
        assert c.status()["broker"]["restarts"] == 2
        raised = [(e["name"], e["severity"], e["detail"].get("restarts")) for e in published(executed)]
        assert ("broker_restarted", "warning", 2) in raised
        c.close()


def test_a_broker_never_restarted_raises_nothing_about_it(ctx, monkeypatch):
    lb = LoopBroker(ctx)
    executed = spy(monkeypatch, lb.broker, "_execute")
    with lb:
        c = Client(ctx, lb.endpoint)
        assert c.status()["broker"]["restarts"] == 0
        assert not [e for e in published(executed) if e["name"] == "broker_restarted"]
        c.close()


# --- 9. a full pipe is a send that did not happen --------------------------------------------


def test_a_request_that_could_not_go_out_is_not_counted_as_sent(ctx, monkeypatch):
    """A full pipe toward a worker (EAGAIN) means the call never reached it: the worker is
    treated as unreachable, the idempotent call is retried on the other worker, and nobody
    runs it twice."""
    with LoopBroker(ctx, liveness=100) as lb:  # these workers do not beat: only the pipe decides
        c = Client(ctx, lb.endpoint)
        a, b = FakeWorker(ctx, lb.endpoint, "a", capacity=1), FakeWorker(ctx, lb.endpoint, "b", capacity=1)
        a.ready()
        b.ready()
        wait_until(lambda: len(workers_of(c)) == 2, 10, what="workers registered")
        full: list[bytes] = []
        real = _loop.send_nowait

        def send_nowait(sock: Any, frames: list[bytes]) -> Sent:
            if not full and len(frames) == 3 and msgpack.unpackb(frames[1])[1] == 1:
                full.append(frames[0])  # the first REQUEST to a worker finds its pipe full
                return Sent.FULL
            return real(sock, frames)

        monkeypatch.setattr(_loop, "send_nowait", send_nowait)
        rid = c.request("calc", "add", [40, 2])
        seen: list[WorkerRequest] = []
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            for w in (a, b):
                w.pump(0.02)
                seen += w.requests
        assert len(seen) == 1, "the call went nowhere, or twice"
        got = a if a.requests else b
        assert got.sock.getsockopt(zmq.ROUTING_ID) != full[0]  # the other worker has it
        got.answer(got.requests.pop())
        r = c.reply(rid)
        assert r.status == Status.OK and unpack_result(r.body) == 42
        st = c.status()
        assert st["counters"]["send_full"] == 1
        for w in (a, b):
            w.pump(0.05)
        assert not (a.requests + b.requests)  # no second copy anywhere
        a.close()
        b.close()
        c.close()


# --- 2. a resumed broker does not serve its backlog before it knows what its peer did ----------


class PairWorker(threading.Thread):
    """One worker registered with both brokers of a pair, as zrpc.Worker is: it answers calls
    from either, and tells both (heartbeat `info`) the newest epoch a broker announces as
    active. `runs` records every call it was given, with the broker that gave it."""

    def __init__(self, ctx: zmq.Context, endpoints: list[str]) -> None:
        super().__init__(name="pair-worker", daemon=True)
        self.links = [FakeWorker(ctx, ep, "pw") for ep in endpoints]
        ident = os.urandom(16)
        for link, ep in zip(self.links, endpoints):  # one routing id on both, as a worker has
            link.sock.close(linger=0)
            link.sock = ctx.socket(zmq.DEALER)
            link.sock.linger = 0
            link.sock.setsockopt(zmq.ROUTING_ID, ident)
            link.sock.connect(ep)
        self.announced: list[tuple[str, int] | None] = [None] * len(endpoints)
        self.runs: list[tuple[int, int]] = []  # (broker index, request id)
        self.stop = threading.Event()

    def info(self) -> dict[str, Any]:
        epochs = [a[1] for a in self.announced if a is not None and a[0] == "active"]
        return {"internal_errors": 0, "active_epoch": max(epochs, default=0)}

    def run(self) -> None:
        for link in self.links:
            link.ready()
        next_beat = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                for link in self.links:
                    link.send(Heartbeat(WORKER, self.info()))
                next_beat = now + INTERVAL
            for i, link in enumerate(self.links):
                link.pump(0.005)
                for info in link.heartbeats:
                    if type(info.get("epoch")) is int:
                        self.announced[i] = (info.get("state"), info["epoch"])
                link.heartbeats.clear()
                while link.requests:
                    req = link.requests.pop(0)
                    self.runs.append((i, req.request_id))
                    link.answer(req)
        for link in self.links:
            link.close()


def test_a_stalled_active_broker_serves_nothing_until_it_knows_its_peer_did_not_take_over(ctx, monkeypatch):
    from tests.conftest import TcpRelay

    states = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    relay = TcpRelay(free_port(), int(states[1].rsplit(":", 1)[1]))  # the backup's news, to the primary
    try:
        p = LoopBroker(ctx, role="primary", state=states[0], peer_state=f"tcp://127.0.0.1:{relay.port}")
        b = LoopBroker(ctx, role="backup", state=states[1], peer_state=states[0])
        with p, b:
            cp, cb = Client(ctx, p.endpoint), Client(ctx, b.endpoint)
            wait_until(lambda: (cp.status()["broker"]["state"], cb.status()["broker"]["state"])
                       == ("active", "passive"), 10, what="pair settled")
            worker = PairWorker(ctx, [p.endpoint, b.endpoint])
            worker.start()
            try:
                wait_until(lambda: len(workers_of(cp)) == 1 and len(workers_of(cb)) == 1, 10,
                           what="worker registered with both")
                relay.cut()  # from now on the primary cannot hear the backup
                release, blocked = threading.Event(), threading.Event()

                def stall(*a: Any) -> None:
                    if not release.is_set():
                        blocked.set()
                        release.wait(30)

                spy(monkeypatch, p.broker.core.dispatcher, "tick", stall)
                assert blocked.wait(5)
                backlog = cp.request("calc", "add", [1, 2])  # waits in the stalled primary's socket
                # the primary is silent: a client that cannot reach it votes on the backup
                wait_until(lambda: cb.call("calc", "add", 3, 4).status == Status.OK, 10,
                           what="backup took over")
                assert cb.status()["broker"]["epoch"] == 2
                wait_until(lambda: worker.info()["active_epoch"] == 2, 10, what="the worker sees it")
                release.set()
                r = cp.reply(backlog)
                assert r.status == Status.NOT_ACTIVE  # the backlog is not served by the stalled one
                assert (0, backlog) not in worker.runs
                wait_until(lambda: cp.status()["broker"]["state"] == "passive", 10,
                           what="the primary learns from the worker that it was replaced")
                assert cb.status()["broker"]["state"] == "active"
                assert [run for run in worker.runs if run[0] == 0] == []  # nothing ran through it
            finally:
                worker.stop.set()
                worker.join(5)
            cp.close()
            cb.close()
    finally:
        relay.close()


# --- 6. a refused key is named in the alert ----------------------------------------------------


def test_a_refused_key_is_named_in_the_unauthorized_notice(ctx, monkeypatch, tmp_path):
    from zrpc._io._security import keygen, load_keypair, load_public

    _, server_secret = keygen(tmp_path / "server", "broker")
    keygen(tmp_path / "authorized", "friend")
    stranger_public, stranger_secret = keygen(tmp_path / "strangers", "stranger")
    lb = LoopBroker(ctx, curve_secret=str(server_secret), curve_authorized=str(tmp_path / "authorized"))
    notices = spy(monkeypatch, lb.broker.core.monitor, "notice")
    with lb:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = load_keypair(stranger_secret)
        sock.curve_serverkey = load_public(server_secret)
        sock.connect(lb.endpoint)
        sock.send_multipart(encode(Heartbeat(CLIENT, {})))

        def refused() -> list[Any]:
            return [n for (n,) in list(notices) if n.name == "unauthorized"]

        wait_until(refused, 10, what="an unauthorized notice")
        key = load_public(stranger_public).decode("ascii")
        assert refused()[0].detail["key"] == key and refused()[0].detail["reason"]
        sock.close()


# --- 8. every line names the broker ---------------------------------------------------------------


def test_every_log_line_names_the_broker_role_and_state(ctx, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="zrpc.broker")
    with LoopBroker(ctx, role="primary", state=f"tcp://127.0.0.1:{free_port()}",
                    peer_state=f"tcp://127.0.0.1:{free_port()}") as lb:
        c = Client(ctx, lb.endpoint)
        spy(monkeypatch, lb.broker.core.dispatcher, "snapshot",
            lambda *a: (_ for _ in ()).throw(KeyError("a bug")))  # an internal error, logged
        c.request("zrpc", "status", [])
        c.sock.send_multipart([b"garbage"])  # a malformed message, logged
        c.call("zrpc", "ping")
        wait_until(lambda: lb.broker._errors.count >= 1, 10, what="an internal error")
        c.close()
    records = [r for r in caplog.records if r.name == "zrpc.broker"]
    assert any("internal error" in r.getMessage() for r in records)
    assert any("malformed" in r.getMessage() for r in records)
    assert all(r.getMessage().startswith("broker[primary/") for r in records), \
        [r.getMessage() for r in records if not r.getMessage().startswith("broker[primary/")]
