"""Soak: a lone broker, then a pair, under mixed load and seeded faults (worker kill -9,
SIGSTOP/SIGCONT, one broker restart per phase), then every call's outcome, the ledger of
non-idempotent executions, the alerts, the logs, the processes and the brokers' memory are
checked. About 60 s of load in `make test`; `make soak` sets ZRPC_SOAK_SECONDS=600.
ZRPC_SOAK_SEED replays a schedule (the seed is printed); ZRPC_SOAK_PHASES=lone (or pair) runs
one phase only."""

from __future__ import annotations

import collections
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, broker_status
from tests.monitor_tap import MonitorTap
from tests.soak_load import (
    Faults,
    Load,
    Proc,
    RssSampler,
    Tally,
    judge_alerts,
    judge_ledger,
    judge_outcomes,
    registered_pids,
)
from zrpc.testing import free_port, wait_until

SECONDS = float(os.environ.get("ZRPC_SOAK_SECONDS", "60"))  # of load, both phases together
PHASES = os.environ.get("ZRPC_SOAK_PHASES", "lone,pair").split(",")  # one alone, to chase a failure
RSS_BOUND_KB = 50 * 1024
WORKERS = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS * 2 + 300))]


class Phase:
    """One phase's processes and findings: `problems` are broken rules, the rest is summary."""

    def __init__(self, name: str, cluster: Cluster, tally: Tally, seed: int, ledger: Path,
                 seconds: float) -> None:
        self.name = name
        self.cluster = cluster
        self.procs = cluster.procs
        self.tally = tally
        self.seed = seed
        self.rng = random.Random(f"{seed}-{name}")
        self.ledger = ledger
        self.seconds = seconds
        self.warmup = min(5.0, seconds * 0.15)
        self.env = {"ZRPC_LEDGER": str(ledger)}
        self.workers: list[Proc] = []
        self.all_procs: list[Proc] = []
        self.problems: list[str] = []
        self.restart_window: tuple[float, float] | None = None  # lone broker down -> whole again
        self.rss = RssSampler(self.warmup)
        self.tap: MonitorTap | None = None
        self.faults: Faults | None = None
        self.duration = 0.0
        self.started_worker = 0
        self.findings: dict[str, Any] = {}
        self.exited: set[int] = set()

    # --- to be provided by each kind of phase -------------------------------------------

    endpoints: list[str]

    def brokers_up(self) -> list[str]:
        raise NotImplementedError

    def restart_broker(self) -> None:
        raise NotImplementedError

    def worker_args(self) -> tuple[str, ...]:
        return ()

    # --- common --------------------------------------------------------------------------

    def start_worker(self) -> Proc:
        self.started_worker += 1
        up = self.brokers_up()
        p: Proc = self.cluster.worker(up[0] if up else self.endpoints[0], *self.worker_args(), env=self.env,
                                      wait=False, name=f"{self.name}-worker{self.started_worker}")
        self.all_procs.append(p)
        return p

    def broker_proc(self, ep: str) -> Proc:
        """The Popen of the broker answering at `ep` (by the pid its status reports)."""
        st = broker_status(ep)
        assert st is not None, f"broker at {ep} not answering"
        pid = st["broker"]["pid"]
        return next(p for p in self.procs.procs if p.pid == pid)

    def wait_workers(self, timeout: float = 30.0) -> None:
        """Every live worker (and no other) registered on every broker that is up."""
        want = {w.pid for w in self.workers}
        for ep in self.brokers_up():
            wait_until(lambda ep=ep: registered_pids(broker_status(ep)) == want,  # type: ignore[misc]
                       timeout, interval=0.1, what=f"workers {sorted(want)} registered at {ep}")

    def run(self) -> None:
        for _ in range(WORKERS):
            self.workers.append(self.start_worker())
        self.wait_workers()
        assert self.tap is not None
        self.tap.wait_metrics(10)
        self.rss.start()
        load = Load(self.name, self.endpoints, self.tally, self.seed).start()
        t0 = time.monotonic()
        until = t0 + self.seconds
        self.faults = Faults(self.rng, self.procs, self.workers, self.start_worker, self.brokers_up,
                             broker_status, self.restart_broker,
                             restart_at=t0 + self.seconds * self.rng.uniform(0.3, 0.5), until=until)
        try:
            time.sleep(self.warmup)  # noqa: sleep (warm-up load before the first fault)
            self.faults.start()
            while time.monotonic() < until and not load.crashed and not self.unplanned_exits():
                time.sleep(0.2)  # noqa: sleep (the soak's length, not a synchronisation)
            self.faults.stop()  # after the fault under way, if any
            if not self.faults.join(120):
                self.problems.append("the fault thread did not finish its last fault within 120 s")
        finally:
            hung = load.stop()
            self.duration = time.monotonic() - t0
        self.problems += [f"load thread hung: {h}" for h in hung]
        self.problems += [f"load thread died: {c}" for c in load.crashed]
        self.problems += self.faults.problems
        self.settle()
        self.rss.stop()

    def settle(self) -> None:
        """After the load: nothing left in flight or queued, every worker (and only the live
        ones) registered, no process gone that the soak did not kill, no internal error."""
        def idle(ep: str) -> dict[str, Any] | None:
            st = broker_status(ep)
            if st is None:
                return None
            busy = st.get("inflight", 0) or st.get("queued_bytes", 0) or \
                any(s.get("queued") or s.get("outstanding") for s in st["services"]) or \
                any(w.get("outstanding") for w in st["workers"])
            return None if busy else st

        for ep in self.brokers_up():
            try:
                wait_until(lambda ep=ep: idle(ep), 30, interval=0.2,  # type: ignore[misc]
                           what=f"broker {ep} idle after the load")
            except TimeoutError as exc:
                st = broker_status(ep) or {}
                services = [(s["name"], s.get("queued"), s.get("outstanding")) for s in st.get("services", [])]
                workers = [(w.get("pid"), w.get("outstanding")) for w in st.get("workers", [])]
                self.problems.append(f"{exc}: inflight={st.get('inflight')} queued_bytes={st.get('queued_bytes')} "
                                     f"services (name, queued, outstanding)={services} "
                                     f"workers (pid, outstanding)={workers}")
            st = broker_status(ep) or {}
            negative = {k: v for k, v in st.get("counters", {}).items() if isinstance(v, (int, float)) and v < 0}
            if negative:
                self.problems.append(f"broker {ep}: negative counters {negative}")
            if st.get("counters", {}).get("internal_errors"):
                self.problems.append(f"broker {ep}: internal_errors={st['counters']['internal_errors']}")
        try:
            self.wait_workers()
        except TimeoutError as exc:
            self.problems.append(str(exc))
        self.unplanned_exits()

    def unplanned_exits(self) -> bool:
        """Records each process of this phase that exited although the soak did not kill it."""
        killed = self.faults.killed if self.faults is not None else set()
        for p in self.all_procs:
            if p.pid not in killed and p.pid not in self.exited and p.poll() is not None:
                self.exited.add(p.pid)
                what = " ".join(str(a) for a in list(p.args)[3:5])  # type: ignore[arg-type]
                self.problems.insert(0, f"process {p.pid} ({what}) exited by itself with code {p.returncode}")
        return bool(self.exited)

    def check_alerts(self) -> collections.Counter[str]:
        assert self.tap is not None and self.faults is not None
        problems, raised = judge_alerts(self.tap.alerts(state="raised"),
                                        self.faults.killed | self.faults.stopped, self.faults.t0)
        self.problems += problems
        return raised

    def check_ledger(self) -> dict[str, int]:
        lines = self.ledger.read_text().splitlines() if self.ledger.exists() else []
        with self.tally.lock:
            charges = {t: c for t, c in self.tally.charges.items() if t.startswith(self.name + ".")}
        problems, figures = judge_ledger(lines, charges)
        self.problems += problems
        return figures

    def check_outcomes(self) -> collections.Counter[str]:
        with self.tally.lock:
            odd = [o for o in self.tally.odd if o.phase == self.name]
        problems, tolerated = judge_outcomes(odd, self.restart_window, lone=self.name == "lone",
                                             t0=self.faults.t0 if self.faults else 0.0)
        self.problems += problems
        return tolerated

    def summary(self) -> list[str]:
        """The phase's figures (calls by outcome, faults, RSS, alerts); adds the checks that
        need them (faults really injected, RSS bound)."""
        with self.tally.lock:
            outcomes = collections.Counter({f"{k} {o}": n for (p, k, o), n in self.tally.counts.items()
                                            if p == self.name})
        growth = {label: (self.rss.first.get(label), self.rss.last.get(label)) for label in self.rss.brokers}
        for label, (a, b) in growth.items():
            if a is not None and b is not None and b - a >= RSS_BOUND_KB:
                self.problems.append(f"{label} RSS grew from {a} kB to {b} kB (bound +{RSS_BOUND_KB} kB)")
        f = self.faults
        out = [f"--- phase {self.name}: {self.duration:.1f}s of load, {self.tally.total(self.name)} calls",
               "calls by outcome: " + (", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items())) or "none")]
        tolerated = self.findings.get("check_outcomes") or {}
        raised = self.findings.get("check_alerts") or {}
        out += [
            "tolerated: " + (", ".join(f"{k}: {n}" for k, n in sorted(tolerated.items())) or "none"),
            f"ledger: {self.findings.get('check_ledger')}",
            "alerts raised: " + (", ".join(f"{k}: {n}" for k, n in sorted(raised.items())) or "none"),
            "broker RSS after warm-up -> after load (kB): " + ", ".join(
                f"{label} {a} -> {b}" for label, (a, b) in growth.items()),
            *(f"  RSS of {label}: {self.rss.trend(label)}" for label in growth),
        ]
        if f is not None:
            for kind in ("worker_kill9", "worker_sigstop", "broker_restart"):
                if not f.counts[kind] and self.duration:
                    self.problems.append(f"no {kind} was injected: the soak tested less than it claims")
            out += [f"faults: {dict(f.counts)}", "fault log: " + "; ".join(f.log)]
            if self.restart_window:
                down, whole = self.restart_window
                out.append(f"broker restart window {down - f.t0:.2f}s..{whole - f.t0:.2f}s "
                           f"({whole - down:.2f}s)")
        if self.problems:
            out.append(f"{len(self.problems)} broken rules:")
            out += [f"  {x}" for x in self.problems[:40]]
        return out

    def close(self) -> None:
        """Judges what the phase did (when it got as far as running), then kills what is left."""
        if self.faults is not None:
            for check in (self.check_alerts, self.check_ledger, self.check_outcomes):
                try:
                    self.findings[check.__name__] = check()
                except Exception as exc:  # noqa: BLE001 - one check failing must not hide the others
                    self.problems.append(f"{check.__name__} failed: {exc!r}")
        if self.tap is not None:
            self.tap.close()
        for p in self.all_procs:
            if p.poll() is None:
                if self.faults is not None:
                    self.faults.killed.add(p.pid)
                self.procs.kill(p)


class LonePhase(Phase):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.port = free_port()
        self.monitor = f"tcp://127.0.0.1:{free_port()}"
        self.endpoints = [self.cluster.broker("--monitor", self.monitor, port=self.port, name="lone-broker")]
        self.broker = self.broker_proc(self.endpoints[0])
        self.all_procs.append(self.broker)
        self.rss.watch("lone broker", self.broker)
        self.tap = MonitorTap(self.monitor)
        self.down = False

    def brokers_up(self) -> list[str]:
        return [] if self.down else self.endpoints

    def restart_broker(self) -> None:
        """kill -9 and start again on the same port; the window lasts until every worker
        has registered with the new broker."""
        assert self.faults is not None
        t_down = time.monotonic()
        self.down = True
        self.faults.kill(self.broker)
        self.cluster.broker("--monitor", self.monitor, port=self.port, name="lone-broker-restarted")
        self.down = False
        self.broker = self.broker_proc(self.endpoints[0])
        self.all_procs.append(self.broker)
        self.rss.watch("lone broker (restarted)", self.broker)
        try:
            self.wait_workers()
        finally:
            self.restart_window = (t_down, time.monotonic())


class PairPhase(Phase):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pair = self.cluster.pair()
        self.endpoints = self.pair.endpoints
        for role in ("primary", "backup"):
            self.all_procs.append(self.pair.procs[role])
            self.rss.watch(role, self.pair.procs[role])
        self.tap = MonitorTap(*(f"tcp://127.0.0.1:{p}" for p in self.pair.ports.monitor))
        self.primary_down = False

    def worker_args(self) -> tuple[str, ...]:
        return ("--brokers", self.pair.brokers)

    def brokers_up(self) -> list[str]:
        return self.endpoints[1:] if self.primary_down else self.endpoints

    def restart_broker(self) -> None:
        """kill -9 the primary; the backup takes over (the load votes); later the primary
        comes back, as passive, and the workers register with it again."""
        assert self.faults is not None
        self.primary_down = True
        self.faults.kill(self.pair.procs["primary"])
        wait_until(lambda: (broker_status(self.endpoints[1]) or {}).get("broker", {}).get("state") == "active",
                   20, interval=0.1, what="backup active after the primary died")
        self.faults.note("backup active")
        time.sleep(self.rng.uniform(2.0, 5.0))  # noqa: sleep (how long the primary stays dead)
        self.cluster.start_broker(self.pair, "primary")
        self.all_procs.append(self.pair.procs["primary"])
        self.rss.watch("primary (restarted)", self.pair.procs["primary"])
        self.primary_down = False
        wait_until(lambda: self.pair.states() == ["passive", "active"], 20, interval=0.1,
                   what="restarted primary passive, backup active")
        self.wait_workers()


def _scan_logs(log_dir: Path) -> list[str]:
    bad = []
    for f in sorted(log_dir.glob("*.log")):
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if "Traceback" in line or "internal error" in line:
                bad.append(f"{f.name}:{n}: {line.strip()[:200]}")
    return bad


def test_soak_lone_broker_then_pair(cluster: Cluster, tmp_path: Path) -> None:
    seed = int(os.environ.get("ZRPC_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nsoak: seed {seed} (ZRPC_SOAK_SEED={seed} replays the schedule), {SECONDS:g}s of load")
    tally = Tally()
    t_start = time.monotonic()
    phases: list[Phase] = []
    report: list[str] = []
    maker: Callable[..., Phase]
    try:
        for maker, name in ((LonePhase, "lone"), (PairPhase, "pair")):
            if name not in PHASES:
                continue
            phase = maker(name, cluster, tally, seed, tmp_path / f"ledger-{name}.txt", SECONDS / len(PHASES))
            phases.append(phase)
            try:
                phase.run()
            finally:
                phase.close()  # checks first, then kills what is left
                report += phase.summary()
    finally:
        report.append(f"--- total {time.monotonic() - t_start:.1f}s, {tally.total()} calls, seed {seed}")
        print("\n".join(report))
    bad_logs = _scan_logs(cluster.procs.log_dir) if cluster.procs.log_dir else []
    problems = [f"[{p.name}] {x}" for p in phases for x in p.problems] + [f"[logs] {b}" for b in bad_logs]
    assert not problems, f"{len(problems)} broken rules (seed {seed}):\n" + "\n".join(problems[:60])
