"""BinaryStar: the primary/backup failover machine (zguide "Binary Star"), sans-IO.

Every rule that changes a broker's state lives in this file, in TRANSITIONS below. Inputs
are the peer's published state and client requests; time comes from the injected clock.

The rule that prevents split brain when only the peer link breaks: a PASSIVE broker becomes
ACTIVE only when its peer has been silent for `peer_timeout` (2 intervals) AND a client
request arrives (a client that can no longer reach the active broker votes with its call).
Epochs settle the cases the zguide calls fatal: each takeover increments the epoch carried in
state messages; of two ACTIVE brokers the lower epoch (the backup on a tie) steps down.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union

from zrpc._clock import Clock
from zrpc._errors import ProtocolError
from zrpc._frames import PEER, _int, _unpack_head, pack


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


@dataclass(frozen=True, slots=True)
class ClientVoted:
    """A client request arrived (never a `zrpc.*` request)."""


Event = Union[PeerStateSeen, ClientVoted]

# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: BStar
    new: BStar
    reason: str


@dataclass(frozen=True, slots=True)
class PublishState:
    state: BStar
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerAlert:
    """failover, split_brain, dual_passive, peer_lost, peer_back (resolved=True ends one)."""

    name: str
    severity: str
    detail: dict[str, Any] = field(default_factory=dict)
    resolved: bool = False


Action = Union[StateChanged, PublishState, PeerAlert]

# --- the table ------------------------------------------------------------------------------

CLIENT = "client_request"
# (state, event) -> (next state or a rule name, reason). A pair missing from the table leaves
# the state as it is. Rule names are decided by _rule_* methods, with the clock and epochs.
TRANSITIONS: dict[tuple[BStar, BStar | str], tuple[BStar | str, str]] = {
    (BStar.PRIMARY, BStar.BACKUP): (BStar.ACTIVE, "peer is a waiting backup: primary serves"),
    (BStar.PRIMARY, BStar.ACTIVE): (BStar.PASSIVE, "peer is active: primary stands by"),
    (BStar.PRIMARY, CLIENT): ("lone_primary", "client request and no peer heard: primary serves"),
    (BStar.BACKUP, BStar.ACTIVE): (BStar.PASSIVE, "peer is active: backup stands by"),
    (BStar.BACKUP, CLIENT): ("reject", "a backup serves only after its primary was seen"),
    (BStar.ACTIVE, BStar.ACTIVE): ("split_brain", "both brokers active"),
    (BStar.ACTIVE, CLIENT): ("accept", ""),
    (BStar.PASSIVE, BStar.PRIMARY): (BStar.ACTIVE, "peer restarted as primary: take over"),
    (BStar.PASSIVE, BStar.BACKUP): (BStar.ACTIVE, "peer restarted as backup: take over"),
    (BStar.PASSIVE, BStar.PASSIVE): ("dual_passive", "both brokers passive"),
    (BStar.PASSIVE, CLIENT): ("failover", "peer silent and a client voted: take over"),
}


class BinaryStar:
    """One broker's side of the pair: its state, its epoch and what it knows of its peer."""

    def __init__(self, role: str, clock: Clock, interval: float = 0.25, peer_intervals: int = 2) -> None:
        if role not in ("primary", "backup"):
            raise ValueError(f"role must be primary or backup, not {role!r}")
        self.role = role
        self._clock = clock
        self.interval = interval
        self.peer_timeout = interval * peer_intervals
        self.state = BStar.PRIMARY if role == "primary" else BStar.BACKUP
        self.epoch = 0
        self.peer_state: BStar | None = None
        self.peer_epoch = 0
        now = clock()
        self._peer_seen: float | None = None
        self._peer_expiry = now + self.peer_timeout  # a restarted broker first hears its peer
        self._next_publish = now
        self._peer_lost = False
        self._split = False

    @property
    def accepts_clients(self) -> bool:
        return self.state is BStar.ACTIVE

    @property
    def peer_alive(self) -> bool:
        return self._peer_seen is not None and self._clock() < self._peer_expiry

    # --- verbs ---------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        if isinstance(event, PeerStateSeen):
            now = self._clock()
            if self._peer_lost:
                self._peer_lost = False
                out.append(PeerAlert("peer_lost", "warning", {"peer_state": event.state.value},
                                     resolved=True))
                out.append(PeerAlert("peer_back", "info", {"peer_state": event.state.value}))
            self._peer_seen = now
            self._peer_expiry = now + self.peer_timeout
            self.peer_state = event.state
            self.peer_epoch = event.epoch
            if self._split and event.state is not BStar.ACTIVE:
                self._split = False
                out.append(PeerAlert("split_brain", "critical", {"state": self.state.value},
                                     resolved=True))
            key: BStar | str = event.state
        elif isinstance(event, ClientVoted):
            key = CLIENT
        else:
            raise TypeError(f"unknown event {event!r}")
        rule = TRANSITIONS.get((self.state, key))
        if rule is None:
            return out
        target, reason = rule
        if isinstance(target, BStar):
            out.extend(self._go(target, reason))
        else:
            out.extend(getattr(self, "_rule_" + target)(reason))
        return out

    def tick(self) -> list[Action]:
        """Publishes our state every interval; notices a silent peer."""
        now = self._clock()
        out: list[Action] = []
        if self._peer_seen is not None and not self._peer_lost and now >= self._peer_expiry:
            self._peer_lost = True
            out.append(PeerAlert("peer_lost", "warning", {"silent_s": round(now - self._peer_seen, 3),
                                                          "peer_state": _v(self.peer_state)}))
        if now >= self._next_publish:
            self._next_publish = now + self.interval
            out.append(PublishState(self.state, self.epoch))
        return out

    def next_deadline(self) -> float:
        nxt = self._next_publish
        if self._peer_seen is not None and not self._peer_lost:
            nxt = min(nxt, self._peer_expiry)
        return nxt

    def snapshot(self) -> dict[str, Any]:
        return {"role": self.role, "state": self.state.value, "epoch": self.epoch,
                "peer_state": _v(self.peer_state) if self.peer_alive else None,
                "peer_epoch": self.peer_epoch}

    # --- rules that need more than the table ----------------------------------------------

    def _go(self, new: BStar, reason: str) -> list[Action]:
        old = self.state
        if new is old:
            return []
        self.state = new
        out: list[Action] = [StateChanged(old, new, reason)]
        if new is BStar.ACTIVE:
            self.epoch = max(self.epoch, self.peer_epoch) + 1
        else:
            self.epoch = max(self.epoch, self.peer_epoch)
        out.append(PublishState(self.state, self.epoch))  # tell the peer at once
        self._next_publish = self._clock() + self.interval
        return out

    def _rule_accept(self, reason: str) -> list[Action]:
        return []

    def _rule_reject(self, reason: str) -> list[Action]:
        return []

    def _rule_lone_primary(self, reason: str) -> list[Action]:
        if self._clock() >= self._peer_expiry:
            return self._go(BStar.ACTIVE, reason)
        return []

    def _rule_failover(self, reason: str) -> list[Action]:
        if self._clock() < self._peer_expiry:
            return []  # the peer is alive: this client should talk to it
        out = self._go(BStar.ACTIVE, reason)
        out.append(PeerAlert("failover", "critical", {"from": _v(self.peer_state), "epoch": self.epoch}))
        return out

    def _rule_split_brain(self, reason: str) -> list[Action]:
        mine, theirs = self.epoch, self.peer_epoch
        out: list[Action] = []
        if not self._split:
            self._split = True
            out.append(PeerAlert("split_brain", "critical", {"epoch": mine, "peer_epoch": theirs}))
        if mine < theirs or (mine == theirs and self.role == "backup"):
            out.extend(self._go(BStar.PASSIVE, f"{reason}: lower epoch {mine} < {theirs} steps down"
                                if mine < theirs else f"{reason}: equal epochs, backup steps down"))
            self._split = False
            out.append(PeerAlert("split_brain", "critical", {"state": self.state.value}, resolved=True))
        return out

    def _rule_dual_passive(self, reason: str) -> list[Action]:
        if self.role != "primary":
            return []  # the primary takes over; we stay passive
        out: list[Action] = [PeerAlert("dual_passive", "warning", {})]
        out.extend(self._go(BStar.ACTIVE, f"{reason}: primary takes over"))
        out.append(PeerAlert("dual_passive", "warning", {}, resolved=True))
        return out


def _v(state: BStar | None) -> str | None:
    return None if state is None else state.value


# --- the state link codec (one frame: [ZRPC1S, state, epoch, role]) ---------------------------


def encode_state(state: BStar, epoch: int, role: str) -> list[bytes]:
    return [pack([PEER, state.value, epoch, role])]


def decode_state(frames: list[bytes]) -> tuple[BStar, int]:
    if len(frames) != 1:
        raise ProtocolError(f"state message has {len(frames)} frames, expected 1")
    fields = _unpack_head(frames[0])
    if fields[0] != PEER or len(fields) < 3:
        raise ProtocolError("not a ZRPC1S state message")
    try:
        state = BStar(fields[1])
    except ValueError:
        raise ProtocolError(f"unknown broker state {fields[1]!r}") from None
    return state, _int(fields[2], "epoch")
