"""The tables of the sections after the main one (scaling, queue depth, memory, knobs, cluster,
prefork), as rich Tables."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

from _cluster import WORKERS, ClusterRow
from _knobs import KnobRow
from _prefork import CALLS, SUPERVISOR, PreforkRow
from _sections import SYSTEM_LABELS, WINDOW, Depth, Memory, Point
from _systems import WORKLOADS
from rich import box
from rich.table import Table

T = TypeVar("T")


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def sectioned(t: Table, items: list[T], group: Callable[[T], Hashable]) -> Iterator[T]:
    """The items, with a section line in `t` wherever `group` changes."""
    last: Hashable = None
    for i, item in enumerate(items):
        if i and group(item) != last:
            t.add_section()
        last = group(item)
        yield item


def split_cell(share: dict[str, float]) -> str:
    """Each process's share of the calls, as "50/50 %"."""
    return "/".join(f"{100 * s:.0f}" for s in share.values()) + " %" if share else "—"


def cpu_cells(cpu: list[float | None]) -> list[str]:
    return [*(fmt(c, 1) for c in cpu), fmt(sum(c for c in cpu if c is not None), 1)]


def scaling_table(points: list[Point], box_style: box.Box) -> Table:
    t = Table(title="scaling through one broker: calls/s, latency, CPU µs per call of each role, broker memory",
              box=box_style)
    for name in ("system", "load"):
        t.add_column(name)
    for name in ("calls/s", "p50 µs", "p99 µs", "clients µs", "broker µs", "workers µs", "total µs", "broker MB"):
        t.add_column(name, justify="right")
    for p in sectioned(t, points, lambda p: (p.system, p.axis)):
        r = p.row
        what = f"{p.n} {p.axis if p.n > 1 else p.axis.replace('threads', 'thread').replace('processes', 'process')}"
        if p.axis == "workers":
            what = f"{p.n} worker{'s' * (p.n > 1)}, {WINDOW} in flight"
        t.add_row(SYSTEM_LABELS[p.system], what, fmt(r.calls_s), fmt(r.p50_us), fmt(r.p99_us),
                  *cpu_cells([r.cpu_role(role) for role in ("client", "broker", "server")]),
                  fmt(p.broker_rss_kb / 1024, 1))
    return t


def queue_table(depths: list[Depth], box_style: box.Box) -> Table:
    t = Table(title="latency against queue depth: zrpc, one broker, one worker (capacity 8), "
                    "calls submitted at once, each timed from submission to reply", box=box_style)
    t.add_column("submitted at once", justify="right")
    for name in ("deepest queue", "calls", "calls/s", "p50 µs", "p99 µs", "max µs", "client µs", "broker µs",
                 "worker µs", "failed"):
        t.add_column(name, justify="right")
    for d in depths:
        r = d.row
        failed = ", ".join(f"{n:,} {k}" for k, n in d.refused.items()) or "0"
        t.add_row("1 at a time" if not d.depth else f"{d.depth:,}", f"{d.peak_queued:,}", f"{r.calls:,}",
                  fmt(r.calls_s), fmt(r.p50_us), fmt(r.p99_us), fmt(d.max_us),
                  *(fmt(r.cpu_role(role), 1) for role in ("client", "broker", "server")), failed)
    return t


def memory_table(rows: list[Memory], box_style: box.Box) -> Table:
    t = Table(title="broker memory (VmRSS) and CPU, by what is connected", box=box_style)
    t.add_column("broker state")
    for name in ("RSS MB", "Δ MB", "KiB per peer", "broker CPU %"):
        t.add_column(name, justify="right")
    t.add_column("note")
    for m in rows:
        t.add_row(m.state, fmt(m.rss_kb / 1024, 1), fmt((m.rss_kb - m.base_kb) / 1024, 1), fmt(m.per_peer_kb),
                  fmt(m.cpu_pct, 1), m.note)
    return t


