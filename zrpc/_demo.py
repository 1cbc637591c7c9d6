"""`zrpc demo`: the whole story on this machine in under a minute.

A local pair of brokers, three workers of examples/calc.py and a steady load; then, one at a
time, a hung worker (SIGSTOP), dead workers (kill -9), a dead primary broker (kill -9), and
their return. It shows calls/s, latency, the active broker, workers and alerts live, and ends
with a summary: calls made, failed, executed twice, the longest gap, alerts seen.
"""

from __future__ import annotations

import collections
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from ._client import Client
from ._errors import CallStateUnknown, ZrpcError
from ._pair import DEFAULT_PORTS, PairPorts, broker_args
from ._procs import Processes, free_port, port_free, wait_until
from ._watch import EventFeed

WORKERS = 3
THREADS = 4


def _ports() -> tuple[PairPorts, bool]:
    """The local pair's ports if free, else free ones (a pair may already be running)."""
    default = PairPorts()
    if all(port_free("127.0.0.1", p) for p in (*default.frontend, *default.state, *default.monitor)):
        return default, True
    return PairPorts(*(tuple(free_port() for _ in range(2)) for _ in DEFAULT_PORTS)), False


def _status(ep: str, timeout: float = 0.5) -> dict[str, Any] | None:
    try:
        with Client([ep], timeout=timeout) as c:
            return c.call("zrpc", "status")  # type: ignore[no-any-return]
    except ZrpcError:
        return None


