"""Membership: one cluster member's view of the cluster, sans-IO: its own registration on an
etcd lease, the member set it watches, and the alerts both call for.

The edge (zrpc._io._etcd) carries out the actions on etcd and answers each with one event
carrying the action's `seq`; the watch it runs reports what it sees as MemberPut and
MemberDeleted, tagged with the seq of the Watch that started it.

Registration: UNREGISTERED -> GRANTING (GrantLease sent) -> PUTTING (Put on the lease sent)
-> REGISTERED (Refresh every ttl/3) -> back to UNREGISTERED when the lease is lost; STOPPED
after stop().

Rules (DESIGN.md §9):

1. start() asks for a lease and for the member set (GrantLease and Fetch). At most one
   registration exchange (grant, put, refresh) and one view exchange (fetch, watch) are in
   flight at a time. An answer to anything but the exchange in flight is stale: it changes
   nothing but rule 6.
2. A granted lease gets our key put on it; once put, we are REGISTERED. The lease is good for
   its TTL from the moment the request that granted or refreshed it was sent (never later
   than etcd's own count), and refreshed every ttl/3 from that moment.
3. The lease is lost when etcd says it expired (LeaseExpired), when our key is deleted (or
   missing from a snapshot) at a revision after our put, or when its TTL passes with no
   refresh answered. Then we register again, from a new lease, at once.
4. A failed registration exchange is tried again after `retry`: a refresh while the lease
   lasts (rule 3 ends it), a grant or a put from a new grant.
5. The member set is the last Snapshot, plus what the watch started from its revision put,
   less what it deleted. Events of any other watch, or at or before the revision already
   applied, are stale. A watch that ends or fails is followed by a new Fetch (after `retry`
   when it failed or ended within `retry` of starting), which starts a new watch.
6. etcd is reachable (`etcd_reachable`) until an exchange fails, or a refresh is still
   unanswered when the lease's TTL passes; and again from the next answer (any event but
   ExchangeFailed and WatchEnded, stale or not). `etcd_unreachable` is raised when it turns
   unreachable and resolved when it turns back: it is raised iff the latest word from etcd
   was a failure, or a silence past the TTL. (A lease that passed its TTL because we did
   not ask, our own stall, is lost without blaming etcd.)
7. Alerts about the other members: `member_joined` (an event) when a name enters the set, or
   is put again with another boot id (it restarted); `member_left` (raised) when one leaves
   the set, resolved when it joins again. The first snapshot is the cluster as found: no
   alerts. Never an alert about ourselves.
8. While etcd is unreachable the member set stays as last seen: the members keep serving
   with it, and nobody new joins (a grant needs etcd).
9. stop() revokes the lease (the others see us leave at once, not a TTL later); after it
   nothing is sent and every event is ignored.
10. An observer (`register=False`: a worker or a client following the cluster) keeps the view
    alone (rules 5-8, reachability from its fetches and watches): no lease, no key, never a
    Revoke, and every member is one of the others.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zrpc._core._clock import Clock
from zrpc._defaults import CLUSTER_NAME, LEASE_TTL

SCHEME = "etcd://"
ENV = "ZRPC_CLUSTER"
"""The environment's cluster URL: what ZRPC_BROKERS is for a pair."""

DEFAULT_PORT = 2379
"""etcd's client port, for a host given without one."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)$")


def parse_cluster(url: str) -> tuple[tuple[str, int], ...]:
    """etcd://H:P[,H:P...] as (host, port) pairs; ValueError saying the expected shape."""
    text = url.strip()
    shape = f"expected {SCHEME}HOST:PORT[,HOST:PORT...]"
    if not text.startswith(SCHEME):
        raise ValueError(f"invalid cluster {url!r}: {shape}")
    out: list[tuple[str, int]] = []
    for part in text[len(SCHEME):].split(","):
        part = part.strip().rstrip("/")
        host, sep, port = part.rpartition(":") if not part.endswith("]") else (part, "", "")
        if not sep:
            host, port = part, str(DEFAULT_PORT)
        if not host or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid cluster {url!r}: bad endpoint {part!r}, {shape}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def check_name(name: str, what: str = "--name") -> str:
    """A member or cluster name: one etcd key segment, so no '/'."""
    if not _NAME.match(name):
        raise ValueError(f"invalid {what} {name!r}: letters, digits, '_', '.' and '-' (at most 64, "
                         "starting with a letter or digit)")
    return name