def knobs_table(rows: list[KnobRow], box_style: box.Box) -> Table:
    base = {k.knob.window: k.row.calls_s for k in rows if k.knob.method == "add" and not (
        k.knob.broker or k.knob.worker or k.knob.curve)}  # the defaults, pipelined and sequential
    t = Table(title="what each knob costs: zrpc, one broker, one worker, add(1, 2) "
                    "(128 in flight unless sequential)", box=box_style)
    t.add_column("knob")
    for name in ("calls/s", "÷ defaults", "p50 µs", "p99 µs", "client µs", "broker µs", "worker µs", "total µs"):
        t.add_column(name, justify="right")
    for k in rows:
        r = k.row
        ref = base.get(1 if k.knob.window == 1 else k.knob.window)
        t.add_row(k.knob.label, fmt(r.calls_s), fmt(r.calls_s / ref, 2) if ref else "—", fmt(r.p50_us),
                  fmt(r.p99_us), *cpu_cells([r.cpu_role(role) for role in ("client", "broker", "server")]))
    return t


def cluster_table(rows: list[ClusterRow], box_style: box.Box) -> Table:
    base = {r.row.workload: r.row.calls_s for r in rows if r.brokers == 1}
    t = Table(title=f"cluster mode, add(1, 2): one client, {WORKERS} workers, 1 to 3 member brokers of one etcd; "
                    "CPU µs per call of each process; each broker's % of the calls", box=box_style)
    t.add_column("brokers", justify="right")
    t.add_column("calls")
    for name in ("calls/s", "÷ 1 broker", "p50 µs", "p99 µs", "client µs", "brokers µs", "per broker µs",
                 "workers µs", "etcd µs", "total µs", "split"):
        t.add_column(name, justify="right")
    for c in sectioned(t, rows, lambda c: c.brokers):
        r = c.row
        ref = base.get(r.workload)
        each = "/".join(fmt(r.cpu_us.get(b)) for b in c.names)
        split = split_cell(c.share())
        how = "sequential" if WORKLOADS[r.workload].window == 1 else f"{WORKLOADS[r.workload].window:,} in flight"
        t.add_row(str(c.brokers), how, fmt(r.calls_s),
                  fmt(r.calls_s / ref, 2) if ref else "—", fmt(r.p50_us), fmt(r.p99_us),
                  fmt(r.cpu_role("client"), 1), fmt(r.cpu_role("broker"), 1), each,
                  fmt(r.cpu_role("server"), 1), fmt(r.cpu_role("etcd"), 1), fmt(sum(r.cpu_us.values()), 1), split)
    return t


def prefork_table(rows: list[PreforkRow], box_style: box.Box) -> Table:
    base = {r.row.workload: r.row.calls_s for r in rows if r.processes == 1}
    t = Table(title="prefork workers: one client, one broker, zrpc worker --processes N; CPU µs per call "
                    "(workers: the N processes and the supervisor); each process's % of the calls", box=box_style)
    t.add_column("processes", justify="right")
    t.add_column("calls", no_wrap=True)
    for name in ("calls/s", "÷ 1", "p50 µs", "p99 µs", "client µs", "broker µs", "workers µs",
                 "per process µs", "supervisor µs", "total µs", "split"):
        t.add_column(name, justify="right")
    for p in sectioned(t, rows, lambda p: p.processes):
        r = p.row
        ref = base.get(r.workload)
        each = "/".join(fmt(r.cpu_us.get(w)) for w in p.workers)
        split = split_cell(p.share())
        t.add_row(str(p.processes), CALLS[r.workload].label, fmt(r.calls_s), fmt(r.calls_s / ref, 2) if ref else "—",
                  fmt(r.p50_us), fmt(r.p99_us), fmt(r.cpu_role("client"), 1), fmt(r.cpu_role("broker"), 1),
                  fmt(r.cpu_role("server"), 1), each, fmt(r.cpu_us.get(SUPERVISOR), 1),
                  fmt(sum(r.cpu_us.values()), 1), split)
    return t
