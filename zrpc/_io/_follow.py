"""ClusterFollower: a cluster's live brokers, for a client's or a worker's loop to follow.

An observer Membership (zrpc/_core/_membership.py, rule 10) decides; an EtcdEdge carries its
fetches and watches out on its own threads and queues what etcd answers, ringing the loop's
waker. The loop calls `step()` when it wakes and at `next_deadline()`, and learns which
brokers joined and which left. While etcd cannot be reached, the brokers last seen stay
(Membership rule 8): running calls go on, and the loop hears `etcd_unreachable` as a warning.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zrpc._core._clock import Clock, monotonic
from zrpc._core._config import check_endpoint
from zrpc._core._membership import (
    RAISED,
    RESOLVED,
    Alert,
    EtcdAction,
    Log,
    Membership,
    Output,
    parse_cluster,
)
from zrpc._core._membership import Event as EtcdEvent
from zrpc._core._session import Output as SessionOutput
from zrpc._core._session import Session
from zrpc._defaults import CLUSTER_NAME
from zrpc._io._etcd import EtcdEdge

log = logging.getLogger("zrpc.client")

BATCH = 512
"""Answers from etcd handed to the core per step: a burst of joins never starves the loop."""


@dataclass
class Changes:
    """What one step found: brokers (name -> frontend endpoint) that joined, and names that
    left. A broker that moved to another endpoint leaves and joins again."""

    joined: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.joined or self.left)


class ClusterFollower:
    """The member brokers of cluster `name` on the etcd at `url` (etcd://H:P[,H:P...])."""

    def __init__(self, url: str, wake: Callable[[], None], *, name: str = CLUSTER_NAME,
                 logger: logging.Logger | logging.LoggerAdapter[Any], clock: Clock = monotonic) -> None:
        self.url = url
        self._wake = wake
        self._log = logger
        self._inbox: queue.SimpleQueue[EtcdEvent] = queue.SimpleQueue()
        self._edge = EtcdEdge(parse_cluster(url), self._deliver, logger=logger)
        self.core = Membership(clock, "", {}, cluster=name, where=self._edge.where, register=False)
        self._known: dict[str, str] = {}  # name -> frontend, as the loop was last told
        self._odd: set[str] = set()  # members whose registration has no usable frontend
        self._stopped = False

    @property
    def brokers(self) -> dict[str, str]:
        """Name -> frontend endpoint of every broker the loop has been told of."""
        return dict(self._known)

    def start(self) -> None:
        self._edge.start()
        self._carry_out(self.core.start())

    def stop(self) -> None:
        self._stopped = True
        self.core.stop()
        self._edge.stop(timeout=1.0)

    def step(self) -> Changes:
        """Feeds what etcd answered to the core, runs its timers, and says what changed."""
        if self._stopped:
            return Changes()
        core = self.core
        for _ in range(BATCH):
            try:
                event = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._carry_out(core.handle(event))
        self._carry_out(core.tick())
        return self._changes()

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    # --- internals -------------------------------------------------------------------------

    def _deliver(self, event: EtcdEvent) -> None:
        """From the edge's threads: queued, and the loop woken to read it."""
        if not self._stopped:
            self._inbox.put(event)
            self._wake()

    def _carry_out(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Log):
                self._log.log(o.level, o.msg, *o.args)
            elif isinstance(o, Alert):
                self._alert(o)
            elif isinstance(o, EtcdAction):
                self._edge.submit(o)

    def _alert(self, a: Alert) -> None:
        """A client or a worker has no monitor socket: its alerts are log lines."""
        if a.name != "etcd_unreachable":
            return  # member_joined / member_left: said by the joined and left below
        if a.state == RAISED:
            self._log.warning("etcd %s unreachable (%s): following the %d broker(s) last seen",
                              self.url, a.detail.get("error"), len(self._known))
        elif a.state == RESOLVED:
            self._log.info("etcd %s answers again", self.url)

    def _changes(self) -> Changes:
        now: dict[str, str] = {}
        for name, info in self.core.members.items():
            frontend = info.get("frontend")
            try:
                now[name] = check_endpoint(frontend) if type(frontend) is str else ""
            except ValueError:
                now[name] = ""
            if not now[name]:  # a registration no broker wrote: not followed, said once
                del now[name]
                if name not in self._odd:
                    self._odd.add(name)
                    self._log.warning("cluster member %s registered no usable frontend (%r): not followed",
                                      name, frontend)
        out = Changes()
        for name, ep in self._known.items():
            if now.get(name) != ep:
                out.left.append(name)
        for name, ep in now.items():
            if self._known.get(name) != ep:
                out.joined[name] = ep
        for name in out.left:
            self._log.info("broker %s (%s) left the cluster", name, self._known[name])
        for name, ep in out.joined.items():
            self._log.info("broker %s joined the cluster: %s", name, ep)
        self._known = now
        return out


def apply_changes(changes: Changes, session: Session, members: dict[str, int],
                  connect: Callable[[int, str], None], disconnect: Callable[[int], None]
                  ) -> list[SessionOutput]:
    """A client's side of a step: brokers that left are dropped from the session (their calls
    re-sent through the others) and disconnected; those that joined get an index and a socket.

    `members` maps names to session indexes; `connect(index, endpoint)` opens the socket of a
    new index (always the next one), `disconnect(index)` closes one. The session's outputs
    are the caller's to carry out."""
    out: list[SessionOutput] = []
    for name in changes.left:
        b = members.pop(name, None)
        if b is not None:
            out.extend(session.remove_broker(b))
            disconnect(b)
    for name, endpoint in changes.joined.items():
        b = session.add_broker()
        try:
            connect(b, endpoint)
        except Exception as exc:  # noqa: BLE001 - one broker that cannot be dialled costs itself
            log.warning("cannot connect to cluster member %s at %s: %s", name, endpoint, exc)
            out.extend(session.remove_broker(b))
            continue
        members[name] = b
    return out
