"""The Binary Star machine: every transition, then two machines over a link that can be cut."""

from __future__ import annotations

import pytest

from broker._bstar import (
    TRANSITIONS,
    BinaryStar,
    BStar,
    ClientVoted,
    PeerAlert,
    PeerStateSeen,
    PublishState,
    StateChanged,
)
from zrpc.testing import FakeClock

P, B, A, S = BStar.PRIMARY, BStar.BACKUP, BStar.ACTIVE, BStar.PASSIVE
I = 0.25  # interval


def machine(role: str, state: BStar, *, peer_silent: bool = False, epoch: int = 1) -> tuple[BinaryStar, FakeClock]:
    clock = FakeClock()
    m = BinaryStar(role, clock, I)
    m.state = state
    m.epoch = epoch
    if not peer_silent:
        m.handle(PeerStateSeen(S if state is A else A, epoch))
        m.state = state
    else:
        clock.advance(3 * I)
    return m, clock


def alerts(actions, name=None):
    return [a for a in actions if isinstance(a, PeerAlert) and (name is None or a.name == name)]


# (role, state, event, peer silent?) -> expected state
CASES = [
    ("primary", P, PeerStateSeen(B), False, A),
    ("primary", P, PeerStateSeen(A, 5), False, S),
    ("primary", P, PeerStateSeen(P), False, P),
    ("primary", P, PeerStateSeen(S), False, P),
    ("primary", P, ClientVoted(), True, A),  # lone primary serves
    ("primary", P, ClientVoted(), False, P),  # the peer was just heard: wait for it
    ("backup", B, PeerStateSeen(A), False, S),
    ("backup", B, PeerStateSeen(P), False, B),
    ("backup", B, PeerStateSeen(B), False, B),
    ("backup", B, ClientVoted(), True, B),  # a backup never serves first
    ("primary", A, PeerStateSeen(P), False, A),
    ("primary", A, PeerStateSeen(B), False, A),
    ("primary", A, PeerStateSeen(S), False, A),
    ("primary", A, ClientVoted(), False, A),
    ("primary", A, PeerStateSeen(A, 5), False, S),  # split brain: the lower epoch yields
    ("backup", S, PeerStateSeen(P), False, A),  # primary restarted
    ("primary", S, PeerStateSeen(B), False, A),  # backup restarted
    ("backup", S, PeerStateSeen(A), False, S),
    ("backup", S, ClientVoted(), False, S),  # peer alive: no failover (no split brain)
    ("backup", S, ClientVoted(), True, A),  # peer silent and a client voted: failover
    ("primary", S, ClientVoted(), True, A),
    ("primary", S, PeerStateSeen(S), False, A),  # dual passive: primary takes over
    ("backup", S, PeerStateSeen(S), False, S),
]


@pytest.mark.parametrize("role, state, event, silent, expected", CASES)
def test_transition(role, state, event, silent, expected):
    m, _ = machine(role, state, peer_silent=silent)
    if silent and isinstance(event, PeerStateSeen):
        pytest.skip("a peer state is never silent")
    m.handle(event)
    assert m.state is expected


def test_every_table_entry_is_covered():
    covered = {(c[1], c[2].state if isinstance(c[2], PeerStateSeen) else "client_request") for c in CASES}
    assert set(TRANSITIONS) <= covered


def test_passive_waits_two_intervals_of_silence_before_a_vote_counts():
    m, clock = machine("backup", S)
    clock.advance(2 * I - 0.01)
    m.handle(ClientVoted())
    assert m.state is S
    clock.advance(0.02)
    out = m.handle(ClientVoted())
    assert m.state is A and alerts(out, "failover")
    assert m.epoch == 2  # the takeover increments the epoch


def test_split_brain_lower_epoch_steps_down():
    m, _ = machine("primary", A, epoch=1)
    out = m.handle(PeerStateSeen(A, 2))
    assert m.state is S
    raised = alerts(out, "split_brain")
    assert [a.resolved for a in raised] == [False, True]


def test_split_brain_higher_epoch_stays_and_resolves_when_peer_yields():
    m, _ = machine("backup", A, epoch=3)
    out = m.handle(PeerStateSeen(A, 2))
    assert m.state is A and [a.resolved for a in alerts(out, "split_brain")] == [False]
    out = m.handle(PeerStateSeen(S, 3))
    assert [a.resolved for a in alerts(out, "split_brain")] == [True]


