"""Elected brokers (`zrpc broker --elect`) on a real etcd (the `etcd` and `etcd3` fixtures of
tests/cluster), ledger workers that record the epoch of every non-idempotent execution, a
client load that accounts for every call, and a sampler of every broker's state.

The bounds the tests hold the brokers to are the rules' (docs/protocol.md section 8) plus
SLACK: the machine is shared and its timings are noisy."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zrpc
from tests.cluster.conftest import Etcd, etcd, etcd3  # noqa: F401 - the fixtures, shared
from tests.monitor_tap import MonitorTap
from tests.netchaos.conftest import lab, netns_ready  # noqa: F401 - scenario 2's hosts, shared
from zrpc import _defaults as D
from zrpc.testing import Processes, free_port, wait_until

TTL = D.ELECTION_TTL
INTERVAL = D.HEARTBEAT_INTERVAL
ETCD_EXPIRY_CHECK = 0.5
"""etcd's lessor looks for expired leases every half second: a key outlives its lease by up to
that much."""
SLACK = 2.5
"""Seconds added to every bound: a loaded 2-core machine delays processes by that much."""
FENCE = TTL * (1 - D.ELECTION_MARGIN)
"""Seconds after its last renewal was sent by which a holder that cannot renew stops serving."""


class Candidate:
    """One elected broker process: its frontend, its monitor (tapped), its view of itself."""

    def __init__(self, procs: Processes, url: str, role: str, name: str, *args: str) -> None:
        self.procs, self.url, self.role, self.name, self.args = procs, url, role, name, args
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.monitor = f"tcp://127.0.0.1:{free_port()}"
        self.tap = MonitorTap(self.monitor)
        self.runs = 0
        self.proc = self._start()

    def _start(self) -> Any:
        self.runs += 1
        label = self.name if self.runs == 1 else f"{self.name}-run{self.runs}"
        return self.procs.zrpc("broker", "--role", self.role, "--elect", self.url,
                               "--frontend", self.frontend, "--monitor", self.monitor,
                               "--log-level", "debug", *self.args, name=label)

    def restart(self) -> None:
        """Starts it again on the same endpoints (as a supervisor would)."""
        self.proc = self._start()

    def status(self, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            with zrpc.Client([self.frontend], timeout=timeout) as c:
                st: dict[str, Any] = c.call("zrpc", "status")
                return st
        except zrpc.ZrpcError:
            return None

    def state(self) -> str | None:
        return ((self.status() or {}).get("broker") or {}).get("state")

    def election(self) -> dict[str, Any]:
        return (self.status() or {}).get("election") or {}

    def close(self) -> None:
        self.tap.close()


@pytest.fixture
def candidates(procs: Processes) -> Iterator[Any]:
    """Starts elected brokers: `candidates(url, role, name, *args) -> Candidate`."""
    made: list[Candidate] = []

    def start(url: str, role: str, name: str, *args: str) -> Candidate:
        c = Candidate(procs, url, role, name, *args)
        made.append(c)
        return c

    yield start
    for c in made:
        c.close()


def ledger_worker(procs: Processes, brokers: list[str] | str, ledger: Path, name: str, *args: str) -> Any:
    """A worker serving `ledger` on every broker (tests/elect/_worker.py); `brokers` an etcd://
    URL: on every member of that cluster."""
    where = (["--cluster", brokers] if isinstance(brokers, str) else ["--brokers", ",".join(brokers)])
    return procs.spawn([sys.executable, "-m", "tests.elect._worker", *where, "--log-level", "debug", *args],
                       name=name, env={"ZRPC_LEDGER": str(ledger)})


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_workers(c: Candidate, n: int, timeout: float = 20.0) -> None:
    wait_until(lambda: len((c.status() or {}).get("workers", [])) >= n, timeout,
               what=f"{n} workers registered with {c.name}")


class Load:
    """Client threads calling ledger.add (idempotent) or ledger.charge (not) in a loop, each call
    with a unique account; every call ends as a result or a zrpc error, recorded with when."""

    def __init__(self, brokers: list[str] | None, threads: int = 3, method: str = "add",
                 timeout: float = D.CALL_TIMEOUT, cluster: str | None = None, delay: float = 0.0) -> None:
        self.client = zrpc.Client(brokers, timeout=timeout, cluster=cluster)
        self.delay = delay  # seconds each charge takes in its handler
        self.method = method
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: dict[str, tuple[float, Any]] = {}  # key -> (when, result)
        self.errors: dict[str, tuple[float, BaseException]] = {}
        self.crashes: list[BaseException] = []
        self.attempted: set[str] = set()
        self.started: dict[str, float] = {}  # key -> when the call was made
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                        for t in range(threads)]

    def _run(self, t: int) -> None:
        proxy = self.client.proxy("ledger")
        i = 0
        while not self.stop.is_set():
            n, i = i, i + 1
            key = f"{self.method}-{t}-{n}"
            with self.lock:
                self.attempted.add(key)
                self.started[key] = time.monotonic()
            try:
                r = proxy.add(n, t) if self.method == "add" else proxy.charge(key, 1, self.delay)
                with self.lock:
                    self.results[key] = (time.monotonic(), r)
            except zrpc.ZrpcError as exc:
                with self.lock:
                    self.errors[key] = (time.monotonic(), exc)
            except BaseException as exc:  # recorded: the test fails on it
                with self.lock:
                    self.crashes.append(exc)
                return

    def __enter__(self) -> Load:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(D.CALL_TIMEOUT + 5)
        self.client.close()

    def ok_since(self, t0: float) -> int:
        with self.lock:
            return sum(1 for when, _ in self.results.values() if when >= t0)

    def check_accounted(self) -> None:
        assert not any(th.is_alive() for th in self.threads), "a call never returned"
        assert self.crashes == [], self.crashes[:3]
        assert self.attempted == set(self.results) | set(self.errors)

    def slowest(self, since: float) -> float:
        """The longest a call made at or after `since` took to be answered (a result or an error)."""
        with self.lock:
            ends = {k: w for k, (w, _) in [*self.results.items(), *self.errors.items()]}
            took = [ends[k] - t for k, t in self.started.items() if t >= since and k in ends]
        return max(took, default=0.0)

    def longest_gap(self, since: float) -> float:
        with self.lock:
            times = sorted(w for w, _ in self.results.values() if w >= since)
        times = [since, *times]
        return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("inf")


class Following(Load):
    """Load for more than two brokers, which one client cannot hold (at most a pair): a client
    per pair of brokers, and each call through the pair that holds the broker the sampler last
    saw active (the others would bounce it until its deadline)."""

    def __init__(self, brokers: list[Candidate], sampler: Sampler, threads: int = 3,
                 timeout: float = 5.0) -> None:
        n = len(brokers)
        self.pairs = [(brokers[i], brokers[(i + 1) % n]) for i in range(n)]
        self.clients = [zrpc.Client([a.frontend, b.frontend], timeout=timeout) for a, b in self.pairs]
        self.sampler = sampler
        super().__init__([brokers[0].frontend], threads=threads, method="charge", timeout=timeout)

    def _run(self, t: int) -> None:
        proxies = [c.proxy("ledger") for c in self.clients]
        i = 0
        while not self.stop.is_set():
            n, i = i, i + 1
            key = f"charge-{t}-{n}"
            active = self.sampler.latest_active()
            k = next((j for j, (a, _) in enumerate(self.pairs) if a.name == active), 0)
            with self.lock:
                self.attempted.add(key)
                self.started[key] = time.monotonic()
            try:
                r = proxies[k].charge(key, 1)
                with self.lock:
                    self.results[key] = (time.monotonic(), r)
            except zrpc.ZrpcError as exc:
                with self.lock:
                    self.errors[key] = (time.monotonic(), exc)
            except BaseException as exc:  # recorded: the test fails on it
                with self.lock:
                    self.crashes.append(exc)
                return

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for c in self.clients:
            c.close()


class Sampler:
    """A thread per broker asking its zrpc.status over and over: (start, end, state, epoch)."""

    def __init__(self, brokers: list[Candidate], every: float = 0.05) -> None:
        self.brokers = brokers
        self.every = every
        self.samples: dict[str, list[tuple[float, float, str | None, int | None]]] = {
            b.name: [] for b in brokers}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(b,), daemon=True) for b in brokers]

    def _run(self, b: Candidate) -> None:
        client = zrpc.Client([b.frontend], timeout=0.25)
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    st = client.call("zrpc", "status")
                    state, epoch = st["broker"]["state"], st["broker"].get("epoch")
                except zrpc.ZrpcError:
                    state, epoch = None, None
                self.samples[b.name].append((t0, time.monotonic(), state, epoch))
                self.stop.wait(self.every)
        finally:
            client.close()

    def __enter__(self) -> Sampler:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(5)

    def active_at(self, t: float) -> list[str]:
        """Brokers that said `active` in a quick answer (under 0.25 s) whose window holds `t`."""
        return [name for name, ss in self.samples.items()
                for s, e, state, _ in ss if state == "active" and s <= t <= e]

    def overlaps(self) -> list[tuple[str, str, float]]:
        """Pairs of brokers that said `active` in quick answers whose windows overlap: a real
        overlap, since a handover leaves at least the margin of the TTL between the old
        holder's last call and the new one's first (0.6 s), far more than a quick answer."""
        quick = [(name, s, e) for name, ss in self.samples.items()
                 for s, e, state, _ in ss if state == "active" and e - s < 0.25]
        quick.sort(key=lambda q: q[1])
        out: list[tuple[str, str, float]] = []
        for i, (a, s1, e1) in enumerate(quick):
            for b, s2, _ in quick[i + 1:]:
                if s2 > e1:
                    break
                if a != b:
                    out.append((a, b, s1))
        return out

    def latest_active(self) -> str | None:
        """The broker whose latest answer said `active` most recently."""
        best: tuple[float, str] | None = None
        for name, ss in self.samples.items():
            if ss and ss[-1][2] == "active" and (best is None or ss[-1][0] > best[0]):
                best = (ss[-1][0], name)
        return None if best is None else best[1]

    def first_active(self, name: str, since: float) -> float | None:
        return next((s for s, _, state, _ in self.samples[name] if state == "active" and s >= since), None)

    def last_active(self, name: str, until: float | None = None) -> float | None:
        times = [e for s, e, state, _ in self.samples[name]
                 if state == "active" and (until is None or s <= until)]
        return max(times, default=None)


def judge_ledger(rows: list[dict[str, Any]], load: Load, fenced: bool = True) -> dict[str, Any]:
    """At most once, and fencing, from the ledger: no account ran twice; every answered charge
    ran exactly once; on every worker, epochs never went down (a newer broker's epoch fences
    the older one); and every epoch's executions all came before the next epoch's first.
    (`fenced=False`, a cluster: no epochs, at most once alone.)"""
    runs = Counter(r["account"] for r in rows)
    twice = [a for a, n in runs.items() if n > 1]
    assert twice == [], f"ran more than once: {twice[:5]}"
    for key, (_, result) in load.results.items():
        assert runs[key] == 1, f"{key} answered {result} but ran {runs[key]} times"
    assert set(runs) <= load.attempted  # nothing ran that was not asked
    if not fenced:
        return {"executions": len(rows), "epochs": [],
                "unknown": sum(1 for _, e in load.errors.values() if isinstance(e, zrpc.CallStateUnknown))}
    assert all(r["epoch"] is not None for r in rows), [r for r in rows if r["epoch"] is None][:3]
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["t"]):
        by_pid.setdefault(r["pid"], []).append(r)
    for pid, rs in by_pid.items():
        epochs = [r["epoch"] for r in rs]
        assert epochs == sorted(epochs), f"worker {pid} ran an older epoch's call after a newer one's"
    spans: dict[int, tuple[float, float]] = {}
    for r in rows:
        lo, hi = spans.get(r["epoch"], (r["t"], r["t"]))
        spans[r["epoch"]] = (min(lo, r["t"]), max(hi, r["t"]))
    ordered = sorted(spans.items())
    for (e1, (_, last)), (e2, (first, _)) in zip(ordered, ordered[1:]):
        assert last < first, f"epoch {e1} ran a call at {last:.3f} after epoch {e2} began at {first:.3f}"
    return {"executions": len(rows), "epochs": [e for e, _ in ordered],
            "unknown": sum(1 for _, e in load.errors.values() if isinstance(e, zrpc.CallStateUnknown))}


def other_errors(load: Load) -> list[BaseException]:
    return [e for _, e in load.errors.values() if not isinstance(e, zrpc.CallStateUnknown)]
