"""The broker's socket loop: the only zmq user in broker/. It translates frames to core events
and core actions to frames, and owns nothing the cores could own."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from zrpc._clock import Clock, monotonic, timeout_ms
from zrpc._errors import ProtocolError
from zrpc._liveness import LivenessTracker
from zrpc._frames import (
    CLIENT,
    WORKER,
    ClientReply,
    ClientRequest,
    Disconnect,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    decode,
    encode,
)
from zrpc._serial import pack_error, pack_result
from zrpc._service import RESERVED
from zrpc._security import CurveKeys, ZapGuard, load_authorized, server_keys
from zrpc._sockets import DEFAULT_MAX_MESSAGE, NOBLOCK, SocketOptions, make_socket, send_frames

from ._bstar import Action as BStarAction
from ._bstar import (
    BinaryStar,
    ClientVoted,
    PeerAlert,
    PeerStateSeen,
    PublishState,
    StateChanged,
    decode_state,
    encode_state,
)
from ._monitor import Eject, Monitor, Thresholds
from ._monitor import Output as MonitorOutput
from ._dispatch import (
    AckLeave,
    Action,
    Dispatcher,
    Notice,
    ReplyArrived,
    ReplyToClient,
    RequestArrived,
    SendToWorker,
    WorkerLeaving,
    WorkerLost,
    WorkerReady,
)

BATCH = 512
"""Messages drained per wake-up: batching is measured to pay (DESIGN.md §2)."""

log = logging.getLogger("zrpc.broker")


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    role: str = "primary"
    state: str | None = None
    peer_state: str | None = None
    monitor: str | None = None
    lb: str = "least-outstanding"
    queue_limit: int = 1000
    queue_bytes: int = 32 * 1024 * 1024
    service_grace: float = 1.0
    heartbeat_interval: float = 0.25
    liveness: int = 3
    max_message: int = DEFAULT_MAX_MESSAGE
    metrics_port: int | None = None
    curve_secret: str | None = None  # this broker's key pair (NAME.key_secret)
    curve_authorized: str | None = None  # directory of the public keys admitted
    max_inflight_per_client: int = 10_000
    thresholds: Thresholds = field(default_factory=Thresholds)


def _libc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def _release_memory() -> None:
    """Hands freed memory back to the OS once a second: after a burst (a flood of large
    messages) glibc would otherwise keep the broker's peak size for good. Costs well under a
    millisecond; a no-op where glibc is not the allocator."""
    if _TRIM is not None:
        _TRIM(0)


class _Prefix(logging.LoggerAdapter):
    """Every log line names the broker's role and state."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        b = self.extra["broker"]  # type: ignore[index]
        return f"broker[{b.role}/{b.state}] {msg}", kwargs


