"""`zrpc demo`: the whole story on this machine in under a minute.

A local pair of brokers, three workers of examples/calc.py and a steady load; then, one at a
time, a hung worker (SIGSTOP), dead workers (kill -9), a dead primary broker (kill -9), and
their return. It shows calls/s, latency, the active broker, workers and alerts live, and ends
with a summary: calls made, failed, executed twice, the longest gap, alerts seen.

The demo supervises its brokers as `zrpc pair` does, but hides nothing: a process it did not
kill on purpose that dies, a broker it had to restart, an internal error or a traceback in any
child's log, and a charge ledger that was never written all show in the summary and make the
demo exit non-zero (the children's logs are then kept for reading).

`Story` is what every story shares (narration, the children and their supervision, the load and
its ledger, the summary and its verdict); `Demo` is the pair's story, and
zrpc._tools._demo_cluster tells the cluster's (`zrpc demo --cluster`) with the same parts.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from zrpc import _defaults as D
from zrpc._errors import CallStateUnknown, ZrpcError
from zrpc._io._client import Client
from zrpc._io._internal import MARK as INTERNAL_ERROR
from zrpc._tools._monitor_view import EventFeed
from zrpc._tools._pair import DEFAULT_PORTS, PairPorts, broker_args, describe_exit
from zrpc._tools._procs import TRACEBACK, Processes, free_port, marked_lines, port_free, wait_until

WORKERS = 3
DEMO_SERVICE = "zrpc.examples.calc:calc"
"""Installed with zrpc (examples/ is packaged as zrpc.examples), so the demo runs anywhere."""
THREADS = 4
MAX_RESTARTS = 3
"""Unplanned restarts of one broker before the demo stops trying (it fails anyway)."""


def _ports() -> tuple[PairPorts, bool]:
    """The local pair's ports if free, else free ones (a pair may already be running)."""
    default = PairPorts()
    if all(port_free(D.LOCAL_HOST, p) for p in (*default.frontend, *default.state, *default.monitor)):
        return default, True
    two = [(free_port(), free_port()) for _ in DEFAULT_PORTS]
    return PairPorts(*two), False


def _status(ep: str, timeout: float = 0.5) -> dict[str, Any] | None:
    try:
        with Client([ep], timeout=timeout) as c:
            status: dict[str, Any] = c.call("zrpc", "status")
            return status
    except ZrpcError:
        return None


class LedgerError(Exception):
    """The charge ledger cannot prove anything: it was never written, or lost a charge."""


def read_ledger(path: Path, charged: set[str], charges: int) -> collections.Counter[str]:
    """How many times each account was charged, as the workers wrote it down. Raises
    LedgerError when the ledger cannot be trusted: "0 double executions" from a ledger nobody
    wrote would be a lie, and a confirmed charge missing from it means it misses executions."""
    if not path.exists() or path.stat().st_size == 0:
        raise LedgerError(f"the charge ledger {path} was never written ({charges} charges made): "
                          "double executions cannot be checked")
    runs = collections.Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())
    missing = charged - set(runs)
    if missing:
        raise LedgerError(f"{len(missing)} confirmed charges are missing from the ledger {path} "
                          f"(e.g. {min(missing)}): it does not record every execution")
    return runs


