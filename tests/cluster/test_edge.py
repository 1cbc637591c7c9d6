"""The etcd edge against a real etcd, driving a Membership core as the broker loop does: it
registers and watches, a clean stop revokes the lease and ends its threads at once, and a
watch whose etcd dies says so."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from zrpc._core._membership import Alert, Log, Membership, Registration
from zrpc._io._etcd import EtcdEdge, read_members
from zrpc.testing import wait_until


class Driver:
    """The broker loop's part, in a thread: events to the core, its actions to the edge."""

    def __init__(self, endpoints: list[tuple[str, int]], name: str) -> None:
        self.core = Membership(time.monotonic, name, {"frontend": f"tcp://127.0.0.1:1/{name}", "boot": name},
                               cluster="edge")
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.edge = EtcdEdge(endpoints, self.inbox.put)
        self.alerts: list[Alert] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.edge.start()
        self._thread.start()

    def _do(self, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, Alert):
                self.alerts.append(o)
            elif not isinstance(o, Log):
                self.edge.submit(o)

    def _run(self) -> None:
        with self._lock:
            self._do(self.core.start())
        while not self._stop.is_set():
            try:
                event = self.inbox.get(timeout=0.05)
            except queue.Empty:
                event = None
            with self._lock:
                if event is not None:
                    self._do(self.core.handle(event))
                self._do(self.core.tick())

    def stop(self) -> float:
        """The loop's clean stop: leave, then stop the edge; how long it took."""
        self._stop.set()
        self._thread.join(2)
        t0 = time.monotonic()
        with self._lock:
            self._do(self.core.stop())
        self.edge.stop()
        return time.monotonic() - t0


def edge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zrpc-etcd")]


def test_the_edge_registers_watches_and_a_clean_stop_leaves_at_once(etcd):
    before = len(edge_threads())
    a, b = Driver(etcd.endpoints, "a"), Driver(etcd.endpoints, "b")
    try:
        for d in (a, b):
            wait_until(lambda d=d: d.core.state is Registration.REGISTERED
                       and d.core.members.keys() == {"a", "b"}, 10, what="both registered, each seeing both")
        listed = read_members(etcd.endpoints, a.core.prefix)
        assert sorted(m["name"] for m in listed) == ["a", "b"]
        assert all(m["lease"] and m["lease_ttl_s"] > 0 for m in listed)
        took = b.stop()
        assert took < 1.0, f"a clean stop took {took:.2f}s"
        wait_until(lambda: a.core.members.keys() == {"a"}, 2, what="b gone from a's view at once")
        assert [m["name"] for m in read_members(etcd.endpoints, a.core.prefix)] == ["a"]
        seen = [(x.name, x.subject) for x in a.alerts]
        assert seen[-1] == ("member_left", "b") and set(seen) <= {("member_joined", "b"), ("member_left", "b")}
    finally:
        for d in (a, b):
            if d.core.state is not Registration.STOPPED:
                d.stop()
    wait_until(lambda: len(edge_threads()) <= before, 3, what="the edge's threads ended")


def test_a_watch_whose_etcd_dies_ends_and_etcd_unreachable_is_raised(etcd):
    d = Driver(etcd.endpoints, "a")
    try:
        wait_until(lambda: d.core.state is Registration.REGISTERED and d.core.members, 10, what="registered")
        etcd.kill()
        wait_until(lambda: any(x.name == "etcd_unreachable" and x.state == "raised" for x in d.alerts), 3,
                   what="etcd_unreachable raised")
        assert d.core.members.keys() == {"a"}  # as last seen
        etcd.start(0)
        wait_until(lambda: d.core.etcd_reachable and d.core.state is Registration.REGISTERED, 10,
                   what="reachable and registered again")
    finally:
        took = d.stop()
    assert took < 2.5  # the revoke went to a live etcd
