"""The election core (broker/_core/_election.py) on fake clocks: its rules one by one, clocks
running fast or slow against etcd's, and random schedules of two or three candidates over one
fake etcd (a linearizable store with leases on its own clock), where no two candidates may
ever serve at once."""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zrpc._core._frames import (
    WORKER,
    ClientReply,
    ClientRequest,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, pack_error
from zrpc._io._internal import InternalErrors
from zrpc.broker._config import BrokerConfig
from zrpc.broker._core._broker import BrokerCore, Publish, Send, SendCall, ToElection
from zrpc.broker._core._election import (
    RENEWALS,
    Alert,
    Campaign,
    Campaigned,
    Election,
    EpochSeen,
    ExchangeFailed,
    Grant,
    KeyCreated,
    KeyDeleted,
    LeaseGone,
    LeaseGranted,
    LeaseRenewed,
    Phase,
    RefusedByWorker,
    Renew,
    Revoke,
    ServingChanged,
    WatchEnded,
    WatchKey,
    election_key,
)
from zrpc.testing import FakeClock

TTL = 3
MARGIN = 0.2
KEY = election_key("zrpc")


def me(name: str, role: str = "primary") -> dict[str, Any]:
    return {"name": name, "frontend": f"tcp://{name}:1", "role": role}


def value(name: str, role: str = "primary") -> bytes:
    return json.dumps({**me(name, role)}).encode()


def of(out: list[Any], kind: type) -> list[Any]:
    return [o for o in out if isinstance(o, kind)]


def one(out: list[Any], kind: type) -> Any:
    found = of(out, kind)
    assert len(found) == 1, (kind.__name__, out)
    return found[0]


def alerts(out: list[Any]) -> list[tuple[str, str]]:
    return [(a.name, a.state) for a in of(out, Alert)]


def make(role: str = "primary", clock: FakeClock | None = None, **kw: Any) -> tuple[Election, FakeClock]:
    clock = clock or FakeClock()
    return Election(clock, me("b1", role), role=role, ttl=TTL, margin=MARGIN, **kw), clock


def elected(role: str = "primary", epoch: int = 7, **kw: Any) -> tuple[Election, FakeClock, list[Any]]:
    """A candidate that got lease 100 and won the key with `epoch`."""
    e, clock = make(role, **kw)
    grant = one(e.start(), Grant)
    out = e.handle(LeaseGranted(grant.seq, 100, TTL))
    if role == "backup":
        clock.advance(e._defer)
        out = e.tick()
    camp = one(out, Campaign)
    out = e.handle(Campaigned(camp.seq, True, epoch, 100, camp.value.encode(), epoch))
    return e, clock, out


# --- the rules, one by one -------------------------------------------------------------------


def test_start_asks_for_a_lease_and_a_primary_campaigns_as_soon_as_it_has_one():
    e, clock = make()
    out = e.start()
    assert out == [Grant(1, TTL)] and e.phase is Phase.GRANTING and not e.decided
    out = e.handle(LeaseGranted(1, 100, TTL))
    camp = one(out, Campaign)
    assert camp.key == KEY and camp.lease == 100
    assert json.loads(camp.value)["role"] == "primary"
    assert e.phase is Phase.CAMPAIGNING and not e.accepts_clients


def test_a_backup_lets_the_primary_try_first():
    e, clock = make("backup")
    out = e.handle(LeaseGranted(one(e.start(), Grant).seq, 100, TTL))
    assert of(out, Campaign) == []
    assert e.next_deadline() == pytest.approx(clock() + e._defer)
    clock.advance(e._defer - 0.01)
    assert of(e.tick(), Campaign) == []
    clock.advance(0.01)
    assert len(of(e.tick(), Campaign)) == 1


def test_a_won_campaign_serves_with_the_keys_create_revision_as_epoch_and_watches_after_it():
    e, clock, out = elected(epoch=42)
    assert one(out, ServingChanged).serving is True
    assert e.accepts_clients and e.epoch == 42 and e.phase is Phase.ACTIVE and e.holding
    watch = one(out, WatchKey)
    assert watch.key == KEY and watch.start_revision == 43
    assert alerts(out) == []  # the first holder: no failover
    snap = e.snapshot()
    assert snap["holder"] == "tcp://b1:1" and snap["epoch"] == 42 and snap["state"] == "active"
    assert snap["lease_left_s"] == TTL


def test_a_lost_campaign_names_the_holder_and_waits_passive():
    e, clock = make("backup")
    e.handle(LeaseGranted(one(e.start(), Grant).seq, 100, TTL))
    clock.advance(1)
    camp = one(e.tick(), Campaign)
    out = e.handle(Campaigned(camp.seq, False, 5, 200, value("b0"), 9))
    assert of(out, ServingChanged) == [] and not e.accepts_clients
    assert e.phase is Phase.PASSIVE and e.epoch == 5 and e.holder == me("b0")
    assert one(out, WatchKey).start_revision == 10
    assert e.snapshot()["holder"] == "tcp://b0:1"
    # rule 3: a passive candidate asks again every `recheck` (a watch can hear nothing)
    clock.advance(TTL)
    assert len(of(e.tick(), Campaign)) == 1


def test_renewals_go_every_quarter_ttl_counted_from_when_the_last_one_was_sent():
    e, clock, _ = elected()
    start = clock()
    clock.advance(TTL / RENEWALS - 0.001)
    assert of(e.tick(), Renew) == []
    clock.advance(0.001)
    renew = one(e.tick(), Renew)
    sent = clock()
    clock.advance(0.4)  # a slow answer
    e.handle(LeaseRenewed(renew.seq, 100, TTL))
    assert e.fence_at == pytest.approx(sent + TTL * (1 - MARGIN))  # from the send, not the answer
    assert e.next_deadline() == pytest.approx(sent + TTL / RENEWALS)
    assert start < sent


@pytest.mark.parametrize("answered_after", [0.0, 1.0, 2.3])
def test_the_holder_stops_serving_at_ttl_less_the_margin_after_its_last_good_renewal_was_sent(
        answered_after):
    e, clock, _ = elected()
    clock.advance(TTL / RENEWALS)
    renew = one(e.tick(), Renew)
    sent = clock()
    clock.advance(answered_after)
    e.handle(LeaseRenewed(renew.seq, 100, TTL))
    fence = sent + TTL * (1 - MARGIN)
    # every later renewal fails: etcd is cut off
    while clock() < fence - 0.05:
        for a in e.tick():
            if isinstance(a, Renew):
                e.handle(ExchangeFailed(a.seq, "renew", "cannot connect"))
        assert e.accepts_clients
        clock.advance(0.05)
    clock.advance(fence - clock())
    assert not e.accepts_clients  # at once, on the clock, before any tick
    out = e.tick()
    assert one(out, ServingChanged).serving is False
    assert ("lease_lost", "raised") in alerts(out)
    assert e.phase is Phase.FENCED and e.holding  # it may still hold the key: it does not know


def test_a_renewal_answered_after_the_fence_proves_the_lease_lived_and_serving_resumes():
    e, clock, _ = elected()
    clock.advance(TTL / RENEWALS)
    renew = one(e.tick(), Renew)
    e.handle(ExchangeFailed(renew.seq, "renew", "no answer in time"))
    clock.advance(TTL)  # long past the fence
    out = e.tick()
    assert ("lease_lost", "raised") in alerts(out) and not e.accepts_clients
    renew = one(out, Renew) if of(out, Renew) else one(e.tick(), Renew)
    out = e.handle(LeaseRenewed(renew.seq, 100, TTL))
    assert ("lease_lost", "resolved") in alerts(out)
    assert one(out, ServingChanged).serving is True and e.epoch == 7


def test_lease_gone_ends_the_term_and_a_new_lease_campaigns_again():
    e, clock, _ = elected()
    clock.advance(TTL / RENEWALS)
    renew = one(e.tick(), Renew)
    out = e.handle(LeaseGone(renew.seq, 100))
    assert one(out, ServingChanged).serving is False and not e.holding
    assert ("lease_lost", "raised") in alerts(out)
    grant = one(out, Grant)
    out = e.handle(LeaseGranted(grant.seq, 101, TTL))
    assert ("lease_lost", "resolved") in alerts(out)
    camp = one(out, Campaign)
    assert camp.lease == 101


def test_a_campaign_whose_answer_was_lost_finds_on_asking_again_that_it_won():
    e, clock = make()
    camp = one(e.handle(LeaseGranted(one(e.start(), Grant).seq, 100, TTL)), Campaign)
    e.handle(ExchangeFailed(camp.seq, "campaign", "no answer in time"))
    assert not e.accepts_clients
    clock.advance(e._retry)
    camp = one(e.tick(), Campaign)
    out = e.handle(Campaigned(camp.seq, False, 12, 100, camp.value.encode(), 12))  # on our lease
    assert e.accepts_clients and e.epoch == 12 and one(out, ServingChanged).serving


@pytest.mark.parametrize("my_role, gone_role, defers", [
    ("primary", "backup", False), ("primary", "primary", False),
    ("backup", "primary", False), ("backup", "backup", True)])
def test_a_vacancy_is_raced_at_once_but_a_backup_lets_a_primary_go_first(my_role, gone_role, defers):
    e, clock = make(my_role)
    e.handle(LeaseGranted(one(e.start(), Grant).seq, 100, TTL))
    clock.advance(1)
    camp = (of(e.tick(), Campaign) or [None])[0]
    if camp is None:
        camp = e._key_seq and Campaign(e._key_seq, KEY, "", 100)
    assert camp
    out = e.handle(Campaigned(camp.seq, False, 5, 200, value("b0", gone_role), 9))
    watch = one(out, WatchKey)
    out = e.handle(KeyDeleted(watch.seq, 11))
    assert e.phase is Phase.CAMPAIGNING and e.holder is None
    if defers:
        assert of(out, Campaign) == []
        clock.advance(e._defer)
        out = e.tick()
    camp = one(out, Campaign)
    out = e.handle(Campaigned(camp.seq, True, 12, 100, camp.value.encode(), 12))
    assert e.accepts_clients
    failover = [a for a in of(out, Alert) if a.name == "failover"]
    assert failover and failover[0].detail["from"] == "tcp://b0:1" and failover[0].detail["epoch"] == 12


def test_the_key_deleted_under_the_holder_ends_its_term_at_once():
    e, clock, out = elected()
    watch = one(out, WatchKey)
    out = e.handle(KeyDeleted(watch.seq, 9))
    assert one(out, ServingChanged).serving is False
    assert ("lease_lost", "raised") in alerts(out)
    assert len(of(out, Campaign)) == 1  # a primary campaigns again at once


def test_the_key_created_by_another_after_ours_makes_the_holder_step_down():
    e, clock, out = elected(epoch=7)
    watch = one(out, WatchKey)
    out = e.handle(KeyCreated(watch.seq, 20, 300, value("b9"), 20))
    assert one(out, ServingChanged).serving is False and e.epoch == 20 and e.phase is Phase.PASSIVE


def test_stale_answers_and_watch_events_change_nothing():
    e, clock, out = elected(epoch=7)
    watch = one(out, WatchKey)
    assert e.handle(KeyDeleted(watch.seq + 99, 100)) == []  # another watch
    assert e.handle(KeyDeleted(watch.seq, 7)) == []  # at or before what the campaign said
    assert e.handle(KeyCreated(watch.seq, 3, 300, value("b9"), 5)) == []
    assert e.handle(LeaseRenewed(999, 100, TTL)) == []  # no such exchange in flight
    assert e.handle(Campaigned(999, False, 50, 300, value("b9"), 50)) == []
    assert e.accepts_clients and e.epoch == 7


@pytest.mark.parametrize("epoch, steps_down", [(6, False), (7, False), (8, True), (2**70, False)])
def test_a_higher_epoch_heard_from_a_worker_makes_the_holder_step_down_and_ask(epoch, steps_down):
    e, clock, _ = elected(epoch=7)
    out = e.handle(EpochSeen(epoch))
    assert (of(out, ServingChanged) == [ServingChanged(False, of(out, ServingChanged)[0].reason)]
            if steps_down else of(out, ServingChanged) == [])
    assert e.accepts_clients is not steps_down
    assert bool(of(out, Campaign)) is steps_down
    assert ("lease_lost", "raised") not in alerts(out)  # the lease is fine: another holds the role


def test_a_worker_refusing_our_epoch_makes_us_step_down_and_the_campaign_decides():
    e, clock, _ = elected(epoch=7)
    out = e.handle(RefusedByWorker("w1"))
    assert not e.accepts_clients
    camp = one(out, Campaign)
    out = e.handle(Campaigned(camp.seq, False, 9, 300, value("b2"), 9))
    assert e.phase is Phase.PASSIVE and e.epoch == 9


def test_a_watch_that_ends_is_followed_by_a_campaign_and_a_new_watch():
    e, clock, out = elected()
    watch = one(out, WatchKey)
    e.handle(WatchEnded(watch.seq, "the stream ended"))
    clock.advance(e._retry)
    camp = one(e.tick(), Campaign)
    out = e.handle(Campaigned(camp.seq, False, 7, 100, camp.value.encode(), 30))
    assert one(out, WatchKey).start_revision == 31 and e.accepts_clients


def test_etcd_unreachable_is_raised_on_a_failure_and_resolved_by_the_next_answer():
    e, clock, _ = elected()
    clock.advance(TTL / RENEWALS)
    renew = one(e.tick(), Renew)
    out = e.handle(ExchangeFailed(renew.seq, "renew", "cannot connect"))
    assert alerts(out) == [("etcd_unreachable", "raised")] and not e.etcd_reachable
    clock.advance(e._retry)
    renew = one(e.tick(), Renew)
    out = e.handle(LeaseRenewed(renew.seq, 100, TTL))
    assert alerts(out) == [("etcd_unreachable", "resolved")]


def test_stop_stops_serving_revokes_the_lease_and_ignores_what_follows():
    e, clock, out = elected()
    out = e.stop()
    assert one(out, ServingChanged).serving is False and one(out, Revoke).lease == 100
    assert e.phase is Phase.STOPPED and e.next_deadline() is None
    assert e.handle(LeaseRenewed(1, 100, TTL)) == [] and e.tick() == [] and e.stop() == []


def test_failover_is_resolved_when_the_holder_steps_down():
    e, clock = make()
    camp = one(e.handle(LeaseGranted(one(e.start(), Grant).seq, 100, TTL)), Campaign)
    out = e.handle(Campaigned(camp.seq, False, 5, 200, value("b0"), 5))
    watch = one(out, WatchKey)
    camp = one(e.handle(KeyDeleted(watch.seq, 6)), Campaign)
    out = e.handle(Campaigned(camp.seq, True, 7, 100, camp.value.encode(), 7))
    assert ("failover", "raised") in alerts(out)
    out = e.handle(EpochSeen(9))
    assert ("failover", "resolved") in alerts(out)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Election(FakeClock(), me("b1"), role="leader")
    with pytest.raises(ValueError):
        Election(FakeClock(), me("b1"), ttl=0)
    with pytest.raises(ValueError):
        Election(FakeClock(), me("b1"), margin=1.5)


# --- a fake etcd, and candidates whose clocks drift ---------------------------------------------


class RealTime:
    """Real time: the one clock every other is a rate of."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, dt: float) -> None:
        assert dt >= 0
        self.now += dt


class RateClock:
    """A monotonic clock running at `rate` x real time (1.1: 10 % fast)."""

    def __init__(self, real: RealTime, rate: float, start: float = 500.0) -> None:
        self.real, self.rate, self.base, self.start = real, rate, real.now, start

    def __call__(self) -> float:
        return self.start + (self.real.now - self.base) * self.rate


@dataclass
class Stored:
    value: bytes
    lease: int
    create: int
    mod: int


@dataclass
class Watcher:
    owner: int
    seq: int
    start: int


class FakeEtcd:
    """One etcd: a linearizable store of keys with leases that expire on etcd's own clock, a
    history of changes for watches."""

    def __init__(self, real: RealTime, rate: float = 1.0) -> None:
        self.clock = RateClock(real, rate, start=0.0)
        self.real = real
        self.revision = 1
        self.leases: dict[int, float] = {}  # id -> expiry on etcd's clock
        self.kv: dict[str, Stored] = {}
        self.history: list[tuple[int, str, Stored | None]] = []  # (revision, key, None: deleted)
        self.watchers: list[Watcher] = []
        self.delivered: list[tuple[int, int, object]] = []  # (owner, watch seq, event) to hand out
        self._next_lease = 100

    def lease_valid(self, lease: int) -> bool:
        self.expire()
        return lease in self.leases

    def expire(self) -> None:
        now = self.clock()
        for lease, at in sorted(self.leases.items()):
            if now >= at:
                self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        self.leases.pop(lease, None)
        for key in [k for k, s in self.kv.items() if s.lease == lease]:
            self.revision += 1
            del self.kv[key]
            self._changed(key, None)

    def _changed(self, key: str, stored: Stored | None) -> None:
        self.history.append((self.revision, key, stored))
        for w in self.watchers:
            self.delivered.append((w.owner, w.seq, self._event(w.seq, self.revision, stored)))

    @staticmethod
    def _event(seq: int, revision: int, stored: Stored | None) -> object:
        if stored is None:
            return KeyDeleted(seq, revision)
        return KeyCreated(seq, stored.create, stored.lease, stored.value, stored.mod)

    def apply(self, owner: int, a: object) -> object | None:
        """Carries out one request now; its answer (None: none is due)."""
        self.expire()
        if isinstance(a, Grant):
            self._next_lease += 1
            self.leases[self._next_lease] = self.clock() + a.ttl
            return LeaseGranted(a.seq, self._next_lease, a.ttl)
        if isinstance(a, Renew):
            if a.lease not in self.leases:
                return LeaseGone(a.seq, a.lease)
            self.leases[a.lease] = self.clock() + TTL
            return LeaseRenewed(a.seq, a.lease, TTL)
        if isinstance(a, Campaign):
            if a.lease not in self.leases:
                return LeaseGone(a.seq, a.lease)
            s = self.kv.get(a.key)
            if s is None:
                self.revision += 1
                s = self.kv[a.key] = Stored(a.value.encode(), a.lease, self.revision, self.revision)
                self._changed(a.key, s)
                return Campaigned(a.seq, True, s.create, s.lease, s.value, self.revision)
            return Campaigned(a.seq, False, s.create, s.lease, s.value, self.revision)
        if isinstance(a, WatchKey):
            self.watchers = [w for w in self.watchers if w.owner != owner]
            self.watchers.append(Watcher(owner, a.seq, a.start_revision))
            for rev, key, stored in self.history:
                if rev >= a.start_revision and key == a.key:
                    self.delivered.append((owner, a.seq, self._event(a.seq, rev, stored)))
            return None
        if isinstance(a, Revoke):
            self._revoke(a.lease)
            return None
        raise TypeError(a)

    def holder_lease(self) -> int | None:
        self.expire()
        s = self.kv.get(KEY)
        return None if s is None else s.lease


@dataclass
class Node:
    """One candidate broker and its edge: requests on their way to etcd (in order, one thread),
    answers on their way back, watch events on theirs."""

    index: int
    core: Election
    clock: RateClock
    requests: deque[object] = field(default_factory=deque)
    answers: deque[object] = field(default_factory=deque)
    events: deque[object] = field(default_factory=deque)
    up: bool = True
    paused: bool = False
    epochs: list[int] = field(default_factory=list)

    def take(self, out: list[Any]) -> None:
        for o in out:
            if isinstance(o, (Grant, Renew, Campaign, WatchKey, Revoke)):
                self.requests.append(o)


def candidate(real: RealTime, i: int, rate: float, role: str) -> Node:
    clock = RateClock(real, rate)
    core = Election(clock, me(f"b{i}", role), role=role, ttl=TTL, margin=MARGIN)
    node = Node(i, core, clock)
    node.take(core.start())
    return node


# --- clocks that drift ---------------------------------------------------------------------------


@pytest.mark.parametrize("local_rate", [0.9, 1.0, 1.1])
@pytest.mark.parametrize("etcd_rate", [0.9, 1.0, 1.1])
@pytest.mark.parametrize("answer_delay", [0.0, 0.3, 1.5])
def test_with_clocks_ten_percent_off_the_holder_stops_serving_before_etcd_can_expire_its_lease(
        local_rate, etcd_rate, answer_delay):
    """Cut off from etcd right after a renewal (answered late, or at once), a holder whose clock
    runs 10 % slow or fast, beside an etcd whose clock does too, stops serving before the lease
    can expire there (real time), and well before it could be given to another candidate."""
    real = RealTime()
    etcd = FakeEtcd(real, etcd_rate)
    node = candidate(real, 0, local_rate, "primary")
    core = node.core
    # run normally for a while: every request processed at once, answered after `answer_delay`
    while real.now < 5.0:
        _pump(etcd, node, answer_delay)
        node.take(core.tick())
        real.advance(0.01)
    assert core.accepts_clients
    while True:  # the next renewal to go out is the last one etcd gets
        node.take(core.tick())
        renewal = next((r for r in node.requests if isinstance(r, Renew)), None)
        if renewal is not None:
            break
        _pump(etcd, node, answer_delay)
        real.advance(0.01)
    node.requests.remove(renewal)
    answer = etcd.apply(0, renewal)  # the last renewal etcd ever gets from us
    lease = renewal.lease
    real.advance(answer_delay)
    node.take(core.handle(answer))
    stopped_at: float | None = None
    while etcd.lease_valid(lease):
        for r in list(node.requests):  # nothing gets through any more
            node.requests.remove(r)
            if not isinstance(r, (WatchKey, Revoke)):
                node.take(core.handle(ExchangeFailed(r.seq, "x", "cut off")))
        node.take(core.tick())
        if stopped_at is None and not core.accepts_clients:
            stopped_at = real.now
        real.advance(0.005)
    expired_at = real.now
    assert stopped_at is not None, "still serving when etcd expired the lease"
    assert stopped_at < expired_at
    print(f"local x{local_rate} etcd x{etcd_rate}: stopped {expired_at - stopped_at:.2f}s before expiry")


def _pump(etcd: FakeEtcd, node: Node, delay: float) -> None:
    """Every request carried out at once; answers handed back `delay` later (approximated by
    handing them back on a later pump once that much real time has passed)."""
    now = etcd.real.now
    while node.requests:
        r = node.requests.popleft()
        a = etcd.apply(node.index, r)
        if a is not None:
            node.answers.append((now + delay, a))
    while node.answers and node.answers[0][0] <= now:
        _, a = node.answers.popleft()
        node.take(node.core.handle(a))
    for owner, seq, ev in list(etcd.delivered):
        if owner == node.index:
            etcd.delivered.remove((owner, seq, ev))
            node.take(node.core.handle(ev))


# --- random schedules: two or three candidates, one etcd ----------------------------------------


class ElectionMachine(RuleBasedStateMachine):
    """Candidates with drifting clocks over one fake etcd; the network between them delays,
    loses and reorders nothing it may not: each edge answers its exchanges in order, every
    exchange once (an answer, or a failure: then etcd may or may not have carried it out),
    watch events in order but at any pace, and a watch may end. Candidates are killed and
    restarted, paused (SIGSTOP) and resumed, told of epochs by workers."""

    @initialize(n=st.integers(2, 3), rates=st.lists(st.sampled_from([0.9, 0.95, 1.0, 1.05, 1.1]),
                                                    min_size=4, max_size=4))
    def start(self, n: int, rates: list[float]) -> None:
        self.real = RealTime()
        self.etcd = FakeEtcd(self.real, rates[3])
        self.rates = rates
        self.nodes = [candidate(self.real, i, rates[i], "primary" if i == 0 else "backup")
                      for i in range(n)]
        self.boots = n
        self.terms: list[tuple[int, int]] = []  # (epoch, node) in the order terms began

    def _node(self, i: int) -> Node:
        return self.nodes[i % len(self.nodes)]

    @rule(dt=st.one_of(st.sampled_from([0.01, 0.1, 0.25, 0.5, 1.0]), st.floats(0.001, 1.2)))
    def time_passes(self, dt: float) -> None:
        self.real.advance(dt)
        self.etcd.expire()
        for node in self.nodes:
            if node.up and not node.paused:
                node.take(node.core.tick())

    @rule(before=st.booleans())
    def time_passes_to_the_edge_of_a_lease(self, before: bool) -> None:
        """To just after the first lease etcd will expire, or just before a holder's fence:
        the moments the invariants are about."""
        edges: list[float] = []
        if before:
            for n in self.nodes:
                if n.up and n.core.accepts_clients:
                    edges.append((n.core.fence_at - n.clock()) / n.clock.rate - 1e-6)
        elif self.etcd.leases:
            edges.append((min(self.etcd.leases.values()) - self.etcd.clock()) / self.etcd.clock.rate + 1e-6)
        if edges and min(edges) > 0:
            self.real.advance(min(edges))
            self.etcd.expire()

    @rule(i=st.integers(0, 2))
    def etcd_carries_out_a_request(self, i: int) -> None:
        node = self._node(i)
        if node.requests:
            answer = self.etcd.apply(node.index, node.requests.popleft())
            if answer is not None:
                node.answers.append(answer)

    @rule(i=st.integers(0, 2), carried_out=st.booleans())
    def a_request_fails(self, i: int, carried_out: bool) -> None:
        node = self._node(i)
        if not node.requests:
            return
        r = node.requests.popleft()
        if isinstance(r, Revoke):
            return
        if isinstance(r, WatchKey):  # the watch would not start
            node.answers.append(ExchangeFailed(r.seq, "watch", "cannot connect"))
            return
        if carried_out:
            self.etcd.apply(node.index, r)  # the answer is lost: the edge says it failed
        node.answers.append(ExchangeFailed(r.seq, type(r).__name__.lower(), "no answer in time"))

    @rule(i=st.integers(0, 2))
    def an_answer_arrives(self, i: int) -> None:
        node = self._node(i)
        if node.answers and node.up and not node.paused:
            node.take(node.core.handle(node.answers.popleft()))

    @rule(i=st.integers(0, 2))
    def a_watch_event_arrives(self, i: int) -> None:
        node = self._node(i)
        if not node.up or node.paused:
            return
        for k, (owner, _seq, ev) in enumerate(self.etcd.delivered):
            if owner == node.index:
                del self.etcd.delivered[k]
                node.take(node.core.handle(ev))
                return

    @rule(i=st.integers(0, 2))
    def a_watch_ends(self, i: int) -> None:
        node = self._node(i)
        w = next((w for w in self.etcd.watchers if w.owner == node.index), None)
        if w is None or not node.up or node.paused:
            return
        self.etcd.watchers.remove(w)
        self.etcd.delivered = [d for d in self.etcd.delivered if d[0] != node.index]
        node.take(node.core.handle(WatchEnded(w.seq, "the stream ended")))

    @rule(i=st.integers(0, 2), epoch=st.integers(0, 50))
    def a_worker_reports_an_epoch(self, i: int, epoch: int) -> None:
        node = self._node(i)
        if node.up and not node.paused:
            node.take(node.core.handle(EpochSeen(epoch)))

    @rule(i=st.integers(0, 2))
    def a_worker_refuses_our_epoch(self, i: int) -> None:
        """Only ever true when a newer holder exists: a worker saw its epoch."""
        node = self._node(i)
        if node.up and not node.paused and node.core.holding and any(
                e > node.core.epoch for e, _ in self.terms):
            node.take(node.core.handle(RefusedByWorker("w")))

    @rule(i=st.integers(0, 2), clean=st.booleans())
    def a_candidate_dies(self, i: int, clean: bool) -> None:
        node = self._node(i)
        if not node.up:
            return
        if clean and not node.paused:
            for r in node.core.stop():
                if isinstance(r, Revoke):
                    self.etcd.apply(node.index, r)
        node.up = False
        node.paused = False
        node.requests.clear()
        node.answers.clear()
        self.etcd.watchers = [w for w in self.etcd.watchers if w.owner != node.index]
        self.etcd.delivered = [d for d in self.etcd.delivered if d[0] != node.index]

    @rule(i=st.integers(0, 2))
    def a_candidate_restarts(self, i: int) -> None:
        node = self._node(i)
        if node.up:
            return
        fresh = candidate(self.real, node.index, self.rates[node.index], node.core.role)
        self.nodes[self.nodes.index(node)] = fresh

    @rule(i=st.integers(0, 2))
    def a_candidate_is_paused_or_resumed(self, i: int) -> None:
        node = self._node(i)
        if node.up:
            node.paused = not node.paused

    @invariant()
    def whoever_serves_holds_the_key_on_a_lease_etcd_still_has(self) -> None:
        holder = self.etcd.holder_lease()
        serving = [n for n in getattr(self, "nodes", []) if n.up and n.core.accepts_clients]
        assert len(serving) <= 1, [n.core for n in serving]
        for n in serving:
            assert n.core.lease == holder and self.etcd.lease_valid(holder), n.core
            if not n.epochs or n.epochs[-1] != n.core.epoch:
                n.epochs.append(n.core.epoch)
                self.terms.append((n.core.epoch, n.index))

    @invariant()
    def epochs_only_grow(self) -> None:
        for n in getattr(self, "nodes", []):
            assert n.epochs == sorted(n.epochs)
        epochs = [e for e, _ in getattr(self, "terms", [])]
        assert epochs == sorted(epochs), self.terms  # a later term always has a higher epoch

    @precondition(lambda self: hasattr(self, "nodes"))
    @rule()
    def everything_settles(self) -> None:
        """Heal: every request carried out and answered, every event delivered, for a while;
        then some live candidate serves (liveness, as long as one is up and not paused)."""
        for node in self.nodes:
            node.paused = False
        for _ in range(400):
            for node in self.nodes:
                if not node.up:
                    continue
                while node.requests:
                    a = self.etcd.apply(node.index, node.requests.popleft())
                    if a is not None:
                        node.answers.append(a)
                while node.answers:
                    node.take(node.core.handle(node.answers.popleft()))
                for d in [d for d in self.etcd.delivered if d[0] == node.index]:
                    self.etcd.delivered.remove(d)
                    node.take(node.core.handle(d[2]))
                node.take(node.core.tick())
            self.whoever_serves_holds_the_key_on_a_lease_etcd_still_has()
            self.real.advance(0.05)
            self.etcd.expire()
        if any(n.up for n in self.nodes):
            assert any(n.up and n.core.accepts_clients for n in self.nodes), [n.core for n in self.nodes]


ElectionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
test_no_two_candidates_ever_serve_at_once = ElectionMachine.TestCase



# --- the broker with an election (broker/_core/_broker.py rule 12) --------------------------------

CLIENT_ID = b"client-1"
WID = b"worker-1"


class Broker:
    """A BrokerCore started with --elect, its election's etcd carried out by a FakeEtcd at once."""

    def __init__(self, role: str = "primary", etcd: FakeEtcd | None = None, owner: int = 0,
                 **config: Any) -> None:
        self.owner = owner
        self.real = etcd.real if etcd is not None else RealTime()
        self.etcd = etcd or FakeEtcd(self.real)
        self.clock = RateClock(self.real, 1.0)
        errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
        self.core = BrokerCore(BrokerConfig(role=role, elect="etcd://127.0.0.1:2379",
                                            frontend=f"tcp://127.0.0.1:{7000 + len(role)}",
                                            heartbeat_interval=0.25, **config),
                               self.clock, errors, host="h", pid=1, boot="b")
        self.out: list[Any] = []
        self.pending: deque[Any] = deque()
        self.take(self.core.start())

    def take(self, actions: list[Any]) -> list[Any]:
        self.out.extend(actions)
        for a in actions:
            if isinstance(a, ToElection):
                self.pending.append(a.action)
        return actions

    def settle(self) -> None:
        """etcd answers everything asked, watches deliver."""
        for _ in range(20):
            while self.pending:
                answer = self.etcd.apply(self.owner, self.pending.popleft())
                if answer is not None:
                    self.take(self.core.election_events([answer]))
            for d in [d for d in self.etcd.delivered if d[0] == self.owner]:
                self.etcd.delivered.remove(d)
                self.take(self.core.election_events([d[2]]))
            self.take(self.core.tick())

    def advance(self, seconds: float) -> None:
        self.real.advance(seconds)

    def frames(self, peer: bytes, frames: list[bytes]) -> list[Any]:
        return self.take(self.core.frames_received(peer, frames))

    def request(self, rid: int, method: str = "add", **headers: Any) -> list[Any]:
        headers.setdefault("budget_ms", 5000)
        return self.frames(CLIENT_ID, encode(ClientRequest(rid, "calc", method, headers,
                                                           pack_call((1, 2), {}))))

    def register(self) -> None:
        self.frames(WID, encode(Ready("w", {"calc": {"add": True, "charge": False}}, 4)))

    def alerts(self) -> list[tuple[str, str]]:
        return [(a.event["name"], a.event["state"]) for a in self.out
                if type(a) is Publish and a.topic.startswith("alert.")]


def client_replies(actions: list[Any]) -> list[ClientReply]:
    return [m for a in actions if type(a) is Send and a.peer == CLIENT_ID
            for m in [decode_frames(a.frames)] if isinstance(m, ClientReply)]


def calls(actions: list[Any]) -> list[WorkerRequest]:
    return [m for a in actions if type(a) is SendCall for m in [decode_frames(a.frames)]
            if isinstance(m, WorkerRequest)]


def test_an_elected_broker_serves_once_it_holds_the_key_and_stamps_its_epoch_on_calls():
    b = Broker()
    assert b.core.state == "primary" and not b.core.serving
    b.register()
    assert [r.status for r in client_replies(b.request(1))] == [Status.NOT_ACTIVE]  # not a vote
    b.settle()
    assert b.core.state == "active" and b.core.serving
    epoch = b.core.election.epoch
    assert epoch > 0
    (call,) = calls(b.request(2, epoch=10**9))  # a client's own epoch is never forwarded
    assert call.headers["epoch"] == epoch
    st = b.core.status()
    assert st["broker"]["epoch"] == epoch and st["broker"]["state"] == "active"
    el = st["election"]
    assert {k: el[k] for k in ("name", "holder", "epoch", "state")} == {
        "name": "zrpc", "holder": b.core.config.frontend, "epoch": epoch, "state": "active"}
    assert 0 < el["lease_left_s"] <= TTL
    hello = [decode_frames(a.frames) for a in b.out if type(a) is Send and a.peer == WID]
    assert any(isinstance(m, Heartbeat) and m.info.get("epoch") == epoch for m in hello)


def test_a_binary_star_or_lone_broker_stamps_no_epoch_and_drops_a_clients():
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    core = BrokerCore(BrokerConfig(), FakeClock(), errors)
    core.start()
    core.frames_received(WID, encode(Ready("w", {"calc": {"add": True}}, 4)))
    out = core.frames_received(CLIENT_ID, encode(ClientRequest(1, "calc", "add", {"epoch": 99},
                                                               pack_call((1, 2), {}))))
    (call,) = calls(out)
    assert "epoch" not in call.headers


def test_a_worker_refusing_our_epoch_makes_the_broker_step_down_and_the_client_move():
    b = Broker()
    b.register()
    b.settle()
    (call,) = calls(b.request(1))
    refusal = WorkerReply(CLIENT_ID, 1, Status.NOT_ACTIVE, pack_error("NotActive", "older epoch"))
    out = b.frames(WID, encode(refusal))
    assert [r.status for r in client_replies(out)] == [Status.NOT_ACTIVE]
    assert not b.core.serving and b.core.counters["epoch_refused"] == 1
    assert any(isinstance(a, ToElection) and isinstance(a.action, Campaign) for a in out)
    assert b.core.dispatcher.counters["not_active_calls"] == 1


def test_a_worker_reporting_a_newer_active_epoch_makes_the_holder_step_down():
    b = Broker()
    b.register()
    b.settle()
    epoch = b.core.election.epoch
    b.frames(WID, encode(Heartbeat(WORKER, {"active_epoch": epoch})))
    assert b.core.serving
    b.frames(WID, encode(Heartbeat(WORKER, {"active_epoch": epoch + 5})))
    assert not b.core.serving and b.core.state == "passive"


def test_past_its_fence_the_broker_serves_nothing_even_before_a_timer_runs():
    """A broker resumed after SIGSTOP: its first message is answered NOT_ACTIVE, queued calls
    too, and lease_lost goes out, before any tick."""
    b = Broker()
    b.register()
    b.settle()
    b.request(1, "charge")  # in flight
    b.advance(TTL)  # stopped: nothing renewed
    out = b.request(2)
    assert [r.status for r in client_replies(out)] == [Status.NOT_ACTIVE] and calls(out) == []
    assert ("lease_lost", "raised") in b.alerts()
    b.settle()  # etcd: the lease expired, the key went; a new lease takes the role again
    assert b.core.serving and ("lease_lost", "resolved") in b.alerts()


def test_two_elected_brokers_one_serves_and_the_other_takes_over_when_it_stops():
    etcd = FakeEtcd(RealTime())
    p = Broker("primary", etcd)
    p.settle()
    s = Broker("backup", etcd, owner=1)
    s.settle()
    s.advance(1)  # a backup lets the primary try first
    s.settle()
    assert p.core.serving and not s.core.serving and s.core.state == "passive"
    p.take(p.core.leave())  # a clean stop revokes the lease
    p.settle()
    s.settle()
    assert s.core.serving and not p.core.serving
    assert ("failover", "raised") in s.alerts()


@pytest.mark.parametrize("config, message", [
    ({"state": "tcp://127.0.0.1:1", "peer_state": "tcp://127.0.0.1:2"}, "--state"),
    ({"cluster": "etcd://127.0.0.1:2379", "name": "b1"}, "--cluster"),
    ({"election": "a/b"}, "--election")])
def test_elect_refuses_what_it_replaces(config, message):
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    with pytest.raises(ValueError, match=message):
        BrokerCore(BrokerConfig(elect="etcd://127.0.0.1:2379", **config), FakeClock(), errors)
