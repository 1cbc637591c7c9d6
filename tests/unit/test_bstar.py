"""The Binary Star machine: every transition, then two machines over a link that can be cut.

Every state is reached by feeding the machine events, as the broker loop does."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zrpc.broker._core._bstar as bstar
from zrpc._errors import ProtocolError
from zrpc.broker._core._bstar import (
    MAX_EPOCH,
    RULES,
    TRANSITIONS,
    UNREACHABLE_TIMEOUTS,
    BinaryStar,
    BStar,
    ClientVoted,
    HigherEpochSeen,
    PeerAlert,
    PeerStateSeen,
    PublishState,
    ServingChanged,
    Stalled,
    StateChanged,
    decode_state,
    encode_state,
)
from zrpc.testing import FakeClock

P, B, A, S = BStar.PRIMARY, BStar.BACKUP, BStar.ACTIVE, BStar.PASSIVE
INTERVAL = 0.25
PEER_TIMEOUT = 2 * INTERVAL


def other(role: str) -> str:
    return "backup" if role == "primary" else "primary"


def reach(role: str, state: BStar, *, epoch: int = 1, peer_silent: bool = False) -> tuple[BinaryStar, FakeClock]:
    """A machine in `state` (with `epoch` once it has been ACTIVE or PASSIVE), its peer heard
    just now unless `peer_silent`; only events get it there."""
    clock = FakeClock()
    m = BinaryStar(role, clock, INTERVAL)
    peer = other(role)
    if state is P or state is B:
        # a waiting peer that causes no transition: a passive primary, or a passive backup
        m.handle(PeerStateSeen(S, 0, peer))
    elif state is S:
        m.handle(PeerStateSeen(A, epoch, peer))
    elif role == "primary":  # ACTIVE: the backup was waiting
        m.handle(PeerStateSeen(S, epoch - 1, peer))
        m.handle(PeerStateSeen(B, epoch - 1, peer))
    else:  # a passive backup whose primary restarted takes over
        m.handle(PeerStateSeen(A, epoch - 1, peer))
        m.handle(PeerStateSeen(P, 0, peer))
    assert m.state is state
    if state in (A, S):
        assert m.epoch == epoch
    if peer_silent:
        clock.advance(3 * INTERVAL)
    return m, clock


def alerts(actions, name=None):
    return [a for a in actions if isinstance(a, PeerAlert) and (name is None or a.name == name)]


def serving(actions):
    return [a.serving for a in actions if isinstance(a, ServingChanged)]


# (role, state, event, peer silent?) -> expected state
CASES = [
    ("primary", P, PeerStateSeen(B, 0, "backup"), False, A),
    ("primary", P, PeerStateSeen(A, 5, "backup"), False, S),
    ("primary", P, PeerStateSeen(P, 0, "backup"), False, P),
    ("primary", P, PeerStateSeen(S, 0, "backup"), False, P),
    ("primary", P, ClientVoted(), True, A),  # lone primary serves
    ("primary", P, ClientVoted(), False, P),  # the peer was just heard: wait for it
    ("backup", B, PeerStateSeen(A, 1, "primary"), False, S),
    ("backup", B, PeerStateSeen(P, 0, "primary"), False, B),
    ("backup", B, PeerStateSeen(B, 0, "primary"), False, B),
    ("backup", B, ClientVoted(), True, B),  # a backup never serves first
    ("primary", A, PeerStateSeen(P, 0, "backup"), False, A),
    ("primary", A, PeerStateSeen(B, 0, "backup"), False, A),
    ("primary", A, PeerStateSeen(S, 1, "backup"), False, A),
    ("primary", A, ClientVoted(), False, A),
    ("primary", A, PeerStateSeen(A, 5, "backup"), False, S),  # split brain: the lower epoch yields
    ("backup", S, PeerStateSeen(P, 0, "primary"), False, A),  # primary restarted
    ("primary", S, PeerStateSeen(B, 0, "backup"), False, A),  # backup restarted
    ("backup", S, PeerStateSeen(A, 1, "primary"), False, S),
    ("backup", S, ClientVoted(), False, S),  # peer alive: no failover (no split brain)
    ("backup", S, ClientVoted(), True, A),  # peer silent and a client voted: failover
    ("primary", S, ClientVoted(), True, A),
    ("primary", S, PeerStateSeen(S, 1, "backup"), False, A),  # dual passive: primary takes over
    ("backup", S, PeerStateSeen(S, 1, "primary"), False, S),
    # a worker sees a newer active broker: fencing when the state link works one way only
    ("primary", A, HigherEpochSeen(5), False, S),
    ("primary", A, HigherEpochSeen(1), False, A),  # our own epoch: nothing newer
    ("backup", A, HigherEpochSeen(1), False, A),  # an older one: it must step down, not us
    ("backup", S, HigherEpochSeen(9), False, S),
    ("primary", P, HigherEpochSeen(9), False, P),
    # the same role on both sides: nobody is confused into serving
    ("primary", P, PeerStateSeen(P, 0, "primary"), False, P),
    ("backup", B, PeerStateSeen(B, 0, "backup"), False, B),
    ("primary", A, PeerStateSeen(A, 1, "primary"), False, S),  # equal epochs, same role: both yield
    ("primary", S, PeerStateSeen(S, 1, "primary"), False, S),  # no primary to pick
    ("backup", S, PeerStateSeen(S, 1, "backup"), False, S),
    # our own stall never changes the state by itself
    ("primary", A, Stalled(0.6), False, A),
    ("backup", S, Stalled(5.0), False, S),
    ("primary", P, Stalled(5.0), False, P),
]


@pytest.mark.parametrize("role, state, event, silent, expected", CASES)
def test_transition(role, state, event, silent, expected):
    m, clock = reach(role, state, peer_silent=silent)
    if isinstance(event, Stalled):
        clock.advance(event.seconds)
    m.handle(event)
    assert m.state is expected


def test_every_table_entry_is_covered():
    covered = {(c[1], c[2].state if isinstance(c[2], PeerStateSeen) else type(c[2])) for c in CASES}
    assert set(TRANSITIONS) <= covered


def test_every_rule_the_table_names_has_a_handler():
    named = {t for t, _ in TRANSITIONS.values() if isinstance(t, str)}
    assert named == set(RULES)


def test_every_rule_is_one_of_the_numbered_rules_at_the_top_of_the_module():
    doc = bstar.__doc__ or ""
    for name in RULES:
        assert f'"{name}"' in doc, name


def test_a_pair_the_table_lacks_changes_nothing():
    m, _ = reach("backup", S)
    assert (S, HigherEpochSeen) not in TRANSITIONS and (S, A) not in TRANSITIONS
    before = repr(m)
    assert m.handle(HigherEpochSeen(9)) == [] and m.handle(PeerStateSeen(A, 1, "primary")) == []
    assert repr(m) == before


def test_unknown_events_are_a_bug_of_the_caller():
    m, _ = reach("primary", A)
    with pytest.raises(TypeError):
        m.handle("client_request")


# --- what a machine shows --------------------------------------------------------------------


def test_repr_shows_role_state_epoch_and_peer():
    m, clock = reach("backup", S, epoch=2)
    assert repr(m) == "<BinaryStar backup PASSIVE epoch=2 peer=ACTIVE>"
    clock.advance(3 * INTERVAL)
    assert repr(m) == "<BinaryStar backup PASSIVE epoch=2 peer=silent>"
    fresh = BinaryStar("primary", FakeClock(), INTERVAL)
    assert repr(fresh) == "<BinaryStar primary PRIMARY epoch=0 peer=unheard>"


def test_repr_shows_doubt_and_conflicts():
    m, clock = reach("primary", A)
    clock.advance(3.0)
    m.handle(Stalled(3.0))
    # the stall is no evidence against the peer: it still counts as alive
    assert repr(m) == "<BinaryStar primary ACTIVE epoch=1 peer=BACKUP doubting>"
    m, _ = reach("primary", P)
    m.handle(PeerStateSeen(P, 0, "primary"))
    assert repr(m) == "<BinaryStar primary PRIMARY epoch=0 peer=PRIMARY role_conflict>"
    m, _ = reach("backup", A, epoch=3)
    m.handle(PeerStateSeen(A, 2, "primary"))
    assert repr(m) == "<BinaryStar backup ACTIVE epoch=3 peer=ACTIVE split_brain>"


@pytest.mark.parametrize("name", ["role", "interval", "peer_timeout", "state", "epoch", "peer_state",
                                  "peer_epoch", "peer_role", "accepts_clients", "peer_alive"])
def test_state_is_read_only(name):
    m, _ = reach("primary", A)
    with pytest.raises(AttributeError):
        setattr(m, name, getattr(m, name))


def test_what_it_knows_of_its_peer_comes_from_its_messages():
    m, _ = reach("backup", S, epoch=4)
    assert (m.peer_state, m.peer_epoch, m.peer_role) == (A, 4, "primary")
    assert m.peer_timeout == PEER_TIMEOUT and m.interval == INTERVAL and m.role == "backup"


def test_passive_waits_two_intervals_of_silence_before_a_vote_counts():
    m, clock = reach("backup", S)
    clock.advance(2 * INTERVAL - 0.01)
    m.handle(ClientVoted())
    assert m.state is S
    clock.advance(0.02)
    out = m.handle(ClientVoted())
    assert m.state is A and alerts(out, "failover")
    assert m.epoch == 2  # the takeover increments the epoch


def test_split_brain_lower_epoch_steps_down():
    m, _ = reach("primary", A, epoch=1)
    out = m.handle(PeerStateSeen(A, 2, "backup"))
    assert m.state is S
    raised = alerts(out, "split_brain")
    assert [a.resolved for a in raised] == [False, True]


def test_split_brain_higher_epoch_stays_and_resolves_when_peer_yields():
    m, _ = reach("backup", A, epoch=3)
    out = m.handle(PeerStateSeen(A, 2, "primary"))
    assert m.state is A and [a.resolved for a in alerts(out, "split_brain")] == [False]
    out = m.handle(PeerStateSeen(S, 3, "primary"))
    assert [a.resolved for a in alerts(out, "split_brain")] == [True]


def test_split_brain_equal_epochs_backup_yields():
    m, _ = reach("backup", A, epoch=2)
    m.handle(PeerStateSeen(A, 2, "primary"))
    assert m.state is S
    m, _ = reach("primary", A, epoch=2)
    m.handle(PeerStateSeen(A, 2, "backup"))
    assert m.state is A


def test_peer_lost_and_back_alerts_and_publishing():
    m, clock = reach("primary", A)
    m.tick()
    clock.advance(INTERVAL)
    assert any(isinstance(a, PublishState) for a in m.tick())
    assert not any(isinstance(a, PublishState) for a in m.tick())
    clock.advance(INTERVAL)
    out = m.tick()
    assert alerts(out, "peer_lost") and any(isinstance(a, PublishState) for a in out)
    assert not alerts(m.tick(), "peer_lost")  # raised once
    out = m.handle(PeerStateSeen(S, 1, "backup"))
    assert [(a.name, a.resolved) for a in alerts(out)] == [("peer_lost", True), ("peer_back", False)]


def test_state_change_is_published_at_once():
    m, _ = reach("primary", P, peer_silent=True)
    out = m.handle(ClientVoted())
    assert any(isinstance(a, StateChanged) for a in out)
    assert PublishState(A, m.epoch) in out


def test_serving_changes_on_entering_and_leaving_active():
    m, _ = reach("primary", P, peer_silent=True)
    assert not m.accepts_clients
    assert serving(m.handle(ClientVoted())) == [True]
    assert serving(m.handle(ClientVoted())) == []  # once
    assert serving(m.handle(PeerStateSeen(A, 7, "backup"))) == [False]  # split brain, we yield
    assert m.state is S


# --- our own stall ----------------------------------------------------------------------------


def test_active_broker_after_a_stall_serves_nothing_until_it_hears_its_peer():
    m, clock = reach("primary", A)
    m.tick()
    clock.advance(3.0)  # SIGSTOP: neither heard nor spoke
    out = m.handle(Stalled(3.0))
    assert serving(out) == [False] and m.state is A and not m.accepts_clients
    m.handle(ClientVoted())
    assert not m.accepts_clients  # a client request is no reason to believe we are alone
    out = m.handle(PeerStateSeen(S, 1, "backup"))  # the peer stayed passive: carry on
    assert serving(out) == [True] and m.accepts_clients


def test_active_broker_after_a_stall_steps_down_when_the_peer_took_over():
    m, clock = reach("primary", A)
    m.tick()
    clock.advance(3.0)
    m.handle(Stalled(3.0))
    out = m.handle(PeerStateSeen(A, 2, "backup"))
    assert m.state is S and serving(out) == []  # never served in between
    assert [a.resolved for a in alerts(out, "split_brain")] == [False, True]


def test_active_broker_after_a_stall_serves_on_when_the_peer_stays_silent():
    m, clock = reach("primary", A)
    m.tick()
    clock.advance(3.0)
    m.handle(Stalled(3.0))
    clock.advance(PEER_TIMEOUT - 0.01)
    assert serving(m.tick()) == [] and not m.accepts_clients
    assert m.next_deadline() <= clock() + 0.01
    clock.advance(0.02)
    out = m.tick()
    assert serving(out) == [True] and m.accepts_clients and m.state is A


def test_a_short_stall_leaves_an_active_broker_serving():
    m, clock = reach("primary", A)
    m.tick()
    clock.advance(PEER_TIMEOUT * 0.6)
    assert serving(m.handle(Stalled(PEER_TIMEOUT * 0.6))) == [] and m.accepts_clients


def test_a_passive_broker_after_a_stall_does_not_take_its_backlog_for_votes():
    m, clock = reach("backup", S)
    clock.advance(5.0)  # stopped: the peer's state messages are not read yet
    m.handle(Stalled(5.0))
    m.handle(ClientVoted())
    assert m.state is S  # its own silence is no evidence that the peer is gone
    assert not alerts(m.tick(), "peer_lost")
    clock.advance(PEER_TIMEOUT)  # one more peer timeout and nothing heard: the peer is gone
    out = m.tick()
    assert alerts(out, "peer_lost")
    m.handle(ClientVoted())
    assert m.state is A


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_stalled_takes_any_number(seconds):
    m, _ = reach("primary", A)
    m.handle(Stalled(seconds))
    assert m.state is A
    m.tick()


# --- fencing through workers --------------------------------------------------------------


def test_higher_epoch_from_a_worker_steps_down_with_a_split_brain_alert():
    m, clock = reach("primary", A, epoch=1)
    out = m.handle(HigherEpochSeen(4))
    assert m.state is S and not m.accepts_clients
    assert [a.resolved for a in alerts(out, "split_brain")] == [False, True]
    assert serving(out) == [False]
    # a later takeover outbids the epoch it was fenced with
    clock.advance(3 * INTERVAL)
    m.handle(ClientVoted())
    assert m.state is A and m.epoch == 5


def test_a_fenced_broker_takes_no_vote_while_workers_see_the_other_serve():
    """The primary was cut off; the backup took over; the primary's workers and clients came
    back before its state link did. A worker fenced it; then its clients' calls from before the
    cut arrive, late: while workers report the backup active, they are no votes."""
    m, clock = reach("primary", A, epoch=1)
    m.handle(HigherEpochSeen(2))
    assert m.state is S and m.fenced
    for _ in range(12):  # 3 s: the state link is still cut, every worker reports each interval
        clock.advance(INTERVAL)
        m.handle(HigherEpochSeen(2))
        m.tick()
        assert m.handle(ClientVoted()) == [] and m.state is S
    # the backup dies: its workers close their links to it and report nothing active
    clock.advance(m.peer_timeout)
    m.tick()
    m.handle(ClientVoted())
    assert m.state is A and m.epoch == 3 and not m.fenced


def test_a_fenced_broker_that_hears_its_peer_again_follows_the_table():
    m, clock = reach("primary", A, epoch=1)
    m.handle(HigherEpochSeen(2))
    m.handle(PeerStateSeen(A, 2, "backup"))  # the state link works again
    assert not m.fenced
    clock.advance(m.peer_timeout)
    m.handle(HigherEpochSeen(2))  # the peer's own silence counts again, not the workers' word
    m.handle(ClientVoted())
    assert m.state is A and m.epoch == 3


def test_absurd_epochs_from_a_worker_are_ignored():
    m, _ = reach("primary", A, epoch=1)
    m.handle(HigherEpochSeen(MAX_EPOCH + 1))
    m.handle(HigherEpochSeen(-3))
    assert m.state is A


# --- misconfiguration --------------------------------------------------------------------


def test_two_primaries_raise_role_conflict_once_and_never_serve():
    m, clock = reach("primary", P)
    out = m.handle(PeerStateSeen(P, 0, "primary"))
    assert [(a.name, a.severity, a.resolved) for a in alerts(out)] == [("role_conflict", "critical", False)]
    assert "primary" in alerts(out)[0].detail["detail"]
    for _ in range(10):
        clock.advance(INTERVAL)
        assert not alerts(m.handle(PeerStateSeen(P, 0, "primary")), "role_conflict")
        m.handle(ClientVoted())
        assert m.state is P and not m.accepts_clients
    out = m.handle(PeerStateSeen(B, 0, "backup"))  # the peer was restarted with the right role
    assert [(a.name, a.resolved) for a in alerts(out)] == [("role_conflict", True)]
    assert m.state is A


def test_two_backups_raise_role_conflict_and_never_serve():
    m, clock = reach("backup", B)
    out = m.handle(PeerStateSeen(B, 0, "backup"))
    assert alerts(out, "role_conflict")
    clock.advance(5.0)
    m.handle(ClientVoted())
    assert m.state is B


def test_two_active_primaries_with_equal_epochs_settle_to_at_most_one():
    pair = Pair(roles=("primary", "primary"))
    pair.link = False
    pair.run(1.0)
    assert pair.vote(pair.p) and pair.vote(pair.b)  # cut off from each other, each served alone
    assert pair.p.epoch == pair.b.epoch
    pair.link = True
    pair.run(2.0)
    assert len(pair.serving()) <= 1  # whoever hears the other first yields; neither takes over again
    assert S in (pair.p.state, pair.b.state)
    assert not pair.vote(pair.p if pair.p.state is S else pair.b)
    assert {a.name for a in pair.alerts if not a.resolved} >= {"role_conflict"}


def test_two_primaries_seeing_each_other_active_at_once_both_yield_and_stay_passive():
    a, b = reach("primary", A), reach("primary", A)
    (ma, _), (mb, _) = a, b
    ma.handle(PeerStateSeen(A, 1, "primary"))
    mb.handle(PeerStateSeen(A, 1, "primary"))
    assert (ma.state, mb.state) == (S, S)
    ma.handle(PeerStateSeen(S, 1, "primary"))
    mb.handle(PeerStateSeen(S, 1, "primary"))
    assert (ma.state, mb.state) == (S, S)  # no primary to pick: an operator must fix the roles


# --- a backup alone ------------------------------------------------------------------------


def test_backup_that_never_hears_its_primary_says_so_and_still_never_serves():
    clock = FakeClock()
    m = BinaryStar("backup", clock, INTERVAL)
    wait = UNREACHABLE_TIMEOUTS * PEER_TIMEOUT
    clock.advance(wait - 0.01)
    assert not alerts(m.tick(), "peer_unreachable")
    clock.advance(0.02)
    out = m.tick()
    [alert] = alerts(out, "peer_unreachable")
    assert alert.severity == "warning" and not alert.resolved and "never serves alone" in alert.detail["detail"]
    clock.advance(wait)
    assert not alerts(m.tick(), "peer_unreachable")  # raised once
    m.handle(ClientVoted())
    assert m.state is B
    out = m.handle(PeerStateSeen(P, 0, "primary"))
    assert [(a.name, a.resolved) for a in alerts(out)] == [("peer_unreachable", True)]


def test_backup_alone_wakes_the_loop_for_its_alert():
    clock = FakeClock()
    m = BinaryStar("backup", clock, INTERVAL)
    m.tick()
    assert m.next_deadline() <= clock() + INTERVAL


def test_primary_alone_raises_no_peer_unreachable():
    clock = FakeClock()
    m = BinaryStar("primary", clock, INTERVAL)
    clock.advance(UNREACHABLE_TIMEOUTS * PEER_TIMEOUT * 2)
    assert not alerts(m.tick())


# --- the state link codec --------------------------------------------------------------------


def test_state_round_trips_with_the_role():
    for state in BStar:
        for role in ("primary", "backup"):
            assert decode_state(encode_state(state, 7, role)) == (state, 7, role)


@pytest.mark.parametrize("fields", [
    ["ZRPC1S", "active", 1],  # the role is missing
    ["ZRPC1S", "active", 1, "leader"],
    ["ZRPC1S", "active", 1, None],
    ["ZRPC1S", "active", -1, "primary"],
    ["ZRPC1S", "active", MAX_EPOCH + 1, "primary"],
    ["ZRPC1S", "active", True, "primary"],
    ["ZRPC1S", "awake", 1, "primary"],
    ["ZRPC1S", ["active"], 1, "primary"],
    ["ZRPC1S", {"a": 1}, 1, "primary"],
    [["ZRPC1S"], "active", 1, "primary"],
    ["ZRPC1C", "active", 1, "primary"],
])
def test_bad_state_messages_are_protocol_errors(fields):
    with pytest.raises(ProtocolError):
        decode_state([msgpack.packb(fields, use_bin_type=True)])


_leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                    st.text(max_size=10), st.binary(max_size=10),
                    st.sampled_from(["ZRPC1S", "active", "passive", "primary", "backup"]))
_values = st.recursive(_leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                       max_leaves=12)


def _packable(v):
    try:
        return msgpack.packb(v, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return msgpack.packb(None)


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=3))
def test_decode_state_raises_only_protocol_error_for_any_bytes(frames):
    try:
        decode_state(frames)
    except ProtocolError:
        pass


@settings(max_examples=400)
@given(st.lists(_values, max_size=6))
def test_decode_state_raises_only_protocol_error_for_any_msgpack(fields):
    try:
        state, epoch, role = decode_state([_packable(fields)])
    except ProtocolError:
        return
    assert isinstance(state, BStar) and 0 <= epoch <= MAX_EPOCH and role in ("primary", "backup")


# --- two machines, one link -----------------------------------------------------------------


class Pair:
    """Primary and backup on one fake clock; the state link can be cut and healed, in each
    direction. A machine that was down gets `Stalled` when it runs again, as the loop does."""

    def __init__(self, roles: tuple[str, str] = ("primary", "backup")) -> None:
        self.clock = FakeClock()
        self.p = BinaryStar(roles[0], self.clock, INTERVAL)
        self.b = BinaryStar(roles[1], self.clock, INTERVAL)
        self.link = True
        self.one_way: set[str] = set()  # "p->b" or "b->p": that direction is cut
        self.alerts: list[PeerAlert] = []
        self.down_since: dict[str, float] = {}

    def _feed(self, actions) -> None:
        self.alerts.extend(a for a in actions if isinstance(a, PeerAlert))

    def run(self, seconds: float, step: float = 0.05, down: set[str] = frozenset(),
            workers: bool = False) -> None:
        t = 0.0
        while t < seconds:
            self.clock.advance(step)
            t += step
            for me, peer, name, peer_name in ((self.p, self.b, "p", "b"), (self.b, self.p, "b", "p")):
                if name in down:
                    self.down_since.setdefault(name, self.clock())
                    continue
                if name in self.down_since:
                    self._feed(me.handle(Stalled(self.clock() - self.down_since.pop(name))))
                for a in me.tick():
                    self._feed([a])
                    if (isinstance(a, PublishState) and self.link and peer_name not in down
                            and f"{name}->{peer_name}" not in self.one_way):
                        self._feed(peer.handle(PeerStateSeen(a.state, a.epoch, me.role)))
            if workers:  # a worker hears both brokers' announcements and reports to each
                live = [m for m, n in ((self.p, "p"), (self.b, "b")) if n not in down]
                active = max((m.epoch for m in live if m.state is A), default=0)
                for m in live:
                    self._feed(m.handle(HigherEpochSeen(active)))

    def vote(self, m: BinaryStar) -> bool:
        self._feed(m.handle(ClientVoted()))
        return m.accepts_clients

    def serving(self) -> list[BinaryStar]:
        return [m for m in (self.p, self.b) if m.accepts_clients]


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
    pair.p = BinaryStar("primary", pair.clock, INTERVAL)  # restarted
    pair.down_since.pop("p")
    pair.run(1.0)
    assert (pair.p.state, pair.b.state) == (S, A)
    # and a second failover back works
    pair.run(1.0, down={"b"})
    assert pair.vote(pair.p) and pair.p.epoch == 3


def test_stopped_primary_resumes_and_steps_down_without_serving_first():
    pair = Pair()
    pair.run(1.0)
    pair.run(1.0, down={"p"})  # SIGSTOP: the primary neither publishes nor hears
    assert pair.vote(pair.b)
    pair.clock.advance(0.01)
    pair._feed(pair.p.handle(Stalled(1.0)))  # SIGCONT: the loop notices its own stall first
    pair.down_since.pop("p")
    assert not pair.vote(pair.p)  # its backlog of client requests is not served
    pair.run(0.5)
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


def test_one_way_link_the_deaf_active_steps_down_through_workers():
    pair = Pair()
    pair.run(1.0)
    pair.one_way = {"b->p"}  # the primary cannot hear the backup any more
    pair.run(1.0, down={"p"}, workers=True)  # the primary stalls; a client votes on the backup
    assert pair.vote(pair.b) and pair.b.epoch == 2
    pair.run(2.0, workers=True)
    assert pair.serving() == [pair.b]
    assert ("split_brain", True) in [(a.name, a.resolved) for a in pair.alerts]


def test_one_way_link_without_workers_leaves_two_actives():
    """What the worker reports are for: the link alone cannot settle this case."""
    pair = Pair()
    pair.run(1.0)
    pair.one_way = {"b->p"}
    pair.run(1.0, down={"p"})
    assert pair.vote(pair.b)
    pair.run(2.0)
    assert len(pair.serving()) == 2


def test_a_loop_that_stalls_over_and_over_still_finds_its_peer_gone():
    m, clock = reach("backup", S)
    for _ in range(10):
        clock.advance(0.4)
        m.handle(Stalled(0.4))
        m.tick()
    assert not m.peer_alive
    m.handle(ClientVoted())
    assert m.state is A  # failover is not postponed for ever


def test_an_active_broker_that_stalls_over_and_over_still_serves():
    m, clock = reach("primary", A)
    m.tick()
    for _ in range(10):
        clock.advance(0.6)
        m.handle(Stalled(0.6))
        m.tick()
    assert m.accepts_clients  # one doubt, then the silent peer is not waited for again


# --- invariants under any sequence of events ------------------------------------------------


class Link:
    """Two machines and the state messages in flight between them, which the test delivers
    late, out of order or never; a worker's report and a restart may come at any time."""

    def __init__(self, roles: tuple[str, str]) -> None:
        self.clock = FakeClock()
        self.roles = roles
        self.m = [BinaryStar(roles[0], self.clock, INTERVAL), BinaryStar(roles[1], self.clock, INTERVAL)]
        self.inbox: list[list[PublishState]] = [[], []]  # messages on their way to m[i]
        self.epochs = [0, 0]

    def _out(self, i: int, actions) -> None:
        self.inbox[1 - i].extend(a for a in actions if isinstance(a, PublishState))

    def step(self, op: str, i: int, n: int) -> None:
        m = self.m[i]
        if op == "advance":
            self.clock.advance(n * 0.1)
        elif op == "tick":
            self._out(i, m.tick())
        elif op == "vote":
            self._out(i, m.handle(ClientVoted()))
        elif op == "stall":
            self.clock.advance(n * 0.1)
            self._out(i, m.handle(Stalled(n * 0.1)))
        elif op == "deliver" and self.inbox[i]:
            msg = self.inbox[i].pop(n % len(self.inbox[i]))
            self._out(i, m.handle(PeerStateSeen(msg.state, msg.epoch, self.roles[1 - i])))
        elif op == "drop" and self.inbox[i]:
            self.inbox[i].pop(n % len(self.inbox[i]))
        elif op == "worker":  # what a worker saw the other announce, or something it misread
            other = self.m[1 - i]
            self._out(i, m.handle(HigherEpochSeen(other.epoch if other.state is A else n)))
        elif op == "run":
            self.run(n)
        elif op == "restart":
            self.m[i] = BinaryStar(self.roles[i], self.clock, INTERVAL)
            self.inbox[i].clear()
            self.epochs[i] = 0

    def run(self, rounds: int) -> None:
        """Both run for a while on a working link: every message delivered at once."""
        for _ in range(rounds):
            self.clock.advance(0.05)
            for i in (0, 1):
                self._out(i, self.m[i].tick())
                while self.inbox[0] or self.inbox[1]:
                    for j in (0, 1):
                        while self.inbox[j]:
                            msg = self.inbox[j].pop(0)
                            self._out(j, self.m[j].handle(PeerStateSeen(msg.state, msg.epoch, self.roles[1 - j])))
                    self.check()

    def see_each_other(self) -> bool:
        a, b = self.m
        return (a.peer_state, a.peer_epoch) == (b.state, b.epoch) and (b.peer_state, b.peer_epoch) == (a.state, a.epoch)

    def check(self) -> None:
        for i, m in enumerate(self.m):
            assert m.epoch >= self.epochs[i], "an epoch went down"
            self.epochs[i] = m.epoch
        if self.see_each_other():
            assert [m.state for m in self.m].count(A) <= 1, self.m