def brokers_prefix(cluster: str) -> str:
    """Where a cluster's brokers register: /zrpc/<cluster>/brokers/<name> (DESIGN.md §9)."""
    return f"/zrpc/{cluster}/brokers/"


def advertised(endpoint: str, host: str) -> str:
    """A bind endpoint as others reach it: tcp://*:P and tcp://0.0.0.0:P name this host."""
    for wild in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wild) and host:
            return f"tcp://{host}:{endpoint[len(wild):]}"
    return endpoint


class Registration(enum.Enum):
    UNREGISTERED = "unregistered"
    GRANTING = "granting"
    PUTTING = "putting"
    REGISTERED = "registered"
    OBSERVING = "observing"  # rule 10: following the member set, not in it
    STOPPED = "stopped"


# --- events (what the edge saw) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    seq: int
    lease: int
    ttl: float


@dataclass(frozen=True, slots=True)
class Registered:
    """Our key is on the lease, at `revision`."""

    seq: int
    lease: int
    revision: int


@dataclass(frozen=True, slots=True)
class RefreshOk:
    seq: int
    lease: int
    ttl: float


@dataclass(frozen=True, slots=True)
class LeaseExpired:
    """etcd answered that the lease is gone (a refresh or a put on it)."""

    seq: int
    lease: int


@dataclass(frozen=True, slots=True)
class ExchangeFailed:
    """No endpoint answered (or one answered an error): `what` names the exchange."""

    seq: int
    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every member's registration, as of `revision`."""

    seq: int
    members: Mapping[str, Mapping[str, Any]]
    revision: int


@dataclass(frozen=True, slots=True)
class MemberPut:
    watch: int
    name: str
    info: Mapping[str, Any]
    revision: int


@dataclass(frozen=True, slots=True)
class MemberDeleted:
    watch: int
    name: str
    revision: int


@dataclass(frozen=True, slots=True)
class WatchEnded:
    """The watch's stream ended (etcd went away, or cancelled it): not an answer."""

    watch: int
    reason: str


Event = (LeaseGranted | Registered | RefreshOk | LeaseExpired | ExchangeFailed | Snapshot
         | MemberPut | MemberDeleted | WatchEnded)

# --- actions (what the edge does) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GrantLease:
    seq: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Put:
    seq: int
    key: str
    value: str
    lease: int


@dataclass(frozen=True, slots=True)
class Refresh:
    seq: int
    lease: int


@dataclass(frozen=True, slots=True)
class Fetch:
    seq: int
    prefix: str


@dataclass(frozen=True, slots=True)
class Watch:
    """Start watching `prefix` from `start_revision` (the edge runs one watch at a time)."""

    seq: int
    prefix: str
    start_revision: int


@dataclass(frozen=True, slots=True)
class Revoke:
    """Best effort, on a clean stop: no answer is expected."""

    seq: int
    lease: int


EtcdAction = GrantLease | Put | Refresh | Fetch | Watch | Revoke


RAISED, RESOLVED, EVENT = "raised", "resolved", "event"


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    subject: str
    state: str  # raised, resolved or event
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    msg: str
    args: tuple[Any, ...] = ()


Output = EtcdAction | Alert | Log

ANSWERS = (LeaseGranted, Registered, RefreshOk, LeaseExpired, Snapshot, MemberPut, MemberDeleted)
"""Events that show etcd answered (rule 6)."""


