"""Consensus-backed failover (`zrpc broker --elect`) on a real etcd: a killed active broker is
replaced within its lease's TTL, losing no idempotent call and running no charge twice; an
active broker stopped past its lease is fenced when it resumes; etcd without a quorum elects
nobody and the holder stops itself, and exactly one serves once the quorum is back; three
candidates killed in turn never serve two at once; a real worker refuses an older epoch.
Every test prints what it measured (-s)."""

from __future__ import annotations

import signal
import statistics
import time

import zmq

from tests.elect.conftest import (
    ETCD_EXPIRY_CHECK,
    FENCE,
    INTERVAL,
    SLACK,
    TTL,
    Following,
    Load,
    Sampler,
    judge_ledger,
    ledger_worker,
    other_errors,
    read_ledger,
    wait_workers,
)
from zrpc._core._frames import WORKER, Heartbeat, Ready, Status, WorkerReply, WorkerRequest, decode_frames, encode
from zrpc._core._serial import pack_call, unpack_result
from zrpc.testing import free_port, wait_until

TAKEOVER = TTL + ETCD_EXPIRY_CHECK + INTERVAL
"""Seconds from a holder's death to its successor serving, at most: the lease outlives the
last renewal by the TTL (the renewal came at most a quarter TTL before the death, so this is
generous), etcd notices an expired lease within half a second, the watch tells the others, one
campaign (milliseconds) and one heartbeat for the status to show it."""


def settle(*brokers, active=0, timeout: float = 20.0) -> None:
    """Waits until brokers[active] serves and every other one is passive."""
    def done() -> bool:
        states = [b.state() for b in brokers]
        return states[active] == "active" and all(s == "passive" for i, s in enumerate(states) if i != active)

    wait_until(done, timeout, what=f"{brokers[active].name} active, the others passive")


def test_kill9_the_active_under_load_the_other_takes_over_within_the_ttl(
        etcd, candidates, procs, tmp_path):
    p = candidates(etcd.url, "primary", "p")
    b = candidates(etcd.url, "backup", "b")
    settle(p, b)
    eps = [p.frontend, b.frontend]
    ledger = tmp_path / "ledger.jsonl"
    for i in range(2):
        ledger_worker(procs, eps, ledger, f"worker{i}")
    wait_workers(p, 2)
    wait_workers(b, 2)
    epoch0 = p.election()["epoch"]
    b.tap.wait_metrics()
    with Sampler([p, b]) as sampler, Load(eps, method="add") as adds, Load(eps, method="charge") as charges:
        wait_until(lambda: adds.ok_since(0) >= 200 and charges.ok_since(0) >= 50, 20, what="load running")
        t_kill = time.monotonic()
        procs.signal(p.proc, signal.SIGKILL)
        wait_until(lambda: sampler.first_active("b", t_kill) is not None, TAKEOVER + SLACK + 5,
                   what="the backup serving")
        took = sampler.first_active("b", t_kill) - t_kill
        wait_until(lambda: adds.ok_since(t_kill + took) >= 200 and charges.ok_since(t_kill + took) >= 50,
                   20, what="calls completing after the takeover")
    adds.check_accounted()
    charges.check_accounted()
    assert adds.errors == {}, list(adds.errors.values())[:3]  # 0 idempotent calls lost
    assert all(r == int(k.split("-")[2]) + int(k.split("-")[1]) for k, (_, r) in adds.results.items())
    assert other_errors(charges) == [], other_errors(charges)[:3]
    verdict = judge_ledger(read_ledger(ledger), charges)
    assert sampler.overlaps() == []
    el = b.election()
    assert el["holder"] == b.frontend and el["epoch"] > epoch0 and el["state"] == "active"
    _, alert = b.tap.wait("failover")
    assert alert["detail"]["from"] == p.frontend and alert["severity"] == "critical"
    gap = adds.longest_gap(t_kill)
    print(f"\nkill -9 the active: the backup serves {took:.2f}s later (bound {TAKEOVER:.2f}s + slack), "
          f"longest gap without an answered add {gap:.2f}s; {len(adds.results)} adds, 0 lost; "
          f"{verdict['executions']} charges ran once each ({verdict['unknown']} state unknown), "
          f"epochs {verdict['epochs']}")
    assert took < TAKEOVER + SLACK


