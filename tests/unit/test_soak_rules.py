"""The soak's judgements (tests/soak_load.py), without processes: each rule it enforces must
be able to fail, or a green soak proves nothing."""

from __future__ import annotations

from tests.soak_load import Charge, Odd, Tally, judge_alerts, judge_ledger, judge_outcomes


def odd(kind: str, outcome: str, start: float = 10.0, end: float = 11.0) -> Odd:
    return Odd("lone", kind, outcome, start, end, "")


# --- outcomes ------------------------------------------------------------------------------


def test_expected_outcomes_are_only_counted_and_the_rest_is_judged() -> None:
    t = Tally()
    t.add("lone", "add", "ok", 0, 1)
    t.add("lone", "timeout", "Timeout", 0, 1)
    t.add("lone", "unknown", "MethodNotFound", 0, 1)
    t.add("lone", "add", "Timeout", 0, 1)
    t.add("lone", "timeout", "ok", 0, 1)  # a sleep longer than its timeout returned: wrong
    assert [(o.kind, o.outcome) for o in t.odd] == [("add", "Timeout"), ("timeout", "ok")]
    assert t.total() == 5


def test_idempotent_failures_are_tolerated_only_inside_the_lone_restart_window() -> None:
    window = (10.0, 12.0)
    inside = [odd("add", "ServiceUnavailable", 9.0, 10.5), odd("pipelined", "Timeout", 4.0, 14.0)]
    problems, tolerated = judge_outcomes(inside, window, lone=True)
    assert problems == [] and sum(tolerated.values()) == 2
    outside = [odd("add", "ServiceUnavailable", 13.0, 13.1)]
    assert len(judge_outcomes(outside, window, lone=True)[0]) == 1
    assert len(judge_outcomes(inside, window, lone=False)[0]) == 2  # a pair must lose nothing
    assert len(judge_outcomes(inside, None, lone=True)[0]) == 2  # no restart, no excuse


def test_a_call_that_times_out_long_after_its_broker_came_back_was_lost() -> None:
    """In flight when the broker died, never re-sent when it came back 0.3 s later: its 10 s
    deadline passed 9 s after the broker was whole again."""
    problems, _ = judge_outcomes([odd("pipelined", "Timeout", 9.9, 19.9)], (10.0, 10.3), lone=True)
    assert len(problems) == 1 and "Timeout" in problems[0]


def test_wrong_results_hangs_and_unexpected_errors_are_never_tolerated() -> None:
    calls = [odd("add", "wrong result"), odd("add", "hung"), odd("error", "RemoteError(TypeError)"),
             odd("echo64k", "Overloaded"), odd("unknown", "ServiceUnavailable", 30, 31),
             odd("charge", "wrong result"), odd("charge", "RemoteError")]
    problems, tolerated = judge_outcomes(calls, (10.0, 12.0), lone=True)
    assert len(problems) == len(calls) and not tolerated
    assert judge_outcomes([odd("add", "hung")] * 3, None, lone=False)[0][0].startswith("3 x add ended hung")


def test_a_charge_may_end_unknown_or_timed_out_anywhere_and_unavailable_only_in_the_window() -> None:
    problems, tolerated = judge_outcomes([odd("charge", "CallStateUnknown"), odd("charge", "Timeout")],
                                         None, lone=False)
    assert problems == [] and sum(tolerated.values()) == 2
    assert judge_outcomes([odd("charge", "ServiceUnavailable", 10.5, 10.6)], (10.0, 12.0), lone=True)[0] == []
    assert len(judge_outcomes([odd("charge", "ServiceUnavailable", 10.5, 10.6)], (10.0, 12.0), lone=False)[0]) == 1


# --- ledger --------------------------------------------------------------------------------


def charge(outcome: str, pid: int | None = None) -> Charge:
    return Charge(outcome, pid, 0.0, 1.0)


def test_ledger_of_single_runs_passes() -> None:
    charges = {"a": charge("ok", 7), "b": charge("CallStateUnknown"), "c": charge("Timeout")}
    problems, figures = judge_ledger(["a 1 7", "b 1 8"], charges)
    assert problems == []
    assert figures == {"charges": 3, "executions": 2, "max_runs": 1, "not_ok_but_ran": 1}


def test_ledger_catches_double_runs_missing_runs_and_wrong_workers() -> None:
    assert any("double" in p for p in judge_ledger(["a 1 7", "a 1 8"], {"a": charge("CallStateUnknown")})[0])
    assert judge_ledger([], {"a": charge("ok", 7)})[0] == ["charge a returned a result but ran 0 times"]
    assert "ledger says 8" in judge_ledger(["a 1 8"], {"a": charge("ok", 7)})[0][0]
    assert "never made" in judge_ledger(["z 1 7"], {})[0][0]
    assert "ServiceUnavailable yet ran" in judge_ledger(["a 1 7"], {"a": charge("ServiceUnavailable")})[0][0]
    assert "malformed" in judge_ledger(["a 1"], {})[0][0]


# --- alerts --------------------------------------------------------------------------------


def alert(name: str, subject: str) -> tuple[float, dict[str, object]]:
    return (5.0, {"name": name, "subject": subject, "broker": "tcp://b", "broker_state": "active"})


def test_alerts_may_name_only_hurt_workers() -> None:
    alerts = [alert("worker_lost", "vm:100:abcdef"), alert("worker_suspect", "vm:200:abcdef"),
              alert("queue_backlog", "calc"), alert("worker_degraded", "vm:300:abcdef")]
    problems, raised = judge_alerts(alerts, hurt={100})
    assert len(problems) == 1 and "vm:200:abcdef" in problems[0]
    assert raised["worker_lost"] == 1 and raised["queue_backlog"] == 1
    assert judge_alerts([alert("worker_lost", "garbled")], hurt={100})[0]  # unknown subject: flagged
    assert judge_alerts([alert("internal_error", "broker")], hurt=set())[0]
