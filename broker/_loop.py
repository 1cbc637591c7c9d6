"""The broker's socket loop, the only zmq user in broker/: it reads sockets, hands what it read
to BrokerCore (broker/_core/_broker.py, where every rule lives) and carries out its actions."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from functools import partial
from typing import Any

import zmq

from zrpc._core._clock import Clock, monotonic, timeout_ms
from zrpc._core._membership import Event as ClusterEvent
from zrpc._core._membership import parse_cluster
from zrpc._core._serial import pack_result
from zrpc._io._etcd import EtcdEdge, EtcdError, KeyEdge, KeyValue, LeaseGone
from zrpc._io._internal import InternalErrors
from zrpc._io._security import (
    EVERY_ROLE,
    ROLES_FILE,
    CurveKeys,
    Roles,
    ZapGuard,
    authorized_keys,
    load_roles,
    server_keys,
)
from zrpc._io._sockets import (
    NOBLOCK,
    Sent,
    SocketOptions,
    Waker,
    bind,
    make_socket,
    map_zmq_errors,
    readable,
    recv_nowait,
    send_nowait,
)
from zrpc.broker._config import BrokerConfig
from zrpc.broker._core import _election as elect
from zrpc.broker._core._broker import (
    Action,
    BrokerCore,
    Log,
    Publish,
    PublishState,
    ReleaseMemory,
    Send,
    SendCall,
    ToElection,
    ToEtcd,
)

__all__ = ["BATCH", "Broker", "BrokerConfig"]

BATCH = 512
"""Messages drained per wake-up: batching is measured to pay (DESIGN.md §2)."""

POLL_CAP = 0.1
"""The longest poll (seconds): stop() is noticed within it."""

log = logging.getLogger("zrpc.broker")


def _libc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def _release_memory() -> None:
    """Hands freed memory back to the OS (once a second, when the core says so): after a burst
    (a flood of large messages) glibc would otherwise keep the broker's peak size for good.
    Costs well under a millisecond; a no-op where glibc is not the allocator."""
    if _TRIM is not None:
        _TRIM(0)


class _Prefix(logging.LoggerAdapter[logging.Logger]):
    """Every log line names the broker's role and state (the loop logs through nothing else)."""

    def __init__(self, logger: logging.Logger, broker: Broker) -> None:
        super().__init__(logger, {})
        self.broker = broker

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        b = self.broker
        # a cluster member has no pair role: its name says which member it is
        who = b.config.name if b.config.cluster and b.config.name else b.role
        return f"broker[{who}/{b.state}] {msg}", kwargs