def test_sigstop_the_active_past_its_lease_it_is_fenced_steps_down_and_nothing_runs_twice(
        etcd, candidates, procs, tmp_path):
    p = candidates(etcd.url, "primary", "p")
    b = candidates(etcd.url, "backup", "b")
    settle(p, b)
    eps = [p.frontend, b.frontend]
    ledger = tmp_path / "ledger.jsonl"
    for i in range(2):
        ledger_worker(procs, eps, ledger, f"worker{i}")
    wait_workers(p, 2)
    wait_workers(b, 2)
    p.tap.wait_metrics()
    with Sampler([p, b]) as sampler, Load(eps, method="charge") as charges, Load(eps, threads=2) as adds:
        wait_until(lambda: charges.ok_since(0) >= 50, 20, what="load running")
        t_stop = time.monotonic()
        procs.signal(p.proc, signal.SIGSTOP)
        try:
            wait_until(lambda: sampler.first_active("b", t_stop) is not None, TAKEOVER + SLACK + 5,
                       what="the backup serving")
            took = sampler.first_active("b", t_stop) - t_stop
            # let the backup serve a while: the workers see its newer epoch
            wait_until(lambda: charges.ok_since(t_stop + took) >= 30, 20, what="the backup serving charges")
        finally:
            procs.signal(p.proc, signal.SIGCONT)
        t_cont = time.monotonic()
        # the resumed broker serves nothing: it is past its fence, and its lease is gone
        wait_until(lambda: p.state() == "passive", 10, what="the resumed broker passive")
        wait_until(lambda: adds.ok_since(t_cont) >= 100, 20, what="calls completing after the resume")
    charges.check_accounted()
    adds.check_accounted()
    assert adds.errors == {}, list(adds.errors.values())[:3]
    assert other_errors(charges) == [], other_errors(charges)[:3]
    verdict = judge_ledger(read_ledger(ledger), charges)
    assert sampler.overlaps() == []
    assert sampler.first_active("p", t_cont) is None  # never active again after the resume
    _, lost = p.tap.wait("lease_lost", timeout=10)
    assert lost["severity"] == "critical"
    st = p.status()
    refused = st["counters"].get("epoch_refused", 0)
    assert st["election"]["holder"] == b.frontend and st["election"]["state"] == "passive"
    print(f"\nSIGSTOP the active past its lease: the backup served {took:.2f}s later; the resumed "
          f"broker fenced itself (lease_lost) and stepped down, {refused} call(s) refused by epoch at "
          f"the workers; {verdict['executions']} charges ran once each ({verdict['unknown']} state "
          f"unknown), epochs {verdict['epochs']}")
    assert took < TAKEOVER + SLACK