def test_split_brain_equal_epochs_backup_yields():
    m, _ = machine("backup", A, epoch=2)
    m.handle(PeerStateSeen(A, 2))
    assert m.state is S
    m, _ = machine("primary", A, epoch=2)
    m.handle(PeerStateSeen(A, 2))
    assert m.state is A


def test_peer_lost_and_back_alerts_and_publishing():
    m, clock = machine("primary", A)
    assert any(isinstance(a, PublishState) for a in m.tick())
    assert not any(isinstance(a, PublishState) for a in m.tick())
    clock.advance(2 * I)
    out = m.tick()
    assert alerts(out, "peer_lost") and any(isinstance(a, PublishState) for a in out)
    assert not alerts(m.tick(), "peer_lost")  # raised once
    out = m.handle(PeerStateSeen(S, 1))
    assert [(a.name, a.resolved) for a in alerts(out)] == [("peer_lost", True), ("peer_back", False)]


def test_state_change_is_published_at_once():
    m, _ = machine("primary", P, peer_silent=True)
    out = m.handle(ClientVoted())
    assert any(isinstance(a, StateChanged) for a in out)
    assert PublishState(A, m.epoch) in out


# --- two machines, one link -----------------------------------------------------------------


class Pair:
    """Primary and backup on one fake clock; the state link can be cut and healed."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.p = BinaryStar("primary", self.clock, I)
        self.b = BinaryStar("backup", self.clock, I)
        self.link = True
        self.alerts: list[PeerAlert] = []

    def run(self, seconds: float, step: float = 0.05, down: set[str] = frozenset()) -> None:
        t = 0.0
        while t < seconds:
            self.clock.advance(step)
            t += step
            for me, peer, name in ((self.p, self.b, "p"), (self.b, self.p, "b")):
                if name in down:
                    continue
                for a in me.tick():
                    if isinstance(a, PeerAlert):
                        self.alerts.append(a)
                    if isinstance(a, PublishState) and self.link and ({"p", "b"} - {name}) - down:
                        for x in peer.handle(PeerStateSeen(a.state, a.epoch)):
                            if isinstance(x, PeerAlert):
                                self.alerts.append(x)

    def vote(self, m: BinaryStar) -> bool:
        for a in m.handle(ClientVoted()):
            if isinstance(a, PeerAlert):
                self.alerts.append(a)
        return m.accepts_clients


def test_pair_starts_with_exactly_one_active():
    pair = Pair()
    pair.run(1.0)
    assert (pair.p.state, pair.b.state) == (A, S)


def test_cut_link_with_clients_on_the_primary_is_no_split_brain():
    pair = Pair()
    pair.run(1.0)
    pair.link = False
    pair.run(2.0)
    assert pair.vote(pair.p)  # clients still reach the primary
    assert pair.b.state is S  # no client voted on the backup: it stays passive
    pair.link = True
    pair.run(1.0)
    assert (pair.p.state, pair.b.state) == (A, S)


def test_primary_crash_then_vote_fails_over_and_restart_comes_back_passive():
    pair = Pair()
    pair.run(1.0)
    pair.run(1.0, down={"p"})
    assert pair.b.state is S  # no vote yet: waits
    assert pair.vote(pair.b)
    assert pair.b.state is A and pair.b.epoch == 2
    pair.p = BinaryStar("primary", pair.clock, I)  # restarted
    pair.run(1.0)
    assert (pair.p.state, pair.b.state) == (S, A)
    # and a second failover back works
    pair.run(1.0, down={"b"})
    assert pair.vote(pair.p) and pair.p.epoch == 3


def test_stopped_primary_resumes_and_steps_down():
    pair = Pair()
    pair.run(1.0)
    pair.run(1.0, down={"p"})  # SIGSTOP: the primary neither publishes nor hears
    assert pair.vote(pair.b)
    pair.run(0.5)  # SIGCONT: both active for a moment; epochs settle it
    assert (pair.p.state, pair.b.state) == (S, A)
    names = [(a.name, a.resolved) for a in pair.alerts if a.name == "split_brain"]
    assert ("split_brain", False) in names and ("split_brain", True) in names


def test_healed_partition_with_two_actives_settles_to_one():
    pair = Pair()
    pair.run(1.0)
    pair.link = False
    pair.run(1.0)
    assert pair.vote(pair.b)  # some client could only reach the backup
    assert pair.p.accepts_clients and pair.b.accepts_clients
    pair.link = True
    pair.run(0.5)
    assert [pair.p.state, pair.b.state].count(A) == 1