class Load:
    """Client threads calling calc.add (idempotent) and calc.charge (not) without pause."""

    def __init__(self, brokers: list[str], ledger: Path) -> None:
        self.client = Client(brokers, timeout=10)
        self.ledger = ledger
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: list[float] = []  # completion times
        self.latencies: collections.deque[tuple[float, float]] = collections.deque(maxlen=20000)
        self.ok = self.failed = self.unknown = self.charges = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(THREADS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, t: int) -> None:
        calc = self.client.proxy("calc")
        i = 0
        while not self.stop.is_set():
            i += 1
            charge = i % 10 == 0
            t0 = time.monotonic()
            try:
                if charge:
                    calc.charge(f"acct-{t}-{i}", 1)
                else:
                    assert calc.add(i, t) == i + t
                outcome = "ok"
            except CallStateUnknown:
                outcome = "unknown"
            except (ZrpcError, AssertionError) as exc:
                outcome = type(exc).__name__
            t1 = time.monotonic()
            with self.lock:
                self.done.append(t1)
                self.latencies.append((t1, t1 - t0))
                self.charges += charge
                if outcome == "ok":
                    self.ok += 1
                elif outcome == "unknown":
                    self.unknown += 1
                else:
                    self.failed += 1
                    self.errors[outcome] += 1

    def rate(self, window: float = 1.0) -> tuple[float, float | None, float | None]:
        now = time.monotonic()
        with self.lock:
            recent = sorted(lat for t, lat in self.latencies if t >= now - window)
        if not recent:
            return 0.0, None, None
        return len(recent) / window, recent[len(recent) // 2] * 1000, recent[int(len(recent) * 0.99)] * 1000

    def longest_gap(self, since: float) -> float:
        with self.lock:
            times = [since, *sorted(t for t in self.done if t >= since)]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        self.client.close()

    def double_executions(self) -> int:
        if not self.ledger.exists():
            return 0
        runs = collections.Counter(line.split()[0] for line in self.ledger.read_text().splitlines() if line)
        return sum(n - 1 for n in runs.values() if n > 1)


class Demo:
    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.step = "starting"
        self.log: collections.deque[str] = collections.deque(maxlen=8)
        self.procs = Processes()
        self.ports, self.default_ports = _ports()
        self.eps = [f"tcp://127.0.0.1:{p}" for p in self.ports.frontend]
        self.tmp = tempfile.TemporaryDirectory(prefix="zrpc-demo-")
        self.ledger = Path(self.tmp.name) / "ledger.txt"
        self.brokers: dict[str, Any] = {}
        self.workers: list[Any] = []
        self.feed: EventFeed | None = None
        self.load: Load | None = None
        self.started = time.monotonic()
        self._printed = 0

    # --- narration -----------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.step = text
        stamp = f"{time.monotonic() - self.started:5.1f}s"
        self.log.append(f"{stamp}  {text}")
        if self.plain:
            click.echo(f"[{stamp}] {text}")

    def alerts_line(self, since: int) -> list[str]:
        assert self.feed is not None
        out = []
        for _, ev in self.feed.alerts()[since:]:
            if ev.get("name") == "worker_joined":
                continue
            out.append(f"{ev['severity']:8} {ev['name']:18} {ev['state']:8} {ev['subject']} "
                       f"[{ev['role']}/{ev['broker_state']}]")
        return out

    def print_new_alerts(self) -> None:
        if self.plain and self.feed is not None:
            lines = self.alerts_line(self._printed)
            self._printed = len(self.feed.alerts())
            for line in lines:
                click.echo(f"         alert: {line}")

    def __rich__(self) -> Any:
        """The live view, built from the active broker's metrics events (no extra calls)."""
        from rich.console import Group
        from rich.table import Table

        rate, p50, p99 = self.load.rate() if self.load else (0.0, None, None)
        m = (self.feed.latest_metrics() if self.feed else None) or {}
        head = Table.grid(padding=(0, 2))
        head.add_row(f"[bold]{self.step}[/]")
        head.add_row(f"calls/s [bold]{rate:,.0f}[/]   p50 {p50 or 0:.1f} ms   p99 {p99 or 0:.1f} ms   "
                     f"active broker: [bold]{m.get('role', '-')}[/]   "
                     f"ok {self.load.ok if self.load else 0}   failed {self.load.failed if self.load else 0}")
        workers = Table(title="workers (as the active broker sees them)", title_justify="left")
        for col in ("worker", "outstanding", "ewma ms", "phi"):
            workers.add_column(col, justify="left" if col == "worker" else "right")
        for name, w in sorted(m.get("workers", {}).items()):
            workers.add_row(name, str(w["outstanding"]), f"{w['ewma_ms']:.2f}", f"{w['phi']:.1f}")
        alerts = Table(title="alerts", title_justify="left", show_header=False)
        alerts.add_column("alert")
        for line in (self.alerts_line(0)[-8:] if self.feed else []):
            style = "green" if " resolved " in line else ("red" if line.startswith("critical") else "yellow")
            alerts.add_row(f"[{style}]{line}[/]")
        return Group(head, workers, alerts)

    # --- the story -----------------------------------------------------------------------

    def start_broker(self, role: str) -> None:
        self.brokers[role] = self.procs.zrpc("broker", *broker_args(role, "127.0.0.1", self.ports),
                                             "--log-level", "error")

    def start_worker(self) -> Any:
        w = self.procs.zrpc("worker", "examples.calc:calc", "--brokers", ",".join(self.eps),
                            "--log-level", "error", env={"ZRPC_LEDGER": str(self.ledger)})
        self.workers.append(w)
        return w

    def n_workers(self, ep: str) -> int:
        return len((_status(ep) or {}).get("workers", []))

    def wait_alert(self, name: str, state: str = "raised", timeout: float = 6.0, since: int = 0) -> bool:
        assert self.feed is not None
        try:
            wait_until(lambda: len(self.feed.alerts(name, state)) > since, timeout, interval=0.05)  # type: ignore[union-attr]
            return True
        except TimeoutError:
            return False

    def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.print_new_alerts()
            time.sleep(0.1)  # noqa: sleep (the story's pacing)

    def run(self) -> dict[str, Any]:
        where = "the local pair" if self.default_ports else "free ports (the local pair's are in use)"
        self.say(f"starting a primary and a backup broker on {where}: {', '.join(self.eps)}")
        self.start_broker("primary")
        self.start_broker("backup")
        self.feed = EventFeed(*(f"tcp://127.0.0.1:{p}" for p in self.ports.monitor))
        wait_until(lambda: [(_status(ep) or {}).get("broker", {}).get("state") for ep in self.eps]
                   == ["active", "passive"], 15, what="pair settled")
        self.say(f"starting {WORKERS} workers of examples.calc, each connected to both brokers")
        for _ in range(WORKERS):
            self.start_worker()
        wait_until(lambda: self.n_workers(self.eps[0]) == WORKERS and self.n_workers(self.eps[1]) == WORKERS,
                   15, what="workers registered")
        self.load = Load(self.eps, self.ledger)
        self.load.start()
        self.say(f"steady load: {THREADS} client threads calling calc.add, and calc.charge (not idempotent)")
        self.pause(3)

        victim = self.workers[0]
        self.say(f"SIGSTOP worker pid {victim.pid}: it hangs; suspect first, then lost, calls rerouted")
        os.kill(victim.pid, signal.SIGSTOP)
        self.wait_alert("worker_suspect")
        self.wait_alert("worker_lost")
        self.pause(1.5)
        self.say(f"SIGCONT worker pid {victim.pid}: it rejoins")
        os.kill(victim.pid, signal.SIGCONT)
        self.wait_alert("worker_lost", "resolved")
        self.pause(1.5)

        a, b = self.workers[1], self.workers[2]
        self.say(f"kill -9 workers pid {a.pid} and {b.pid}: one worker left, redundancy lost")
        self.procs.kill(a)
        self.pause(0.5)
        self.procs.kill(b)
        self.wait_alert("redundancy_lost")
        self.pause(1.5)
        self.say("starting two new workers: redundancy back")
        self.start_worker()
        self.start_worker()
        self.wait_alert("redundancy_lost", "resolved", timeout=10)
        self.pause(1.5)

        primary = self.brokers["primary"]
        self.say(f"kill -9 the primary broker (pid {primary.pid}): the backup takes over, no call lost")
        t_kill = time.monotonic()
        self.procs.kill(primary)
        self.wait_alert("failover", timeout=10)
        self.pause(2.5)
        gap = self.load.longest_gap(t_kill)
        self.say(f"failover done: the longest gap without a completed call was {gap * 1000:.0f} ms")
        self.pause(1)
        self.say("restarting the old primary: it comes back passive, the pair is redundant again")
        self.start_broker("primary")
        self.wait_alert("failover", "resolved", timeout=10)
        self.pause(2)

        self.say("stopping the load")
        self.load.close()
        self.print_new_alerts()
        counts = collections.Counter(f"{e['name']} {e['state']}" for _, e in self.feed.alerts()
                                     if e["name"] != "worker_joined")
        return {
            "calls made": self.load.ok + self.load.failed + self.load.unknown,
            "calls failed": self.load.failed,
            "non-idempotent calls": self.load.charges,
            "state unknown (not idempotent, reported)": self.load.unknown,
            "double executions": self.load.double_executions(),
            "longest gap at failover": f"{gap * 1000:.0f} ms",
            "alerts seen": ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none",
            "errors": dict(self.load.errors),
        }

    def close(self) -> None:
        if self.load is not None and not self.load.stop.is_set():
            self.load.close()
        if self.feed is not None:
            self.feed.close()
        for p in self.procs.procs:
            if p.poll() is None:
                self.procs.terminate(p, timeout=3)
        self.procs.close()
        self.tmp.cleanup()


def run_demo(plain: bool = False) -> int:
    import sys

    plain = plain or not sys.stdout.isatty()  # a live view needs a terminal; logs get lines
    demo = Demo(plain)
    summary: dict[str, Any] = {}
    try:
        if plain:
            summary = demo.run()
        else:
            from rich.live import Live

            with Live(demo, refresh_per_second=4, transient=False):
                summary = demo.run()
    except KeyboardInterrupt:
        click.echo("demo: interrupted; stopping everything", err=True)
        return 130
    finally:
        demo.close()
    _summary(summary, plain)
    ok = summary["calls failed"] == 0 and summary["double executions"] == 0
    return 0 if ok else 1


def _summary(summary: dict[str, Any], plain: bool) -> None:
    errors = summary.pop("errors", {})
    if plain:
        click.echo("summary:")
        for k, v in summary.items():
            click.echo(f"  {k}: {v}")
        if errors:
            click.echo(f"  error types: {errors}")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="summary", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value")
    for k, v in summary.items():
        t.add_row(k, str(v))
    if errors:
        t.add_row("error types", str(errors))
    Console().print(t)



