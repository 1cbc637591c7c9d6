"""Election: one broker's candidacy for the active role of a consensus-backed pair (`--elect`),
sans-IO: its etcd lease, its campaign for the key that names the active broker, what it knows
of the holder, and whether it may serve now.

The active role is the key /zrpc/elections/<name>/active, created only if absent, on the
creator's lease; its create revision is the holder's **epoch** (etcd revisions only grow, so a
later holder always has a higher one). The edge (zrpc/_io/_etcd.py, through broker/_loop.py)
carries out the actions and answers each exchange with one event carrying the action's `seq`;
the watch it runs reports KeyCreated and KeyDeleted tagged with the seq of its WatchKey.

Rules (DESIGN.md §9, docs/protocol.md §8):

1. start() asks for a lease. At most one lease exchange (Grant, Renew) and one key exchange
   (Campaign) are in flight at a time; an answer to anything else is stale and changes
   nothing but rule 10.
2. A lease is good for its TTL (the smaller of the one asked for and the one granted) counted
   from the moment the request that granted or renewed it was **sent**: etcd counts from when
   it processed it, which is later. It is renewed every ttl/RENEWALS from that moment; a failed
   exchange is tried again after `retry`. A lease is never given up on while etcd might still
   hold it: only etcd saying it is gone (LeaseGone) ends it, and a new one is asked for at once.
3. A campaign is one transaction: if the key's create revision is 0 (absent), put it, holding
   our identity, on our lease; else read it. Its answer names the holder and its epoch: we hold
   the role iff the key is on our lease (so a campaign whose answer was lost, asked again,
   finds that it won). A campaign is sent after every grant, when the key is deleted (a
   vacancy), when the watch ends, when a higher epoch is heard of, and every `recheck` while
   another holds the key (a watch on a cut-off etcd member hears nothing).
4. Role orders who tries first: a backup defers a campaign after a grant or a vacancy by
   `defer`, unless the holder it last saw was a primary (the primary is the one gone).
5. The watch starts after each campaign answer, from the revision after it, unless one is
   running. Events of another watch, or at or before the revision already applied, are stale.
   The key created on another lease: that candidate holds it. The key deleted: a vacancy.
6. **Serving.** Only the holder serves, and only while now < fence_at = lease start + TTL x
   (1 - margin) (rule 2's start). With the local clock running at rate r against real time and
   etcd's at rate e, we stop at real time TTL x (1 - margin) / r after the renewal was sent,
   etcd expires the lease no sooner than TTL / e after it: safe while (1 - margin) < r / e,
   i.e. margin 0.2 covers clocks 10 % off each way at once.
7. **Self-fencing.** When fence_at passes, the holder stops serving at once (ServingChanged)
   and raises `lease_lost`: the lease may expire any moment and another candidate take the key.
   A renewal answered later proves the lease (and so the key on it) lived on: it serves again
   and `lease_lost` is resolved. etcd saying the lease is gone, or the key deleted or created
   by another, ends the term: the key went with the lease.
8. **Epochs** never decrease. A higher epoch than ours heard of while holding the role (a
   worker's heartbeat, or a worker refusing our epoch: RefusedByWorker) means another broker
   holds a newer key: we step down at once, and campaign to learn who holds it.
9. Alerts: `failover` (critical) raised when we take the key after another candidate held it,
   resolved when we no longer hold it; `lease_lost` (critical) by rule 7 (or when the key went
   while we held it), resolved once a lease is fresh again (renewed or newly granted).
10. etcd is reachable until an exchange fails, and again from the next answer, stale or not:
    `etcd_unreachable` is raised and resolved as it turns (as for a cluster member).
11. stop() stops serving and revokes the lease, so the key goes now and the others race at
    once, not a TTL later; after it nothing is sent and every event is ignored.

Invariants, checked on random schedules over a fake etcd in the tests: whenever a candidate
accepts clients, the key is on its lease and etcd has not expired that lease, so no two
candidates ever serve at once; a candidate's epoch never decreases.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zrpc._core._clock import Clock
from zrpc._defaults import ELECTION_DEFER, ELECTION_MARGIN, ELECTION_NAME, ELECTION_TTL, ROLES

MAX_EPOCH = 2**63 - 1
"""etcd revisions are int64: a larger epoch on the wire is garbage."""

RENEWALS = 4
"""Renewals per TTL: three may fail or be late before the holder stops serving (rule 6)."""


def election_key(name: str) -> str:
    """The key whose holder is the active broker (DESIGN.md §9)."""
    return f"/zrpc/elections/{name}/active"


class Phase(enum.Enum):
    GRANTING = "granting"  # no lease: asking etcd for one
    CAMPAIGNING = "campaigning"  # a lease, and nobody known to hold the key
    PASSIVE = "passive"  # another candidate holds the key
    ACTIVE = "active"  # we hold the key and serve
    FENCED = "fenced"  # we hold the key, but our lease is not fresh: not serving (rule 7)
    STOPPED = "stopped"


# --- events (what the edge saw, or what workers told the broker) ----------------------------


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    seq: int
    lease: int
    ttl: float


@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    seq: int
    lease: int
    ttl: float


@dataclass(frozen=True, slots=True)
class LeaseGone:
    """etcd answered that the lease does not exist (a renewal, or a campaign on it)."""

    seq: int
    lease: int


@dataclass(frozen=True, slots=True)
class Campaigned:
    """The create-if-absent's answer: `won`, and the key as it is now (its create revision is
    the holder's epoch, `lease` the holder's lease, `value` its identity), as of `revision`."""

    seq: int
    won: bool
    epoch: int
    lease: int
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class KeyCreated:
    """The watch saw the key put (created, or rewritten) at `revision`."""

    watch: int
    epoch: int
    lease: int
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class KeyDeleted:
    watch: int
    revision: int


@dataclass(frozen=True, slots=True)
class WatchEnded:
    """The watch's stream ended (etcd went away, or cancelled it): not an answer."""

    watch: int
    reason: str


