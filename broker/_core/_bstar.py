"""BinaryStar: the primary/backup failover machine (zguide "Binary Star"), sans-IO.

States: PRIMARY and BACKUP (just started, waiting to hear the peer), ACTIVE (serves clients)
and PASSIVE (stands by). Inputs: the peer's published state (`PeerStateSeen`), a client request
(`ClientVoted`), a stall of our own loop (`Stalled`) and what workers report of the other
broker (`HigherEpochSeen`). Time comes from the injected clock.

Rules (the names in quotes are the rules of RULES that TRANSITIONS points to):

1. Everything that changes a broker's state, or whether it serves, lives in this file.
   TRANSITIONS maps (our state, input) to the next state, or to the name of a rule that decides
   with the clock and the epochs; the input is the peer's state for `PeerStateSeen`, the event's
   class otherwise. A pair missing from the table leaves the state as it is.
2. Epochs count takeovers: entering ACTIVE sets ours one above every epoch heard of (from the
   peer or from workers), any other change to the highest heard of. Epochs never decrease.
3. "lone_primary": a PRIMARY that has not heard its peer for `peer_timeout` (2 intervals)
   serves on the first client request. A BACKUP never serves before it has seen its primary.
4. "failover", the rule that prevents split brain when only the peer link breaks: a PASSIVE
   broker becomes ACTIVE only when its peer has been silent for `peer_timeout` AND a client
   request arrives (a client that can no longer reach the active broker votes with its call).
5. "split_brain", the case the zguide calls fatal: of two ACTIVE brokers the lower epoch steps
   down (the backup on a tie); the one that stays says split_brain until its peer is not ACTIVE.
6. "dual_passive", the other fatal case: of two PASSIVE brokers the primary takes over.
7. "doubt": our own stall (SIGSTOP, a long pause of the loop) is no evidence against the peer,
   and the peer may have taken over while we were silent. After a `Stalled` event an ACTIVE
   broker that was silent for a whole peer timeout stops accepting clients until it hears its
   peer (then the table decides) or one more peer timeout passes without a word (then nobody
   else can have taken over through the link, and it serves on). Any broker gives its peer one
   more peer timeout before it counts it silent. Both allowances are made once per sighting of
   the peer: a loop that stalls over and over still finds a dead peer, and still serves.
8. "fenced", for a one-way state link: the ACTIVE broker that cannot hear its peer learns from
   workers, which hear both. A worker that saw a broker announce ACTIVE with a higher epoch
   than ours makes an ACTIVE broker step down, as a split brain seen on the link does. Until
   it hears its peer again, a broker fenced so takes each worker's report of an active broker
   at the epoch it knows of (or higher) for a sign of its peer's life: a client request is no
   vote while workers still see that broker serve (the calls its clients sent it just before a
   cut, delivered late when the cut heals, are such requests). A worker reports only what its
   open links say, so once that broker is gone the reports stop within the worker's liveness,
   and rule 4 applies again one peer timeout later.
9. Misconfiguration: the state message carries the sender's role. Two primaries or two backups
   raise `role_conflict` (critical) for as long as it lasts, and refuse to be confused: two
   backups never serve (rule 3); two primaries never serve while they hear each other (rule 3
   needs a silent peer); of two ACTIVE ones with equal epochs each yields when it sees the
   other, so at most one stays (rule 5); two PASSIVE ones with one role stay passive (rule 6
   has no primary to pick).
10. A backup that has never heard its primary raises `peer_unreachable` after
    UNREACHABLE_TIMEOUTS peer timeouts, and still never serves alone (rule 3).
11. "stale": a cut state link queues the peer's messages and delivers them, oldest first,
    when it heals. An ACTIVE or PASSIVE state with an epoch below the highest we know of is
    such a message (epochs never decrease): it is a sign of life, and nothing more, for up to
    a peer timeout; a peer that goes on saying it for longer is believed (a replay lasts
    milliseconds, and a too-high epoch from a worker must not silence a peer for good). A
    (re)started peer (PRIMARY, BACKUP) is always news.

Invariants, checked on random event sequences in the tests: a broker's epoch never decreases,
and while each broker knows the other's current state and epoch, at most one is ACTIVE.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zrpc._core._clock import Clock
from zrpc._core._frames import PEER, _int, _unpack_head, pack
from zrpc._defaults import HEARTBEAT_INTERVAL, ROLES
from zrpc._errors import ProtocolError

MAX_EPOCH = 2**53
"""Epochs count takeovers; a larger one on the wire is garbage (and must stay packable + 1)."""

PEER_INTERVALS = 2
"""Intervals of silence before the peer counts as gone (the zguide's): one lost state message
is no failover, and a takeover still follows within two intervals of the last word."""

UNREACHABLE_TIMEOUTS = 10
"""Peer timeouts a backup waits for its primary before it says it has never heard it."""


class BStar(enum.Enum):
    PRIMARY = "primary"  # primary, waiting to hear from its peer (serves clients meanwhile)
    BACKUP = "backup"  # backup, waiting to hear from its peer (never serves)
    ACTIVE = "active"
    PASSIVE = "passive"


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerStateSeen:
    state: BStar
    epoch: int = 0
    role: str | None = None  # the sender's configured role (None: not known)


@dataclass(frozen=True, slots=True)
class ClientVoted:
    """A client request arrived (never a `zrpc.*` request)."""


@dataclass(frozen=True, slots=True)
class Stalled:
    """Our own loop did not run for `seconds`: we neither heard nor spoke meanwhile."""

    seconds: float


@dataclass(frozen=True, slots=True)
class HigherEpochSeen:
    """A worker reports a broker announcing itself ACTIVE with this epoch (its view of the
    pair, which holds when our state link only works one way)."""

    epoch: int


Event = PeerStateSeen | ClientVoted | Stalled | HigherEpochSeen

# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: BStar
    new: BStar
    reason: str


@dataclass(frozen=True, slots=True)
class ServingChanged:
    """Whether client requests are accepted changed (entering or leaving ACTIVE, or an
    ACTIVE broker in doubt after its own stall): the loop (de)activates its dispatcher."""

    serving: bool
    reason: str


@dataclass(frozen=True, slots=True)
class PublishState:
    state: BStar
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerAlert:
    """failover, split_brain, dual_passive, peer_lost, peer_back, role_conflict,
    peer_unreachable (resolved=True ends one)."""

    name: str
    severity: str
    detail: dict[str, Any] = field(default_factory=dict)
    resolved: bool = False


Action = StateChanged | ServingChanged | PublishState | PeerAlert

# --- the table ------------------------------------------------------------------------------

Input = BStar | type[ClientVoted] | type[Stalled] | type[HigherEpochSeen]
"""The table's input column: the peer's state (from `PeerStateSeen`), or the event's class."""

TRANSITIONS: dict[tuple[BStar, Input], tuple[BStar | str, str]] = {
    # (our state, input) -> (next state, or the name of the rule in RULES that decides; reason)
    (BStar.PRIMARY, BStar.BACKUP): (BStar.ACTIVE, "peer is a waiting backup: primary serves"),
    (BStar.PRIMARY, BStar.ACTIVE): (BStar.PASSIVE, "peer is active: primary stands by"),
    (BStar.PRIMARY, ClientVoted): ("lone_primary", "client request and no peer heard: primary serves"),
    (BStar.BACKUP, BStar.ACTIVE): (BStar.PASSIVE, "peer is active: backup stands by"),
    (BStar.BACKUP, ClientVoted): (BStar.BACKUP, "a backup serves only after its primary was seen"),
    (BStar.ACTIVE, BStar.ACTIVE): ("split_brain", "both brokers active"),
    (BStar.ACTIVE, ClientVoted): (BStar.ACTIVE, "an active broker serves"),
    (BStar.ACTIVE, Stalled): ("doubt", "stalled {seconds:.2f}s, silent for a peer timeout: the "
                                       "peer may have taken over; waiting to hear it"),
    (BStar.ACTIVE, HigherEpochSeen): ("fenced", "a worker sees an active broker with epoch "
                                                "{theirs} > ours {mine}: step down"),
    (BStar.PASSIVE, BStar.PRIMARY): (BStar.ACTIVE, "peer restarted as primary: take over"),
    (BStar.PASSIVE, BStar.BACKUP): (BStar.ACTIVE, "peer restarted as backup: take over"),
    (BStar.PASSIVE, BStar.PASSIVE): ("dual_passive", "both brokers passive"),
    (BStar.PASSIVE, ClientVoted): ("failover", "peer silent and a client voted: take over"),
}
"""Rule 1. A next state equal to ours documents a pair that changes nothing."""


class BinaryStar:
    """One broker's side of the pair: its state, its epoch and what it knows of its peer.

    Everything it knows is read-only from outside: only events change it."""

    def __init__(self, role: str, clock: Clock, interval: float = HEARTBEAT_INTERVAL,
                 peer_intervals: int = PEER_INTERVALS) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be primary or backup, not {role!r}")
        self._role = role
        self._clock = clock
        self._interval = interval
        self._peer_timeout = interval * peer_intervals
        self._state = BStar.PRIMARY if role == "primary" else BStar.BACKUP
        self._epoch = 0
        self._peer_state: BStar | None = None
        self._peer_epoch = 0
        self._peer_role: str | None = None
        now = clock()
        self._started = now
        self._known_epoch = 0  # the highest epoch heard of, from the peer or from workers
        self._peer_seen: float | None = None
        self._peer_expiry = now + self._peer_timeout  # a restarted broker first hears its peer
        self._next_publish = now
        self._published_at = now
        self._peer_lost = False
        self._split = False
        self._conflict = False  # the peer has our role
        self._unreachable = False  # a backup that has never heard its primary said so
        self._doubt_until: float | None = None  # ACTIVE but stalled: not serving until then
        self._reason = ""  # why serving changed, when no state change says it
        self._forgiven = False  # a stall of ours was allowed for since the peer was last heard
        self._stale_since: float | None = None  # rule 11: since when the peer's news is stale
        self._fenced = False  # rule 8: stepped down on a worker's word, peer not heard since

    # --- what it knows (read-only) ----------------------------------------------------------

    @property
    def role(self) -> str:
        return self._role

    @property
    def interval(self) -> float:
        """Seconds between two publications of our state."""
        return self._interval

    @property
    def peer_timeout(self) -> float:
        """Seconds of silence after which the peer counts as gone."""
        return self._peer_timeout

    @property
    def state(self) -> BStar:
        return self._state

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def peer_state(self) -> BStar | None:
        """The state the peer last published (None: never heard)."""
        return self._peer_state

    @property
    def peer_epoch(self) -> int:
        return self._peer_epoch

    @property
    def peer_role(self) -> str | None:
        return self._peer_role

    @property
    def accepts_clients(self) -> bool:
        return self._state is BStar.ACTIVE and self._doubt_until is None

    @property
    def fenced(self) -> bool:
        """Rule 8: stepped down on a worker's word and not heard from its peer since: every
        worker's report of an active broker is news to it."""
        return self._fenced

    @property
    def peer_alive(self) -> bool:
        return self._peer_seen is not None and not self._peer_lost and self._clock() < self._peer_expiry

    def __repr__(self) -> str:
        if self._peer_state is None:
            peer = "unheard"
        elif self.peer_alive:
            peer = self._peer_state.name
        else:
            peer = "silent"
        flags = "".join(f" {name}" for name, on in (("doubting", self._doubt_until is not None),
                                                     ("split_brain", self._split),
                                                     ("role_conflict", self._conflict)) if on)
        return f"<BinaryStar {self._role} {self._state.name} epoch={self._epoch} peer={peer}{flags}>"

    # --- verbs ---------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        serving = self.accepts_clients
        out = self._handle(event)
        return self._serving(serving, out)

    def tick(self) -> list[Action]:
        """Publishes our state every interval; notices a silent peer, a backup alone too
        long, and the end of a doubt after a stall."""
        serving = self.accepts_clients
        now = self._clock()
        out: list[Action] = []
        if self._peer_seen is not None and not self._peer_lost and now >= self._peer_expiry:
            self._peer_lost = True
            out.append(PeerAlert("peer_lost", "warning", {"silent_s": round(now - self._peer_seen, 3),
                                                          "peer_state": _v(self._peer_state)}))
        if (self._state is BStar.BACKUP and self._peer_seen is None and not self._unreachable
                and now >= self._unreachable_at):
            self._unreachable = True
            out.append(PeerAlert("peer_unreachable", "warning", {
                "silent_s": round(now - self._started, 3),
                "detail": "this backup has never heard its primary; a backup never serves alone "
                          "(Binary Star), so nothing is served until the primary is up"}))
        if self._doubt_until is not None and now >= self._doubt_until:
            self._doubt_until = None
            self._reason = (f"peer not heard for {self._peer_timeout:.2f}s after our stall: "
                            "nobody took over, serving on")
        if now >= self._next_publish:
            out.append(self._publish(now))
        return self._serving(serving, out)

    def next_deadline(self) -> float:
        nxt = self._next_publish
        if self._peer_seen is not None and not self._peer_lost:
            nxt = min(nxt, self._peer_expiry)
        if self._state is BStar.BACKUP and self._peer_seen is None and not self._unreachable:
            nxt = min(nxt, self._unreachable_at)
        if self._doubt_until is not None:
            nxt = min(nxt, self._doubt_until)
        return nxt

    def snapshot(self) -> dict[str, Any]:
        return {"role": self._role, "state": self._state.value, "epoch": self._epoch,
                "peer_state": _v(self._peer_state) if self.peer_alive else None,
                "peer_epoch": self._peer_epoch, "peer_role": self._peer_role,
                "serving": self.accepts_clients}

    # --- events: what each one teaches, then the table ---------------------------------------

    @property
    def _unreachable_at(self) -> float:
        return self._started + UNREACHABLE_TIMEOUTS * self._peer_timeout

    def _handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        key: Input
        match event:
            case PeerStateSeen():
                if self._stale(event):
                    now = self._clock()
                    self._peer_seen = now  # alive, whatever it said long ago
                    self._peer_expiry = now + self._peer_timeout
                    return out
                out = self._peer_heard(event)
                key = event.state
            case ClientVoted():
                key = ClientVoted
            case Stalled():
                if not self._allow_for_stall(event.seconds):
                    return out
                key = Stalled
            case HigherEpochSeen():
                if not 0 <= event.epoch <= MAX_EPOCH:
                    return out  # garbage from a worker
                self._known_epoch = max(self._known_epoch, event.epoch)
                if self._fenced and self._state is not BStar.ACTIVE and event.epoch >= self._known_epoch:
                    # rule 8: the broker that fenced us serves on; our peer lives
                    self._peer_expiry = max(self._peer_expiry, self._clock() + self._peer_timeout)
                key = HigherEpochSeen
            case _:
                raise TypeError(f"unknown event {event!r}")
        step = TRANSITIONS.get((self._state, key))
        if step is None:
            return out
        target, reason = step
        if isinstance(target, BStar):
            out.extend(self._go(target, reason))
        else:
            out.extend(RULES[target](self, event, reason))
        return out

    def _stale(self, event: PeerStateSeen) -> bool:
        """Rule 11: an old message of the peer's, replayed by a link that healed."""
        if event.state not in (BStar.ACTIVE, BStar.PASSIVE) or event.epoch >= self._known_epoch:
            self._stale_since = None
            return False
        now = self._clock()
        if self._stale_since is None:
            self._stale_since = now
        return now - self._stale_since < self._peer_timeout

    def _peer_heard(self, event: PeerStateSeen) -> list[Action]:
        now = self._clock()
        out: list[Action] = []
        if self._peer_lost:
            self._peer_lost = False
            out.append(PeerAlert("peer_lost", "warning", {"peer_state": event.state.value},
                                 resolved=True))
            out.append(PeerAlert("peer_back", "info", {"peer_state": event.state.value}))
        if self._unreachable:
            self._unreachable = False
            out.append(PeerAlert("peer_unreachable", "warning", {"peer_state": event.state.value},
                                 resolved=True))
        self._peer_seen = now
        self._peer_expiry = now + self._peer_timeout
        self._forgiven = False
        self._fenced = False  # the link works: the table decides from the peer's own word
        self._peer_state = event.state
        self._peer_epoch = event.epoch
        self._known_epoch = max(self._known_epoch, event.epoch)
        if event.role is not None:
            self._peer_role = event.role
            if event.role == self._role and not self._conflict:
                self._conflict = True
                out.append(PeerAlert("role_conflict", "critical", {
                    "role": self._role, "peer_role": event.role,
                    "detail": f"both brokers of the pair are configured as {self._role}: "
                              f"neither takes over from the other; restart one with "
                              f"--role {'backup' if self._role == 'primary' else 'primary'}"}))
            elif event.role != self._role and self._conflict:
                self._conflict = False
                out.append(PeerAlert("role_conflict", "critical", {"role": self._role,
                                                                   "peer_role": event.role},
                                     resolved=True))
        if self._doubt_until is not None:
            self._doubt_until = None  # the table decides with the peer's news
            self._reason = f"peer heard after our stall: it is {event.state.value}"
        if self._split and event.state is not BStar.ACTIVE:
            self._split = False
            out.append(PeerAlert("split_brain", "critical", {"state": self._state.value},
                                 resolved=True))
        return out

    def _allow_for_stall(self, seconds: float) -> bool:
        """Rule 7's allowance for the peer; False when there is none to make (a stall of no
        time, NaN, or one already allowed for since the peer was last heard)."""
        if not seconds > 0 or self._forgiven:
            return False
        self._forgiven = True
        now = self._clock()
        # our silence is no evidence against the peer: shift its timer, at most to one full
        # peer timeout from now (its news may still be on its way to us)
        self._peer_expiry = max(self._peer_expiry, min(self._peer_expiry + seconds, now + self._peer_timeout))
        return True

    # --- the rules the table names --------------------------------------------------------
    # Each takes the event the table routed to it (its class follows from the table's input
    # column) and the table's reason.

    def _rule_lone_primary(self, event: ClientVoted, reason: str) -> list[Action]:
        if self._clock() >= self._peer_expiry:
            return self._go(BStar.ACTIVE, reason)
        return []

    def _rule_failover(self, event: ClientVoted, reason: str) -> list[Action]:
        if self._clock() < self._peer_expiry:
            return []  # the peer is alive: this client should talk to it
        out = self._go(BStar.ACTIVE, reason)
        out.append(PeerAlert("failover", "critical", {"from": _v(self._peer_state), "epoch": self._epoch}))
        return out

    def _rule_split_brain(self, event: PeerStateSeen, reason: str) -> list[Action]:
        mine, theirs = self._epoch, self._peer_epoch
        out: list[Action] = []
        if not self._split:
            self._split = True
            out.append(PeerAlert("split_brain", "critical", {"epoch": mine, "peer_epoch": theirs}))
        tie_yields = self._role == "backup" or self._conflict  # same role: both yield
        if mine < theirs or (mine == theirs and tie_yields):
            out.extend(self._go(BStar.PASSIVE, f"{reason}: lower epoch {mine} < {theirs} steps down"
                                if mine < theirs else f"{reason}: equal epochs, {self._role} steps down"))
            out.extend(self._split_over())
        return out

    def _rule_dual_passive(self, event: PeerStateSeen, reason: str) -> list[Action]:
        if self._role != "primary" or self._conflict:
            return []  # the primary takes over; we stay passive (and two primaries both do)
        out: list[Action] = [PeerAlert("dual_passive", "warning", {})]
        out.extend(self._go(BStar.ACTIVE, f"{reason}: primary takes over"))
        out.append(PeerAlert("dual_passive", "warning", {}, resolved=True))
        return out

    def _rule_doubt(self, event: Stalled, reason: str) -> list[Action]:
        now = self._clock()
        if now - self._published_at >= self._peer_timeout:
            # the peer heard nothing from us for as long as it takes to give up on us: it
            # may be ACTIVE now; serve nothing new until we hear it or a peer timeout passes
            self._doubt_until = now + self._peer_timeout
            self._reason = reason.format(seconds=event.seconds)
        return []

    def _rule_fenced(self, event: HigherEpochSeen, reason: str) -> list[Action]:
        mine, theirs = self._epoch, event.epoch
        if theirs <= mine:
            return []  # our own epoch, or an older broker's: that one must step down, not us
        out: list[Action] = []
        if not self._split:
            out.append(PeerAlert("split_brain", "critical", {"epoch": mine, "active_epoch": theirs,
                                                             "seen_by": "worker"}))
        out.extend(self._go(BStar.PASSIVE, reason.format(theirs=theirs, mine=mine)))
        out.extend(self._split_over())
        self._fenced = True
        return out

    # --- what the rules share -------------------------------------------------------------

    def _split_over(self) -> list[Action]:
        self._split = False
        return [PeerAlert("split_brain", "critical", {"state": self._state.value}, resolved=True)]

    def _publish(self, now: float) -> PublishState:
        self._next_publish = now + self._interval
        self._published_at = now
        return PublishState(self._state, self._epoch)

    def _serving(self, before: bool, out: list[Action]) -> list[Action]:
        after = self.accepts_clients
        if after != before:
            reason = next((a.reason for a in reversed(out) if isinstance(a, StateChanged)), None)
            out.append(ServingChanged(after, reason or self._reason))
        return out

    def _go(self, new: BStar, reason: str) -> list[Action]:
        """Rule 2 on every change of state, which is published at once."""
        old = self._state
        if new is old:
            return []
        self._state = new
        self._doubt_until = None
        out: list[Action] = [StateChanged(old, new, reason)]
        if new is BStar.ACTIVE:
            self._epoch = max(self._epoch, self._peer_epoch, self._known_epoch) + 1
            self._fenced = False
        else:
            self._epoch = max(self._epoch, self._peer_epoch, self._known_epoch)
        out.append(self._publish(self._clock()))  # tell the peer at once
        return out


Rule = Callable[[BinaryStar, Any, str], list[Action]]
"""(machine, the event the table routed here, the table's reason) -> actions."""

RULES: dict[str, Rule] = {
    "lone_primary": BinaryStar._rule_lone_primary,  # rule 3
    "failover": BinaryStar._rule_failover,  # rule 4
    "split_brain": BinaryStar._rule_split_brain,  # rule 5
    "dual_passive": BinaryStar._rule_dual_passive,  # rule 6
    "doubt": BinaryStar._rule_doubt,  # rule 7
    "fenced": BinaryStar._rule_fenced,  # rule 8
}
"""The rules TRANSITIONS names, by name."""

assert {t for t, _ in TRANSITIONS.values() if isinstance(t, str)} == set(RULES)


def _v(state: BStar | None) -> str | None:
    return None if state is None else state.value


# --- the state link codec (one frame: [ZRPC1S, state, epoch, role]) ---------------------------


def encode_state(state: BStar, epoch: int, role: str) -> list[bytes]:
    return [pack([PEER, state.value, epoch, role])]


def decode_state(frames: list[bytes]) -> tuple[BStar, int, str]:
    """(state, epoch, role) from a state message; ProtocolError, and nothing else, for any
    other input."""
    if len(frames) != 1:
        raise ProtocolError(f"state message has {len(frames)} frames, expected 1")
    fields = _unpack_head(frames[0])
    if len(fields) < 4 or type(fields[0]) is not str or fields[0] != PEER:
        raise ProtocolError("not a ZRPC1S state message [ZRPC1S, state, epoch, role]")
    state = next((s for s in BStar if type(fields[1]) is str and s.value == fields[1]), None)
    if state is None:
        raise ProtocolError(f"unknown broker state {_short(fields[1])}")
    epoch = _int(fields[2], "epoch", 0, MAX_EPOCH)
    role = fields[3]
    if type(role) is not str or role not in ROLES:
        raise ProtocolError(f"role must be primary or backup, not {_short(role)}")
    return state, epoch, role


def _short(v: Any) -> str:
    try:
        text = repr(v)
    except Exception:  # noqa: BLE001 - a repr of decoded data should not fail; never let it
        text = type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."
