"""BrokerCore: one broker's policy, sans-IO: what every message, timer and stall means, and
what to send, publish and log because of it.

It composes the Dispatcher, the BinaryStar machine (a pair member only: a lone broker has
none), the Monitor and the workers' LivenessTracker, with an injected clock. The socket loop
(broker/_loop.py) hands it what it read and carries out the actions it returns; it decides
nothing but to skip the later SendCalls to a worker one of them failed to reach. The verbs:
`start`, `frames_received`, `peer_state_received`, `call_not_sent`,
`refused`, `authorize`, `checkpoint`, `drained`, `tick`, `next_deadline`; in cluster mode
`cluster_events` and `leave` too, with `--elect` `election_events` and `leave`.

Rules (DESIGN.md §3-5, docs/protocol.md §7-8):

1. Input is decoded here, at its entry point. What does not decode is counted (`malformed`,
   one Malformed for the frontend and the state link) and logged, rate-limited; a client
   REQUEST whose request id is readable is answered PROTOCOL_ERROR. A message of a kind a
   broker is never sent is malformed too.
2. Requests to the reserved service `zrpc` (status, services, ping) are answered here, in
   every state, and are never a vote.
3. Any other client REQUEST is dispatched while this broker serves (a lone broker always).
   Otherwise it is Binary Star's client vote (ClientVoted); if the vote does not make this
   broker serve, it is answered NOT_ACTIVE and counted (`not_active`).
4. Serving follows Binary Star: when it flips, the dispatcher is activated or deactivated,
   once for all the news read in one go (a backlog of state messages flips it once).
5. Any traffic from a registered worker is a heartbeat. An unknown worker is asked to
   register, unless it left (or was refused) within the dispatcher's memory. A worker that is
   lost (silent, or a call to it did not go out) or removed is forgotten everywhere:
   liveness, monitor, the internal errors it reported.
6. A registered worker's heartbeat `info` is read for two things: a rise in its internal
   errors (an `internal_error` notice naming it), and an `active_epoch` above ours while we
   are ACTIVE (HigherEpochSeen: a broker we cannot hear took over), or any `active_epoch`
   once that fenced us, until we hear our peer (Binary Star's rule 8: it still serves).
7. Our own stall (more time between checkpoints than the poll was allowed, by more than a
   heartbeat interval) is no evidence against anyone: every worker's silence is shortened by
   it, nobody is judged before the frontend's backlog is drained (or DRAIN_TIMEOUTS liveness
   timeouts passed), and Binary Star hears of it before any request is served.
8. Alerts: notices about calls and workers, the monitor's evaluation and the metrics' alerts
   go out only while this broker is active (the passive one would only repeat its peer's);
   notices about this broker itself (ALWAYS_NOTICED) and Binary Star's go out in every
   state. Every alert is logged and published on `alert.<name>`; an unpublished notice is
   logged at debug level. A new subscriber to `alert.` hears the alerts in force again, as
   `in_force` (`subscribed`).
9. Timers: the monitor evaluates every min(EVAL_PERIOD, interval / 2); every METRICS_PERIOD
   the metrics go out on `metrics` (in every state), the stored status is refreshed and
   memory is released; workers are sent a heartbeat every interval; `broker_restarted`
   stays raised for RESTART_ALERT_S after a restarted broker starts.
10. A bug costs one message or one step, never the broker: it is recorded, the other steps
    still run, a client REQUEST it cost is answered ERROR ("InternalError"), and each tick
    turns the internal errors since the last one into one `internal_error` notice.
11. A cluster member (`--cluster`, DESIGN.md §9) is a lone broker that also keeps a
    Membership (zrpc/_core/_membership.py): what etcd answered goes to it (`cluster_events`),
    its etcd requests go to the loop (ToEtcd), its alerts go out as notices, about this
    broker, in every state; `leave` revokes its lease on a clean stop. It never changes
    what is served: etcd decides membership, heartbeats decide death.
12. An elected broker (`--elect`, DESIGN.md §9) has an Election (broker/_core/_election.py)
    instead of Binary Star: it serves while the Election says so, and no client request is a
    vote. Its epoch (the key's create revision) is stamped on every call and probe sent to a
    workers (`epoch`), and said in heartbeats. Its fence deadline is checked before every
    message and after every wake-up, so a broker that stalled past it serves nothing more. A
    worker's `active_epoch` above ours, or a worker refusing a call of ours with NOT_ACTIVE
    (it has seen a newer epoch), makes it step down. Its alerts (failover, lease_lost,
    etcd_unreachable) go out in every state; `leave` revokes its lease on a clean stop.
13. Who calls (CURVE keys on): the loop hands every message's ZAP User-Id (the sender's
    public key, Z85) to `frames_received`. A client REQUEST loses any `caller` header it
    carries, and gets its sender's key as `caller` when there is one, before anything else
    reads it: a client cannot claim an identity.
14. Roles (`authorize`, docs/operations.md §7): a READY offering a service outside its key's
    `serve` is refused: nothing of it reaches the dispatcher (a worker registered already
    leaves, as under new roles); the worker is told why (its heartbeats carry `refused`: it
    is kept, heartbeated and never asked to register, so it does not reconnect in a loop),
    counted (`unauthorized_workers`). A client REQUEST
    outside its key's `call`, or for a `zrpc` method other than OPEN_METHODS without `admin`,
    is answered UNAUTHORIZED before it can be a vote (`unauthorized_calls`). Each raises
    `unauthorized` (subject: the key's name, detail: key, what, service). New roles judge
    every worker again: a registered one no longer allowed leaves (its calls in flight
    finish), a refused one now allowed is asked to register. No roles: every key may do
    everything.
15. `zrpc.health` (as gRPC's health protocol): SERVING while this broker serves and the
    service has a registered worker that is not leaving; NOT_SERVING for a service a worker
    offered once (or when this broker does not serve); UNKNOWN for one never offered. No
    argument: the broker itself.
16. A READY whose `info` says `restarts` above what this broker last saw under that worker
    name (above 0 for a name it never saw) is a `worker_restarted` notice, before the
    dispatcher hears of it.

Counters: the core counts what it sees (`received`, `malformed`, `not_active`,
`unauthorized_workers`, `unauthorized_calls`); the loop, which alone sees sends, counts
`sent`, `unroutable` and `send_full` in the same `counters`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from zrpc._core._clock import Clock
from zrpc._core._frames import (
    CLIENT,
    H_CALLER,
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
from zrpc._core._liveness import LivenessTracker
from zrpc._core._malformed import Malformed
from zrpc._core._membership import RESOLVED, EtcdAction, Membership, advertised, check_name, parse_cluster
from zrpc._core._membership import Alert as ClusterAlert
from zrpc._core._membership import Event as ClusterEvent
from zrpc._core._membership import Log as ClusterLog
from zrpc._core._membership import Output as ClusterOutput
from zrpc._core._serial import pack_error, pack_result, unpack_call
from zrpc._core._service import RESERVED
from zrpc._errors import ProtocolError
from zrpc.broker._core._bstar import (
    MAX_EPOCH,
    BinaryStar,
    BStar,
    ClientVoted,
    HigherEpochSeen,
    PeerAlert,
    PeerStateSeen,
    ServingChanged,
    Stalled,
    StateChanged,
    decode_state,
    encode_state,
)
from zrpc.broker._core._bstar import Action as BStarAction
from zrpc.broker._core._bstar import PublishState as BStarPublish
from zrpc.broker._core._dispatch import (
    AckLeave,
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
from zrpc.broker._core._dispatch import Action as DispatchAction
from zrpc.broker._core._election import Alert as ElectionAlert
from zrpc.broker._core._election import Election, EpochSeen, RefusedByWorker
from zrpc.broker._core._election import EtcdAction as ElectionAction
from zrpc.broker._core._election import Event as ElectionEvent
from zrpc.broker._core._election import Log as ElectionLog
from zrpc.broker._core._election import Output as ElectionOutput
from zrpc.broker._core._election import ServingChanged as ElectionServing
from zrpc.broker._core._monitor import IN_FORCE, Alert, Eject, Monitor, Thresholds
from zrpc.broker._core._monitor import Output as MonitorOutput

DRAIN_TIMEOUTS = 10
"""After a stall of our own, liveness is judged once the frontend is drained, or after this
many liveness timeouts of draining (a flood that never drains must not hide a dead worker)."""

RESTART_ALERT_S = 60.0
"""How long `broker_restarted` stays raised after a restarted broker starts: a subscriber that
reconnects to the new run still sees it."""

EVAL_PERIOD = 0.1
"""The longest between two evaluations of the monitor's conditions (seconds)."""