class Membership:
    """One member's registration and view of the cluster; the rules are in the module docstring."""

    def __init__(self, clock: Clock, name: str, info: Mapping[str, Any], *,
                 cluster: str = CLUSTER_NAME, ttl: int = LEASE_TTL, retry: float | None = None,
                 where: str = "", register: bool = True) -> None:
        """`info` is what we register (our endpoints; `boot` tells a restart apart); `retry`
        (default ttl/3) paces the exchanges that failed; `where` names etcd in alerts;
        `register=False` makes an observer (rule 10; its name is only for logs)."""
        if ttl < 1:
            raise ValueError("the lease TTL is at least 1 s")
        self._clock = clock
        self._register = register
        self.name = check_name(name) if register else ""
        self.cluster = check_name(cluster, "--cluster-name")
        self.prefix = brokers_prefix(cluster)
        self.key = self.prefix + name
        self._info = {**info, "name": name}
        self._boot = self._info.get("boot")
        self.ttl = ttl
        self._every = ttl / 3
        self._retry = self._every if retry is None else retry
        self._where = where
        self._state = Registration.UNREGISTERED
        self._seq = 0
        self._reg_seq: int | None = None  # the registration exchange in flight
        self._reg_sent = 0.0
        self._next_reg: float | None = None
        self._lease: int | None = None
        self._lease_deadline: float | None = None
        self._lease_from = 0.0  # when the request behind the lease's TTL was sent
        self._put_revision = 0
        self._view_seq: int | None = None  # the fetch in flight
        self._watch_seq: int | None = None  # the watch running
        self._watch_sent = 0.0
        self._next_fetch: float | None = None
        self._members: dict[str, dict[str, Any]] = {}
        self._revision = 0
        self._seen = False  # a snapshot came
        self._left: set[str] = set()  # members whose member_left is raised
        self._reachable = True
        self._error: str | None = None
        self.registrations = 0

    # --- read-only views -----------------------------------------------------------------

    @property
    def state(self) -> Registration:
        return self._state

    @property
    def etcd_reachable(self) -> bool:
        return self._reachable

    @property
    def members(self) -> dict[str, dict[str, Any]]:
        """Every member as last seen (ourselves included once registered), a copy."""
        return {n: dict(i) for n, i in self._members.items()}

    @property
    def lease(self) -> int | None:
        return self._lease

    @property
    def lease_deadline(self) -> float | None:
        """When the lease expires, as far as we know (None: no lease)."""
        return self._lease_deadline

    def __repr__(self) -> str:
        etcd = "ok" if self._reachable else "unreachable"
        return (f"<Membership {self.cluster}/{self.name} {self._state.name} etcd={etcd} "
                f"members={sorted(self._members)}>")

    def snapshot(self) -> dict[str, Any]:
        """The `cluster` part of zrpc.status."""
        left = (None if self._lease_deadline is None
                else round(max(0.0, self._lease_deadline - self._clock()), 3))
        return {"name": self.cluster, "member": self.name, "members": sorted(self._members),
                "etcd": "ok" if self._reachable else "unreachable", "etcd_error": self._error,
                "registration": self._state.value, "lease": self._lease, "lease_left_s": left,
                "registrations": self.registrations, "revision": self._revision}

    # --- verbs ---------------------------------------------------------------------------

    def start(self) -> list[Output]:
        """Rule 1."""
        out: list[Output] = []
        if self._state is Registration.UNREGISTERED and self._reg_seq is None:
            if self._register:
                self._grant(out)
            else:
                self._state = Registration.OBSERVING
            self._fetch(out)
        return out

    def stop(self) -> list[Output]:
        """Rule 9."""
        out: list[Output] = []
        if self._state is not Registration.STOPPED and self._lease is not None:
            out.append(Revoke(self._next_seq(), self._lease))
        self._state = Registration.STOPPED
        self._reg_seq = self._view_seq = self._watch_seq = None
        self._next_reg = self._next_fetch = self._lease_deadline = None
        return out

    def handle(self, event: Event) -> list[Output]:
        out: list[Output] = []
        if self._state is Registration.STOPPED:
            return out
        if isinstance(event, ANSWERS):
            self._answered(out)
        if isinstance(event, LeaseGranted):
            self._on_granted(event, out)
        elif isinstance(event, Registered):
            self._on_registered(event, out)
        elif isinstance(event, RefreshOk):
            self._on_refreshed(event, out)
        elif isinstance(event, LeaseExpired):
            if event.seq == self._reg_seq:
                self._lose("etcd says it expired", out)
        elif isinstance(event, ExchangeFailed):
            self._on_failed(event, out)
        elif isinstance(event, Snapshot):
            self._on_snapshot(event, out)
        elif isinstance(event, MemberPut):
            self._on_put(event, out)
        elif isinstance(event, MemberDeleted):
            self._on_deleted(event, out)
        elif isinstance(event, WatchEnded):
            self._on_watch_ended(event, out)
        else:
            raise TypeError(f"Membership cannot handle {event!r}")  # our bug, not etcd's
        return out

    def tick(self) -> list[Output]:
        """Time-driven work: a lease past its TTL (rule 3), refreshes and retries (2, 4, 5)."""
        out: list[Output] = []
        if self._state is Registration.STOPPED:
            return out
        now = self._clock()
        if (self._state is Registration.REGISTERED and self._lease_deadline is not None
                and now >= self._lease_deadline):
            if self._reg_seq is not None:  # asked and not answered; else our own stall
                self._failed(f"no answer from etcd within the lease's {self.ttl}s TTL", out)
            self._lose(f"not renewed within its {self.ttl}s TTL", out)
        if self._reg_seq is None and self._next_reg is not None and now >= self._next_reg:
            if self._state is Registration.REGISTERED and self._lease is not None:
                self._send_reg(Refresh(self._next_seq(), self._lease), out)
            elif self._state is Registration.UNREGISTERED:
                self._grant(out)
        if (self._view_seq is None and self._watch_seq is None and self._next_fetch is not None
                and now >= self._next_fetch):
            self._fetch(out)
        return out

    def next_deadline(self) -> float | None:
        times: list[float] = []
        if self._reg_seq is None and self._next_reg is not None:
            times.append(self._next_reg)
        if self._state is Registration.REGISTERED and self._lease_deadline is not None:
            times.append(self._lease_deadline)
        if self._view_seq is None and self._watch_seq is None and self._next_fetch is not None:
            times.append(self._next_fetch)
        return min(times, default=None)

    # --- registration --------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send_reg(self, action: GrantLease | Put | Refresh, out: list[Output]) -> None:
        self._reg_seq = action.seq
        self._reg_sent = self._clock()
        self._next_reg = None
        out.append(action)

    def _grant(self, out: list[Output]) -> None:
        self._state = Registration.GRANTING
        self._send_reg(GrantLease(self._next_seq(), self.ttl), out)

    def _on_granted(self, e: LeaseGranted, out: list[Output]) -> None:
        if e.seq != self._reg_seq or self._state is not Registration.GRANTING:
            return
        self._lease = e.lease
        self._lease_deadline = self._reg_sent + e.ttl
        self._lease_from = self._reg_sent
        self._state = Registration.PUTTING
        value = json.dumps(self._info, sort_keys=True, default=str)
        self._send_reg(Put(self._next_seq(), self.key, value, e.lease), out)

    def _on_registered(self, e: Registered, out: list[Output]) -> None:
        if e.seq != self._reg_seq or self._state is not Registration.PUTTING or e.lease != self._lease:
            return
        self._reg_seq = None
        self._state = Registration.REGISTERED
        self._put_revision = e.revision
        self.registrations += 1
        self._next_reg = self._lease_from + self._every
        again = " again" if self.registrations > 1 else ""
        out.append(Log(logging.INFO, "registered%s as %s in cluster %s (lease %x, TTL %ds)",
                       (again, self.name, self.cluster, e.lease, self.ttl)))

    def _on_refreshed(self, e: RefreshOk, out: list[Output]) -> None:
        if (e.seq != self._reg_seq or self._state is not Registration.REGISTERED
                or e.lease != self._lease):
            return
        self._reg_seq = None
        self._lease_from = self._reg_sent
        self._lease_deadline = self._reg_sent + e.ttl
        self._next_reg = self._reg_sent + self._every

    def _on_failed(self, e: ExchangeFailed, out: list[Output]) -> None:
        self._failed(f"{e.what}: {e.reason}", out)
        now = self._clock()
        if e.seq == self._reg_seq:
            self._reg_seq = None
            self._next_reg = now + self._retry
            if self._state is not Registration.REGISTERED:
                self._state = Registration.UNREGISTERED  # a put failed: from a new grant
                self._lease = self._lease_deadline = None
        elif e.seq == self._view_seq or e.seq == self._watch_seq:
            self._view_seq = self._watch_seq = None
            self._next_fetch = now + self._retry

    def _lose(self, why: str, out: list[Output]) -> None:
        """Rule 3: register again from a new lease, at once."""
        if self._state in (Registration.UNREGISTERED, Registration.STOPPED):
            return
        out.append(Log(logging.WARNING, "lost its lease in cluster %s (%s): registering again",
                       (self.cluster, why)))
        self._state = Registration.UNREGISTERED
        self._lease = self._lease_deadline = None
        self._reg_seq = None
        self._next_reg = self._clock()
        self._grant(out)

    # --- reachability (rule 6) -----------------------------------------------------------

    def _answered(self, out: list[Output]) -> None:
        if not self._reachable:
            self._reachable = True
            out.append(Alert("etcd_unreachable", "etcd", RESOLVED, {"etcd": self._where}))
            out.append(Log(logging.INFO, "etcd answers again (%s)", (self._where,)))
        self._error = None

    def _failed(self, reason: str, out: list[Output]) -> None:
        self._error = reason[:300]
        if self._reachable:
            self._reachable = False
            out.append(Alert("etcd_unreachable", "etcd", RAISED,
                             {"etcd": self._where, "error": self._error,
                              "members": sorted(self._members)}))

    # --- the view (rules 5, 7, 8) ----------------------------------------------------------

    def _fetch(self, out: list[Output]) -> None:
        self._next_fetch = None
        self._view_seq = self._next_seq()
        out.append(Fetch(self._view_seq, self.prefix))

    def _on_snapshot(self, e: Snapshot, out: list[Output]) -> None:
        if e.seq != self._view_seq:
            return
        self._view_seq = None
        old, new = self._members, {n: dict(i) for n, i in e.members.items()}
        if self._seen:
            for name in sorted(set(old) - set(new)):
                self._member_left(name, out)
            for name, info in sorted(new.items()):
                self._member_seen(name, old.get(name), info, out)
        elif new:
            out.append(Log(logging.INFO, "cluster %s has %d member(s): %s",
                           (self.cluster, len(new), ", ".join(sorted(new)))))
        self._seen = True
        self._members = new
        self._revision = e.revision
        if (self._state is Registration.REGISTERED and e.revision >= self._put_revision
                and self.name not in new):
            self._lose("its key is gone from etcd", out)
        self._watch_seq = self._next_seq()
        self._watch_sent = self._clock()
        out.append(Watch(self._watch_seq, self.prefix, e.revision + 1))

    def _on_put(self, e: MemberPut, out: list[Output]) -> None:
        if e.watch != self._watch_seq or e.revision <= self._revision:
            return
        self._revision = e.revision
        info = dict(e.info)
        before = self._members.get(e.name)
        self._members[e.name] = info
        self._member_seen(e.name, before, info, out)

    def _on_deleted(self, e: MemberDeleted, out: list[Output]) -> None:
        if e.watch != self._watch_seq or e.revision <= self._revision:
            return
        self._revision = e.revision
        was = self._members.pop(e.name, None)
        if e.name == self.name:
            if self._state is Registration.REGISTERED and e.revision > self._put_revision:
                self._lose("its key was deleted", out)
        elif was is not None:
            self._member_left(e.name, out)

    def _on_watch_ended(self, e: WatchEnded, out: list[Output]) -> None:
        if e.watch != self._watch_seq:
            return
        self._watch_seq = None
        now = self._clock()
        self._next_fetch = max(now, self._watch_sent + self._retry)
        out.append(Log(logging.DEBUG, "the watch of cluster %s ended (%s): fetching again",
                       (self.cluster, e.reason)))

    def _member_seen(self, name: str, before: Mapping[str, Any] | None, info: Mapping[str, Any],
                     out: list[Output]) -> None:
        if name == self.name:
            return
        restarted = before is not None and before.get("boot") != info.get("boot")
        if before is not None and not restarted:
            return
        detail = {k: info[k] for k in ("frontend", "monitor", "host", "pid") if k in info}
        if restarted:
            detail["restarted"] = True
        out.append(Alert("member_joined", name, EVENT, detail))
        if name in self._left:
            self._left.discard(name)
            out.append(Alert("member_left", name, RESOLVED, {"rejoined": True}))

    def _member_left(self, name: str, out: list[Output]) -> None:
        if name == self.name or name in self._left:
            return
        self._left.add(name)
        out.append(Alert("member_left", name, RAISED,
                         {"reason": "its lease expired or was revoked", "members": len(self._members)}))