OPS = ["advance", "advance", "tick", "vote", "vote", "stall", "deliver", "deliver", "drop", "worker",
       "restart", "run"]
"""Sampled uniformly: time passing, votes and deliveries come most often, as they do."""


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([("primary", "backup"), ("primary", "primary"), ("backup", "backup")]),
       st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1), st.integers(0, 12)), min_size=5, max_size=60))
def test_any_sequence_of_events_keeps_the_invariants(roles, steps):
    """Epochs never decrease; while each knows the other's current state and epoch, at most
    one is ACTIVE (however late, reordered or lost the state messages between them were)."""
    link = Link(roles)
    for op, i, n in steps:
        link.step(op, i, n)
        link.check()
    link.run(40)  # the link heals: they come to know each other
    assert link.see_each_other()
    assert [m.state for m in link.m].count(A) <= 1


def test_a_replayed_old_state_after_a_healed_cut_changes_nothing():
    """The backup took over while the primary was cut off; a worker told the primary, which
    stood down. When the link heals, the backup's messages from during the cut arrive first,
    oldest first: its PASSIVE of epoch 1 is history, not a second broker standing by."""
    m, clock = reach("primary", A, epoch=1)
    out = m.handle(HigherEpochSeen(2))  # a worker sees the backup active with epoch 2
    assert m.state is S and m.epoch == 2 and not m.accepts_clients
    for _ in range(3):  # the replay: what the backup published during the cut
        out += m.handle(PeerStateSeen(S, 1, "backup"))
        clock.advance(0.01)
    out += m.handle(PeerStateSeen(A, 2, "backup"))  # and what it says now
    assert m.state is S and m.epoch == 2 and not m.accepts_clients
    assert (m.peer_state, m.peer_epoch) == (A, 2)
    assert [a.new for a in out if isinstance(a, StateChanged)] == [S]  # the step down only


def test_a_peer_that_goes_on_with_a_lower_epoch_is_believed_after_a_peer_timeout():
    """An epoch too high for either broker (a worker's garbage within range) must not make
    the peer's real news stale for good: two passive brokers still settle."""
    m, clock = reach("primary", S, epoch=1)
    m.handle(HigherEpochSeen(90))  # not the peer's: it is passive at 1
    assert m.state is S
    for _ in range(int(PEER_TIMEOUT / 0.1)):
        m.handle(PeerStateSeen(S, 1, "backup"))
        assert m.state is S
        clock.advance(0.1)
    m.handle(PeerStateSeen(S, 1, "backup"))
    assert m.state is A and m.epoch == 91  # dual_passive: the primary takes over, above all