def test_etcd_without_quorum_elects_nobody_the_holder_stops_itself_and_one_serves_after(
        etcd3, candidates, procs, tmp_path):
    p = candidates(etcd3.url, "primary", "p")
    b = candidates(etcd3.url, "backup", "b")
    settle(p, b)
    eps = [p.frontend, b.frontend]
    ledger = tmp_path / "ledger.jsonl"
    ledger_worker(procs, eps, ledger, "worker")
    wait_workers(p, 1)
    p.tap.wait_metrics()
    with Sampler([p, b]) as sampler:
        t_cut = time.monotonic()
        etcd3.kill(1)
        etcd3.kill(2)
        # the holder cannot renew: it stops serving once its fence passes (it is counted from
        # the last renewal sent before the cut, so within FENCE of it), and says so
        wait_until(lambda: sampler.samples["p"] and sampler.samples["p"][-1][2] == "passive"
                   and sampler.samples["p"][-1][0] > t_cut, FENCE + SLACK + 5, what="the holder stopping itself")
        stopped = sampler.last_active("p") - t_cut
        _, lost = p.tap.wait("lease_lost", timeout=5)
        t_quiet = time.monotonic()
        # nobody is elected without a quorum, however long it lasts
        wait_until(lambda: time.monotonic() - t_quiet > TTL + 1, TTL + 5, what="a while without quorum")
        assert sampler.first_active("p", t_quiet) is None and sampler.first_active("b", t_cut) is None
        assert b.election()["etcd"] == "unreachable"
        t_back = time.monotonic()
        etcd3.start(1)
        etcd3.start(2)
        wait_until(lambda: [p.state(), b.state()].count("active") == 1, 30, what="one broker active")
        back = time.monotonic() - t_back
        t_one = time.monotonic()
        wait_until(lambda: time.monotonic() - t_one > 2.0, 5, what="a while with quorum")
    assert sampler.overlaps() == []
    states = [p.state(), b.state()]
    assert states.count("active") == 1 and states.count("passive") == 1, states
    after = [s for name in ("p", "b") for s in sampler.samples[name] if s[0] > t_one]
    assert sum(1 for s in after if s[2] == "active") > 0
    print(f"\netcd quorum lost: the holder stopped serving {stopped:.2f}s after the cut (fence "
          f"{FENCE:.1f}s after its last renewal) and raised lease_lost ({lost['detail'].get('reason')}); "
          f"nobody was elected for {TTL + 1}s; quorum back: {states} within {back:.1f}s of the restart")
    assert stopped < FENCE + SLACK


def test_three_candidates_exactly_one_active_at_every_moment_across_repeated_kills(
        etcd, candidates, procs, tmp_path):
    """Every worker serves all three candidates, as at-most-once needs: the new holder's probes
    must reach every worker a re-sent call may have run on. A client follows a pair of brokers,
    so calls go through the pair that holds the active one."""
    cs = [candidates(etcd.url, "primary", "c0"), candidates(etcd.url, "backup", "c1"),
          candidates(etcd.url, "backup", "c2")]
    settle(*cs)
    ledger = tmp_path / "ledger.jsonl"
    for i in range(3):
        ledger_worker(procs, [c.frontend for c in cs], ledger, f"worker{i}")
    for c in cs:
        wait_workers(c, 3)
    takeovers: list[float] = []
    epochs: list[int] = [cs[0].election()["epoch"]]
    with Sampler(cs) as sampler, Following(cs, sampler) as charges:
        wait_until(lambda: charges.ok_since(0) >= 30, 20, what="load running")
        for round_ in range(3):
            holder = next(c for c in cs if c.state() == "active")
            t_kill = time.monotonic()
            procs.signal(holder.proc, signal.SIGKILL)
            holder.proc.wait(5)

            def successor(t_kill: float = t_kill, holder=holder):
                return next((c for c in cs if c is not holder and sampler.first_active(c.name, t_kill)),
                            None)

            new = wait_until(successor, TAKEOVER + SLACK + 5, what=f"a successor (round {round_})")
            takeovers.append(sampler.first_active(new.name, t_kill) - t_kill)
            epochs.append(new.election()["epoch"])
            holder.restart()  # back as a candidate: it must not take the role from the holder
            wait_until(lambda holder=holder: holder.state() == "passive", 20, what=f"{holder.name} back passive")
            wait_workers(holder, 3)
            t_ok = time.monotonic()
            wait_until(lambda t_ok=t_ok: charges.ok_since(t_ok) >= 20, 20, what="charges after the takeover")
    charges.check_accounted()
    verdict = judge_ledger(read_ledger(ledger), charges)
    assert sampler.overlaps() == []
    assert epochs == sorted(set(epochs)), epochs  # every term a newer epoch
    states = [c.state() for c in cs]
    assert states.count("active") == 1 and states.count("passive") == 2, states
    errors = sorted({type(e).__name__ for _, e in charges.errors.values()})
    print(f"\nthree candidates, 3 kills: takeovers {', '.join(f'{t:.2f}s' for t in takeovers)} "
          f"(median {statistics.median(takeovers):.2f}s, worst {max(takeovers):.2f}s); epochs {epochs}; "
          f"{verdict['executions']} charges ran once each, {len(charges.errors)} not answered OK "
          f"({', '.join(errors) or 'none'}); {sum(len(s) for s in sampler.samples.values())} status "
          f"samples, never two active")
    assert max(takeovers) < TAKEOVER + SLACK


