"""`zrpc demo` as a user runs it: the whole story, a summary with real numbers, and no crash
hidden (an unplanned exit, a restart, an internal error or an unwritten ledger fail it)."""

import re
import sys

import pytest

from tests import run_to_end
from zrpc._tools._demo import LedgerError, clean, read_ledger


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


def test_the_demo_notices_a_child_it_did_not_kill_and_restarts_a_broker(monkeypatch):
    from zrpc._tools._demo import Demo

    demo = Demo(plain=True)
    try:
        started: list[tuple[str, ...]] = []

        def fake_zrpc(*args, **kw):
            started.append(args)
            return demo.procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], name=kw.get("name"))

        crash = demo.procs.spawn([sys.executable, "-c", "import sys; sys.exit(3)"], name="primary")
        demo.brokers["primary"] = crash
        killed = demo.procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], name="worker1")
        demo.procs.kill(killed)
        crash.wait(10)
        monkeypatch.setattr(demo.procs, "zrpc", fake_zrpc)
        demo.watch()
        demo.watch()  # each death is counted once
        assert demo.unplanned == [f"primary pid {crash.pid} (exit code 3)"]
        assert demo.restarts["primary"] == 1 and len(started) == 1
        assert started[0][0] == "broker" and started[0][-2:] == ("--restarts", "1")
    finally:
        demo.close()
