"""Idle means idle: a broker, a worker and a client with nothing to do use a few percent of a
core at most (heartbeats only). A loop that polls without waiting uses all of one (100 %): the
bound below is far from both, so it tells a bug from a busy machine, not a fast from a slow one.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.conftest import broker_status
from zrpc.testing import wait_until

IDLE_BOUND = 0.10  # of one core
WINDOW = 3.0  # seconds of idleness measured

CLIENT = textwrap.dedent("""
    import sys, time
    import zrpc
    endpoint, ready = sys.argv[1], sys.argv[2]
    with zrpc.Client([endpoint], timeout=10) as client:
        assert client.call("calc", "add", 1, 2) == 3
        open(ready, "w").close()
        while True:
            time.sleep(3600)  # noqa: sleep (holds an idle client: its I/O thread is measured)
""")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def core_share(pids: dict[str, int], window: float = WINDOW) -> dict[str, float]:
    """The share of one core each process used over `window` seconds."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)  # noqa: sleep (a measurement window, not a synchronisation)
    elapsed = time.monotonic() - t0
    return {name: (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()}


def settle(ep: str) -> None:
    """Until the broker has seen the worker for a while (start-up work is over)."""
    wait_until(lambda: (broker_status(ep) or {}).get("workers"), 15, what="worker registered")


def start_client(procs: Any, ep: str, tmp_path: Path) -> Any:
    ready = tmp_path / "client-ready"
    proc = procs.spawn([sys.executable, "-c", CLIENT, ep, str(ready)], name="idle-client")
    wait_until(ready.exists, 15, what="client made its first call")
    return proc


def test_idle_broker_worker_and_client_use_almost_no_cpu(cluster, procs, tmp_path):
    ep = cluster.broker()
    worker = cluster.worker(ep)
    client = start_client(procs, ep, tmp_path)
    settle(ep)
    broker = procs.children[0].proc
    share = core_share({"broker": broker.pid, "worker": worker.pid, "client": client.pid})
    print("\nidle CPU (share of a core):", {k: f"{v:.1%}" for k, v in share.items()})
    assert all(v < IDLE_BOUND for v in share.values()), share


def test_sequential_calls_still_complete_after_idling(cluster, client_factory):
    ep = cluster.broker()
    worker = cluster.worker(ep)
    settle(ep)
    c = client_factory([ep], timeout=10)
    assert [c.call("calc", "add", i, 1) for i in range(50)] == [i + 1 for i in range(50)]
    assert [c.call("calc", "slow_square", i, 0) for i in range(20)] == [i * i for i in range(20)]
    share = core_share({"worker": worker.pid})
    assert share["worker"] < IDLE_BOUND, share


def test_a_draining_worker_does_not_spin(cluster, client_factory, procs):
    ep = cluster.broker()
    worker = cluster.worker(ep)
    c = client_factory([ep], timeout=30)
    long_call = c.proxy("calc").sleep.future(8)  # well past the drain's 1 s grace
    wait_until(lambda: any(w["outstanding"] for w in (broker_status(ep) or {}).get("workers", [])),
               10, what="the call running on the worker")
    procs.signal(worker, signal.SIGTERM)  # drain: finish the call, then leave
    wait_until(lambda: "draining" in log_of(procs, worker), 10, what="the worker draining")
    share = core_share({"worker": worker.pid}, window=4.0)  # from ~0 s to ~4 s into the drain
    print("\ndraining worker CPU:", f"{share['worker']:.1%}")
    assert share["worker"] < IDLE_BOUND, share
    assert long_call.result(timeout=30) == 8
    assert worker.wait(15) == 0


def log_of(procs: Any, proc: Any) -> str:
    log = procs.child(proc).log
    return log.read_text(errors="replace") if log is not None and log.exists() else ""
