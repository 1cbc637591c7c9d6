"""Session: a client's calls and its view of the brokers, sans-IO.

Given what arrived and what time it is, it says what to send to which broker, which calls
completed and which expired. Client (threads) and AsyncClient (asyncio) are thin loops around
it, so both follow the same rules: heartbeats, deadlines, and which broker is active.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from zrpc._core._calls import CallTable, PendingCall
from zrpc._core._clock import Clock
from zrpc._core._frames import (
    CLIENT,
    H_RESENT,
    NO_WORKER,
    ClientReply,
    Heartbeat,
    Message,
    Status,
    decode_frames,
    encode,
)
from zrpc._core._liveness import LivenessTracker
from zrpc._core._malformed import Malformed
from zrpc._core._serial import unpack_error
from zrpc._defaults import HEARTBEAT_INTERVAL, LIVENESS
from zrpc._errors import ProtocolError, Timeout, Unauthorized

UNSERVED_MEMORY = 1.0
"""Seconds a spread client skips a broker, for one service, after it answered that no worker
of that service is there (its workers may be on the other members' side of the cluster)."""


@dataclass(frozen=True, slots=True)
class Transmit:
    broker: int
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Completed:
    call: PendingCall
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Expired:
    call: PendingCall
    why: str = ""  # said in the Timeout when the deadline passed for a known reason


@dataclass(frozen=True, slots=True)
class Refused:
    """The broker refused this client's credentials: the call fails with Unauthorized."""

    call: PendingCall
    reason: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """A message from a broker that did not decode, or has no business at a client: counted
    in `Session.malformed`, and given to the loop only when it is worth a log line."""

    broker: int
    reason: str
    count: int  # malformed messages so far, this one included


Output = Transmit | Completed | Expired | Refused | Dropped


def epoch_of(info: dict[str, Any]) -> int:
    """A heartbeat's epoch, read without trusting it: anything but a number is no epoch (0).

    The session must be total over every message that decodes: one odd heartbeat must never
    take the client's loop down with it."""
    v = info.get("epoch")
    if type(v) is int:
        return v
    if type(v) is float and math.isfinite(v):
        return int(v)
    return 0


def _no_worker(body: bytes) -> bool:
    """Whether a SERVICE_UNAVAILABLE says no worker of the service is at that broker (its
    other kind, a lost worker's call not retried, must not be retried by moving it)."""
    message = unpack_error(body).get("message")
    return isinstance(message, str) and message.startswith(NO_WORKER)


def settle(o: Output) -> None:
    """Completes a call's future for the outputs that end a call; Transmit needs the loop's
    socket and Dropped its logger, so both are the loop's."""
    if type(o) is Completed:
        o.call.resolve(o.status, o.body)
    elif type(o) is Expired:
        if o.why:
            o.call.fail(Timeout(f"{o.call.service}.{o.call.method}: no reply before the deadline ({o.why})"))
        else:
            o.call.timed_out()
    elif type(o) is Refused:
        o.call.fail(Unauthorized(o.reason))


class Session:
    """Which broker to talk to, and what became of each call.

    Failover (DESIGN.md §4): calls go to the broker believed active. The client switches to
    the other broker when the active one has been silent (no reply, no heartbeat) for
    `failover_timeout`, when it answers NOT_ACTIVE, or when the other one says it is active and
    this one does not. Calls that were sent to a broker that went silent are re-sent with the
    same request id and the `resent` header: the new broker treats them as votes for its
    takeover, and asks the workers' reply caches before running a non-idempotent one.

    Spread (`spread=True`, cluster mode, DESIGN.md §9): every broker serves, and the set
    changes (`add_broker`, `remove_broker`). Each call goes to the lighter of two brokers drawn
    at random among the usable ones (power of two choices on this client's own outstanding
    calls per broker); a broker is usable unless it left, refused our keys, was silent for
    `failover_timeout` or said NOT_ACTIVE. Calls on a broker that went silent or left are
    re-sent, `resent`, through another (the probe rule settles the unsafe ones there); a call
    made while no broker is known waits for one, within its deadline. A broker that answers
    SERVICE_UNAVAILABLE (no worker of that service there: the call never ran) is skipped for
    that service for UNSERVED_MEMORY, and the call tries the brokers it has not tried yet; only
    when every usable broker said so is the answer the caller's.
    """

    def __init__(self, clock: Clock, brokers: int, timeout: float, *,
                 interval: float = HEARTBEAT_INTERVAL, liveness: int = LIVENESS,
                 failover_timeout: float | None = None, spread: bool = False,
                 rng: random.Random | None = None) -> None:
        self._clock = clock
        self.table = CallTable(clock, timeout)
        self.brokers = 0
        self.active = 0
        self.spread = spread
        self.interval = interval
        self.failover_timeout = failover_timeout or 2 * interval * liveness
        self.liveness: LivenessTracker[int] = LivenessTracker(clock, interval, liveness)
        self.alive: list[bool] = []
        self.lost: list[bool] = []  # silent for failover_timeout
        self.gone: list[bool] = []  # removed from the set (spread): never used again
        self.info: list[dict[str, Any]] = []
        self.refused: list[str | None] = []  # why a broker refused our keys
        self.load: list[int] = []  # calls in flight per broker (spread's two choices read it)
        self._rng = rng or random.Random()
        self._parked: deque[PendingCall] = deque()  # spread, no broker usable: waiting for one
        self._unserved: dict[tuple[str, int], float] = {}  # (service, broker) -> skipped until
        for _ in range(brokers):
            self.add_broker()
        self.switches = 0
        self.malformed = Malformed()  # undecodable or unexpected messages from brokers, dropped
        self._switched_at = clock()
        self._bounced: deque[tuple[float, PendingCall]] = deque()
        self._heartbeat = encode(Heartbeat(CLIENT, {}))

    # --- inputs --------------------------------------------------------------------------

    def add_broker(self) -> int:
        """One more broker (spread: a member joined); its index, never reused. Calls parked
        for want of a broker go to it at the next tick."""
        b = self.brokers
        self.brokers += 1
        self.liveness.seen(b)  # silence is counted from the start
        self.alive.append(False)
        self.lost.append(False)
        self.gone.append(False)
        self.info.append({})
        self.refused.append(None)
        self.load.append(0)
        return b

    def remove_broker(self, broker: int) -> list[Output]:
        """Spread: broker `broker` left the set; its calls are re-sent through the others."""
        if not 0 <= broker < self.brokers or self.gone[broker]:
            return []
        self.gone[broker] = True
        self.alive[broker] = False
        self.liveness.forget(broker)
        return self._resend([c for c in self.table if c.broker == broker])

    def submit(self, call: PendingCall) -> list[Output]:
        """A new call: to the broker we believe active (spread: the lighter of two)."""
        if self.spread:
            self.table.add(call)
            return self._place(call)
        if all(self.refused):
            return [Refused(call, self.refused[self.active] or "")]
        if self.refused[self.active] and self.brokers > 1:
            self.active = 1 - self.active
        self.table.add(call)
        return [self._transmit(call, self.active)]

    def handshake(self, broker: int, refused: str | None) -> list[Output]:
        """The security handshake with a broker failed (`refused` says why) or succeeded."""
        self.refused[broker] = refused
        if refused is None:
            return []
        out: list[Output] = []
        for c in [c for c in self.table if c.broker == broker]:
            if self.spread and self.pick(avoid=broker, call=c) not in (None, broker):
                out.extend(self._place(c, avoid=broker))  # another member may take our key
                continue
            self.table.pop(c.request_id)
            self._unload(c)
            out.append(Refused(c, refused))
        if self.spread:  # the parked ones may find a broker that takes our keys
            out.extend(self._unpark())
        return out

    def frames_received(self, broker: int, frames: list[bytes]) -> list[Output]:
        """What a loop hands over: frames as they came. Undecodable ones match no call (that
        call keeps its deadline); they are counted and dropped."""
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            return self._drop(broker, str(exc))
        return self.received(broker, msg)

    def received(self, broker: int, msg: Message) -> list[Output]:
        """Any traffic from a broker shows it is alive; replies complete calls."""
        out: list[Output] = []
        if self.gone[broker]:
            return out  # it left the set: its late replies were re-sent elsewhere
        self.liveness.seen(broker)
        self.alive[broker] = True
        if self.lost[broker]:
            self.lost[broker] = False
            if broker == self.active or self.spread:  # back (restarted): what it held is gone
                out.extend(self._resend([c for c in self.table if c.broker == broker]))
            if self.spread:
                out.extend(self._unpark())
        if type(msg) is ClientReply:
            if msg.status == Status.NOT_ACTIVE:
                return out + self._bounce(broker, msg.request_id)
            if msg.status == Status.SERVICE_UNAVAILABLE and self.spread and _no_worker(msg.body):
                pending = self.table.pending.get(msg.request_id)
                if pending is not None and pending.broker != broker:
                    return out  # a late refusal from a broker the call has left
                moved = self._elsewhere(broker, msg.request_id)
                if moved is not None:
                    return out + moved
            call = self.table.pop(msg.request_id)
            if call is None:
                return out  # late or duplicate: already answered
            self._unload(call)
            out.append(Completed(call, msg.status, msg.body))
        elif type(msg) is Heartbeat:
            info = dict(msg.info)
            boot, before = info.get("boot"), self.info[broker].get("boot")
            if boot is not None and before is not None and boot != before:
                # the broker restarted between two heartbeats (faster than failover_timeout):
                # what it held is gone, so its calls are re-sent (a probe guards the unsafe ones)
                out.extend(self._resend([c for c in self.table if c.broker == broker]))
            self.info[broker] = info
            if self.spread:
                if info.get("state") == "active":  # serving again after a NOT_ACTIVE
                    out.extend(self._unpark())
            elif broker != self.active and self._prefer(broker):
                out.extend(self._switch(broker, "it says it is active"))
        else:  # a request or a worker's message has no business here
            out.extend(self._drop(broker, f"{type(msg).__name__} is not sent to a client"))
        return out

    def tick(self) -> list[Output]:
        """Heartbeats every interval, dead-broker detection, failover, and deadlines."""
        out: list[Output] = []
        now = self._clock()
        for b in self.liveness.expired():
            self.alive[b] = False
        for b in range(self.brokers):
            if (not self.lost[b] and not self.gone[b]
                    and self.liveness.silence(b) >= self.failover_timeout):
                self.lost[b] = True
                if b != self.active or self.spread:  # we moved on already, or move its calls
                    out.extend(self._resend([c for c in self.table if c.broker == b]))
        if (not self.spread and self.brokers > 1 and self.lost[self.active]
                and now - self._switched_at >= self.failover_timeout):
            out.extend(self._switch(1 - self.active, "silent"))
        while self._bounced and self._bounced[0][0] <= now:
            _, call = self._bounced.popleft()
            if call.request_id in self.table.pending:
                if self.spread:
                    out.extend(self._place(call))
                else:
                    out.append(self._transmit(call, self.active))
        if self.liveness.beat():
            out.extend(Transmit(b, self._heartbeat) for b in range(self.brokers) if not self.gone[b])
        for c in self.table.expired():
            waited = self.spread and c.broker < 0  # parked (or bounced): it found no broker
            self._unload(c)
            out.append(Expired(c, self._no_broker() if waited else ""))
        if self._parked:  # waiting for a broker: one may have joined or come back
            self._parked = deque(c for c in self._parked if c.request_id in self.table.pending)
            out.extend(self._unpark())
        return out

    def next_deadline(self) -> float:
        nxt = self.liveness.next_deadline()
        dl = self.table.next_deadline()
        if dl is not None:
            nxt = min(nxt, dl)
        if self._bounced:
            nxt = min(nxt, self._bounced[0][0])
        return nxt

    def close(self) -> list[PendingCall]:
        self._parked.clear()
        return self.table.drain()

    def __repr__(self) -> str:
        brokers = ", ".join(self._describe(b) + ("*" if b == self.active else "")
                            for b in range(self.brokers))
        return (f"<Session brokers=[{brokers}] calls={len(self.table)} switches={self.switches}"
                f" malformed={self.malformed.count}>")

    # --- internals -----------------------------------------------------------------------

    def _describe(self, broker: int) -> str:
        """One word for what we know of a broker: refused our keys, lost (silent for
        failover_timeout), silent (missed heartbeats), else the state it last announced."""
        if self.gone[broker]:
            return "gone"
        if self.refused[broker]:
            return "refused"
        if self.lost[broker]:
            return "lost"
        if not self.alive[broker]:
            return "silent"
        state = self.info[broker].get("state")
        return state[:16] if type(state) is str else "alive"  # a broker's word, kept short

    def _drop(self, broker: int, reason: str) -> list[Output]:
        """Counts a malformed message; a Dropped for the loop to log when the count says so
        (the first few, then one in many: a flood must not fill the disk)."""
        if self.malformed.add(reason):
            return [Dropped(broker, reason, self.malformed.count)]
        return []

    def _prefer(self, other: int) -> bool:
        """Should we move to `other`? Only if it says it is active and ours does not (or is
        gone, or is an active with a lower epoch: the one about to step down)."""
        theirs, ours = self.info[other], self.info[self.active]
        if theirs.get("state") != "active":
            return False
        if not self.alive[self.active] or self.lost[self.active] or ours.get("state") != "active":
            return True
        return epoch_of(theirs) > epoch_of(ours)

    def _switch(self, new: int, reason: str) -> list[Output]:
        old = self.active
        self.active = new
        self.switches += 1
        self._switched_at = self._clock()
        self.info[old].pop("state", None)
        # calls the old broker will answer NOT_ACTIVE come back by themselves; those sent to
        # a broker that is gone are re-sent now
        if self.alive[old] and not self.lost[old] and reason != "silent":
            return []
        return self._resend([c for c in self.table if c.broker == old])

    def _resend(self, calls: list[PendingCall]) -> list[Output]:
        out: list[Output] = []
        for c in calls:
            c.headers[H_RESENT] = True
            if self.spread:
                out.extend(self._place(c, avoid=c.broker))
            else:
                out.append(self._transmit(c, self.active))
        return out

    # --- spread (cluster mode) -----------------------------------------------------------

    def _usable(self, b: int) -> bool:
        return (not self.gone[b] and not self.lost[b] and self.refused[b] is None
                and self.info[b].get("state") != "passive")

    def pick(self, avoid: int = -1, call: PendingCall | None = None) -> int | None:
        """Power of two choices: the one with fewer of our calls in flight of two usable
        brokers drawn at random (`avoid` only when no other is usable; None: none is). For
        `call`, brokers known to have no worker of its service come last."""
        usable = [b for b in range(self.brokers) if self._usable(b) and b != avoid]
        if not usable and avoid >= 0 and self._usable(avoid):
            usable = [avoid]
        if call is not None and len(usable) > 1 and (call.unserved or self._unserved):
            now = self._clock()
            served = [b for b in usable if not (call.unserved and b in call.unserved)
                      and self._unserved.get((call.service, b), 0.0) <= now]
            usable = served or usable
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        a, b = self._rng.sample(usable, 2)
        return a if self.load[a] <= self.load[b] else b

    def _place(self, call: PendingCall, avoid: int = -1) -> list[Output]:
        """Spread: send to the broker `pick` chooses, or park until one is usable."""
        b = self.pick(avoid, call)
        if b is None:
            self._unload(call)
            call.broker = -1
            self._parked.append(call)
            return []
        return [self._transmit(call, b)]

    def _elsewhere(self, broker: int, request_id: int) -> list[Output] | None:
        """SERVICE_UNAVAILABLE from `broker`: the call goes to a usable broker it has not tried
        (None when there is none: the answer stands)."""
        call = self.table.pending.get(request_id)
        if call is None:
            return None
        self._unserved[(call.service, broker)] = self._clock() + UNSERVED_MEMORY
        if len(self._unserved) > 4096:  # bounded: forget the expired ones
            now = self._clock()
            self._unserved = {k: t for k, t in self._unserved.items() if t > now}
        tried = call.unserved = (call.unserved or set()) | {broker}
        if not any(self._usable(b) and b not in tried for b in range(self.brokers)):
            return None
        return self._place(call, avoid=broker)

    def _no_broker(self) -> str:
        """Why a parked call found no broker, for its Timeout."""
        if not self.brokers or all(self.gone):
            return "no broker of the cluster is known: none registered, or etcd unreachable"
        return "no broker of the cluster was usable: every one silent, refused or passive"

    def _unpark(self) -> list[Output]:
        out: list[Output] = []
        while self._parked and self.pick() is not None:
            call = self._parked.popleft()
            if call.request_id in self.table.pending:
                out.extend(self._place(call))
        return out

    def _unload(self, call: PendingCall) -> None:
        """The call no longer counts against the broker it was sent to."""
        b = call.broker
        if 0 <= b < self.brokers and self.load[b] > 0:
            self.load[b] -= 1
        call.broker = -1

    def _bounce(self, broker: int, request_id: int) -> list[Output]:
        """A passive broker refused the call: try the other one, at once the first time,
        then once per interval (both may be passive for a moment during a takeover)."""
        call = self.table.pending.get(request_id)
        if call is None or (self.spread and call.broker != broker):
            return []  # spread: a late refusal from a broker the call has left
        self.info[broker]["state"] = "passive"
        out: list[Output] = []
        if self.spread:
            call.bounces += 1
            if call.bounces == 1:
                return self._place(call, avoid=broker)
            self._unload(call)
            self._bounced.append((self._clock() + self.interval, call))
            return out
        if broker == self.active and self.brokers > 1:
            out.extend(self._switch(1 - broker, "not active"))
        call.bounces += 1
        if call.bounces == 1:
            out.append(self._transmit(call, self.active))
        else:
            self._bounced.append((self._clock() + self.interval, call))
        return out

    def _transmit(self, call: PendingCall, broker: int) -> Transmit:
        now = self._clock()
        self._unload(call)
        self.load[broker] += 1
        call.broker = broker
        call.sent_at = now
        return Transmit(broker, call.encode(now))