class Broker:
    """One broker process: a ROUTER frontend shared by clients and workers."""

    def __init__(self, config: BrokerConfig, *, context: zmq.Context[Any] | None = None,
                 clock: Clock = monotonic) -> None:
        self.config = config
        self.role = config.role
        self._clock = clock
        self.log = _Prefix(log, self)
        self._errors = InternalErrors(self.log, "broker")
        self.core = BrokerCore(config, clock, self._errors, pid=os.getpid(),
                               host=socket.gethostname(), boot=os.urandom(4).hex())
        self._ctx: zmq.Context[Any] = context or zmq.Context()
        self._own_ctx = context is None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._keys: CurveKeys | None = None
        self._guard: ZapGuard | None = None
        self._front: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._mon: zmq.Socket[Any] | None = None
        # cluster mode: the etcd edge's threads queue what etcd answered and ring the waker
        self._edge: EtcdEdge | None = None
        self._waker: Waker | None = None
        self._inbox: queue.SimpleQueue[ClusterEvent] = queue.SimpleQueue()
        # --elect: the election's edge answers the same way, into an inbox of its own
        self._key_edge: KeyEdge | None = None
        self._elect_inbox: queue.SimpleQueue[elect.Event] = queue.SimpleQueue()
        self.ready = threading.Event()  # set once the frontend is bound

    # --- what the core knows, for the log prefix, Prometheus and tests ---------------------

    @property
    def state(self) -> str:
        return self.core.state

    @property
    def counters(self) -> dict[str, int]:
        return self.core.counters

    @property
    def metrics(self) -> dict[str, Any]:
        """The latest `metrics` snapshot."""
        return self.core.metrics

    @property
    def last_status(self) -> dict[str, Any]:
        """The status stored every second (a whole new dict each time: Prometheus reads it
        from its own thread)."""
        return self.core.last_status

    def status(self) -> dict[str, Any]:
        return self.core.status()

    # --- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Safe from a signal handler or another thread: the loop exits within POLL_CAP."""
        self._stop.set()

    def reload_keys(self) -> None:
        """SIGHUP: read the authorized keys directory (its keys and roles) again."""
        self._reload.set()

    def _security(self) -> tuple[CurveKeys | None, ZapGuard | None, Roles | None]:
        """CURVE on every socket when keys are given (DESIGN.md §6); ZAP admits only the public
        keys in --curve-authorized (and this broker's own, which its peer uses); the roles in
        that directory's ROLES_FILE, if any, say what each key may do."""
        secret, authorized = self.config.curve_secret, self.config.curve_authorized
        if secret is None or authorized is None:
            if (secret is None) != (authorized is None):
                raise ValueError("--curve-secret and --curve-authorized go together")
            return None, None, None
        keys = server_keys(secret)
        named = authorized_keys(authorized)
        roles = load_roles(authorized, named)  # a mistake in it stops the start, in one line
        guard = ZapGuard(self._ctx, set(named.values()) | {keys.public})
        guard.start()
        return keys, guard, (roles or Roles.everyone(named)).admitting(guard.allowed)

    def _say_roles(self, roles: Roles | None) -> None:
        if roles is not None and (roles.keys or roles.default is not EVERY_ROLE):  # a roles file
            self.log.info("%s", roles.describe())
        else:
            self.log.info("no %s in %s: every authorized key may serve and call everything",
                          ROLES_FILE, self.config.curve_authorized)

    def bind(self) -> None:
        """Binds every socket, or closes those it made and raises OSError naming what failed."""
        cfg = self.config
        self._keys, self._guard, roles = self._security()
        keys = self._keys
        opts = SocketOptions(max_message=cfg.max_message, curve=keys)
        made: list[zmq.Socket[Any]] = []
        try:
            self._front = front = make_socket(self._ctx, zmq.ROUTER, options=opts)
            made.append(front)
            bind(front, cfg.frontend, "frontend")
            if cfg.state is not None and cfg.peer_state is not None:
                self._pub = pub = make_socket(self._ctx, zmq.PUB, options=opts)
                made.append(pub)
                bind(pub, cfg.state, "state endpoint")
                # the peer link reconnects on the heartbeat's timescale, not the 8 s client
                # cap: a restarted peer must be heard within a couple of intervals
                ivl = max(10, int(cfg.heartbeat_interval * 1000))
                self._sub = sub = make_socket(self._ctx, zmq.SUB, options=SocketOptions(
                    max_message=cfg.max_message, reconnect_ivl_ms=ivl, reconnect_ivl_max_ms=2 * ivl,
                    curve=keys.as_client_of(keys.public) if keys else None))
                made.append(sub)
                with map_zmq_errors(f"connect to peer state {cfg.peer_state}"):
                    sub.setsockopt(zmq.SUBSCRIBE, b"")
                    sub.connect(cfg.peer_state)
            if cfg.monitor is not None:
                # XPUB: each subscription reaches the loop, which repeats the alerts in force
                self._mon = mon = make_socket(self._ctx, zmq.XPUB, options=opts)
                made.append(mon)
                mon.setsockopt(zmq.XPUB_VERBOSE, 1)
                bind(mon, cfg.monitor, "monitor endpoint")
            if cfg.metrics_port is not None:
                from zrpc.broker._metrics import serve_prometheus

                self.core.refresh_status()
                serve_prometheus(self, cfg.metrics_port)
        except BaseException:
            for sock in made:
                sock.close(linger=0)
            self._front = self._pub = self._sub = self._mon = None
            if self._guard is not None:
                self._guard.stop()
                self._guard = None
            raise
        if self._guard is not None:
            self._say_roles(roles)
            self._execute(self.core.authorize(roles))
        self.ready.set()

    def run(self) -> None:
        if self._front is None:
            self.bind()
        front = self._front
        assert front is not None
        core = self.core
        execute = self._execute
        self.log.info("serving on %s (lb=%s, queue_limit=%d)", self.config.frontend,
                      self.config.lb, self.config.queue_limit)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        if self._sub is not None:
            poller.register(self._sub, zmq.POLLIN)
        mon = self._mon
        if mon is not None:
            poller.register(mon, zmq.POLLIN)
        if (core.cluster is not None and self.config.cluster is not None) or core.election is not None:
            self._waker = Waker(self._ctx, f"etcd-{id(self):x}")
            poller.register(self._waker.socket, zmq.POLLIN)
        if core.cluster is not None and self.config.cluster is not None:
            self._edge = EtcdEdge(parse_cluster(self.config.cluster), self._deliver, logger=self.log)
            self._edge.start()
            self.log.info("joining cluster %s as %s (etcd %s)", core.cluster.cluster,
                          core.cluster.name, self._edge.where)
        if core.election is not None and self.config.elect is not None:
            self._key_edge = KeyEdge(parse_cluster(self.config.elect), logger=self.log)
            self._key_edge.start()
            self.log.info("standing for election %s as %s (etcd %s)", core.election.name,
                          self.role, self._key_edge.where)
        execute(core.start())
        frames_received = core.frames_received
        record = self._errors.record
        keyed = self._guard is not None  # rule 13: every message's sender key, for the core
        try:
            while not self._stop.is_set():
                ms = self._poll_timeout()
                events = poller.poll(ms)
                # plain tries on every wake-up: contain()'s context manager costs a microsecond
                # each time, a try nothing until it raises
                try:
                    execute(core.checkpoint(ms / 1000))
                except Exception as exc:  # noqa: BLE001 - that is the point
                    record(exc, "a stall of the loop")
                if self._waker is not None:
                    self._read_etcd()
                if events:
                    # the peer's state first: a broker resumed after SIGSTOP must learn that
                    # its peer took over before it serves anything from its backlog
                    self._read_peer()
                    if mon is not None and any(sock is mon for sock, _ in events):
                        self._read_subscriptions(mon)
                    for _ in range(BATCH):
                        user: str | None = None
                        if keyed:
                            msg, user = _recv_keyed(front)
                        else:
                            msg = recv_nowait(front)
                        if msg is None:
                            core.drained()
                            break
                        # a bug costs this one message, never the broker (a plain try: it
                        # costs nothing on this path until something raises)
                        try:
                            execute(frames_received(msg[0], msg[1:], user))
                        except Exception as exc:  # noqa: BLE001 - that is the point
                            record(exc, "a frontend message")
                else:
                    core.drained()
                try:
                    execute(core.checkpoint())
                except Exception as exc:  # noqa: BLE001
                    record(exc, "a stall of the loop")
                # what the peer already sent is heard before its silence is judged: a state
                # message waiting unread is not a lost peer
                self._read_peer()
                if self._guard is not None:  # else there are none
                    try:
                        self._security_events()
                    except Exception as exc:  # noqa: BLE001
                        record(exc, "security events")
                try:
                    execute(core.tick())
                except Exception as exc:  # noqa: BLE001
                    record(exc, "the timers")
        finally:
            self._leave()
            front.close(linger=0)
            for sock in (self._pub, self._sub, self._mon):
                if sock is not None:
                    sock.close(linger=0)
            if self._guard is not None:
                self._guard.stop()
            if self._own_ctx:
                self._ctx.term()
            self.log.info("stopped")

    def _poll_timeout(self) -> int:
        """Milliseconds until the core's next deadline, POLL_CAP at most."""
        ms = timeout_ms(self.core.next_deadline(), self._clock(), cap=POLL_CAP)
        return int(POLL_CAP * 1000) if ms is None else ms

    # --- input ---------------------------------------------------------------------------

    def _read_peer(self) -> None:
        """Everything the peer's state link holds, given to the core at once."""
        sub = self._sub
        if sub is None:
            return
        try:  # twice per wake-up, usually empty: no context manager, no raised zmq.Again
            if not readable(sub):
                return
            batch: list[list[bytes]] = []
            for _ in range(BATCH):
                frames = recv_nowait(sub)
                if frames is None:
                    break
                batch.append(frames)
            if batch:
                self._execute(self.core.peer_state_received(batch))
        except Exception as exc:  # noqa: BLE001 - a bug costs this read, never the loop
            self._errors.record(exc, "the peer's state")

    def _deliver(self, event: ClusterEvent) -> None:
        """From the etcd edge's threads: queued for the loop, which is woken to read it."""
        waker = self._waker
        if waker is not None:
            self._inbox.put(event)
            waker.wake()

    def _read_etcd(self) -> None:
        """What etcd answered since the last wake-up, given to the core at once."""
        waker = self._waker
        if waker is None:
            return
        try:
            waker.clear()  # before reading: an answer queued after it rings again
            batch = _drain(self._inbox)
            if batch:
                self._execute(self.core.cluster_events(batch))
            news = _drain(self._elect_inbox)
            if news:
                self._execute(self.core.election_events(news))
        except Exception as exc:  # noqa: BLE001 - a bug costs this read, never the loop
            self._errors.record(exc, "answers from etcd")

    # --- the election's etcd requests (--elect) ------------------------------------------------

    def _tell(self, event: elect.Event) -> None:
        """From the election edge's threads: queued for the loop, which is woken to read it."""
        waker = self._waker
        if waker is not None:
            self._elect_inbox.put(event)
            waker.wake()

    def _elect(self, a: elect.EtcdAction) -> None:
        """One of the election's actions, handed to its edge: a request (run in order on the
        edge's thread, its answer an event) or the watch."""
        edge = self._key_edge
        if edge is None:
            return
        if isinstance(a, elect.WatchKey):
            edge.watch(a.key, a.start_revision, on_event=partial(self._key_event, a.seq),
                       on_end=partial(self._key_watch_ended, a.seq))
        else:
            edge.submit(partial(self._exchange, edge, a))

    def _exchange(self, edge: KeyEdge, a: elect.EtcdAction) -> None:
        """On the edge's thread: the request, and its answer as one event (none for a revoke)."""
        event: elect.Event | None
        what = type(a).__name__.lower()
        try:
            if isinstance(a, elect.Grant):
                lease, ttl = edge.grant(a.ttl)
                event = elect.LeaseGranted(a.seq, lease, ttl)
            elif isinstance(a, elect.Renew):
                event = elect.LeaseRenewed(a.seq, a.lease, edge.renew(a.lease))
            elif isinstance(a, elect.Campaign):
                won, kv, revision = edge.create_if_absent(a.key, a.value, a.lease)
                event = elect.Campaigned(a.seq, won, kv.create_revision if kv else 0,
                                         kv.lease if kv else 0, kv.value if kv else b"", revision)
            elif isinstance(a, elect.Revoke):
                edge.revoke(a.lease)
                self.log.info("revoked its election lease %x: the others may take the role now",
                              a.lease)
                event = None
            else:
                raise TypeError(f"the election edge cannot carry out {a!r}")
        except LeaseGone:
            event = None if isinstance(a, elect.Revoke) else elect.LeaseGone(a.seq, getattr(a, "lease", 0))
        except EtcdError as exc:
            event = None if isinstance(a, elect.Revoke) else elect.ExchangeFailed(a.seq, what, str(exc))
        if event is not None:
            self._tell(event)

    def _key_event(self, seq: int, kv: KeyValue | None, revision: int) -> None:
        if kv is None:
            self._tell(elect.KeyDeleted(seq, revision))
        else:
            self._tell(elect.KeyCreated(seq, kv.create_revision, kv.lease, kv.value, revision))

    def _key_watch_ended(self, seq: int, reason: str, failed: bool) -> None:
        self._tell(elect.ExchangeFailed(seq, "watch", reason) if failed
                   else elect.WatchEnded(seq, reason))

    def _leave(self) -> None:
        """A clean stop of a cluster member or an elected broker: its lease is revoked (the
        others see it leave, or race for the role, at once), the watch cancelled, the edge's
        threads ended."""
        edge, key_edge, waker = self._edge, self._key_edge, self._waker
        if edge is None and key_edge is None:
            return
        try:
            self._execute(self.core.leave())
            for e in (edge, key_edge):
                if e is not None:
                    e.stop()
        except Exception as exc:  # noqa: BLE001 - stopping goes on whatever happens
            self._errors.record(exc, "leaving the cluster")
        finally:
            self._edge = self._key_edge = self._waker = None
            if waker is not None:
                waker.close()

    def _security_events(self) -> None:
        """SIGHUP's reload of the authorized keys and their roles (both, or neither: a mistake
        in either keeps the old ones), and the keys ZAP refused (for the core)."""
        guard, keys, directory = self._guard, self._keys, self.config.curve_authorized
        if guard is None or keys is None or directory is None:
            return
        if self._reload.is_set():
            self._reload.clear()
            try:
                named = authorized_keys(directory)
                roles = load_roles(directory, named) or Roles.everyone(named)
            except ValueError as exc:
                self.log.error("keeping the old authorized keys and roles: %s", exc)
            else:
                guard.allowed = set(named.values()) | {keys.public}
                roles = roles.admitting(guard.allowed)
                self.log.info("reloaded %d authorized keys", len(named))
                self._say_roles(roles)
                self._execute(self.core.authorize(roles))
        while guard.refused:
            address, key, reason = guard.refused.popleft()
            self._execute(self.core.refused(address, key, reason))

    # --- output --------------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        """Carries out the core's actions. One that fails costs itself only: the rest of the
        batch (heartbeats, replies, calls the Dispatcher counts as sent) still goes out."""
        pending = actions
        not_sent: set[bytes] = set()  # workers a call did not reach, in this batch
        record = self._errors.record
        while pending:
            more: list[Action] = []
            for a in pending:
                # a plain try: it costs nothing on this path until something raises
                try:
                    if type(a) is Send:
                        self._send(a.peer, a.frames)
                    elif type(a) is SendCall:
                        wid = a.worker
                        if wid in not_sent:
                            continue  # lost earlier in this batch: its calls were dealt with then
                        sent = self._send(wid, a.frames)
                        if sent is not Sent.OK:
                            not_sent.add(wid)
                            more.extend(self.core.call_not_sent(wid, full=sent is Sent.FULL))
                    elif type(a) is Log:
                        self.log.log(a.level, a.msg, *a.args)
                    elif type(a) is Publish:
                        self._publish(self._mon, [a.topic.encode(), pack_result(a.event)])
                    elif type(a) is PublishState:
                        self._publish(self._pub, a.frames)
                    elif type(a) is ReleaseMemory:
                        _release_memory()
                    elif type(a) is ToEtcd:
                        if self._edge is not None:
                            self._edge.submit(a.action)
                    elif type(a) is ToElection:
                        self._elect(a.action)
                except Exception as exc:  # noqa: BLE001 - a bug costs one action, never the broker
                    record(exc, f"an action ({type(a).__name__})")
            pending = more

    def _read_subscriptions(self, mon: zmq.Socket[Any]) -> None:
        """Monitor subscriptions (`\\x01` + topic prefix; unsubscriptions start `\\x00`)."""
        for _ in range(BATCH):
            msg = recv_nowait(mon)
            if msg is None:
                return
            if msg[0][:1] == b"\x01":
                try:
                    self._execute(self.core.subscribed(msg[0][1:]))
                except Exception as exc:  # noqa: BLE001 - a bug costs one subscription
                    self._errors.record(exc, "a monitor subscription")

    @staticmethod
    def _publish(sock: zmq.Socket[Any] | None, frames: list[bytes]) -> None:
        """Monitor and state messages: a monitor or a peer never slows the broker down, so no
        zmq error of theirs is the broker's (the peer's silence is Binary Star's to judge)."""
        if sock is not None:
            try:
                send_nowait(sock, frames)
            except zmq.ZMQError:
                pass

    def _send(self, peer: bytes, frames: list[bytes]) -> Sent:
        """GONE when the peer is gone (ROUTER_MANDATORY), FULL when its pipe is full: either
        way nothing went out. Counted; what it means is the core's to decide."""
        front = self._front
        assert front is not None
        sent = send_nowait(front, [peer, *frames])
        counters = self.core.counters
        if sent is Sent.OK:
            counters["sent"] += 1
        elif sent is Sent.GONE:
            counters["unroutable"] += 1
        else:
            counters["send_full"] += 1
        return sent


def _recv_keyed(sock: zmq.Socket[Any]) -> tuple[list[bytes] | None, str | None]:
    """recv_nowait's message (None when there is none yet), and the ZAP User-Id it came with:
    the sender's CURVE public key in Z85 (every frame of a CURVE connection carries it)."""
    recv = sock.recv
    try:
        frame = recv(NOBLOCK, copy=False)
    except zmq.Again:
        return None, None
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        user = None
    parts = [frame.bytes]
    while frame.more:
        frame = recv(NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts, user if isinstance(user, str) and user else None


def _drain(inbox: queue.SimpleQueue[Any]) -> list[Any]:
    """What an inbox holds (at most BATCH), without waiting."""
    batch: list[Any] = []
    while len(batch) < BATCH:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            break
    return batch