@dataclass(frozen=True, slots=True)
class ExchangeFailed:
    """No endpoint answered (or one answered an error): `what` names the exchange."""

    seq: int
    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class EpochSeen:
    """A worker reports an active broker with this epoch (its heartbeat's `active_epoch`)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class RefusedByWorker:
    """A worker refused a call we stamped with our epoch: it has seen a higher one."""

    worker: str


Event = (LeaseGranted | LeaseRenewed | LeaseGone | Campaigned | KeyCreated | KeyDeleted
         | WatchEnded | ExchangeFailed | EpochSeen | RefusedByWorker)

ANSWERS = (LeaseGranted, LeaseRenewed, LeaseGone, Campaigned, KeyCreated, KeyDeleted)
"""Events that show etcd answered (rule 10)."""

# --- actions (what the edge does, and what the broker does) --------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    seq: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Renew:
    seq: int
    lease: int


@dataclass(frozen=True, slots=True)
class Campaign:
    """Put `key` = `value` on `lease` only if the key is absent; either way, answer what it is."""

    seq: int
    key: str
    value: str
    lease: int


@dataclass(frozen=True, slots=True)
class WatchKey:
    """Watch `key` from `start_revision` (the edge runs one watch at a time)."""

    seq: int
    key: str
    start_revision: int


@dataclass(frozen=True, slots=True)
class Revoke:
    """Best effort, on a clean stop: no answer is expected."""

    seq: int
    lease: int


EtcdAction = Grant | Renew | Campaign | WatchKey | Revoke

RAISED, RESOLVED = "raised", "resolved"

SUBJECT = "election"
"""The subject of the election's own alerts (etcd_unreachable's is "etcd")."""


@dataclass(frozen=True, slots=True)
class ServingChanged:
    """Whether client requests are accepted changed: the loop (de)activates its dispatcher."""

    serving: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    subject: str
    state: str  # raised or resolved
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    msg: str
    args: tuple[Any, ...] = ()


Output = EtcdAction | ServingChanged | Alert | Log


def holder_info(value: bytes) -> dict[str, Any]:
    """A key's value as the holder's identity (a candidate's JSON); what is not one is kept as
    text, for the status to show."""
    try:
        info = json.loads(value)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return {"malformed": value[:100].decode(errors="replace")}
    return info


class Election:
    """One candidate's lease, campaign and view of the holder; the rules are in the module
    docstring.

    Args:
        clock: monotonic seconds.
        me: what we put in the key when we win (name, frontend, role, ...): others show it.
        role: primary or backup (rule 4).
        name: the election's name (its key: election_key(name)).
        ttl: the lease's TTL, whole seconds.
        margin: rule 6's share of the TTL given back against clock drift.
        defer: rule 4's wait.
        retry: the wait before a failed exchange is tried again (default ttl/6).
        recheck: how often a passive candidate asks who holds the key (default ttl).
        where: names etcd in alerts.
    """

    def __init__(self, clock: Clock, me: Mapping[str, Any], *, role: str = ROLES[0],
                 name: str = ELECTION_NAME, ttl: int = ELECTION_TTL,
                 margin: float = ELECTION_MARGIN, defer: float = ELECTION_DEFER,
                 retry: float | None = None, recheck: float | None = None,
                 where: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be primary or backup, not {role!r}")
        if ttl < 1:
            raise ValueError("the lease TTL is at least 1 s")
        if not 0 < margin < 1:
            raise ValueError("the margin is a share of the TTL, between 0 and 1")
        self._clock = clock
        self.name = name
        self.key = election_key(name)
        self.role = role
        self._me = {**me, "role": role}
        self._value = json.dumps(self._me, sort_keys=True, default=str)
        self.ttl = ttl
        self._margin = margin
        self._defer = defer
        self._retry = ttl / 6 if retry is None else retry
        self._recheck = float(ttl) if recheck is None else recheck
        self._where = where
        self._seq = 0
        self._stopped = False
        # the lease (rule 2)
        self._lease: int | None = None
        self._lease_ttl = float(ttl)
        self._lease_from = 0.0  # when the request behind the lease's freshness was sent
        self._lease_seq: int | None = None  # the lease exchange in flight
        self._lease_sent = 0.0
        self._next_lease: float | None = None  # the next grant or renewal
        # the key (rules 3-5)
        self._key_seq: int | None = None  # the campaign in flight
        self._next_campaign: float | None = None
        self._watch_seq: int | None = None
        self._watch_sent = 0.0
        self._revision = 0  # the latest revision applied
        self._mine = False  # the key is on our lease
        self._holder: dict[str, Any] | None = None  # the key's value, while someone holds it
        self._holder_lease = 0
        self._epoch = 0  # the holder's epoch (0: nobody holds it); the last one's after it went
        self._highest = 0  # the highest epoch heard of (rule 8)
        self._last_role: str | None = None  # the role of the holder last seen (rule 4)
        self._last_other: str | None = None  # another holder seen since our last term (rule 9)
        # what was announced
        self._serving = False
        self._lease_lost = False
        self._failover = False
        self._reachable = True
        self._error: str | None = None
        self.terms = 0  # times this candidate took the role

    # --- read-only views -----------------------------------------------------------------

    @property
    def fence_at(self) -> float:
        """Rule 6: the holder serves until then (-inf: no lease)."""
        if self._lease is None:
            return float("-inf")
        return self._lease_from + self._lease_ttl * (1 - self._margin)

    @property
    def accepts_clients(self) -> bool:
        """Rule 6, on the clock now (a stall of ours counts against us at once)."""
        return self._mine and not self._stopped and self._clock() < self.fence_at

    @property
    def epoch(self) -> int:
        """The current holder's epoch (ours while we hold the role), else the last one's."""
        return self._epoch

    @property
    def highest_epoch(self) -> int:
        return self._highest

    @property
    def holder(self) -> dict[str, Any] | None:
        """The holder's identity (a copy; None: nobody known to hold the key)."""
        return None if self._holder is None else dict(self._holder)

    @property
    def holding(self) -> bool:
        """The key is on our lease (we serve only while the lease is also fresh)."""
        return self._mine

    @property
    def lease(self) -> int | None:
        return self._lease

    @property
    def etcd_reachable(self) -> bool:
        return self._reachable

    @property
    def phase(self) -> Phase:
        if self._stopped:
            return Phase.STOPPED
        if self._mine:
            return Phase.ACTIVE if self.accepts_clients else Phase.FENCED
        if self._holder is not None:
            return Phase.PASSIVE
        return Phase.GRANTING if self._lease is None else Phase.CAMPAIGNING

    @property
    def decided(self) -> bool:
        """A holder is or was known (before that, the broker says its role, as Binary Star's
        PRIMARY and BACKUP do)."""
        return self._mine or self._holder is not None or self._epoch > 0

    def __repr__(self) -> str:
        holder = (self._holder or {}).get("frontend", "-") if not self._mine else "us"
        return (f"<Election {self.name} {self.role} {self.phase.name} epoch={self._epoch} "
                f"holder={holder} lease={'-' if self._lease is None else hex(self._lease)}>")

    def snapshot(self) -> dict[str, Any]:
        """The `election` part of zrpc.status."""
        now = self._clock()
        left = None if self._lease is None else round(max(0.0, self._lease_from + self._lease_ttl - now), 3)
        holder = self._me if self._mine else self._holder
        return {"name": self.name, "key": self.key, "state": self.phase.value,
                "holder": None if holder is None else holder.get("frontend", holder.get("name")),
                "holder_role": None if holder is None else holder.get("role"),
                "epoch": self._epoch if (self._mine or self._holder is not None) else None,
                "last_epoch": self._epoch, "highest_epoch": self._highest,
                "lease": self._lease, "lease_left_s": left,
                "serving_left_s": round(max(0.0, self.fence_at - now), 3) if self._mine else None,
                "etcd": "ok" if self._reachable else "unreachable", "etcd_error": self._error,
                "terms": self.terms, "revision": self._revision}

    # --- verbs ---------------------------------------------------------------------------

    def start(self) -> list[Output]:
        """Rule 1."""
        out: list[Output] = []
        if not self._stopped and self._lease is None and self._lease_seq is None:
            self._send_lease(Grant(self._next_seq(), self.ttl), out)
        return out

    def stop(self) -> list[Output]:
        """Rule 11."""
        out: list[Output] = []
        if self._stopped:
            return out
        if self._mine:
            self._step_down("stopping", out)
        if self._lease is not None:
            out.append(Revoke(self._next_seq(), self._lease))
        self._stopped = True
        self._lease_seq = self._key_seq = self._watch_seq = None
        self._next_lease = self._next_campaign = None
        self._sync("stopping", out)
        return out

    def handle(self, event: Event) -> list[Output]:
        out: list[Output] = []
        if self._stopped:
            return out
        if isinstance(event, ANSWERS):
            self._answered(out)
        match event:
            case LeaseGranted():
                self._on_granted(event, out)
            case LeaseRenewed():
                self._on_renewed(event, out)
            case LeaseGone():
                self._on_lease_gone(event, out)
            case Campaigned():
                self._on_campaigned(event, out)
            case KeyCreated():
                self._on_created(event, out)
            case KeyDeleted():
                self._on_deleted(event, out)
            case WatchEnded():
                self._on_watch_ended(event, out)
            case ExchangeFailed():
                self._on_failed(event, out)
            case EpochSeen():
                self._on_epoch(event.epoch, "a worker reports an active broker with epoch "
                               f"{event.epoch}", out)
            case RefusedByWorker():
                if self._mine:
                    self._lose_role(f"worker {event.worker} refused our epoch {self._epoch}: it "
                                    "has seen a newer one", out, alert=False)
                    self._schedule_campaign(out, after_vacancy=False)
            case _:
                raise TypeError(f"Election cannot handle {event!r}")  # our bug, not etcd's
        self._sync("", out)
        return out

    def tick(self) -> list[Output]:
        """Time-driven work: the self-fence (rule 7), renewals and grants (2), campaigns (3)."""
        out: list[Output] = []
        if self._stopped:
            return out
        now = self._clock()
        if self._lease_seq is None and self._next_lease is not None and now >= self._next_lease:
            if self._lease is None:
                self._send_lease(Grant(self._next_seq(), self.ttl), out)
            else:
                self._send_lease(Renew(self._next_seq(), self._lease), out)
        if (self._key_seq is None and self._next_campaign is not None and now >= self._next_campaign
                and self._lease is not None):
            self._campaign(out)
        self._sync("", out)
        return out

    def next_deadline(self) -> float | None:
        if self._stopped:
            return None
        times: list[float] = []
        if self._lease_seq is None and self._next_lease is not None:
            times.append(self._next_lease)
        if self._key_seq is None and self._next_campaign is not None and self._lease is not None:
            times.append(self._next_campaign)
        if self._serving:
            times.append(self.fence_at)
        return min(times, default=None)

    # --- the lease (rule 2) --------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send_lease(self, action: Grant | Renew, out: list[Output]) -> None:
        self._lease_seq = action.seq
        self._lease_sent = self._clock()
        self._next_lease = None
        out.append(action)

    def _fresh(self, ttl: float) -> None:
        """The lease is good from when the request just answered was sent."""
        self._lease_seq = None
        self._lease_ttl = min(float(self.ttl), ttl) if ttl > 0 else float(self.ttl)
        self._lease_from = self._lease_sent
        self._next_lease = self._lease_sent + self._lease_ttl / RENEWALS

    def _on_granted(self, e: LeaseGranted, out: list[Output]) -> None:
        if e.seq != self._lease_seq or self._lease is not None:
            return
        self._lease = e.lease
        self._fresh(e.ttl)
        self._lease_regained("a new lease", out)
        out.append(Log(logging.INFO, "election %s: lease %x granted (TTL %ds)",
                       (self.name, e.lease, int(self._lease_ttl))))
        self._schedule_campaign(out, after_vacancy=True)

    def _on_renewed(self, e: LeaseRenewed, out: list[Output]) -> None:
        if e.seq != self._lease_seq or e.lease != self._lease:
            return
        self._fresh(e.ttl)
        self._lease_regained("renewed", out)

    def _on_lease_gone(self, e: LeaseGone, out: list[Output]) -> None:
        if e.seq == self._key_seq:
            self._key_seq = None
            if self._next_campaign is None:
                self._next_campaign = self._clock()  # again, on the lease we have by then
        elif e.seq != self._lease_seq:
            return
        if e.lease != self._lease:
            return  # a lease already given up
        self._lease_seq = None
        self._lease = None
        if self._mine:
            self._lose_role("etcd says our lease is gone (it expired): the key went with it", out)
        out.append(Log(logging.WARNING, "election %s: lease %x is gone: asking for a new one",
                       (self.name, e.lease)))
        self._send_lease(Grant(self._next_seq(), self.ttl), out)

    def _lease_regained(self, how: str, out: list[Output]) -> None:
        if self._lease_lost:
            self._lease_lost = False
            out.append(Alert("lease_lost", SUBJECT, RESOLVED, {
                "election": self.name, "lease": how, "holding": self._mine}))

    # --- the key (rules 3-5, 8) ----------------------------------------------------------

    def _schedule_campaign(self, out: list[Output], *, after_vacancy: bool) -> None:
        delay = (self._defer if after_vacancy and self.role == "backup" and self._last_role != "primary"
                 else 0.0)
        at = self._clock() + delay
        if self._next_campaign is None or at < self._next_campaign:
            self._next_campaign = at
        if self._key_seq is None and delay == 0 and self._lease is not None:
            self._campaign(out)

    def _campaign(self, out: list[Output]) -> None:
        assert self._lease is not None
        self._next_campaign = None
        self._key_seq = self._next_seq()
        out.append(Campaign(self._key_seq, self.key, self._value, self._lease))

    def _on_campaigned(self, e: Campaigned, out: list[Output]) -> None:
        if e.seq != self._key_seq:
            return
        self._key_seq = None
        if e.revision > self._revision:
            self._revision = e.revision
        epoch = e.epoch if 0 < e.epoch <= MAX_EPOCH else 0
        if epoch and self._lease is not None and e.lease == self._lease:  # won, or had won
            self._take(epoch, "won the election" if e.won else "holds the key", out)
        elif epoch:
            self._seen_holder(epoch, e.lease, e.value, out)
        else:  # absent and not created: cannot happen with a real etcd; ask again
            self._next_campaign = self._clock() + self._retry
        if self._watch_seq is None:
            self._watch_seq = self._next_seq()
            self._watch_sent = self._clock()
            out.append(WatchKey(self._watch_seq, self.key, self._revision + 1))
        if not self._mine and self._next_campaign is None:
            self._next_campaign = self._clock() + self._recheck

    def _on_created(self, e: KeyCreated, out: list[Output]) -> None:
        if e.watch != self._watch_seq or e.revision <= self._revision:
            return
        self._revision = e.revision
        if not 0 < e.epoch <= MAX_EPOCH:
            return
        if self._lease is not None and e.lease == self._lease:
            self._take(e.epoch, "its key is put on our lease", out)
        else:
            self._seen_holder(e.epoch, e.lease, e.value, out)

    def _on_deleted(self, e: KeyDeleted, out: list[Output]) -> None:
        if e.watch != self._watch_seq or e.revision <= self._revision:
            return
        self._revision = e.revision
        if self._mine:
            self._lose_role("our key was deleted from etcd", out)
        elif self._holder is not None:
            out.append(Log(logging.WARNING, "election %s: %s no longer holds the active role "
                           "(epoch %d): campaigning", (self.name, self._holder.get("frontend", "?"),
                                                       self._epoch)))
            self._last_role = self._holder.get("role")
        self._holder = None
        self._holder_lease = 0
        self._schedule_campaign(out, after_vacancy=True)

    def _on_watch_ended(self, e: WatchEnded, out: list[Output]) -> None:
        if e.watch != self._watch_seq:
            return
        self._watch_seq = None
        at = max(self._clock(), self._watch_sent + self._retry)
        if self._next_campaign is None or at < self._next_campaign:
            self._next_campaign = at
        out.append(Log(logging.DEBUG, "election %s: the watch ended (%s): asking again",
                       (self.name, e.reason)))

    def _on_failed(self, e: ExchangeFailed, out: list[Output]) -> None:
        self._unreachable(f"{e.what}: {e.reason}", out)
        now = self._clock()
        if e.seq == self._lease_seq:
            self._lease_seq = None
            self._next_lease = now + self._retry
        elif e.seq == self._key_seq:
            self._key_seq = None
            self._next_campaign = now + self._retry
        elif e.seq == self._watch_seq:
            self._watch_seq = None
            self._next_campaign = now + self._retry

    def _on_epoch(self, epoch: int, why: str, out: list[Output]) -> None:
        """Rule 8."""
        if not 0 <= epoch <= MAX_EPOCH:
            return  # garbage from a worker
        self._highest = max(self._highest, epoch)
        if self._mine and epoch > self._epoch:
            self._lose_role(why, out, alert=False)
            self._schedule_campaign(out, after_vacancy=False)

    def _take(self, epoch: int, how: str, out: list[Output]) -> None:
        self._highest = max(self._highest, epoch)
        if self._mine and epoch == self._epoch:
            return
        self._mine = True
        self._holder = None
        self._holder_lease = self._lease or 0
        self._epoch = epoch
        self._last_role = self.role
        self._next_campaign = None
        self.terms += 1
        before, self._last_other = self._last_other, None
        out.append(Log(logging.WARNING if before is not None else logging.INFO,
                       "election %s: %s: active with epoch %d", (self.name, how, epoch)))
        if before is not None and not self._failover:  # rule 9
            self._failover = True
            out.append(Alert("failover", SUBJECT, RAISED, {"election": self.name, "epoch": epoch,
                                                           "from": before}))

    def _seen_holder(self, epoch: int, lease: int, value: bytes, out: list[Output]) -> None:
        self._highest = max(self._highest, epoch)
        info = holder_info(value)
        if self._mine:
            self._lose_role(f"{info.get('frontend', '?')} holds the key with epoch {epoch}", out)
        new = self._holder is None or self._holder_lease != lease or self._epoch != epoch
        self._holder = info
        self._holder_lease = lease
        self._epoch = epoch
        self._last_role = info.get("role")
        self._last_other = str(info.get("frontend", "?"))
        if new:
            out.append(Log(logging.INFO, "election %s: %s is active (epoch %d)",
                           (self.name, info.get("frontend", "?"), epoch)))

    def _lose_role(self, why: str, out: list[Output], alert: bool = True) -> None:
        """We no longer hold the key (or cannot tell we do): not serving from now on."""
        self._step_down(why, out)
        if alert and not self._lease_lost:
            self._lease_lost = True
            out.append(Alert("lease_lost", SUBJECT, RAISED, {"election": self.name,
                                                             "epoch": self._epoch, "reason": why}))

    def _step_down(self, why: str, out: list[Output]) -> None:
        if not self._mine:
            return
        self._mine = False
        self._holder_lease = 0
        out.append(Log(logging.WARNING, "election %s: stepping down (epoch %d): %s",
                       (self.name, self._epoch, why)))
        self._sync(why, out)
        if self._failover:
            self._failover = False
            out.append(Alert("failover", SUBJECT, RESOLVED, {"election": self.name,
                                                             "reason": why}))

    # --- serving (rules 6, 7) --------------------------------------------------------------

    def _sync(self, reason: str, out: list[Output]) -> None:
        now_serving = self.accepts_clients
        if now_serving == self._serving:
            return
        self._serving = now_serving
        if not now_serving and self._mine and not self._stopped:
            ttl = self._lease_ttl
            why = (f"lease not renewed within {ttl * (1 - self._margin):.2f}s (TTL {ttl:.0f}s less "
                   f"the {self._margin:.0%} margin): it may expire, stopped serving first")
            if not self._lease_lost:
                self._lease_lost = True
                out.append(Alert("lease_lost", SUBJECT, RAISED, {
                    "election": self.name, "epoch": self._epoch, "reason": why}))
            reason = why
        elif now_serving and not reason:
            reason = f"holds the active role of election {self.name} (epoch {self._epoch})"
        out.append(ServingChanged(now_serving, reason or "not the holder"))

    # --- reachability (rule 10) -------------------------------------------------------------

    def _answered(self, out: list[Output]) -> None:
        if not self._reachable:
            self._reachable = True
            out.append(Alert("etcd_unreachable", "etcd", RESOLVED, {"etcd": self._where}))
            out.append(Log(logging.INFO, "etcd answers again (%s)", (self._where,)))
        self._error = None

    def _unreachable(self, reason: str, out: list[Output]) -> None:
        self._error = reason[:300]
        if self._reachable:
            self._reachable = False
            out.append(Alert("etcd_unreachable", "etcd", RAISED,
                             {"etcd": self._where, "error": self._error, "election": self.name}))