METRICS_PERIOD = 1.0
"""Seconds between `metrics` snapshots (and refreshes of the status Prometheus reads)."""

ALWAYS_NOTICED = frozenset({"unauthorized", "internal_error", "broker_restarted", "etcd_unreachable",
                            "member_joined", "member_left", "lease_lost", "failover"})
"""Notices a passive broker reports too: they are about this broker, not about the calls the
active one serves."""

OPEN_METHODS = frozenset({"ping", "health"})
"""`zrpc` methods every authorized key may call; the others (status, services) need `admin`."""

REFUSED_LIMIT = 1000
"""Workers refused by their roles kept at once (heartbeated, never asked to register); the
oldest is let go first (it reconnects, and is refused again)."""

SEEN_LIMIT = 10_000
"""Services and worker names remembered for `zrpc.health` and `worker_restarted`; the oldest
is forgotten first."""

SERVING, NOT_SERVING, UNKNOWN = "SERVING", "NOT_SERVING", "UNKNOWN"
"""`zrpc.health` answers (gRPC's health statuses)."""

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}


class Settings(Protocol):
    """What the core reads of its configuration: zrpc.broker.BrokerConfig (a layer above the
    cores, so named here by shape, not imported)."""

    @property
    def frontend(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def state(self) -> str | None: ...
    @property
    def peer_state(self) -> str | None: ...
    @property
    def lb(self) -> str: ...
    @property
    def queue_limit(self) -> int: ...
    @property
    def queue_bytes(self) -> int: ...
    @property
    def service_grace(self) -> float: ...
    @property
    def heartbeat_interval(self) -> float: ...
    @property
    def liveness(self) -> int: ...
    @property
    def max_inflight_per_client(self) -> int: ...
    @property
    def thresholds(self) -> Thresholds: ...
    @property
    def restarts(self) -> int: ...
    @property
    def monitor(self) -> str | None: ...
    @property
    def cluster(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def cluster_name(self) -> str: ...
    @property
    def elect(self) -> str | None: ...
    @property
    def election(self) -> str: ...


class Authority(Protocol):
    """What the core asks of the roles of the keys (zrpc._io._security.Roles, a layer above
    the cores: named here by shape)."""

    def may_serve(self, key: str | None, service: str) -> bool: ...
    def may_call(self, key: str | None, service: str) -> bool: ...
    def may_admin(self, key: str | None) -> bool: ...
    def label(self, key: str | None) -> str: ...


@dataclass(slots=True)
class _Refused:
    """A worker refused by its key's roles (rule 14)."""

    key: str | None
    name: str
    services: tuple[str, ...]
    why: str
    seen: float


class Errors(Protocol):
    """Where a loop counts its own bugs (zrpc._io._internal.InternalErrors is one)."""

    count: int
    last: str | None
    where: str

    def record(self, exc: BaseException, what: str = ...) -> bool: ...


# --- actions (what the loop carries out) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Frames for a peer on the frontend (a client, or a worker when it is not a call)."""

    peer: bytes
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class SendCall:
    """A call for a worker. One that does not go out is reported (`call_not_sent`), and no
    later SendCall to that worker from the same list is sent: the loss dealt with its calls."""

    worker: bytes
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class PublishState:
    """Our Binary Star state, for the peer (the state link)."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Publish:
    """An event on the monitor socket: topic `alert.<name>` or `metrics`."""

    topic: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the broker's log (`msg % args`, formatted only if the level is on)."""

    level: int
    msg: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleaseMemory:
    """The metrics step ran: a moment to hand memory freed by a burst back to the OS."""


@dataclass(frozen=True, slots=True)
class ToEtcd:
    """A request for etcd (cluster mode): the loop hands it to the etcd edge, which answers
    through `cluster_events`."""

    action: EtcdAction


@dataclass(frozen=True, slots=True)
class ToElection:
    """A request for etcd about the election (`--elect`): the loop hands it to the election's
    edge, which answers through `election_events`."""

    action: ElectionAction


Action = Send | SendCall | PublishState | Publish | Log | ReleaseMemory | ToEtcd | ToElection


class BrokerCore:
    """One broker's cores and the policy between them; the rules are in the module docstring."""

    def __init__(self, config: Settings, clock: Clock, errors: Errors, *,
                 dispatcher: Dispatcher | None = None, wall: Callable[[], float] = time.time,
                 pid: int = 0, host: str = "", boot: str = "") -> None:
        """`dispatcher` replaces the one the config describes (a test tunes what BrokerConfig
        does not carry); `wall` stamps published events; `boot` names this run of the broker
        in heartbeats (a client that sees it change knows the broker restarted)."""
        if (config.state is None) != (config.peer_state is None):
            raise ValueError("--state and --peer-state go together (both for a pair, neither alone)")
        self.config = config
        self.role = config.role
        self._clock = clock
        self._wall = wall
        self._errors = errors
        self._pid, self._host, self._boot = pid, host, boot
        interval = config.heartbeat_interval
        # a lone broker serves at once; a pair member follows the Binary Star rules
        self._bstar = BinaryStar(config.role, clock, interval) if config.peer_state else None
        self._dispatcher = dispatcher or Dispatcher(
            clock, strategy=config.lb, queue_limit=config.queue_limit,
            queue_bytes=config.queue_bytes, service_grace=config.service_grace,
            max_inflight_per_client=config.max_inflight_per_client,
            run_unseen=not config.cluster)  # a cluster's members all serve (rule 12)
        self._liveness: LivenessTracker[bytes] = LivenessTracker(clock, interval, config.liveness)
        self._monitor = Monitor(clock, interval, config.thresholds)
        self._cluster = self._membership(config, clock)
        self._election = self._elector(config, clock)
        self.malformed = Malformed()
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "sent", "malformed", "unroutable", "send_full", "not_active",
             "unauthorized_workers", "unauthorized_calls"), 0)
        self.metrics: dict[str, Any] = {}  # the latest `metrics` snapshot
        self.last_status: dict[str, Any] = {}  # refreshed every METRICS_PERIOD, for Prometheus
        now = clock()
        self._started = now
        self._eval_every = min(EVAL_PERIOD, interval / 2)
        self._next_eval = now
        self._next_metrics = now + METRICS_PERIOD
        # what the dispatcher was last told: a lone broker serves at once, an elected one
        # once it holds the role
        self._serving = self._bstar is None and self._election is None
        self._mark = now  # the last checkpoint
        self._stall_min = interval
        self._drained = True
        self._drain_until: float | None = None
        self._errors_reported = 0
        self._worker_errors: dict[bytes, int] = {}  # internal errors each worker last reported
        self._restart_resolved = False
        self._roles: Authority | None = None  # rule 14 (None: every key may do everything)
        self._worker_keys: dict[bytes, str] = {}  # each registered worker's key (rule 13)
        self._refused: dict[bytes, _Refused] = {}  # refused by roles, oldest first (rule 14)
        self._services_seen: dict[str, None] = {}  # offered in a READY, oldest first (rule 15)
        self._restarts: dict[str, int] = {}  # worker name -> restarts last seen (rule 16)

    # --- read-only views -----------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    @property
    def bstar(self) -> BinaryStar | None:
        return self._bstar

    @property
    def monitor(self) -> Monitor:
        return self._monitor

    @property
    def liveness(self) -> LivenessTracker[bytes]:
        return self._liveness

    @property
    def cluster(self) -> Membership | None:
        """This broker's view of its cluster (None: not a cluster member)."""
        return self._cluster

    @property
    def election(self) -> Election | None:
        """This broker's candidacy (None: not started with --elect)."""
        return self._election

    @property
    def state(self) -> str:
        """active, passive, primary or backup (a lone broker is always active; an elected one
        says its role until it knows who holds the election, then active while it serves)."""
        e = self._election
        if e is not None:
            return "active" if self._serving else "passive" if e.decided else self.role
        return "active" if self._bstar is None else self._bstar.state.value

    @property
    def serving(self) -> bool:
        """Whether the dispatcher was last told to serve."""
        return self._serving

    def __repr__(self) -> str:
        b = self._bstar
        epoch = b.epoch if b is not None else self._election.epoch if self._election else 0
        doubt = "" if b is None or b.accepts_clients or b.state is not BStar.ACTIVE else " in-doubt"
        queued = sum(s["queued"] for s in self._dispatcher.snapshot()["services"])
        return (f"<BrokerCore {self.role} {self.state.upper()}{doubt} epoch={epoch} "
                f"workers={len(self._dispatcher.worker_ids())} queued={queued}>")

    # --- verbs ---------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The loop starts serving: a lone broker dispatches at once, a pair member only once
        it is ACTIVE; a broker a supervisor had to restart says so."""
        out: list[Action] = []
        with self._contain("the start"):
            self._activate(self._serving, out)
            n = self.config.restarts
            if n > 0:
                out.append(Log(logging.WARNING, "started again after %d restart(s) by its "
                               "supervisor: the previous run died (see its log)", (n,)))
                self._notice(Notice("broker_restarted", self._errors.where, {"restarts": n}), out)
        if self._cluster is not None:
            with self._contain("joining the cluster"):
                self._cluster_outputs(self._cluster.start(), out)
        if self._election is not None:
            with self._contain("standing for election"):
                self._election_outputs(self._election.start(), out)
        self._mark = self._clock()
        return out

    def frames_received(self, peer: bytes, frames: list[bytes],
                        caller: str | None = None) -> list[Action]:
        """A message from the frontend: `frames` after the routing id `peer`; `caller` is its
        sender's public key (Z85, the ZAP User-Id) when keys are on (rule 13)."""
        self.counters["received"] += 1
        out: list[Action] = []
        try:
            if self._election is not None:
                self._election_due(out)  # rule 12: past the fence deadline, nothing more starts
            self._on_frames(peer, frames, caller, out)
        except Exception as exc:  # noqa: BLE001 - a bug costs this one message (rule 10)
            self._failed(exc, peer, frames, out)
        return out

    def peer_state_received(self, messages: Sequence[list[bytes]]) -> list[Action]:
        """Every state message read from the peer in one go (rule 4: serving flips once)."""
        out: list[Action] = []
        bstar = self._bstar
        if bstar is None:
            return out
        actions: list[BStarAction] = []
        for frames in messages:
            with self._contain("a state message from the peer"):
                try:
                    state, epoch, role = decode_state(frames)
                except ProtocolError as exc:
                    self._malformed(b"peer", f"state message: {exc}", out)
                    continue
                actions.extend(bstar.handle(PeerStateSeen(state, epoch, role)))
        with self._contain("the peer's state"):
            self._bstar_actions(actions, out)
        return out

    def call_not_sent(self, worker: bytes, full: bool) -> list[Action]:
        """A SendCall did not go out (the worker is gone, or its pipe is `full`): the worker is
        lost, and its calls are retried or answered by the rules for a lost worker."""
        out: list[Action] = []
        with self._contain("a call that did not go out"):
            if self._dispatcher.has_worker(worker):
                self._lose(worker, "its queue is full (the call did not go out)" if full
                           else "unreachable", out)
        return out

    def refused(self, address: str, key: str | None, reason: str) -> list[Action]:
        """The security layer refused a peer's key (rule 8: noticed in every state)."""
        out: list[Action] = []
        self._notice(Notice("unauthorized", address, {"reason": reason, "key": key}), out)
        return out

    def authorize(self, roles: Authority | None) -> list[Action]:
        """The roles of the keys, at start and after each reload (None: no roles file): every
        worker is judged again (rule 14)."""
        out: list[Action] = []
        with self._contain("new roles"):
            self._roles = roles
            d = self._dispatcher
            if roles is not None:
                for wid, key in list(self._worker_keys.items()):
                    w = d.workers.get(wid)
                    if w is None or w.leaving or wid in self._refused:
                        continue
                    denied = [s for s in w.services if not roles.may_serve(key, s)]
                    if denied:
                        self._refuse_worker(wid, key, w.name, tuple(w.services), denied, out)
            for peer, r in list(self._refused.items()):
                if roles is None or all(roles.may_serve(r.key, s) for s in r.services):
                    del self._refused[peer]
                    if d.has_worker(peer):
                        continue  # still finishing its calls: it re-registers when it reconnects
                    info = self._hello()
                    info["register"] = True
                    out.append(Send(peer, encode(Heartbeat(WORKER, info))))
                    out.append(Log(logging.INFO, "worker %s may serve %s now: asked to register",
                                   (r.name, ",".join(r.services))))
        return out

    def cluster_events(self, events: Sequence[ClusterEvent]) -> list[Action]:
        """What the etcd edge saw (rule 11), each event contained on its own."""
        out: list[Action] = []
        cluster = self._cluster
        if cluster is None:
            return out
        for e in events:
            with self._contain("an answer from etcd"):
                self._cluster_outputs(cluster.handle(e), out)
        return out

    def election_events(self, events: Sequence[ElectionEvent]) -> list[Action]:
        """What the election's etcd edge saw (rule 12), each event contained on its own."""
        out: list[Action] = []
        e = self._election
        if e is None:
            return out
        for ev in events:
            with self._contain("an answer from etcd about the election"):
                self._election_outputs(e.handle(ev), out)
        return out

    def leave(self) -> list[Action]:
        """A clean stop: the lease is revoked, so the other members see this one leave now (and
        the other candidates of an election race for the role at once)."""
        out: list[Action] = []
        if self._cluster is not None:
            with self._contain("leaving the cluster"):
                self._cluster_outputs(self._cluster.stop(), out)
        if self._election is not None:
            with self._contain("leaving the election"):
                self._election_outputs(self._election.stop(), out)
        return out

    def checkpoint(self, allowed: float = 0.0) -> list[Action]:
        """The loop runs again; its poll was allowed to wait `allowed` seconds (rule 7)."""
        out: list[Action] = []
        try:  # plain tries here and in tick(): they run on every wake-up, and a try costs
            self._checkpoint(allowed, out)  # nothing until it raises (_contain() a microsecond)
            if self._election is not None:
                self._election_due(out)
        except Exception as exc:  # noqa: BLE001 - rule 10
            self._errors.record(exc, "a stall of the loop")
        return out

    def drained(self) -> None:
        """The frontend had nothing more to read: what peers sent meanwhile has been heard."""
        self._drained = True

    def tick(self) -> list[Action]:
        """Every timer, each step contained on its own: one failing never skips the others."""
        out: list[Action] = []
        record = self._errors.record
        try:
            self._checkpoint(0.0, out)  # before any timer acts on a clock that jumped under it
        except Exception as exc:  # noqa: BLE001 - rule 10, as every step below
            record(exc, "a stall of the loop")
        try:
            self._carry_out(self._dispatcher.tick(), out)
        except Exception as exc:  # noqa: BLE001
            record(exc, "the dispatcher's timers")
        try:
            self._checkpoint(0.0, out)
        except Exception as exc:  # noqa: BLE001
            record(exc, "a stall of the loop")
        if self._bstar is not None:
            try:
                self._bstar_actions(self._bstar.tick(), out)
            except Exception as exc:  # noqa: BLE001
                record(exc, "the Binary Star timers")
        if self._cluster is not None:
            try:
                self._cluster_outputs(self._cluster.tick(), out)
            except Exception as exc:  # noqa: BLE001
                record(exc, "the cluster's timers")
        if self._election is not None:
            try:
                self._election_outputs(self._election.tick(), out)
            except Exception as exc:  # noqa: BLE001
                record(exc, "the election's timers")
        now = self._clock()
        if now >= self._next_eval:
            self._next_eval = now + self._eval_every
            if self.state == "active":  # the passive broker's view would only repeat it
                try:
                    self._monitor_outputs(self._monitor.evaluate(self._dispatcher.snapshot()), out)
                except Exception as exc:  # noqa: BLE001
                    record(exc, "the monitor's evaluation")
        if now >= self._next_metrics:
            self._next_metrics = now + METRICS_PERIOD
            try:
                self._metrics_step(out)
            except Exception as exc:  # noqa: BLE001
                record(exc, "the metrics snapshot")
        try:
            self._checkpoint(0.0, out)  # a slow step above is a stall too: before anyone is judged
        except Exception as exc:  # noqa: BLE001
            record(exc, "a stall of the loop")
        try:
            self._judge_liveness(out)
        except Exception as exc:  # noqa: BLE001
            record(exc, "a silent worker")
        try:
            if self._liveness.beat():
                frames = encode(Heartbeat(WORKER, self._hello()))
                refused = self._refused
                out.extend(Send(wid, frames) for wid in self._dispatcher.worker_ids()
                           if wid not in refused)
                if refused:
                    self._beat_refused(out)
        except Exception as exc:  # noqa: BLE001
            record(exc, "heartbeats to workers")
        self._report_errors(out)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of any core (the loop polls until then, or less)."""
        try:
            nxt = min(self._liveness.next_deadline(), self._next_eval, self._next_metrics)
            dd = self._dispatcher.next_deadline()
            if dd is not None:
                nxt = min(nxt, dd)
            if self._bstar is not None:
                nxt = min(nxt, self._bstar.next_deadline())
            if self._cluster is not None:
                cd = self._cluster.next_deadline()
                if cd is not None:
                    nxt = min(nxt, cd)
            if self._election is not None:
                ed = self._election.next_deadline()
                if ed is not None:
                    nxt = min(nxt, ed)
        except Exception as exc:  # noqa: BLE001 - a core's bug must not end the loop
            self._errors.record(exc, "the next deadline")
            return self._clock() + 0.01
        return nxt

    def status(self) -> dict[str, Any]:
        """The answer to `zrpc.status` (docs/protocol.md §6)."""
        snap = self._dispatcher.snapshot()
        pair = self._bstar.snapshot() if self._bstar is not None else {}
        if self._election is not None:
            pair = {"epoch": self._election.epoch}
        snap["broker"] = {
            "endpoint": self.config.frontend,
            "role": self.role,
            "state": self.state,
            "serving": self._serving,
            "peer_state": pair.get("peer_state"),
            "epoch": pair.get("epoch"),
            "pid": self._pid,
            "host": self._host,
            "uptime_s": round(self._clock() - self._started, 3),
            "restarts": self.config.restarts,
        }
        if self._cluster is not None:
            snap["broker"]["name"] = self._cluster.name
            snap["cluster"] = self._cluster.snapshot()
        if self._election is not None:
            snap["election"] = self._election.snapshot()
        snap["counters"].update(self.counters)
        snap["counters"]["internal_errors"] = self._errors.count
        snap["alerts"] = [{"name": a.name, "severity": a.severity, "subject": a.subject,
                           "detail": a.detail} for a in self._monitor.active]
        for w in snap["workers"]:
            w["phi"] = round(self._monitor.phi(bytes.fromhex(w["id"])), 2)
        return snap

    def refresh_status(self) -> None:
        """Stores a fresh status for readers on other threads (a new dict each time)."""
        self.last_status = self.status()

    # --- input ---------------------------------------------------------------------------

    def _on_frames(self, peer: bytes, frames: list[bytes], caller: str | None,
                   out: list[Action]) -> None:
        if len(frames) != 2:
            self._malformed(peer, f"{len(frames)} frames, expected 2", out)
            return
        try:
            msg = decode(frames[0], frames[1])
        except ProtocolError as exc:
            if exc.reply_to is not None:
                out.append(Send(peer, encode(ClientReply(exc.reply_to, Status.PROTOCOL_ERROR,
                                                         pack_error("ProtocolError", str(exc))))))
            self._malformed(peer, str(exc), out)
            return
        d = self._dispatcher
        if type(msg) is ClientRequest:
            headers = msg.headers  # rule 13: the broker says who calls, never the client
            if caller is not None:
                headers[H_CALLER] = caller
            elif H_CALLER in headers:
                del headers[H_CALLER]
            if self._roles is not None and not self._may_call(peer, msg, caller, out):
                return  # rule 14: refused before it could be a vote
            bstar = self._bstar
            if msg.service == RESERVED:
                self._internal(peer, msg, out)
            elif (bstar.accepts_clients or self._vote(bstar, out) if bstar is not None
                  else self._serving):  # a lone broker always serves; an elected one: rule 12
                self._carry_out(d.handle(RequestArrived(peer, msg)), out)
            else:
                self.counters["not_active"] += 1
                out.append(Send(peer, encode(ClientReply(msg.request_id, Status.NOT_ACTIVE,
                                                         pack_error("NotActive", self._not_active())))))
        elif type(msg) is WorkerReply:
            self._worker_seen(peer, out)
            if msg.status == Status.NOT_ACTIVE and self._election is not None and d.has_worker(peer):
                self._refused_by_worker(peer, out)
            self._worker_event(peer, ReplyArrived(peer, msg), out)
        elif type(msg) is Ready:
            self._ready(peer, msg, caller, out)
        elif type(msg) is Heartbeat:
            if msg.sender == WORKER:
                self._worker_seen(peer, out)
                if d.has_worker(peer):
                    self._monitor.worker_heartbeat(peer)
                    if msg.info:
                        self._worker_info(peer, msg.info, out)
            else:
                out.append(Send(peer, encode(Heartbeat(CLIENT, self._hello()))))
        elif type(msg) is Disconnect:
            self._refused.pop(peer, None)  # leaving on purpose: nothing more to tell it
            self._worker_event(peer, WorkerLeaving(peer), out)
            if d.has_worker(peer):  # still finishing calls: still watched
                self._liveness.seen(peer)
        else:
            self._malformed(peer, f"{type(msg).__name__} is not sent to a broker", out)

    def _failed(self, exc: Exception, peer: bytes, frames: list[bytes], out: list[Action]) -> None:
        """A message this broker failed on (its own bug): recorded, and a client request is
        answered rather than left to time out."""
        self._errors.record(exc, "a frontend message")
        try:
            if len(frames) != 2:
                return
            msg = decode(frames[0], frames[1])
            if type(msg) is ClientRequest:
                out.append(Send(peer, encode(ClientReply(msg.request_id, Status.ERROR, pack_error(
                    "InternalError", "the broker failed while handling this request (an internal "
                    "error, logged there); it may have been dispatched")))))
        except Exception as again:  # noqa: BLE001 - nothing more to do for this message
            self._errors.record(again, "the answer to a failed message")

    def _vote(self, bstar: BinaryStar, out: list[Action]) -> bool:
        """A client request to a broker that does not serve: a vote for takeover (rule 3)."""
        self._bstar_actions(bstar.handle(ClientVoted()), out)
        return bstar.accepts_clients

    def _not_active(self) -> str:
        if self._bstar is not None and self._bstar.state is BStar.ACTIVE:
            return "broker is active but stalled: it waits to hear its peer before it serves"
        e = self._election
        if e is not None:
            holder = e.holder
            where = f": {holder.get('frontend', '?')} holds it" if holder else ""
            return f"broker does not hold the active role of election {e.name}{where}"
        return f"broker is {self.state}"

    def _internal(self, peer: bytes, req: ClientRequest, out: list[Action]) -> None:
        """Answers the reserved `zrpc` service (as Majordomo's mmi.*); never a vote."""
        if req.method == "status":
            body, status = pack_result(self.status()), Status.OK
        elif req.method == "services":
            body, status = pack_result(self._dispatcher.services_map()), Status.OK
        elif req.method == "ping":
            body, status = pack_result("pong"), Status.OK
        elif req.method == "health":
            body, status = self._health(req.body)
        else:
            body = pack_error("MethodNotFound", f"the broker has no method zrpc.{req.method}")
            status = Status.METHOD_NOT_FOUND
        out.append(Send(peer, encode(ClientReply(req.request_id, status, body))))

    def _ready(self, peer: bytes, msg: Ready, caller: str | None, out: list[Action]) -> None:
        """A worker registers (or announces itself again): its roles first (rule 14), then its
        restarts (rule 16), then the dispatcher; a READY the dispatcher refused (a limit) is
        answered with the reason in the heartbeat, as one refused by roles is."""
        roles = self._roles
        if roles is not None:
            denied = [s for s in msg.services if not roles.may_serve(caller, s)]
            if denied:
                self._refuse_worker(peer, caller, msg.worker_id, tuple(msg.services), denied, out)
                return
        self._refused.pop(peer, None)
        self._restarted(msg, out)
        d = self._dispatcher
        actions = d.handle(WorkerReady(peer, msg))
        self._carry_out(actions, out)
        self._liveness.seen(peer)
        hello = self._hello()
        if d.has_worker(peer):
            if caller is not None:
                self._worker_keys[peer] = caller
            for name in msg.services:
                _remember(self._services_seen, name, None)
        else:
            why = [a.detail.get("reason") for a in actions if type(a) is Notice
                   and a.name == "worker_refused"]
            hello["refused"] = str(why[0]) if why else "refused by the broker"
        out.append(Send(peer, encode(Heartbeat(WORKER, hello))))

    def _refuse_worker(self, peer: bytes, key: str | None, name: str, services: tuple[str, ...],
                       denied: list[str], out: list[Action]) -> None:
        """Rule 14: told why, kept (heartbeated, never asked to register), counted, alerted; a
        registered one leaves (no new call; those in flight finish)."""
        roles = self._roles
        label = roles.label(key) if roles is not None else str(key)
        why = (f"the key {label} may not serve {', '.join(denied)} (see the roles file of the "
               "broker)")
        if self._dispatcher.has_worker(peer):
            self._worker_event(peer, WorkerLeaving(peer), out)
        self.counters["unauthorized_workers"] += 1
        self._refused.pop(peer, None)
        self._refused[peer] = _Refused(key, name, services, why, self._clock())
        while len(self._refused) > REFUSED_LIMIT:
            del self._refused[next(iter(self._refused))]
        info = self._hello()
        info["refused"] = why
        out.append(Send(peer, encode(Heartbeat(WORKER, info))))
        self._notice(Notice("unauthorized", label, {
            "key": key, "what": "serve", "service": ", ".join(denied), "worker": name,
            "reason": why}), out)

    def _beat_refused(self, out: list[Action]) -> None:
        """Rule 14: each refused worker still heard is heartbeated with the reason; one silent
        for a liveness timeout is let go."""
        now, timeout = self._clock(), self._liveness.timeout
        for peer, r in list(self._refused.items()):
            if now - r.seen > timeout:
                del self._refused[peer]
                continue
            info = self._hello()
            info["refused"] = r.why
            out.append(Send(peer, encode(Heartbeat(WORKER, info))))

    def _may_call(self, peer: bytes, req: ClientRequest, caller: str | None,
                  out: list[Action]) -> bool:
        """Rule 14: a call outside the key's role is answered UNAUTHORIZED, counted, alerted."""
        roles = self._roles
        assert roles is not None
        if req.service == RESERVED:
            if req.method in OPEN_METHODS or roles.may_admin(caller):
                return True
            what, target = "admin", f"{RESERVED}.{req.method}"
            label = roles.label(caller)
            why = (f"the key {label} may not call {target}: an admin method (admin = true in the "
                   "roles file of the broker)")
        elif roles.may_call(caller, req.service):
            return True
        else:
            what, target = "call", req.service
            label = roles.label(caller)
            why = f"the key {label} may not call {target} (see the roles file of the broker)"
        self.counters["unauthorized_calls"] += 1
        out.append(Send(peer, encode(ClientReply(req.request_id, Status.UNAUTHORIZED,
                                                 pack_error("Unauthorized", why)))))
        self._notice(Notice("unauthorized", label, {
            "key": caller, "what": what, "service": target, "method": req.method,
            "reason": why}), out)
        return False

    def _health(self, body: bytes) -> tuple[bytes, Status]:
        """Rule 15: `zrpc.health(service=None)`."""
        try:
            args, kwargs = unpack_call(body) if body else ([], {})
        except ProtocolError as exc:
            return pack_error("ProtocolError", str(exc)), Status.PROTOCOL_ERROR
        service = args[0] if args else kwargs.get("service")
        if (len(args) + len(kwargs) > 1 or not set(kwargs) <= {"service"}
                or not (service is None or isinstance(service, str))):
            return pack_error("ProtocolError", "zrpc.health takes one argument: a service name "
                                               "(none: the broker itself)"), Status.PROTOCOL_ERROR
        status = SERVING if self._serving else NOT_SERVING
        if service is not None:
            served = any(service in w.services and not w.leaving
                         for w in self._dispatcher.workers.values())
            if not served:
                status = NOT_SERVING if service in self._services_seen else UNKNOWN
        return pack_result({"status": status, "service": service, "state": self.state}), Status.OK

    def _restarted(self, msg: Ready, out: list[Action]) -> None:
        """Rule 16: a prefork worker's process came back after a crash."""
        n = msg.info.get("restarts")
        if type(n) is not int or n < 0:
            return
        before = self._restarts.get(msg.worker_id, 0)
        _remember(self._restarts, msg.worker_id, n)
        if n > before:
            info = msg.info
            self._notice(Notice("worker_restarted", msg.worker_id, {
                "restarts": n, "prefork": info.get("prefork"), "host": info.get("host"),
                "pid": info.get("pid")}), out)

    def _worker_seen(self, peer: bytes, out: list[Action]) -> None:
        """Any traffic from a worker is a heartbeat; an unknown one is asked to register
        (this broker restarted, or declared it dead while it was only stopped), unless it
        is one that left cleanly: it is gone on purpose."""
        d = self._dispatcher
        refused = self._refused.get(peer)
        if refused is not None:  # rule 14: kept while it is heard, never asked to register
            refused.seen = self._clock()
        if d.has_worker(peer):
            self._liveness.seen(peer)
        elif refused is None and d.wants_register(peer):
            info = self._hello()
            info["register"] = True
            out.append(Send(peer, encode(Heartbeat(WORKER, info))))

    def _worker_event(self, peer: bytes, event: ReplyArrived | WorkerLeaving,
                      out: list[Action]) -> None:
        """A worker's message for the dispatcher; a worker it removed (its last reply after
        DISCONNECT) is forgotten everywhere else too."""
        d = self._dispatcher
        known = d.has_worker(peer)
        self._carry_out(d.handle(event), out)
        if known and not d.has_worker(peer):
            self._forget(peer)

    def _worker_info(self, peer: bytes, info: dict[str, Any], out: list[Action]) -> None:
        """A registered worker's heartbeat `info` (rule 6)."""
        n = info.get("internal_errors")
        if type(n) is int and n >= 0:
            before = self._worker_errors.get(peer, 0)
            if n != before:
                self._worker_errors[peer] = n
            if n > before:
                w = self._dispatcher.workers.get(peer)
                name = w.name if w is not None else peer.hex()
                self._notice(Notice("internal_error", name, {
                    "error": f"the worker reports {n - before} new internal error(s); see its log",
                    "count": n, "worker": peer.hex()}), out)
        epoch = info.get("active_epoch")
        bstar = self._bstar
        if (bstar is not None and type(epoch) is int and 0 < epoch <= MAX_EPOCH
                and ((bstar.state is BStar.ACTIVE and bstar.epoch < epoch) or bstar.fenced)):
            self._bstar_actions(bstar.handle(HigherEpochSeen(epoch)), out)
        e = self._election
        if e is not None and type(epoch) is int and e.holding and epoch > e.epoch:
            self._election_outputs(e.handle(EpochSeen(epoch)), out)

    def _refused_by_worker(self, peer: bytes, out: list[Action]) -> None:
        """Rule 12: a worker answered a call of ours NOT_ACTIVE: it has seen a newer epoch."""
        e = self._election
        if e is None:
            return
        self.counters["epoch_refused"] = self.counters.get("epoch_refused", 0) + 1
        w = self._dispatcher.workers.get(peer)
        name = w.name if w is not None else peer.hex()
        if e.holding:
            out.append(Log(logging.WARNING, "worker %s refused a call stamped with our epoch %d: "
                           "another broker holds a newer one", (name, e.epoch)))
        self._election_outputs(e.handle(RefusedByWorker(name)), out)

    def _malformed(self, peer: bytes, why: str, out: list[Action]) -> None:
        m = self.malformed
        if m.add(why):
            out.append(Log(logging.WARNING, "dropped malformed message #%d from %s: %s",
                           (m.count, peer.hex()[:16], why)))
        self.counters["malformed"] = m.count

    # --- time ----------------------------------------------------------------------------

    def _checkpoint(self, allowed: float, out: list[Action]) -> None:
        now = self._clock()
        gap = now - self._mark - allowed
        self._mark = now
        if gap > self._stall_min:
            self._stalled(gap, out)

    def _stalled(self, seconds: float, out: list[Action]) -> None:
        """Rule 7: peers get the time back, nobody is judged before the backlog (their
        heartbeats may be in it) is read, and Binary Star hears of it first."""
        live = self._liveness
        level = logging.WARNING if seconds >= live.timeout else logging.DEBUG
        out.append(Log(level, "the loop stalled for %.2fs (stopped, or starved of CPU): peers "
                       "are given that time back", (seconds,)))
        live.pause(seconds)
        self._drained = False
        if self._drain_until is None:  # not moved by the next stall: a dead worker is found
            self._drain_until = self._clock() + DRAIN_TIMEOUTS * live.timeout
        if self._bstar is not None:
            self._bstar_actions(self._bstar.handle(Stalled(seconds)), out)

    def _judge_liveness(self, out: list[Action]) -> None:
        if self._drain_until is not None:
            if not self._drained and self._clock() < self._drain_until:
                return  # after our own stall: their heartbeats may still be in the backlog
            self._drain_until = None
        live = self._liveness
        for wid in live.expired():
            with self._contain("a silent worker"):
                if self._dispatcher.has_worker(wid):
                    self._lose(wid, f"silent for {live.timeout:.2f}s", out)

    def _metrics_step(self, out: list[Action]) -> None:
        self._restart_settled(out)
        d = self._dispatcher
        snap = d.snapshot()
        metrics, alerts = self._monitor.metrics(snap)
        metrics.update(self._identity(), counters={**snap["counters"], **self.counters,
                                                   "internal_errors": self._errors.count})
        self.metrics = metrics
        self.last_status = self.status()
        out.append(Publish("metrics", metrics))
        if self.state == "active":
            self._monitor_outputs(alerts, out)
        for wid in [w for w in self._worker_errors if not d.has_worker(w)]:
            del self._worker_errors[wid]  # bounded by the workers we know, whatever path removed one
        for wid in [w for w in self._worker_keys if not d.has_worker(w)]:
            del self._worker_keys[wid]
        out.append(ReleaseMemory())

    def _restart_settled(self, out: list[Action]) -> None:
        if (self.config.restarts > 0 and not self._restart_resolved
                and self._clock() - self._started >= RESTART_ALERT_S):
            self._restart_resolved = True
            self._notice(Notice("broker_restarted", self._errors.where,
                                {"restarts": self.config.restarts, "resolved": True}), out)

    def _report_errors(self, out: list[Action]) -> None:
        """Internal errors since the last tick become one `internal_error` alert."""
        errors = self._errors
        if errors.count == self._errors_reported:
            return
        self._errors_reported = errors.count
        self._notice(Notice("internal_error", errors.where, {"error": errors.last,
                                                             "count": errors.count}), out)
        self._errors_reported = errors.count  # an alert that failed too is not alerted again

    # --- between the cores ---------------------------------------------------------------

    def _carry_out(self, actions: list[DispatchAction], out: list[Action]) -> None:
        """The dispatcher's actions as frames and alerts."""
        for a in actions:
            if type(a) is SendToWorker:
                out.append(SendCall(a.worker_id, encode(a.message)))
            elif type(a) is ReplyToClient:
                out.append(Send(a.client_id, encode(ClientReply(a.request_id, a.status, a.body))))
            elif type(a) is AckLeave:
                out.append(Send(a.worker_id, encode(Disconnect())))
            elif type(a) is Notice:
                self._notice(a, out)

    def _lose(self, wid: bytes, reason: str, out: list[Action]) -> None:
        """The dispatcher's answer to a lost worker; the worker is forgotten everywhere."""
        self._carry_out(self._dispatcher.handle(WorkerLost(wid, reason)), out)
        self._forget(wid)

    def _forget(self, wid: bytes) -> None:
        self._monitor.forget(wid)
        self._liveness.forget(wid)
        self._worker_errors.pop(wid, None)
        self._worker_keys.pop(wid, None)

    def _activate(self, serving: bool, out: list[Action]) -> None:
        self._carry_out(self._dispatcher.handle(Activated() if serving else Deactivated()), out)

    def _bstar_actions(self, actions: list[BStarAction], out: list[Action]) -> None:
        serving: bool | None = None
        for a in actions:
            if isinstance(a, BStarPublish):
                out.append(PublishState(encode_state(a.state, a.epoch, self.role)))
            elif isinstance(a, StateChanged):
                out.append(Log(logging.INFO, "%s -> %s: %s", (a.old.value, a.new.value, a.reason)))
                if a.new is BStar.ACTIVE:
                    self._monitor_outputs(self._monitor.became_active(), out)
            elif isinstance(a, ServingChanged):
                serving = a.serving
                out.append(Log(logging.INFO, "%s clients: %s",
                               ("serving" if a.serving else "not serving", a.reason)))
            elif isinstance(a, PeerAlert):
                if a.name == "role_conflict" and not a.resolved:
                    out.append(Log(logging.ERROR, "role conflict: %s",
                                   (a.detail.get("detail", a.detail),)))
                self._monitor_outputs(self._monitor.peer(a), out)
        if serving is not None and serving != self._serving:
            # leaving ACTIVE (or doubting it): nothing new goes to workers from here, and the
            # queue is answered NOT_ACTIVE, so that no call runs on both brokers
            self._serving = serving
            self._activate(serving, out)

    def _notice(self, n: Notice, out: list[Action]) -> None:
        """Rule 8: published while active, or always for notices about this broker."""
        try:
            outputs = (self._monitor.notice(n) if self.state == "active" or n.name in ALWAYS_NOTICED
                       else [])
            if not outputs:
                out.append(Log(logging.DEBUG, "%s %s %s", (n.name, n.subject, n.detail)))
            self._monitor_outputs(outputs, out)
        except Exception as exc:  # noqa: BLE001 - an alert's bug must not cost the calls around it
            self._errors.record(exc, f"the {n.name} notice")

    def _monitor_outputs(self, outputs: list[MonitorOutput], out: list[Action]) -> None:
        for o in outputs:
            if isinstance(o, Eject):
                self._dispatcher.set_ejected(o.worker_id, o.ejected)
                continue
            level = logging.INFO if o.state == "resolved" else _LEVELS.get(o.severity, logging.ERROR)
            out.append(Log(level, "alert %s %s: %s %s", (o.name, o.state, o.subject, o.detail)))
            out.append(self._alert(o, o.state))

    def _alert(self, a: Alert, state: str) -> Publish:
        return Publish("alert." + a.name, {
            "name": a.name, "severity": a.severity, "state": state, "resolved": state == "resolved",
            "subject": a.subject, "detail": a.detail, **self._identity()})

    def subscribed(self, prefix: bytes) -> list[Action]:
        """Rule 8: a monitor subscriber that joins late hears every alert in force (state
        `in_force`): a PUB socket drops what was published before a subscriber connected, and
        an operator who starts `zrpc monitor` after two primaries met would otherwise see nothing."""
        return [self._alert(a, IN_FORCE) for a in self._monitor.active
                if ("alert." + a.name).encode().startswith(prefix)]

    def _membership(self, config: Settings, clock: Clock) -> Membership | None:
        """Rule 11: a cluster member registers its endpoints under its name."""
        url = config.cluster
        if url is None:
            if config.name is not None:
                raise ValueError("--name is a cluster member's name: it needs --cluster")
            return None
        parse_cluster(url)
        if config.peer_state is not None:
            raise ValueError("--cluster makes this broker a cluster member, not one of a pair: "
                             "no --state or --peer-state")
        if not config.name:
            raise ValueError("--cluster needs --name (this member's name in the cluster)")
        host = self._host
        info = {"frontend": advertised(config.frontend, host), "host": host, "pid": self._pid,
                "boot": self._boot,
                "monitor": advertised(config.monitor, host) if config.monitor else None}
        return Membership(clock, config.name, info, cluster=config.cluster_name, where=url)

    def _cluster_outputs(self, outputs: list[ClusterOutput], out: list[Action]) -> None:
        for o in outputs:
            if isinstance(o, ClusterAlert):
                detail = dict(o.detail)
                if o.state == RESOLVED:
                    detail["resolved"] = True
                self._notice(Notice(o.name, o.subject, detail), out)
            elif isinstance(o, ClusterLog):
                out.append(Log(o.level, o.msg, o.args))
            else:
                out.append(ToEtcd(o))

    def _elector(self, config: Settings, clock: Clock) -> Election | None:
        """Rule 12: a broker started with --elect stands for the election's active role."""
        url = config.elect
        if url is None:
            return None
        parse_cluster(url)
        if config.peer_state is not None or config.state is not None:
            raise ValueError("--elect replaces the Binary Star link: no --state or --peer-state "
                             "(etcd is the link)")
        if config.cluster is not None:
            raise ValueError("--elect and --cluster: an elected broker is one of a pair, not a "
                             "cluster member")
        check_name(config.election, "--election")
        host = self._host
        me = {"name": advertised(config.frontend, host), "frontend": advertised(config.frontend, host),
              "host": host, "pid": self._pid, "boot": self._boot}
        return Election(clock, me, role=config.role, name=config.election, where=url)

    def _election_due(self, out: list[Action]) -> None:
        """Rule 12: once the fence deadline passes, the election hears of it before anything
        else is served (the clock is read, not a timer waited for: a stall counts at once)."""
        e = self._election
        if e is not None and self._serving and self._clock() >= e.fence_at:
            self._election_outputs(e.tick(), out)

    def _election_outputs(self, outputs: list[ElectionOutput], out: list[Action]) -> None:
        serving: bool | None = None
        for o in outputs:
            if isinstance(o, ElectionServing):
                serving = o.serving
                out.append(Log(logging.INFO if o.serving else logging.WARNING, "%s clients: %s",
                               ("serving" if o.serving else "not serving", o.reason)))
            elif isinstance(o, ElectionAlert):
                detail = dict(o.detail)
                if o.state == RESOLVED:
                    detail["resolved"] = True
                if o.name == "lease_lost" and o.state != RESOLVED:
                    out.append(Log(logging.ERROR, "lease lost: %s", (o.detail.get("reason"),)))
                self._monitor_outputs(self._monitor.notice(Notice(o.name, o.subject, detail)), out)
            elif isinstance(o, ElectionLog):
                out.append(Log(o.level, o.msg, o.args))
            else:
                out.append(ToElection(o))
        e = self._election
        if e is None:
            return
        if self._serving or serving:  # stamped on every call and probe from now on (rule 12)
            self._dispatcher.epoch = e.epoch
        if serving is not None and serving != self._serving:
            self._serving = serving
            if serving:
                self._monitor_outputs(self._monitor.became_active(), out)
            self._activate(serving, out)

    def _identity(self) -> dict[str, Any]:
        """Who says it, on every event: a cluster member by its name (it has no pair role)."""
        who = {"time": self._wall(), "broker": self.config.frontend, "role": self.role,
               "broker_state": self.state}
        if self._cluster is not None:
            who["member"] = self._cluster.name
        return who

    def _hello(self) -> dict[str, Any]:
        b, e = self._bstar, self._election
        epoch = b.epoch if b is not None else e.epoch if e is not None else 0
        return {"interval_ms": int(self.config.heartbeat_interval * 1000),
                "liveness": self.config.liveness, "role": self.role, "state": self.state,
                "epoch": epoch, "boot": self._boot}

    @contextmanager
    def _contain(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - rule 10
            self._errors.record(exc, what)


def _remember(seen: dict[Any, Any], key: Any, value: Any) -> None:
    """Bounded memory (SEEN_LIMIT), oldest first: `key` is made the newest."""
    seen.pop(key, None)
    seen[key] = value
    while len(seen) > SEEN_LIMIT:
        del seen[next(iter(seen))]