class Load:
    """Client threads calling calc.add (idempotent) and calc.charge (not) without pause."""

    def __init__(self, brokers: list[str] | None, ledger: Path, cluster: str | None = None) -> None:
        """Calls go to `brokers`, or to the members of the cluster whose etcd is at `cluster`."""
        self.client = Client(brokers, timeout=10, cluster=cluster)
        self.ledger = ledger
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: list[float] = []  # completion times
        self.latencies: collections.deque[tuple[float, float]] = collections.deque(maxlen=20000)
        self.ok = self.failed = self.unknown = self.charges = 0
        self.charged: set[str] = set()  # accounts whose charge was confirmed
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
            account = f"acct-{t}-{i}"
            t0 = time.monotonic()
            try:
                if charge:
                    calc.charge(account, 1)
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
                    if charge:
                        self.charged.add(account)
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

    def slowest(self, since: float) -> float:
        """The longest a call that completed after `since` took (seconds)."""
        with self.lock:
            return max((lat for t, lat in self.latencies if t >= since), default=0.0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        self.client.close()

    def ledger_runs(self) -> collections.Counter[str]:
        with self.lock:
            charged = set(self.charged)
        return read_ledger(self.ledger, charged, self.charges)


class StepFailed(Exception):
    """A step of a story did not happen (a broker never joined, etcd never came up): the story
    stops there, says why in one line, and keeps the children's logs."""


class Story:
    """What every story shares: narration, the children (started, watched, a crashed broker
    restarted and counted), the load and its ledger, and the summary with its verdict.

    A story lists its brokers' frontends (`eps`), says how a broker starts (`start_broker`,
    kept in `brokers`) and how a worker finds them (`worker_args`), and tells itself in `run`,
    which returns `finish(...)`."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.step = "starting"
        self.log: collections.deque[str] = collections.deque(maxlen=8)
        self.tmp = Path(tempfile.mkdtemp(prefix="zrpc-demo-"))
        self.procs = Processes(log_dir=self.tmp / "logs")
        self.eps: list[str] = []  # the brokers' frontends
        self.ledger = self.tmp / "ledger.txt"
        self.unplanned: list[str] = []  # children that died without the demo killing them
        self.restarts: collections.Counter[str] = collections.Counter()  # role -> unplanned restarts
        self._dead_seen: set[int] = set()
        self.keep_logs = False
        self.brokers: dict[str, Any] = {}
        self.workers: list[Any] = []
        self.feed: EventFeed | None = None
        self.load: Load | None = None
        self.started = time.monotonic()
        self._printed = 0

    # --- what a story says about itself ----------------------------------------------------

    def start_broker(self, role: str) -> None:
        """Starts (again) the broker named `role`, with `--restarts N` after unplanned deaths."""
        raise NotImplementedError

    def worker_args(self) -> list[str]:
        """How a worker finds the brokers."""
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def __rich__(self) -> Any:
        """The live view (rich renders it four times a second while the story runs)."""
        raise NotImplementedError

    def where(self, ev: dict[str, Any]) -> str:
        """Which broker an alert came from, as the story names it."""
        return f"[{ev['role']}/{ev['broker_state']}]"

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
                       f"{self.where(ev)}")
        return out

    def print_new_alerts(self) -> None:
        if self.plain and self.feed is not None:
            lines = self.alerts_line(self._printed)
            self._printed = len(self.feed.alerts())
            for line in lines:
                click.echo(f"         alert: {line}")

    def alerts_table(self) -> Any:
        """The last alerts, coloured by what they say (for the live view)."""
        from rich.markup import escape
        from rich.table import Table

        alerts = Table(title="alerts", title_justify="left", show_header=False)
        alerts.add_column("alert")
        for line in (self.alerts_line(0)[-8:] if self.feed else []):
            style = "green" if " resolved " in line else ("red" if line.startswith("critical") else "yellow")
            alerts.add_row(f"[{style}]{escape(line)}[/]")  # escaped: `[b1]` is no markup
        return alerts

    # --- the children ----------------------------------------------------------------------

    def start_worker(self) -> Any:
        w = self.procs.zrpc("worker", DEMO_SERVICE, *self.worker_args(),
                            "--log-level", "error", env={"ZRPC_LEDGER": str(self.ledger)},
                            name=f"worker{len(self.workers) + 1}")
        self.workers.append(w)
        return w

    def watch(self) -> None:
        """A child that died without the demo killing it is a crash: said at once, counted,
        and a broker is restarted (as `zrpc pair` would, with --restarts N) so the story goes on."""
        for child in self.procs.children:
            code = child.proc.poll()
            if code is None or child.exit_expected or child.proc.pid in self._dead_seen:
                continue
            self._dead_seen.add(child.proc.pid)
            self.unplanned.append(f"{child.name} pid {child.proc.pid} ({describe_exit(code)})")
            role = next((r for r, p in self.brokers.items() if p is child.proc), None)
            if role is None:
                self.say(f"UNPLANNED: {child.name} (pid {child.proc.pid}) died: {describe_exit(code)}")
                continue
            if self.restarts[role] >= MAX_RESTARTS:
                self.say(f"UNPLANNED: the {role} broker (pid {child.proc.pid}) died again: "
                         f"{describe_exit(code)}; not restarting it")
                continue
            self.restarts[role] += 1
            self.say(f"UNPLANNED: the {role} broker (pid {child.proc.pid}) died: {describe_exit(code)}; "
                     f"restarting it (restart {self.restarts[role]})")
            self.start_broker(role)

    def wait(self, pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
        def check() -> Any:
            self.watch()
            return pred()

        return wait_until(check, timeout, interval=interval, what=what)

    def n_workers(self, ep: str) -> int:
        return len((_status(ep) or {}).get("workers", []))

    def wait_alert(self, name: str, state: str = "raised", timeout: float = 6.0, since: int = 0) -> bool:
        feed = self.feed
        assert feed is not None
        try:
            self.wait(lambda: len(feed.alerts(name, state)) > since, timeout, what=f"alert {name} {state}")
            return True
        except TimeoutError:
            return False

    def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.watch()
            self.print_new_alerts()
            time.sleep(0.1)  # noqa: sleep (the story's pacing)

    # --- the summary -------------------------------------------------------------------------

    def finish(self, told: dict[str, Any], problems: Sequence[str] = ()) -> dict[str, Any]:
        """Stops the load and sums the story up: the calls and the ledger, then what the story
        measured (`told`), then what would make it fail; `problems` are the story's own."""
        assert self.load is not None and self.feed is not None
        self.say("stopping the load")
        self.load.close()
        self.watch()
        internal = self.internal_errors()
        self.print_new_alerts()
        counts = collections.Counter(f"{e['name']} {e['state']}" for _, e in self.feed.alerts()
                                     if e["name"] != "worker_joined")
        try:
            runs = self.load.ledger_runs()
            ledger: str | None = None
        except LedgerError as exc:
            runs, ledger = collections.Counter(), str(exc)
        return {
            "calls made": self.load.ok + self.load.failed + self.load.unknown,
            "calls failed": self.load.failed,
            "non-idempotent calls": self.load.charges,
            "state unknown (not idempotent, reported)": self.load.unknown,
            "ledger entries": sum(runs.values()),
            "double executions": sum(n - 1 for n in runs.values() if n > 1),
            **told,
            "alerts seen": ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none",
            "unplanned exits": ", ".join(self.unplanned) or "none",
            "broker restarts": sum(self.restarts.values()),
            "internal errors": internal,
            "errors": dict(self.load.errors),
            "problems": ([ledger] if ledger else []) + list(problems) + self.log_problems(),
        }

    def internal_errors(self) -> int:
        """Internal errors the brokers and workers counted, over every broker process that ran
        (a broker's counters start again at 0 when it restarts: the metrics history keeps them)."""
        assert self.feed is not None
        total, last = 0, dict[Any, int]()
        events = [e for _, topic, e in list(self.feed.events) if topic == "metrics"]
        for ev in events:
            n = int((ev.get("counters") or {}).get("internal_errors", 0) or 0)
            prev = last.get(ev.get("broker"), 0)
            if n < prev:  # a restarted broker
                total += prev
            last[ev.get("broker")] = n
        total += sum(last.values())
        statuses = [st for st in (_status(ep) for ep in self.eps) if st]
        latest = sum(int(st.get("counters", {}).get("internal_errors", 0) or 0) for st in statuses)
        workers: dict[str, int] = {}  # a worker's own count, from the alerts brokers raise on it
        for _, ev in self.feed.alerts("internal_error"):
            detail = ev.get("detail") or {}
            if "worker" in detail and isinstance(detail.get("count"), int):
                workers[str(detail["worker"])] = max(workers.get(str(detail["worker"]), 0), detail["count"])
        return max(total, latest) + sum(workers.values())

    def log_problems(self) -> list[str]:
        """Tracebacks and internal errors in any child's log (they log errors only)."""
        out = []
        for log in sorted((self.tmp / "logs").glob("*.log")):
            hits = [line for _, mark, line in marked_lines(log) if mark in (TRACEBACK, INTERNAL_ERROR)]
            if hits:
                out.append(f"{log.stem}: {len(hits)} line(s) with a traceback or an internal error, "
                           f"first: {hits[0].strip()[:200]}")
        return out

    def after_children(self) -> None:
        """What to stop once the children have stopped (what they needed while stopping)."""

    def close(self) -> None:
        if self.load is not None and not self.load.stop.is_set():
            self.load.close()
        if self.feed is not None:
            self.feed.close()
        try:
            self.procs.close(grace=3.0)
        finally:
            self.after_children()
        if self.keep_logs:
            click.echo(f"demo: the children's logs are kept in {self.tmp / 'logs'}", err=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class Demo(Story):
    """The pair's story: a hung worker, dead workers, a dead primary, and their return."""

    def __init__(self, plain: bool) -> None:
        super().__init__(plain)
        self.ports, self.default_ports = _ports()
        self.eps = [f"tcp://{D.LOCAL_HOST}:{p}" for p in self.ports.frontend]

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
        return Group(head, workers, self.alerts_table())

    # --- the story -----------------------------------------------------------------------

    def start_broker(self, role: str) -> None:
        restarts = ["--restarts", str(self.restarts[role])] if self.restarts[role] else []
        self.brokers[role] = self.procs.zrpc("broker", *broker_args(role, D.LOCAL_HOST, self.ports),
                                             "--log-level", "error", *restarts, name=role)

    def worker_args(self) -> list[str]:
        return ["--brokers", ",".join(self.eps)]

    def run(self) -> dict[str, Any]:
        where = "the local pair" if self.default_ports else "free ports (the local pair's are in use)"
        self.say(f"starting a primary and a backup broker on {where}: {', '.join(self.eps)}")
        self.start_broker("primary")
        self.start_broker("backup")
        self.feed = EventFeed(*(f"tcp://{D.LOCAL_HOST}:{p}" for p in self.ports.monitor))
        self.wait(lambda: [(_status(ep) or {}).get("broker", {}).get("state") for ep in self.eps]
                  == ["active", "passive"], 15, what="pair settled")
        self.say(f"starting {WORKERS} workers of {DEMO_SERVICE}, each connected to both brokers")
        for _ in range(WORKERS):
            self.start_worker()
        self.wait(lambda: self.n_workers(self.eps[0]) == WORKERS and self.n_workers(self.eps[1]) == WORKERS,
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
        self.say("bringing the old primary back, as the operator would (a step of the story, no "
                 "crash healed): it comes back passive, the pair is redundant again")
        self.start_broker("primary")
        self.wait_alert("failover", "resolved", timeout=10)
        self.pause(2)

        return self.finish({"longest gap at failover": f"{gap * 1000:.0f} ms"})


def run_demo(plain: bool = False) -> int:
    """The pair's story (`zrpc demo`)."""
    return run_story(Demo, plain)


def run_story(story: Callable[[bool], Story], plain: bool = False) -> int:
    """Tells `story` live (or as plain lines off a terminal), prints its summary, and exits
    non-zero when it did not run as promised (its children's logs are then kept)."""
    import sys

    plain = plain or not sys.stdout.isatty()  # a live view needs a terminal; logs get lines
    demo = story(plain)
    summary: dict[str, Any] = {}
    interrupted = False
    try:
        if plain:
            summary = demo.run()
        else:
            from rich.live import Live

            with Live(demo, refresh_per_second=4, transient=False):
                summary = demo.run()
    except KeyboardInterrupt:
        interrupted = True
        click.echo("demo: interrupted; stopping everything", err=True)
        return 130
    except StepFailed as exc:
        click.echo(f"demo: FAILED: {exc}", err=True)
        for problem in [f"unplanned exit: {u}" for u in demo.unplanned] + demo.log_problems():
            click.echo(f"demo: PROBLEM: {problem}", err=True)
        return 1
    finally:
        ok = clean(summary)
        demo.keep_logs = not ok and not interrupted  # a failed run leaves its evidence
        demo.close()
    _summary(summary, plain)
    return 0 if ok else 1


def clean(summary: dict[str, Any]) -> bool:
    """Whether the story ran as promised: no call failed or ran twice, nothing died or was
    restarted unasked, no internal error, a ledger that proves it."""
    return bool(summary) and (summary["calls failed"] == 0 and summary["double executions"] == 0
                              and summary["ledger entries"] > 0 and not summary["problems"]
                              and summary["unplanned exits"] == "none"
                              and summary["broker restarts"] == 0 and summary["internal errors"] == 0)


def _summary(summary: dict[str, Any], plain: bool) -> None:
    errors = summary.pop("errors", {})
    problems = summary.pop("problems", [])
    for problem in problems:
        click.echo(f"demo: PROBLEM: {problem}", err=True)
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



