"""`zrpc worker --processes N` on real processes: N workers registered from one import, calls
spread over them, a killed one restarted (said in the log, and in its READY), SIGTERM drains
them all and leaves no process behind, nor does the supervisor's own death; mistakes are one
error line."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

import zrpc
from tests import CHILD_ENV
from tests.conftest import Cluster, broker_status
from zrpc._tools._procs import RESTART_MARK, TRACEBACK, Processes
from zrpc.testing import wait_until

PROBE = textwrap.dedent("""
    import os, time
    import zrpc
    from zrpc._io._worker import _ready_info

    probe = zrpc.Service("probe")
    IMPORTED_BY = os.getpid()  # the supervisor: the module is imported once, before the fork

    @probe.method
    def whoami():
        return {"pid": os.getpid(), "ppid": os.getppid(), "imported_by": IMPORTED_BY,
                "ready": _ready_info()}

    @probe.method
    def sleep(seconds):
        time.sleep(seconds)  # noqa: sleep (a handler that takes a while)
        return os.getpid()
    """)


@pytest.fixture
def probe_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "prefork_probe.py").write_text(PROBE)
    (tmp_path / "prefork_empty.py").write_text("import zrpc\nsvc = zrpc.Service('empty')\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), CHILD_ENV["PYTHONPATH"]])}


def start(cluster: Cluster, env: dict[str, str], ep: str, n: int, *args: str):
    """`zrpc worker prefork_probe:probe --processes n`, once its n workers are registered:
    (the supervisor, the workers' pids)."""
    proc = cluster.procs.zrpc("worker", "prefork_probe:probe", "--brokers", ep, "--processes", str(n),
                              "--log-level", "debug", *args, env=env, name="prefork")
    st = cluster.wait_workers(ep, n)
    return proc, {w["pid"] for w in st["workers"]}


def whoami_all(c: zrpc.Client, n: int = 60) -> dict[int, dict]:
    """Pipelined calls (futures), answered by whichever processes the broker chose."""
    futures = [c.future("probe", "whoami") for _ in range(n)]
    return {r["pid"]: r for r in (f.result(10) for f in futures)}


def gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie whose parent has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_processes_register_share_the_calls_and_say_their_index(cluster, probe_env, client_factory):
    ep = cluster.broker()
    sup, pids = start(cluster, probe_env, ep, 3, "--concurrency", "2")
    assert len(pids) == 3 and sup.pid not in pids
    st = broker_status(ep)
    assert [w["capacity"] for w in st["workers"]] == [2, 2, 2]  # the options reach every process
    seen = whoami_all(client_factory([ep]))
    assert set(seen) == pids  # the calls spread over the three
    assert {r["ppid"] for r in seen.values()} == {sup.pid}  # forked by the supervisor
    assert {r["imported_by"] for r in seen.values()} == {sup.pid}  # which imported the service once
    assert sorted((r["ready"]["prefork"], r["ready"]["restarts"]) for r in seen.values()) == \
        [(0, 0), (1, 0), (2, 0)]
    log = (cluster.procs.log_dir / "prefork.log").read_text()
    assert "worker: 3 processes serving" in log


def test_a_killed_process_is_restarted_and_says_so(cluster, probe_env, client_factory):
    ep = cluster.broker()
    sup, pids = start(cluster, probe_env, ep, 3)
    c = client_factory([ep])
    index = {pid: r["ready"]["prefork"] for pid, r in whoami_all(c).items()}
    victim = min(pids)
    cluster.procs.expect_in_log(sup, RESTART_MARK, times=1)  # the one restart this test causes
    os.kill(victim, signal.SIGKILL)

    def new_pid() -> int | None:
        st = broker_status(ep)
        now = {w["pid"] for w in (st or {}).get("workers", [])}
        fresh = now - pids
        return next(iter(fresh)) if len(now) == 3 and fresh else None

    fresh = cluster.wait(new_pid, 20, what="the killed process restarted")
    log = (cluster.procs.log_dir / "prefork.log").read_text()
    i = index[victim]
    assert f"worker: process {i} exited (killed by SIGKILL): {RESTART_MARK} in 1s (restart 1)" in log
    assert f"worker: process {i} restarted (pid {fresh}, restarts 1)" in log
    # its READY says which process it is and that it was restarted (ZRPC_PREFORK=I:1); the
    # broker's status shows only the pid of a worker's READY info, so the worker itself is asked
    replies = wait_until(lambda: (lambda seen: seen if fresh in seen else None)(whoami_all(c)), 10,
                         what="a call answered by the restarted process")
    assert replies[fresh]["ready"]["prefork"] == i and replies[fresh]["ready"]["restarts"] == 1
    others = [r["ready"] for pid, r in replies.items() if pid != fresh]
    assert all(r["restarts"] == 0 for r in others)
    assert cluster.procs.child(sup).proc.poll() is None


def test_sigterm_drains_every_process_and_leaves_none_behind(cluster, probe_env, client_factory):
    ep = cluster.broker()
    sup, pids = start(cluster, probe_env, ep, 3, "--concurrency", "1")
    c = client_factory([ep], timeout=20)
    calls = [c.future("probe", "sleep", 1.0) for _ in range(3)]
    cluster.wait(lambda: all(w["outstanding"] == 1 for w in broker_status(ep)["workers"]), 10,
                 what="a call in flight on each process")
    started = time.monotonic()
    assert cluster.procs.terminate(sup, timeout=20) == 0
    assert sorted(f.result(10) for f in calls) == sorted(pids)  # each finished its call
    assert time.monotonic() - started < 15
    assert all(gone(p) for p in pids)  # reaped by the supervisor before it left
    log = (cluster.procs.log_dir / "prefork.log").read_text()
    assert log.count("draining 1 in-flight call(s), then leaving") == 3
    assert "worker: stopped" in log


def test_a_second_signal_stops_them_at_once(cluster, probe_env, client_factory):
    ep = cluster.broker()
    sup, pids = start(cluster, probe_env, ep, 2, "--concurrency", "1")
    c = client_factory([ep], timeout=60)
    calls = [c.future("probe", "sleep", 60) for _ in range(2)]
    cluster.wait(lambda: all(w["outstanding"] == 1 for w in broker_status(ep)["workers"]), 10,
                 what="a call in flight on each process")
    started = time.monotonic()
    cluster.procs.signal(sup, signal.SIGTERM)
    wait_until(lambda: "worker: stopping" in (cluster.procs.log_dir / "prefork.log").read_text(), 5,
               what="the supervisor stopping")
    cluster.procs.signal(sup, signal.SIGTERM)
    assert sup.wait(10) == 0
    assert time.monotonic() - started < 10  # not the 60 s the calls would take
    assert all(gone(p) for p in pids)
    for f in calls:
        f.cancel()


def test_the_supervisor_killed_outright_takes_its_processes_with_it(cluster, probe_env):
    ep = cluster.broker()
    sup, pids = start(cluster, probe_env, ep, 2)
    cluster.procs.signal(sup, signal.SIGKILL)  # its process alone, not its group
    sup.wait(10)
    wait_until(lambda: all(gone(p) for p in pids), 10, what="the orphaned processes gone")
    cluster.wait_workers(ep, 0)


def run_worker(procs: Processes, env: dict[str, str], *args: str) -> tuple[int, str]:
    return procs.run("worker", *args, "--brokers", "tcp://127.0.0.1:1", env=env, timeout=30)


@pytest.mark.parametrize("spec, words, code", [
    ("prefork_no_such_module", ["cannot import"], 2),  # imported once, before any fork
    ("prefork_empty", ["at least one @method"], 1),  # found by the first process, said once
])
def test_a_service_that_cannot_be_served_is_one_error(procs, probe_env, spec, words, code):
    rc, out = run_worker(procs, probe_env, spec, "--processes", "3")
    assert rc == code, out
    assert TRACEBACK not in out and RESTART_MARK not in out
    errors = [ln for ln in out.splitlines() if ln.lower().startswith("error")]
    assert len(errors) == 1, out
    assert all(w in errors[0] for w in words), out
    assert "processes serving" not in out


def test_zero_processes_is_a_usage_error(procs, probe_env):
    rc, out = run_worker(procs, probe_env, "prefork_probe:probe", "--processes", "0")
    assert rc == 2 and "--processes" in out and TRACEBACK not in out, out
