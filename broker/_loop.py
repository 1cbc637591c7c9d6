"""The broker's socket loop: the only zmq user in broker/. It translates frames to core events
and core actions to frames, and owns nothing the cores could own."""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from zrpc._core._clock import Clock, monotonic, timeout_ms
from zrpc._errors import ProtocolError
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
    decode,
    encode,
)
from zrpc._io._internal import InternalErrors
from zrpc._core._liveness import LivenessTracker
from zrpc._io._security import CurveKeys, ZapGuard, load_authorized, server_keys
from zrpc._core._serial import pack_error, pack_result
from zrpc._core._service import RESERVED
from zrpc._io._sockets import (
    DEFAULT_MAX_MESSAGE,
    NOBLOCK,
    SocketOptions,
    make_socket,
    send_frames,
)

from zrpc.broker._core._bstar import (
    MAX_EPOCH,
    BinaryStar,
    BStar,
    ClientVoted,
    HigherEpochSeen,
    PeerAlert,
    PeerStateSeen,
    PublishState,
    ServingChanged,
    Stalled,
    StateChanged,
    decode_state,
    encode_state,
)
from zrpc.broker._core._bstar import Action as BStarAction
from zrpc.broker._core._dispatch import (
    AckLeave,
    Action,
    Activated,
    Deactivated,
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
from zrpc.broker._core._monitor import Eject, Monitor, Thresholds
from zrpc.broker._core._monitor import Output as MonitorOutput

BATCH = 512
"""Messages drained per wake-up: batching is measured to pay (DESIGN.md §2)."""

DRAIN_TIMEOUTS = 10
"""After a stall of our own, liveness is judged once the frontend is drained, or after this
many liveness timeouts of draining (a flood that never drains must not hide a dead worker)."""

RESTART_ALERT_S = 60.0
"""How long `broker_restarted` stays raised after a restarted broker starts."""

ALWAYS_NOTICED = frozenset({"unauthorized", "internal_error", "broker_restarted"})
"""Notices a passive broker reports too: they are about this broker, not about the calls the
active one serves."""


class Sent(enum.Enum):
    """What became of a message given to the frontend."""

    OK = "sent"
    GONE = "unroutable"  # the peer is gone (ROUTER_MANDATORY)
    FULL = "full"  # its pipe is full: the message did not go out

log = logging.getLogger("zrpc.broker")

from zrpc.broker._config import BrokerConfig  # noqa: E402 (re-exported)


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


class _Prefix(logging.LoggerAdapter[logging.Logger]):
    """Every log line names the broker's role and state (the loop logs through nothing else)."""

    def __init__(self, logger: logging.Logger, broker: Broker) -> None:
        super().__init__(logger, {})
        self.broker = broker

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        b = self.broker
        return f"broker[{b.role}/{b.state}] {msg}", kwargs


class Broker:
    """One broker process: a ROUTER frontend shared by clients and workers."""

    def __init__(self, config: BrokerConfig, *, context: zmq.Context | None = None,  # type: ignore[type-arg]
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
        self.log = _Prefix(log, self)
        self._errors = InternalErrors(self.log, "broker")
        self._errors_reported = 0
        self._worker_errors: dict[bytes, int] = {}  # internal errors each worker last reported
        # what the dispatcher was last told: a lone broker serves from the start, a pair
        # member once Binary Star says so
        self._serving = self.bstar is None
        # a stall of our own (see _checkpoint): liveness waits for the backlog to be read
        self._mark = clock()
        self._stall_min = config.heartbeat_interval
        self._drained = True
        self._drain_until: float | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._keys: CurveKeys | None = None
        self._guard: ZapGuard | None = None
        self._front: zmq.Socket | None = None  # type: ignore[type-arg]
        self._pub: zmq.Socket | None = None  # type: ignore[type-arg]
        self._sub: zmq.Socket | None = None  # type: ignore[type-arg]
        self._mon: zmq.Socket | None = None  # type: ignore[type-arg]
        self._started_wall = time.time()
        # names this run of the broker in heartbeats: a client that sees it change knows the
        # broker restarted (faster than it could notice) and re-sends the calls it had there
        self._boot = os.urandom(4).hex()
        self._restart_resolved = False
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
            from zrpc.broker._metrics import serve_prometheus

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
        with self._errors.contain("the start"):
            self._start()
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        if self._sub is not None:
            poller.register(self._sub, zmq.POLLIN)
        recv = front.recv_multipart
        on_frames = self._on_frames
        contain = self._errors.contain
        self._mark = self._clock()
        try:
            while not self._stop.is_set():
                ms = self._poll_timeout()
                events = poller.poll(ms)
                with contain("a stall of the loop"):
                    self._checkpoint(ms / 1000)
                if events:
                    # the peer's state first: a broker resumed after SIGSTOP must learn that
                    # its peer took over before it serves anything from its backlog
                    with contain("the peer's state"):
                        self._read_peer()
                    for _ in range(BATCH):
                        try:
                            frames = recv(zmq.NOBLOCK)
                        except zmq.Again:
                            self._drained = True
                            break
                        # a bug costs this one message, never the broker (a plain try: it
                        # costs nothing on this path until something raises)
                        try:
                            on_frames(frames)
                        except Exception as exc:  # noqa: BLE001 - that is the point
                            self._frontend_failed(exc, frames)
                else:
                    self._drained = True
                with contain("a stall of the loop"):
                    self._checkpoint()
                with contain("the dispatcher's timers"):
                    self._execute(self.dispatcher.tick())
                self._keep_alive()
                self._report_errors()
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

    def _start(self) -> None:
        """A lone broker dispatches at once, a pair member only once it is ACTIVE; a broker a
        supervisor had to restart says so (the crash before it must not go unseen)."""
        self._activate(self._serving)
        n = self.config.restarts
        if n > 0:
            self.log.warning("started again after %d restart(s) by its supervisor: the previous "
                             "run died (see its log)", n)
            self._notice(Notice("broker_restarted", self._errors.where, {"restarts": n}))

    def _poll_timeout(self) -> int:
        """Milliseconds until the earliest deadline of any core, 100 at most."""
        now = self._clock()
        try:
            nxt = min(self.liveness.next_deadline(), self._next_eval, self._next_metrics)
            dd = self.dispatcher.next_deadline()
            if dd is not None:
                nxt = min(nxt, dd)
            if self.bstar is not None:
                nxt = min(nxt, self.bstar.next_deadline())
        except Exception as exc:  # noqa: BLE001 - a core's bug must not end the loop
            self._errors.record(exc, "the next deadline")
            nxt = now + 0.01
        ms = timeout_ms(nxt, now, cap=0.1)
        return 100 if ms is None else ms

    def _checkpoint(self, allowed: float = 0.0) -> None:
        """Notices a stall of our own: more time went by since the last checkpoint than the
        poll was allowed to wait, by more than a heartbeat interval (SIGSTOP, a starved
        machine, a step that took too long)."""
        now = self._clock()
        gap = now - self._mark - allowed
        self._mark = now
        if gap > self._stall_min:
            self._stalled(gap)

    def _stalled(self, seconds: float) -> None:
        """Our silence is no evidence against anyone: liveness moves every peer's last-seen
        on by the stall and judges nobody before the frontend's backlog (their heartbeats
        may be in it) has been read; Binary Star learns of it before any client request is
        served, so that a resumed broker does not serve its backlog before it knows what its
        peer did meanwhile."""
        level = logging.WARNING if seconds >= self.liveness.timeout else logging.DEBUG
        self.log.log(level, "the loop stalled for %.2fs (stopped, or starved of CPU): peers are "
                     "given that time back", seconds)
        self.liveness.pause(seconds)
        self._drained = False
        if self._drain_until is None:  # not moved by the next stall: a dead worker is found
            self._drain_until = self._clock() + DRAIN_TIMEOUTS * self.liveness.timeout
        if self.bstar is not None:
            self._bstar_actions(self.bstar.handle(Stalled(seconds)))

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
                                                    pack_error("NotActive", self._not_active()))))
        elif t is WorkerReply:
            self._worker_seen(peer)
            self._worker_event(peer, ReplyArrived(peer, msg))  # type: ignore[arg-type]
        elif t is Ready:
            self._execute(d.handle(WorkerReady(peer, msg)))  # type: ignore[arg-type]
            self.liveness.seen(peer)
            self._send(peer, encode(Heartbeat(WORKER, self._hello())))
        elif t is Heartbeat:
            if msg.sender == WORKER:  # type: ignore[union-attr]
                self._worker_seen(peer)
                if d.has_worker(peer):
                    self.monitor.worker_heartbeat(peer)
                    if msg.info:  # type: ignore[union-attr]
                        self._worker_info(peer, msg.info)  # type: ignore[union-attr]
            else:
                self._send(peer, encode(Heartbeat(CLIENT, self._hello())))
        elif t is Disconnect:
            self._worker_event(peer, WorkerLeaving(peer))
            if d.has_worker(peer):  # still finishing calls: still watched
                self.liveness.seen(peer)
        else:
            self._malformed(peer, f"{t.__name__} is not sent to a broker")

    def _frontend_failed(self, exc: Exception, frames: list[bytes]) -> None:
        """A message this broker failed on (its own bug): counted and logged by
        InternalErrors, and a client request is answered rather than left to time out."""
        self._errors.record(exc, "a frontend message")
        try:
            if len(frames) != 3:
                return
            msg = decode(frames[1], frames[2])
            if type(msg) is ClientRequest:
                self._send(frames[0], encode(ClientReply(msg.request_id, Status.ERROR, pack_error(
                    "InternalError", "the broker failed while handling this request (an internal "
                    "error, logged there); it may have been dispatched"))))
        except Exception as again:  # noqa: BLE001 - nothing more to do for this message
            self._errors.record(again, "the answer to a failed message")

    def _worker_event(self, peer: bytes, event: ReplyArrived | WorkerLeaving) -> None:
        """A worker's message for the dispatcher; a worker it removed (its last reply after
        DISCONNECT) is forgotten everywhere else too."""
        d = self.dispatcher
        known = d.has_worker(peer)
        self._execute(d.handle(event))
        if known and not d.has_worker(peer):
            self._forget(peer)

    def _worker_seen(self, peer: bytes) -> None:
        """Any traffic from a worker is a heartbeat; an unknown one is asked to register
        (this broker restarted, or declared it dead while it was only stopped), unless it
        is one that left cleanly: it is gone on purpose."""
        d = self.dispatcher
        if d.has_worker(peer):
            self.liveness.seen(peer)
        elif d.wants_register(peer):
            self._ask_register(peer)

    def _worker_info(self, peer: bytes, info: dict[str, Any]) -> None:
        """A registered worker's heartbeat `info`: its own internal errors, and the newest
        epoch it sees a broker announce as ACTIVE (fencing when our state link fails one
        way)."""
        n = info.get("internal_errors")
        if type(n) is int and n >= 0:
            before = self._worker_errors.get(peer, 0)
            if n != before:
                self._worker_errors[peer] = n
            if n > before:
                w = self.dispatcher.workers.get(peer)
                name = w.name if w is not None else peer.hex()
                self._notice(Notice("internal_error", name, {
                    "error": f"the worker reports {n - before} new internal error(s); see its log",
                    "count": n, "worker": peer.hex()}))
        epoch = info.get("active_epoch")
        bstar = self.bstar
        if (bstar is not None and type(epoch) is int and bstar.state is BStar.ACTIVE
                and bstar.epoch < epoch <= MAX_EPOCH):
            self._bstar_actions(bstar.handle(HigherEpochSeen(epoch)))

    @property
    def state(self) -> str:
        return "active" if self.bstar is None else self.bstar.state.value

    def _not_active(self) -> str:
        if self.bstar is not None and self.bstar.state is BStar.ACTIVE:
            return "broker is active but stalled: it waits to hear its peer before it serves"
        return f"broker is {self.state}"

    def _vote(self) -> bool:
        """A client request to a broker that is not active: a vote for takeover."""
        assert self.bstar is not None
        self._bstar_actions(self.bstar.handle(ClientVoted()))
        return self.bstar.accepts_clients

    def _read_peer(self) -> None:
        sub, bstar = self._sub, self.bstar
        if sub is None or bstar is None:
            return
        actions: list[BStarAction] = []
        for _ in range(BATCH):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            with self._errors.contain("a state message from the peer"):
                try:
                    state, epoch, role = decode_state(frames)
                except ProtocolError as exc:
                    self._malformed(b"peer", f"state message: {exc}")
                    continue
                actions.extend(bstar.handle(PeerStateSeen(state, epoch, role)))
        self._bstar_actions(actions)  # all of the backlog's news at once: serving flips once

    def _bstar_actions(self, actions: list[BStarAction]) -> None:
        serving: bool | None = None
        for a in actions:
            if isinstance(a, PublishState):
                if self._pub is not None:
                    try:
                        send_frames(self._pub, encode_state(a.state, a.epoch, self.role), NOBLOCK)
                    except zmq.Again:
                        pass
            elif isinstance(a, StateChanged):
                self.log.info("%s -> %s: %s", a.old.value, a.new.value, a.reason)
                if a.new is BStar.ACTIVE:
                    self._monitor_outputs(self.monitor.became_active())
            elif isinstance(a, ServingChanged):
                serving = a.serving
                self.log.info("%s clients: %s", "serving" if a.serving else "not serving", a.reason)
            elif isinstance(a, PeerAlert):
                if a.name == "role_conflict" and not a.resolved:
                    self.log.error("role conflict: %s", a.detail.get("detail", a.detail))
                self._monitor_outputs(self.monitor.peer(a))
        if serving is not None and serving != self._serving:
            # leaving ACTIVE (or doubting it): nothing new goes to workers from here, and the
            # queue is answered NOT_ACTIVE, so that no call runs on both brokers
            self._serving = serving
            self._activate(serving)

    def _activate(self, serving: bool) -> None:
        self._execute(self.dispatcher.handle(Activated() if serving else Deactivated()))

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
            address, key, reason = guard.refused.popleft()
            self._notice(Notice("unauthorized", address, {"reason": reason, "key": key}))

    def _keep_alive(self) -> None:
        """Every timer step, each contained on its own: one failing never skips the others."""
        contain = self._errors.contain
        with contain("a stall of the loop"):
            self._checkpoint()  # before any timer acts on a clock that jumped under it
        with contain("security events"):
            self._security_events()
        if self.bstar is not None:
            with contain("the Binary Star timers"):
                # what the peer already sent is heard before its silence is judged: a state
                # message waiting unread is not a lost peer
                self._read_peer()
                self._bstar_actions(self.bstar.tick())
        now = self._clock()
        if now >= self._next_eval:
            self._next_eval = now + min(0.1, self.config.heartbeat_interval / 2)
            if self.state == "active":  # the passive broker's view would only repeat it
                with contain("the monitor's evaluation"):
                    self._monitor_outputs(self.monitor.evaluate(self.dispatcher.snapshot()))
        if now >= self._next_metrics:
            self._next_metrics = now + 1.0
            with contain("the metrics snapshot"):
                self._metrics_step()
        with contain("a stall of the loop"):
            self._checkpoint()  # a slow step above is a stall too: before anyone is judged
        self._judge_liveness()
        with contain("heartbeats to workers"):
            if self.liveness.beat():
                frames = encode(Heartbeat(WORKER, self._hello()))
                for wid in self.dispatcher.worker_ids():
                    self._send(wid, frames)

    def _judge_liveness(self) -> None:
        if self._drain_until is not None:
            if not self._drained and self._clock() < self._drain_until:
                return  # after our own stall: their heartbeats may still be in the backlog
            self._drain_until = None
        for wid in self.liveness.expired():
            with self._errors.contain("a silent worker"):
                if self.dispatcher.has_worker(wid):
                    self._execute(self._lose(wid, f"silent for {self.liveness.timeout:.2f}s"))

    def _lose(self, wid: bytes, reason: str) -> list[Action]:
        """The dispatcher's answer to a lost worker; the worker is forgotten everywhere."""
        out = self.dispatcher.handle(WorkerLost(wid, reason))
        self._forget(wid)
        return out

    def _forget(self, wid: bytes) -> None:
        self.monitor.forget(wid)
        self.liveness.forget(wid)
        self._worker_errors.pop(wid, None)

    def _restart_settled(self) -> None:
        """`broker_restarted` stays in force (in `zrpc status`, on the monitor) for a minute
        after the start, so that a subscriber that reconnects to the new run still sees it."""
        if self.config.restarts > 0 and not self._restart_resolved and \
                time.time() - self._started_wall >= RESTART_ALERT_S:
            self._restart_resolved = True
            self._notice(Notice("broker_restarted", self._errors.where,
                                {"restarts": self.config.restarts, "resolved": True}))

    def _metrics_step(self) -> None:
        self._restart_settled()
        snap = self.dispatcher.snapshot()
        metrics, alerts = self.monitor.metrics(snap)
        metrics.update(self._identity(), counters={**snap["counters"], **self.counters,
                                                   "internal_errors": self._errors.count})
        self.metrics = metrics
        self.last_status = self.status()
        self._publish("metrics", metrics)
        if self.state == "active":
            self._monitor_outputs(alerts)
        d = self.dispatcher
        for wid in [w for w in self._worker_errors if not d.has_worker(w)]:
            del self._worker_errors[wid]  # bounded by the workers we know, whatever path removed one
        _release_memory()

    def _report_errors(self) -> None:
        """Our own internal errors since the last iteration become one `internal_error` alert."""
        errors = self._errors
        if errors.count == self._errors_reported:
            return
        self._errors_reported = errors.count
        self._notice(Notice("internal_error", errors.where, {"error": errors.last, "count": errors.count}))
        self._errors_reported = errors.count  # an alert that failed too is not alerted again

    def _hello(self) -> dict[str, Any]:
        return {"interval_ms": int(self.config.heartbeat_interval * 1000),
                "liveness": self.config.liveness, "role": self.role, "state": self.state,
                "epoch": self.bstar.epoch if self.bstar is not None else 0, "boot": self._boot}

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
            "serving": self._serving,
            "peer_state": pair.get("peer_state"),
            "epoch": pair.get("epoch"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "uptime_s": round(time.time() - self._started_wall, 3),
            "restarts": self.config.restarts,
        }
        snap["counters"].update(self.counters)
        snap["counters"]["internal_errors"] = self._errors.count
        snap["alerts"] = [{"name": a.name, "severity": a.severity, "subject": a.subject,
                           "detail": a.detail} for a in self.monitor.active]
        for w in snap["workers"]:
            w["phi"] = round(self.monitor.phi(bytes.fromhex(w["id"])), 2)
        return snap

    # --- output --------------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        pending = actions
        d = self.dispatcher
        while pending:
            more: list[Action] = []
            for a in pending:
                t = type(a)
                if t is SendToWorker:
                    wid = a.worker_id  # type: ignore[union-attr]
                    if not d.has_worker(wid):
                        continue  # lost earlier in this batch: its calls were dealt with then
                    sent = self._send(wid, encode(a.message))  # type: ignore[union-attr]
                    if sent is not Sent.OK:
                        # it did not go out: the worker is unreachable, and its calls are
                        # retried or answered by the dispatcher's rules for a lost worker
                        more.extend(self._lose(wid, "unreachable" if sent is Sent.GONE else
                                               "its queue is full (the call did not go out)"))
                elif t is ReplyToClient:
                    self._send(a.client_id, encode(ClientReply(a.request_id, a.status, a.body)))  # type: ignore[union-attr]
                elif t is AckLeave:
                    self._send(a.worker_id, encode(Disconnect()))  # type: ignore[union-attr]
                elif t is Notice:
                    self._notice(a)  # type: ignore[arg-type]
            pending = more

    def _notice(self, n: Notice) -> None:
        try:
            outputs = (self.monitor.notice(n) if self.state == "active" or n.name in ALWAYS_NOTICED
                       else [])
            if not outputs:
                self.log.debug("%s %s %s", n.name, n.subject, n.detail)
            self._monitor_outputs(outputs)
        except Exception as exc:  # noqa: BLE001 - an alert's bug must not cost the calls around it
            self._errors.record(exc, f"the {n.name} notice")

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

    def _send(self, peer: bytes, frames: list[bytes]) -> Sent:
        """GONE when the peer is gone (ROUTER_MANDATORY), FULL when its pipe is full: either
        way nothing went out. Counted; what it means is the caller's to decide."""
        try:
            send_frames(self._front, [peer, *frames], NOBLOCK)  # type: ignore[arg-type]
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self.counters["unroutable"] += 1
                return Sent.GONE
            if exc.errno == errno.EAGAIN:
                self.counters["send_full"] += 1
                return Sent.FULL
            raise
        self.counters["sent"] += 1
        return Sent.OK