def test_elect_mistakes_on_the_command_line_are_one_line(procs, etcd):
    cases = [
        (("--elect", etcd.url), "needs --role"),
        (("--role", "primary", "--elect", etcd.url, "--state", "tcp://127.0.0.1:1"), "--state"),
        (("--role", "primary", "--elect", etcd.url, "--cluster", etcd.url, "--name", "x"), "--cluster"),
        (("--election", "x"), "needs --elect"),
        (("--role", "primary", "--elect", etcd.url, "--election", "a/b"), "--election"),
        (("--role", "primary", "--elect", "http://x"), "etcd://"),
    ]
    for args, words in cases:
        code, out = procs.run("broker", *args, name="cli")
        assert code != 0 and words in out and "Traceback" not in out, (args, out)


def test_a_real_worker_refuses_a_call_stamped_with_an_older_epoch_and_runs_a_current_one(
        etcd, candidates, procs, tmp_path):
    """The worker's side of fencing, end to end: a stand-in for a stale broker (a bare ROUTER
    the worker also serves) sends it calls with the holder's epoch and with an older one."""
    p = candidates(etcd.url, "primary", "p")
    wait_until(lambda: p.state() == "active", 20, what="p active")
    epoch = p.election()["epoch"]
    ctx = zmq.Context()
    stale = ctx.socket(zmq.ROUTER)
    stale.setsockopt(zmq.LINGER, 0)
    stale.setsockopt(zmq.RCVTIMEO, 10_000)
    ep = f"tcp://127.0.0.1:{free_port()}"
    stale.bind(ep)
    try:
        ledger_worker(procs, [p.frontend, ep], tmp_path / "ledger.jsonl", "worker")
        wait_workers(p, 1)  # it has heard p's heartbeat: active, with `epoch`

        def ask(rid: int, stamped: int) -> WorkerReply:
            headers = {"budget_ms": 5000, "idempotent": True, "attempt": 0, "epoch": stamped}
            stale.send_multipart([wid, *encode(WorkerRequest(b"client-x", rid, "ledger", "add", headers,
                                                             pack_call((2, 3), {})))])
            while True:
                msg = decode_frames(stale.recv_multipart()[1:])
                if isinstance(msg, WorkerReply) and msg.request_id == rid:
                    return msg

        while True:  # its READY, on connecting
            frames = stale.recv_multipart()
            if isinstance(decode_frames(frames[1:]), Ready):
                wid = frames[0]
                break
        stale.send_multipart([wid, *encode(Heartbeat(WORKER, {"state": "passive", "epoch": 0}))])
        old = ask(1, epoch - 1)
        assert old.status == Status.NOT_ACTIVE
        current = ask(2, epoch)
        assert current.status == Status.OK and unpack_result(current.body) == 5
        again = ask(3, epoch - 1)  # once refused, always: epochs never go back
        assert again.status == Status.NOT_ACTIVE
    finally:
        stale.close()
        ctx.term()
    print(f"\na worker that has seen epoch {epoch} refused epoch {epoch - 1} (NOT_ACTIVE) and ran "
          f"epoch {epoch}")
