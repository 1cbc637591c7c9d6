"""Session: a client's calls and its view of the brokers, sans-IO.

Given what arrived and what time it is, it says what to send to which broker, which calls
completed and which expired. Client (threads) and AsyncClient (asyncio) are thin loops around
it, so both follow the same rules: heartbeats, deadlines, and which broker is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ._calls import CallTable, PendingCall
from ._clock import Clock
from ._frames import CLIENT, ClientReply, Heartbeat, Message, encode
from ._liveness import LivenessTracker


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


Output = Union[Transmit, Completed, Expired]


class Session:
    """Which broker to talk to, and what became of each call."""

    def __init__(self, clock: Clock, brokers: int, timeout: float, *, interval: float = 0.25,
                 liveness: int = 3) -> None:
        self._clock = clock
        self.table = CallTable(clock, timeout)
        self.brokers = brokers
        self.active = 0
        self.liveness: LivenessTracker[int] = LivenessTracker(clock, interval, liveness)
        self.alive = [False] * brokers
        self.info: list[dict[str, Any]] = [{} for _ in range(brokers)]
        self._heartbeat = encode(Heartbeat(CLIENT, {}))

    # --- inputs --------------------------------------------------------------------------

    def submit(self, call: PendingCall) -> list[Output]:
        """A new call: send it to the broker we believe active."""
        self.table.add(call)
        return [self._transmit(call, self.active)]

    def received(self, broker: int, msg: Message) -> list[Output]:
        """Any traffic from a broker shows it is alive; replies complete calls."""
        self.liveness.seen(broker)
        self.alive[broker] = True
        t = type(msg)
        if t is ClientReply:
            call = self.table.pop(msg.request_id)  # type: ignore[union-attr]
            if call is None:
                return []  # late or duplicate: already answered
            return [Completed(call, msg.status, msg.body)]  # type: ignore[union-attr]
        if t is Heartbeat:
            self.info[broker] = dict(msg.info)  # type: ignore[union-attr]
        return []

    def tick(self) -> list[Output]:
        """Heartbeats every interval, dead-broker detection, and calls past their deadline."""
        out: list[Output] = []
        for b in self.liveness.expired():
            self.alive[b] = False
        if self.liveness.beat():
            out.extend(Transmit(b, self._heartbeat) for b in range(self.brokers))
        out.extend(Expired(c) for c in self.table.expired())
        return out

    def next_deadline(self) -> float:
        nxt = self.liveness.next_deadline()
        dl = self.table.next_deadline()
        return nxt if dl is None else min(nxt, dl)

    def close(self) -> list[PendingCall]:
        return self.table.drain()

    # --- internals -----------------------------------------------------------------------

    def _transmit(self, call: PendingCall, broker: int) -> Transmit:
        now = self._clock()
        call.broker = broker
        call.sent_at = now
        return Transmit(broker, call.encode(now))