class Broker:
    """One broker process: a ROUTER frontend shared by clients and workers."""

    def __init__(self, config: BrokerConfig, *, context: zmq.Context | None = None,
                 clock: Clock = monotonic) -> None:
        self.config = config
        self.role = config.role
        if (config.state is None) != (config.peer_state is None):
            raise ValueError("--state and --peer-state go together (both for a pair, neither alone)")
        # A broker with no peer serves at once; a pair member follows the Binary Star rules.
        self.bstar = BinaryStar(config.role, clock, config.heartbeat_interval) if config.peer_state else None
        self._clock = clock
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.dispatcher = Dispatcher(clock, strategy=config.lb, queue_limit=config.queue_limit,
                                     queue_bytes=config.queue_bytes,
                                     service_grace=config.service_grace,
                                     max_inflight_per_client=config.max_inflight_per_client)
        self.liveness: LivenessTracker[bytes] = LivenessTracker(
            clock, config.heartbeat_interval, config.liveness)
        self.monitor = Monitor(clock, config.heartbeat_interval, config.thresholds)
        self.metrics: dict[str, Any] = {}  # the latest `metrics` snapshot
        self.last_status: dict[str, Any] = {}  # refreshed every second, read by Prometheus
        self._next_eval = clock()
        self._next_metrics = clock() + 1.0
        self.log = _Prefix(log, {"broker": self})
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._keys: CurveKeys | None = None
        self._guard: ZapGuard | None = None
        self._front: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._started_wall = time.time()
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "sent", "malformed", "unroutable", "send_full", "not_active"), 0)
        self.ready = threading.Event()  # set once the frontend is bound

    # --- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Safe from a signal handler or another thread: the loop exits within 100 ms."""
        self._stop.set()

    def _security(self) -> tuple[CurveKeys | None, ZapGuard | None]:
        """CURVE on every socket when keys are given (DESIGN.md §6); ZAP admits only the public
        keys in --curve-authorized (and this broker's own, which its peer uses)."""
        cfg = self.config
        if (cfg.curve_secret is None) != (cfg.curve_authorized is None):
            raise ValueError("--curve-secret and --curve-authorized go together")
        if cfg.curve_secret is None:
            return None, None
        keys = server_keys(cfg.curve_secret)
        guard = ZapGuard(self._ctx, load_authorized(cfg.curve_authorized) | {keys.public})  # type: ignore[arg-type]
        guard.start()
        return keys, guard

    def reload_keys(self) -> None:
        """SIGHUP: read the authorized keys directory again."""
        self._reload.set()

    def bind(self) -> None:
        self._keys, self._guard = self._security()
        opts = SocketOptions(max_message=self.config.max_message, curve=self._keys)
        self._front = make_socket(self._ctx, zmq.ROUTER, options=opts)
        try:
            self._front.bind(self.config.frontend)
        except zmq.ZMQError as exc:
            self._front.close()
            raise OSError(f"cannot bind frontend {self.config.frontend}: {exc.strerror}") from None
        if self.bstar is not None:
            self._pub = make_socket(self._ctx, zmq.PUB, options=opts)
            try:
                self._pub.bind(self.config.state)  # type: ignore[arg-type]
            except zmq.ZMQError as exc:
                self._front.close()
                self._pub.close()
                raise OSError(f"cannot bind state endpoint {self.config.state}: {exc.strerror}") from None
            # the peer link reconnects on the heartbeat's timescale, not the 8 s client cap:
            # a restarted peer must be heard within a couple of intervals
            ivl = max(10, int(self.config.heartbeat_interval * 1000))
            self._sub = make_socket(self._ctx, zmq.SUB, options=SocketOptions(
                max_message=self.config.max_message, reconnect_ivl_ms=ivl, reconnect_ivl_max_ms=2 * ivl,
                curve=self._keys.as_client_of(self._keys.public) if self._keys else None))
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.connect(self.config.peer_state)  # type: ignore[arg-type]
        if self.config.monitor is not None:
            self._mon = make_socket(self._ctx, zmq.PUB, options=opts)
            try:
                self._mon.bind(self.config.monitor)
            except zmq.ZMQError as exc:
                for sock in (self._front, self._pub, self._sub, self._mon):
                    if sock is not None:
                        sock.close()
                raise OSError(f"cannot bind monitor endpoint {self.config.monitor}: {exc.strerror}") from None
        if self.config.metrics_port is not None:
            from ._metrics import serve_prometheus

            self.last_status = self.status()
            serve_prometheus(self, self.config.metrics_port)
        self.ready.set()

    def run(self) -> None:
        if self._front is None:
            self.bind()
        front = self._front
        assert front is not None
        self.log.info("serving on %s (lb=%s, queue_limit=%d)", self.config.frontend,
                      self.config.lb, self.config.queue_limit)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        if self._sub is not None:
            poller.register(self._sub, zmq.POLLIN)
        recv = front.recv_multipart
        try:
            while not self._stop.is_set():
                now = self._clock()
                nxt = self.liveness.next_deadline()
                dd = self.dispatcher.next_deadline()
                if dd is not None:
                    nxt = min(nxt, dd)
                if self.bstar is not None:
                    nxt = min(nxt, self.bstar.next_deadline())
                nxt = min(nxt, self._next_eval, self._next_metrics)
                if poller.poll(timeout_ms(nxt, now, cap=0.1)):
                    # the peer's state first: a broker resumed after SIGSTOP must learn that
                    # its peer took over before it serves anything from its backlog
                    self._read_peer()
                    for _ in range(BATCH):
                        try:
                            frames = recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                self._execute(self.dispatcher.tick())
                self._keep_alive()
        finally:
            front.close(linger=0)
            for sock in (self._pub, self._sub, self._mon):
                if sock is not None:
                    sock.close(linger=0)
            if self._guard is not None:
                self._guard.stop()
            if self._own_ctx:
                self._ctx.term()
            self.log.info("stopped")

    # --- input ---------------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        self.counters["received"] += 1
        if len(frames) != 3:
            self._malformed(frames[0] if frames else b"?", f"{len(frames) - 1} frames, expected 2")
            return
        peer, head, body = frames
        try:
            msg = decode(head, body)
        except ProtocolError as exc:
            if exc.reply_to is not None:
                self._send(peer, encode(ClientReply(exc.reply_to, Status.PROTOCOL_ERROR,
                                                    pack_error("ProtocolError", str(exc)))))
            self._malformed(peer, str(exc))
            return
        t = type(msg)
        d = self.dispatcher
        if t is ClientRequest:
            if msg.service == RESERVED:  # type: ignore[union-attr]
                self._internal(peer, msg)  # type: ignore[arg-type]
            elif self.bstar is None or self.bstar.accepts_clients or self._vote():
                self._execute(d.handle(RequestArrived(peer, msg)))  # type: ignore[arg-type]
            else:
                self.counters["not_active"] += 1
                self._send(peer, encode(ClientReply(msg.request_id, Status.NOT_ACTIVE,  # type: ignore[union-attr]
                                                    pack_error("NotActive", f"broker is {self.state}"))))
        elif t is WorkerReply:
            self._execute(d.handle(ReplyArrived(peer, msg)))  # type: ignore[arg-type]
            self._worker_seen(peer)
        elif t is Ready:
            self._execute(d.handle(WorkerReady(peer, msg)))  # type: ignore[arg-type]
            self.liveness.seen(peer)
            self._send(peer, encode(Heartbeat(WORKER, self._hello())))
        elif t is Heartbeat:
            if msg.sender == WORKER:  # type: ignore[union-attr]
                self._worker_seen(peer)
                if d.has_worker(peer):
                    self.monitor.worker_heartbeat(peer)
            else:
                self._send(peer, encode(Heartbeat(CLIENT, self._hello())))
        elif t is Disconnect:
            self._execute(d.handle(WorkerLeaving(peer)))
            if d.has_worker(peer):  # still finishing calls: still watched
                self.liveness.seen(peer)
        else:
            self._malformed(peer, f"{t.__name__} is not sent to a broker")

    def _worker_seen(self, peer: bytes) -> None:
        """Any traffic from a worker is a heartbeat; an unknown one is asked to register
        (this broker restarted, or declared it dead while it was only stopped)."""
        if self.dispatcher.has_worker(peer):
            self.liveness.seen(peer)
        else:
            self._ask_register(peer)

    @property
    def state(self) -> str:
        return "active" if self.bstar is None else self.bstar.state.value

    def _vote(self) -> bool:
        """A client request to a broker that is not active: a vote for takeover."""
        assert self.bstar is not None
        self._bstar_actions(self.bstar.handle(ClientVoted()))
        return self.bstar.accepts_clients

    def _read_peer(self) -> None:
        sub, bstar = self._sub, self.bstar
        if sub is None or bstar is None:
            return
        while True:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                state, epoch = decode_state(frames)
            except ProtocolError as exc:
                self._malformed(b"peer", f"state message: {exc}")
                continue
            self._bstar_actions(bstar.handle(PeerStateSeen(state, epoch)))

    def _bstar_actions(self, actions: list[BStarAction]) -> None:
        for a in actions:
            if isinstance(a, PublishState):
                try:
                    send_frames(self._pub, encode_state(a.state, a.epoch, self.role), NOBLOCK)  # type: ignore[arg-type]
                except zmq.Again:
                    pass
            elif isinstance(a, StateChanged):
                self.log.info("%s -> %s: %s", a.old.value, a.new.value, a.reason)
            elif isinstance(a, PeerAlert):
                self._monitor_outputs(self.monitor.peer(a))

    def _security_events(self) -> None:
        guard = self._guard
        if guard is None:
            return
        if self._reload.is_set():
            self._reload.clear()
            try:
                guard.allowed = load_authorized(self.config.curve_authorized) | {self._keys.public}  # type: ignore[arg-type,union-attr]
                self.log.info("reloaded %d authorized keys", len(guard.allowed) - 1)
            except ValueError as exc:
                self.log.error("keeping the old authorized keys: %s", exc)
        while guard.refused:
            address, reason = guard.refused.popleft()
            self._notice(Notice("unauthorized", address, {"reason": reason}))

    def _keep_alive(self) -> None:
        self._security_events()
        if self.bstar is not None:
            self._bstar_actions(self.bstar.tick())
        now = self._clock()
        if now >= self._next_eval:
            self._next_eval = now + min(0.1, self.config.heartbeat_interval / 2)
            if self.state == "active":  # the passive broker's view would only repeat it
                self._monitor_outputs(self.monitor.evaluate(self.dispatcher.snapshot()))
        if now >= self._next_metrics:
            self._next_metrics = now + 1.0
            snap = self.dispatcher.snapshot()
            metrics, alerts = self.monitor.metrics(snap)
            metrics.update(self._identity(), counters={**snap["counters"], **self.counters})
            self.metrics = metrics
            self.last_status = self.status()
            self._publish("metrics", metrics)
            if self.state == "active":
                self._monitor_outputs(alerts)
            _release_memory()
        for wid in self.liveness.expired():
            if self.dispatcher.has_worker(wid):
                self._execute(self.dispatcher.handle(
                    WorkerLost(wid, f"silent for {self.liveness.timeout:.2f}s")))
        if self.liveness.beat():
            frames = encode(Heartbeat(WORKER, self._hello()))
            for wid in self.dispatcher.worker_ids():
                self._send(wid, frames)

    def _hello(self) -> dict[str, Any]:
        return {"interval_ms": int(self.config.heartbeat_interval * 1000),
                "liveness": self.config.liveness, "role": self.role, "state": self.state,
                "epoch": self.bstar.epoch if self.bstar is not None else 0}

    def _ask_register(self, peer: bytes) -> None:
        info = self._hello()
        info["register"] = True
        self._send(peer, encode(Heartbeat(WORKER, info)))

    def _malformed(self, peer: bytes, why: str) -> None:
        n = self.counters["malformed"] = self.counters["malformed"] + 1
        if n <= 10 or n % 1000 == 0:
            self.log.warning("dropped malformed message #%d from %s: %s", n, peer.hex()[:16], why)

    def _internal(self, peer: bytes, req: ClientRequest) -> None:
        """Answers the reserved `zrpc` service (as Majordomo's mmi.*); never a failover vote."""
        if req.method == "status":
            body, status = pack_result(self.status()), Status.OK
        elif req.method == "services":
            body, status = pack_result(self.dispatcher.services_map()), Status.OK
        elif req.method == "ping":
            body, status = pack_result("pong"), Status.OK
        else:
            body = pack_error("MethodNotFound", f"the broker has no method zrpc.{req.method}")
            status = Status.METHOD_NOT_FOUND
        self._send(peer, encode(ClientReply(req.request_id, status, body)))

    def status(self) -> dict[str, Any]:
        snap = self.dispatcher.snapshot()
        pair = self.bstar.snapshot() if self.bstar is not None else {}
        snap["broker"] = {
            "endpoint": self.config.frontend,
            "role": self.role,
            "state": self.state,
            "peer_state": pair.get("peer_state"),
            "epoch": pair.get("epoch"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "uptime_s": round(time.time() - self._started_wall, 3),
        }
        snap["counters"].update(self.counters)
        snap["alerts"] = [{"name": a.name, "severity": a.severity, "subject": a.subject,
                           "detail": a.detail} for a in self.monitor.active]
        for w in snap["workers"]:
            w["phi"] = round(self.monitor.phi(bytes.fromhex(w["id"])), 2)
        return snap

    # --- output --------------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        pending = actions
        while pending:
            more: list[Action] = []
            for a in pending:
                t = type(a)
                if t is SendToWorker:
                    if not self._send(a.worker_id, encode(a.message)):  # type: ignore[union-attr]
                        more.extend(self.dispatcher.handle(WorkerLost(a.worker_id, "unreachable")))  # type: ignore[union-attr]
                elif t is ReplyToClient:
                    self._send(a.client_id, encode(ClientReply(a.request_id, a.status, a.body)))  # type: ignore[union-attr]
                elif t is AckLeave:
                    self._send(a.worker_id, encode(Disconnect()))  # type: ignore[union-attr]
                elif t is Notice:
                    self._notice(a)  # type: ignore[arg-type]
            pending = more

    def _notice(self, n: Notice) -> None:
        outputs = self.monitor.notice(n) if self.state == "active" or n.name == "unauthorized" else []
        if not outputs:
            self.log.debug("%s %s %s", n.name, n.subject, n.detail)
        self._monitor_outputs(outputs)

    def _monitor_outputs(self, outputs: list[MonitorOutput]) -> None:
        for o in outputs:
            if isinstance(o, Eject):
                self.dispatcher.set_ejected(o.worker_id, o.ejected)
                continue
            level = {"info": logging.INFO, "warning": logging.WARNING}.get(o.severity, logging.ERROR)
            if o.state == "resolved":
                level = logging.INFO
            self.log.log(level, "alert %s %s: %s %s", o.name, o.state, o.subject, o.detail)
            self._publish("alert." + o.name, {
                "name": o.name, "severity": o.severity, "state": o.state,
                "resolved": o.state == "resolved", "subject": o.subject, "detail": o.detail,
                **self._identity()})

    def _identity(self) -> dict[str, Any]:
        return {"time": time.time(), "broker": self.config.frontend, "role": self.role,
                "broker_state": self.state}

    def _publish(self, topic: str, event: dict[str, Any]) -> None:
        if self._mon is None:
            return
        try:
            send_frames(self._mon, [topic.encode(), pack_result(event)], NOBLOCK)
        except zmq.ZMQError:
            pass  # a monitor must never slow the broker down

    def _send(self, peer: bytes, frames: list[bytes]) -> bool:
        """False when the peer is gone (ROUTER_MANDATORY); a full pipe is counted, not fatal."""
        try:
            send_frames(self._front, [peer, *frames], NOBLOCK)  # type: ignore[arg-type]
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self.counters["unroutable"] += 1
                return False
            if exc.errno == errno.EAGAIN:
                self.counters["send_full"] += 1
                return True
            raise
        self.counters["sent"] += 1
        return True
