"""The membership core on a fake clock: registration on a lease and its renewal, a lost lease
registered again, the member set from snapshots and the watch, the alerts it raises, and a
state machine against a fake etcd that fails whenever hypothesis says so."""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zrpc._core._membership import (
    RAISED,
    RESOLVED,
    Alert,
    EtcdAction,
    Event,
    ExchangeFailed,
    Fetch,
    GrantLease,
    LeaseExpired,
    LeaseGranted,
    Log,
    MemberDeleted,
    MemberPut,
    Membership,
    Output,
    Put,
    Refresh,
    RefreshOk,
    Registered,
    Registration,
    Revoke,
    Snapshot,
    Watch,
    WatchEnded,
    advertised,
    brokers_prefix,
    check_name,
    parse_cluster,
)
from zrpc.testing import FakeClock

TTL = 3
EVERY = TTL / 3
LEASE = 0x1234
INFO = {"frontend": "tcp://127.0.0.1:6001", "boot": "run1"}


def actions(out: list[Output]) -> list[EtcdAction]:
    return [o for o in out if not isinstance(o, (Alert, Log))]


def alerts(out: list[Output], name: str | None = None) -> list[Alert]:
    return [o for o in out if isinstance(o, Alert) and (name is None or o.name == name)]


def one(out: list[Output], kind: type[Any]) -> Any:
    found = [a for a in actions(out) if isinstance(a, kind)]
    assert len(found) == 1, out
    return found[0]


def registered(clock: FakeClock, members: dict[str, Any] | None = None) -> tuple[Membership, Watch]:
    """A member registered with lease LEASE at revision 10, its view a snapshot of `members`
    (b1 itself included) at revision 10, its watch started."""
    m = Membership(clock, "b1", INFO, ttl=TTL)
    out = m.start()
    grant, fetch = one(out, GrantLease), one(out, Fetch)
    put = one(m.handle(LeaseGranted(grant.seq, LEASE, TTL)), Put)
    m.handle(Registered(put.seq, LEASE, 10))
    view = {"b1": dict(INFO), **(members or {})}
    watch = one(m.handle(Snapshot(fetch.seq, view, 10)), Watch)
    assert m.state is Registration.REGISTERED
    return m, watch


# --- registration ------------------------------------------------------------------------------


def test_start_asks_for_a_lease_and_the_members_then_puts_its_key_on_the_lease():
    clock = FakeClock()
    m = Membership(clock, "b1", INFO, cluster="prod", ttl=TTL)
    out = m.start()
    grant, fetch = one(out, GrantLease), one(out, Fetch)
    assert grant.ttl == TTL and fetch.prefix == "/zrpc/prod/brokers/"
    assert m.state is Registration.GRANTING
    put = one(m.handle(LeaseGranted(grant.seq, LEASE, TTL)), Put)
    assert put.key == "/zrpc/prod/brokers/b1" and put.lease == LEASE
    assert json.loads(put.value) == {**INFO, "name": "b1"}
    out = m.handle(Registered(put.seq, LEASE, 5))
    assert m.state is Registration.REGISTERED and m.registrations == 1
    assert [o.msg for o in out if isinstance(o, Log)] == ["registered%s as %s in cluster %s (lease %x, TTL %ds)"]


def test_the_lease_is_renewed_every_third_of_its_ttl_from_when_the_grant_was_sent():
    clock = FakeClock()
    m = Membership(clock, "b1", INFO, ttl=TTL)
    grant = one(m.start(), GrantLease)
    clock.advance(0.2)  # the grant took 0.2 s: its TTL counts from when it was asked for
    put = one(m.handle(LeaseGranted(grant.seq, LEASE, TTL)), Put)
    m.handle(Registered(put.seq, LEASE, 5))
    assert m.lease_deadline == pytest.approx(clock() - 0.2 + TTL)
    assert m.next_deadline() == pytest.approx(clock() - 0.2 + EVERY)
    clock.advance(EVERY - 0.2 - 0.001)
    assert actions(m.tick()) == []
    clock.advance(0.001)
    refresh = one(m.tick(), Refresh)
    assert refresh.lease == LEASE
    assert actions(m.tick()) == []  # one refresh in flight at a time
    clock.advance(0.1)
    m.handle(RefreshOk(refresh.seq, LEASE, TTL))
    assert m.lease_deadline == pytest.approx(clock() - 0.1 + TTL)


def test_a_failed_refresh_raises_etcd_unreachable_is_tried_again_and_an_answer_resolves_it():
    clock = FakeClock()
    m, _ = registered(clock)
    clock.advance(EVERY)
    refresh = one(m.tick(), Refresh)
    out = m.handle(ExchangeFailed(refresh.seq, "refresh", "127.0.0.1:2379: cannot connect"))
    [a] = alerts(out)
    assert (a.name, a.state, a.subject) == ("etcd_unreachable", RAISED, "etcd")
    assert not m.etcd_reachable and m.state is Registration.REGISTERED  # the lease still lasts
    assert m.snapshot()["etcd"] == "unreachable"
    clock.advance(EVERY)
    again = one(m.tick(), Refresh)
    out = m.handle(RefreshOk(again.seq, LEASE, TTL))
    assert [(a.name, a.state) for a in alerts(out)] == [("etcd_unreachable", RESOLVED)]
    assert m.etcd_reachable and m.snapshot()["etcd"] == "ok"


def test_a_lease_past_its_ttl_with_a_refresh_unanswered_is_lost_and_registered_again():
    clock = FakeClock()
    m, _ = registered(clock)
    clock.advance(EVERY)
    one(m.tick(), Refresh)  # hangs: etcd stopped
    clock.advance(TTL - EVERY - 0.001)
    assert actions(m.tick()) == []
    clock.advance(0.001)
    out = m.tick()
    assert [(a.name, a.state) for a in alerts(out)] == [("etcd_unreachable", RAISED)]
    grant = one(out, GrantLease)  # at once: a new lease
    assert m.state is Registration.GRANTING and m.lease is None
    assert m.members.keys() == {"b1"}  # rule 8: the view stays as last seen
    put = one(m.handle(LeaseGranted(grant.seq, LEASE + 1, TTL)), Put)
    out = m.handle(Registered(put.seq, LEASE + 1, 20))
    assert m.state is Registration.REGISTERED and m.registrations == 2 and m.etcd_reachable


def test_a_lease_past_its_ttl_because_we_stalled_is_lost_without_blaming_etcd():
    clock = FakeClock()
    m, _ = registered(clock)
    clock.advance(TTL + 5)  # our loop did not run: no refresh was even asked for
    out = m.tick()
    assert alerts(out) == [] and m.etcd_reachable
    assert isinstance(one(out, GrantLease), GrantLease)


def test_an_expired_lease_is_registered_again_at_once_and_etcd_is_reachable():
    clock = FakeClock()
    m, _ = registered(clock)
    clock.advance(EVERY)
    refresh = one(m.tick(), Refresh)
    out = m.handle(LeaseExpired(refresh.seq, LEASE))
    assert alerts(out) == [] and m.etcd_reachable
    assert one(out, GrantLease).ttl == TTL
    assert any(isinstance(o, Log) and o.level == logging.WARNING for o in out)


def test_a_failed_grant_or_put_starts_again_from_a_grant_after_the_retry_delay():
    clock = FakeClock()
    m = Membership(clock, "b1", INFO, ttl=TTL, retry=0.5)
    grant = one(m.start(), GrantLease)
    put = one(m.handle(LeaseGranted(grant.seq, LEASE, TTL)), Put)
    m.handle(ExchangeFailed(put.seq, "put", "boom"))
    assert m.state is Registration.UNREGISTERED and m.lease is None
    assert m.next_deadline() == pytest.approx(clock() + 0.5)
    clock.advance(0.499)
    assert actions(m.tick()) == []
    clock.advance(0.001)
    assert one(m.tick(), GrantLease).ttl == TTL


def test_our_key_deleted_after_our_put_means_the_lease_is_lost():
    clock = FakeClock()
    m, watch = registered(clock)
    assert actions(m.handle(MemberPut(watch.seq, "b1", INFO, 11))) == []
    out = m.handle(MemberDeleted(watch.seq, "b1", 12))
    assert one(out, GrantLease) and alerts(out) == []  # never an alert about ourselves


def test_a_late_delete_of_the_key_of_an_older_lease_changes_nothing():
    clock = FakeClock()
    m, watch = registered(clock)
    clock.advance(EVERY)
    refresh = one(m.tick(), Refresh)
    grant = one(m.handle(LeaseExpired(refresh.seq, LEASE)), GrantLease)
    put = one(m.handle(LeaseGranted(grant.seq, LEASE + 1, TTL)), Put)
    m.handle(Registered(put.seq, LEASE + 1, 20))
    m.handle(MemberDeleted(watch.seq, "b1", 15))  # the old lease's key, deleted before our put
    assert m.state is Registration.REGISTERED and m.lease == LEASE + 1


def test_a_stale_failure_counts_for_reachability_only():
    m, _ = registered(FakeClock())
    out = m.handle(ExchangeFailed(999, "fetch", "cannot connect"))
    assert [a.name for a in alerts(out)] == ["etcd_unreachable"]
    assert m.state is Registration.REGISTERED


def test_our_key_missing_from_a_later_snapshot_means_the_lease_is_lost():
    clock = FakeClock()
    m, watch = registered(clock)
    m.handle(WatchEnded(watch.seq, "the stream ended"))
    clock.advance(EVERY)
    fetch = one(m.tick(), Fetch)
    out = m.handle(Snapshot(fetch.seq, {"b2": {"boot": "x"}}, 30))
    assert any(isinstance(a, GrantLease) for a in actions(out))


# --- the member set and its alerts --------------------------------------------------------------


def test_the_first_snapshot_is_the_cluster_as_found_no_alerts():
    clock = FakeClock()
    m = Membership(clock, "b3", INFO, ttl=TTL)
    fetch = one(m.start(), Fetch)
    out = m.handle(Snapshot(fetch.seq, {"b1": {"boot": "a"}, "b2": {"boot": "b"}}, 7))
    assert alerts(out) == []
    assert one(out, Watch).start_revision == 8
    assert m.members.keys() == {"b1", "b2"}


def test_members_join_leave_and_come_back_with_alerts_that_pair_up():
    clock = FakeClock()
    m, w = registered(clock)
    out = m.handle(MemberPut(w.seq, "b2", {"frontend": "tcp://h:2", "boot": "x"}, 11))
    [a] = alerts(out)
    assert (a.name, a.subject, a.state, a.detail["frontend"]) == ("member_joined", "b2", "event", "tcp://h:2")
    assert alerts(m.handle(MemberPut(w.seq, "b2", {"frontend": "tcp://h:2", "boot": "x"}, 12))) == []
    out = m.handle(MemberDeleted(w.seq, "b2", 13))
    assert [(a.name, a.subject, a.state) for a in alerts(out)] == [("member_left", "b2", RAISED)]
    assert m.members.keys() == {"b1"}
    out = m.handle(MemberPut(w.seq, "b2", {"boot": "y"}, 14))
    assert [(a.name, a.state) for a in alerts(out)] == [("member_joined", "event"), ("member_left", RESOLVED)]
    out = m.handle(MemberPut(w.seq, "b2", {"boot": "z"}, 15))  # put again by a new run of it
    [a] = alerts(out)
    assert a.name == "member_joined" and a.detail["restarted"] is True


def test_a_new_snapshot_alerts_what_changed_while_the_watch_was_down():
    clock = FakeClock()
    m, w = registered(clock, {"b2": {"boot": "x"}, "b3": {"boot": "y"}})
    m.handle(WatchEnded(w.seq, "etcd went away"))
    clock.advance(EVERY)
    fetch = one(m.tick(), Fetch)
    out = m.handle(Snapshot(fetch.seq, {"b1": INFO, "b3": {"boot": "y"}, "b4": {"boot": "z"}}, 40))
    assert sorted((a.name, a.subject, a.state) for a in alerts(out)) == [
        ("member_joined", "b4", "event"), ("member_left", "b2", RAISED)]


def test_stale_watch_events_and_revisions_already_applied_change_nothing():
    clock = FakeClock()
    m, w = registered(clock)
    m.handle(MemberPut(w.seq + 100, "ghost", {}, 50))
    m.handle(MemberPut(w.seq, "old", {}, 10))  # at the snapshot's revision: in it already
    assert m.members.keys() == {"b1"}


def test_a_watch_that_ends_is_followed_by_a_fetch_paced_by_the_retry_delay():
    clock = FakeClock()
    m, w = registered(clock)
    out = m.handle(WatchEnded(w.seq, "the stream ended"))  # it had just started
    assert actions(out) == []
    assert m.next_deadline() is not None
    clock.advance(EVERY)
    fetch = one(m.tick(), Fetch)
    m.handle(ExchangeFailed(fetch.seq, "fetch", "cannot connect"))
    clock.advance(EVERY - 0.01)
    assert not [a for a in actions(m.tick()) if isinstance(a, Fetch)]
    clock.advance(0.01)
    assert [a for a in actions(m.tick()) if isinstance(a, Fetch)]


def test_while_etcd_is_unreachable_the_members_stay_as_last_seen():
    clock = FakeClock()
    m, w = registered(clock, {"b2": {"boot": "x"}})
    m.handle(WatchEnded(w.seq, "etcd went away"))
    for _ in range(10):
        clock.advance(EVERY)
        for a in actions(m.tick()):
            if not isinstance(a, Revoke):
                m.handle(ExchangeFailed(a.seq, type(a).__name__.lower(), "cannot connect"))
    assert not m.etcd_reachable
    assert m.members.keys() == {"b1", "b2"}
    assert m.state is not Registration.REGISTERED  # its lease passed its TTL meanwhile


def test_stop_revokes_the_lease_and_then_ignores_everything():
    m, w = registered(FakeClock())
    [revoke] = actions(m.stop())
    assert isinstance(revoke, Revoke) and revoke.lease == LEASE
    assert m.state is Registration.STOPPED
    assert m.handle(MemberPut(w.seq, "b2", {}, 99)) == [] and m.tick() == [] and m.next_deadline() is None
    assert m.stop() == []
    assert Membership(FakeClock(), "b1", INFO).stop() == []  # no lease, nothing to revoke


def test_repr_and_snapshot_say_where_it_stands():
    clock = FakeClock()
    m, _ = registered(clock, {"b2": {"boot": "x"}})
    assert repr(m) == "<Membership zrpc/b1 REGISTERED etcd=ok members=['b1', 'b2']>"
    snap = m.snapshot()
    assert snap["name"] == "zrpc" and snap["member"] == "b1" and snap["members"] == ["b1", "b2"]
    assert snap["etcd"] == "ok" and snap["registration"] == "registered" and snap["lease"] == LEASE


def test_a_core_fed_something_else_raises_type_error():
    with pytest.raises(TypeError):
        Membership(FakeClock(), "b1", INFO).handle("nonsense")  # type: ignore[arg-type]  # on purpose


# --- names and URLs --------------------------------------------------------------------------


@pytest.mark.parametrize("url, endpoints", [
    ("etcd://127.0.0.1:2379", (("127.0.0.1", 2379),)),
    ("etcd://h1:2379,h2:2380", (("h1", 2379), ("h2", 2380))),
    ("etcd://h1", (("h1", 2379),)),
    (" etcd://[::1]:2379 ", (("::1", 2379),)),
])
def test_cluster_urls(url, endpoints):
    assert parse_cluster(url) == endpoints


@pytest.mark.parametrize("url", ["http://h:2379", "etcd://", "etcd://h:x", "etcd://h:70000", "etcd://h:1,",
                                 "h:2379", "etcd://a b:1"])
def test_bad_cluster_urls_say_the_shape_expected(url):
    with pytest.raises(ValueError, match="expected etcd://HOST:PORT"):
        parse_cluster(url)


def test_names_keys_and_advertised_endpoints():
    assert check_name("b-1.x_2") == "b-1.x_2"
    for bad in ("", "a/b", "-a", "x" * 65, "a b"):
        with pytest.raises(ValueError, match="invalid --name"):
            check_name(bad)
    with pytest.raises(ValueError, match="--cluster-name"):
        Membership(FakeClock(), "b1", INFO, cluster="a/b")
    assert brokers_prefix("zrpc") == "/zrpc/zrpc/brokers/"
    assert advertised("tcp://*:6001", "host1") == "tcp://host1:6001"
    assert advertised("tcp://0.0.0.0:6001", "host1") == "tcp://host1:6001"
    assert advertised("tcp://10.0.0.1:6001", "host1") == "tcp://10.0.0.1:6001"


# --- a state machine against a fake etcd -------------------------------------------------------

NAMES = ("b2", "b3", "b4")


class FakeEtcd:
    """Just enough etcd: leases that expire while it is up (and are extended when it comes
    back, as a new leader does), keys, a revision, a history the watch replays."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.up = True
        self.revision = 1
        self.store: dict[str, tuple[dict[str, Any], int | None]] = {}
        self.leases: dict[int, float] = {}
        self.history: list[tuple[int, str, dict[str, Any] | None]] = []  # (rev, name, info or None)
        self._next_lease = 100

    def change(self, name: str, info: dict[str, Any] | None, lease: int | None = None) -> None:
        self.revision += 1
        if info is None:
            del self.store[name]
        else:
            self.store[name] = (info, lease)
        self.history.append((self.revision, name, info))

    def expire(self) -> None:
        if not self.up:
            return
        now = self.clock()
        for lease in [lid for lid, t in self.leases.items() if t <= now]:
            del self.leases[lease]
            for name in [n for n, (_, lid) in self.store.items() if lid == lease]:
                self.change(name, None)

    def grant(self, ttl: int) -> int:
        self._next_lease += 1
        self.leases[self._next_lease] = self.clock() + ttl
        return self._next_lease


class MembershipMachine(RuleBasedStateMachine):
    """Whatever the order of answers, failures, other members and time: the member set is the
    last snapshot plus what the watch put less what it deleted; etcd_unreachable is raised iff
    the latest word from etcd was a failure or a silence past the TTL; member alerts pair up
    and are never about ourselves; and once etcd stays up, the member is registered and sees
    exactly the keys etcd holds."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.etcd = FakeEtcd(self.clock)
        self.m = Membership(self.clock, "b1", {"boot": "me"}, ttl=TTL)
        self.pending: deque[EtcdAction] = deque()
        self.watch: Watch | None = None
        self.watch_events: deque[Event] = deque()
        self.expected: dict[str, dict[str, Any]] = {}
        self.unreachable_raised = False
        self.left: set[str] = set()
        self.last_word = "ok"
        self.take(self.m.start())

    # --- plumbing ------------------------------------------------------------------------

    def take(self, out: list[Output]) -> None:
        for o in out:
            if isinstance(o, Alert):
                self.alert(o)
            elif isinstance(o, Log):
                continue
            elif isinstance(o, Watch):
                self.watch = o  # the edge runs one watch: a new one replaces the old
                self.watch_events = deque(
                    MemberPut(o.seq, n, info, rev) if info is not None else MemberDeleted(o.seq, n, rev)
                    for rev, n, info in self.etcd.history if rev >= o.start_revision)
                if not self.etcd.up:  # the edge could not start it
                    self.watch_events.append(ExchangeFailed(o.seq, "watch", "cannot connect"))
                    self.watch = None
            else:
                self.pending.append(o)

    def alert(self, a: Alert) -> None:
        assert a.subject != "b1", a
        if a.name == "etcd_unreachable":
            assert (a.state == RAISED) != self.unreachable_raised, a  # alternates, raised first
            self.unreachable_raised = a.state == RAISED
        elif a.name == "member_left":
            assert (a.state == RAISED) == (a.subject not in self.left), a
            (self.left.add if a.state == RAISED else self.left.discard)(a.subject)
        else:
            assert a.name == "member_joined" and a.state == "event", a

    def feed(self, event: Event) -> None:
        self.take(self.m.handle(event))
        if isinstance(event, ExchangeFailed):
            self.last_word = "failed"
        elif not isinstance(event, WatchEnded):
            self.last_word = "ok"
        if isinstance(event, Snapshot):
            self.expected = {n: dict(i) for n, i in event.members.items()}
        elif isinstance(event, MemberPut):
            self.expected[event.name] = dict(event.info)
        elif isinstance(event, MemberDeleted):
            self.expected.pop(event.name, None)

    def answer(self, a: EtcdAction) -> Event | None:
        e = self.etcd
        what = type(a).__name__.lower()
        if isinstance(a, Revoke):
            return None
        if not e.up:
            return ExchangeFailed(a.seq, what, "cannot connect")
        e.expire()
        if isinstance(a, GrantLease):
            return LeaseGranted(a.seq, e.grant(a.ttl), a.ttl)
        if isinstance(a, Put):
            if a.lease not in e.leases:
                return LeaseExpired(a.seq, a.lease)
            e.change(a.key.rsplit("/", 1)[1], json.loads(a.value), a.lease)
            self.watch_events.extend(self.replay(e.revision))
            return Registered(a.seq, a.lease, e.revision)
        if isinstance(a, Refresh):
            if a.lease not in e.leases:
                return LeaseExpired(a.seq, a.lease)
            e.leases[a.lease] = self.clock() + TTL
            return RefreshOk(a.seq, a.lease, TTL)
        if isinstance(a, Fetch):
            return Snapshot(a.seq, {n: dict(i) for n, (i, _) in e.store.items()}, e.revision)
        raise AssertionError(a)

    def replay(self, revision: int) -> list[Event]:
        """The watch's events for what happened at `revision` (if a watch runs)."""
        w = self.watch
        if w is None:
            return []
        return [MemberPut(w.seq, n, info, rev) if info is not None else MemberDeleted(w.seq, n, rev)
                for rev, n, info in self.etcd.history if rev == revision]

    # --- rules ---------------------------------------------------------------------------

    @precondition(lambda self: self.pending)
    @rule()
    def etcd_answers(self) -> None:
        event = self.answer(self.pending.popleft())
        if event is not None:
            self.feed(event)

    @precondition(lambda self: self.watch_events)
    @rule()
    def the_watch_delivers(self) -> None:
        self.feed(self.watch_events.popleft())

    @rule(name=st.sampled_from(NAMES), boot=st.sampled_from(("r1", "r2")))
    def another_member_registers(self, name: str, boot: str) -> None:
        if self.etcd.up:
            self.etcd.change(name, {"boot": boot})
            self.watch_events.extend(self.replay(self.etcd.revision))

    @rule(name=st.sampled_from(NAMES))
    def another_member_leaves(self, name: str) -> None:
        if self.etcd.up and name in self.etcd.store:
            self.etcd.change(name, None)
            self.watch_events.extend(self.replay(self.etcd.revision))

    @rule()
    def etcd_goes_down(self) -> None:
        if self.etcd.up and self.watch is not None:
            self.watch_events.append(WatchEnded(self.watch.seq, "the stream ended"))
            self.watch = None  # nothing more comes from it
        self.etcd.up = False

    @rule()
    def etcd_comes_back(self) -> None:
        if not self.etcd.up:
            self.etcd.up = True
            for lease in self.etcd.leases:  # a new leader extends every lease
                self.etcd.leases[lease] = self.clock() + TTL

    @rule(dt=st.sampled_from((0.01, 0.4, EVERY, 1.3, TTL + 0.5)))
    def time_passes(self, dt: float) -> None:
        m = self.m
        deadline, asked = m.lease_deadline, any(isinstance(a, Refresh) for a in self.pending)
        was = m.state
        self.clock.advance(dt)
        self.etcd.expire()
        out = m.tick()
        self.take(out)
        raised = [a for a in out if isinstance(a, Alert) and a.name == "etcd_unreachable"]
        if raised:  # only a silence past the TTL raises it on a tick
            assert was is Registration.REGISTERED and asked and deadline is not None
            assert deadline <= self.clock()
            self.last_word = "silent"

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def the_member_set_is_the_snapshot_and_the_watch_since(self) -> None:
        assert self.m.members == self.expected

    @invariant()
    def etcd_unreachable_is_raised_iff_the_latest_word_was_a_failure(self) -> None:
        assert self.unreachable_raised == (not self.m.etcd_reachable)
        assert self.unreachable_raised == (self.last_word != "ok")

    @invariant()
    def nobody_present_is_marked_left(self) -> None:
        assert not (self.left & set(self.m.members))

    def teardown(self) -> None:
        """etcd stays up: the member ends registered, seeing exactly what etcd holds."""
        self.etcd_comes_back()
        for _ in range(200):
            if self.pending:
                self.etcd_answers()
            elif self.watch_events:
                self.the_watch_delivers()
            else:
                self.time_passes(0.4)
            if (self.m.state is Registration.REGISTERED and self.m.etcd_reachable and not self.pending
                    and not self.watch_events and self.m.members.keys() == self.etcd.store.keys()):
                break
        m = self.m
        assert m.state is Registration.REGISTERED and m.etcd_reachable and not self.unreachable_raised
        assert m.members.keys() == self.etcd.store.keys()
        assert self.etcd.store["b1"][1] == m.lease
        assert self.left <= {n for n in NAMES if n not in self.etcd.store}


MembershipMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("ZRPC_MEMBERSHIP_EXAMPLES", "200")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMembershipMachine = MembershipMachine.TestCase


# --- inside BrokerCore --------------------------------------------------------------------------


def cluster_core(clock: FakeClock, **config: Any) -> Any:
    from zrpc._io._internal import InternalErrors
    from zrpc.broker._config import BrokerConfig
    from zrpc.broker._core._broker import BrokerCore

    config.setdefault("cluster", "etcd://127.0.0.1:2379")
    config.setdefault("name", "b1")
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    return BrokerCore(BrokerConfig(**config), clock, errors, host="h1", pid=7, boot="run1")


def test_a_cluster_member_asks_etcd_through_the_loop_and_publishes_the_cluster_alerts():
    from zrpc.broker._core._broker import Publish, ToEtcd

    clock = FakeClock()
    core = cluster_core(clock, frontend="tcp://*:6001", monitor="tcp://*:6101")
    out = core.start()
    sent = [a.action for a in out if isinstance(a, ToEtcd)]
    grant, fetch = [a for a in sent if isinstance(a, GrantLease)], [a for a in sent if isinstance(a, Fetch)]
    assert len(grant) == len(fetch) == 1
    [put] = [a.action for a in core.cluster_events([LeaseGranted(grant[0].seq, LEASE, TTL)])
             if isinstance(a, ToEtcd)]
    assert isinstance(put, Put) and put.key == "/zrpc/zrpc/brokers/b1"
    assert json.loads(put.value) == {"name": "b1", "frontend": "tcp://h1:6001", "monitor": "tcp://h1:6101",
                                     "host": "h1", "pid": 7, "boot": "run1"}
    core.cluster_events([Registered(put.seq, LEASE, 3)])
    [watch] = [a.action for a in core.cluster_events([Snapshot(fetch[0].seq, {"b1": {}}, 3)])
               if isinstance(a, ToEtcd)]
    out = core.cluster_events([MemberPut(watch.seq, "b2", {"frontend": "tcp://h2:1", "boot": "x"}, 4)])
    [pub] = [a for a in out if isinstance(a, Publish)]
    assert pub.topic == "alert.member_joined" and pub.event["subject"] == "b2" and pub.event["severity"] == "info"
    out = core.cluster_events([MemberDeleted(watch.seq, "b2", 5), ExchangeFailed(99, "fetch", "down")])
    assert sorted((a.topic, a.event["state"]) for a in out if isinstance(a, Publish)) == [
        ("alert.etcd_unreachable", "raised"), ("alert.member_left", "raised")]
    st = core.status()
    assert st["broker"]["name"] == "b1"
    assert {k: st["cluster"][k] for k in ("name", "member", "members", "etcd")} == {
        "name": "zrpc", "member": "b1", "members": ["b1"], "etcd": "unreachable"}
    assert {a["name"] for a in st["alerts"]} == {"etcd_unreachable", "member_left"}
    assert core.next_deadline() <= clock() + EVERY
    [revoke] = [a.action for a in core.leave() if isinstance(a, ToEtcd)]
    assert isinstance(revoke, Revoke) and revoke.lease == LEASE


def test_a_broker_not_in_a_cluster_has_no_cluster_in_its_status():
    from zrpc._io._internal import InternalErrors
    from zrpc.broker._config import BrokerConfig
    from zrpc.broker._core._broker import BrokerCore

    core = BrokerCore(BrokerConfig(), FakeClock(), InternalErrors(logging.getLogger("t"), "broker"))
    assert "cluster" not in core.status() and core.cluster is None and core.leave() == []


@pytest.mark.parametrize("config, words", [
    ({"state": "tcp://127.0.0.1:1", "peer_state": "tcp://127.0.0.1:2"}, "no --state or --peer-state"),
    ({"name": None}, "--cluster needs --name"),
    ({"cluster": None}, "--name is a cluster member's name"),
    ({"cluster": "http://h:1"}, "expected etcd://"),
    ({"name": "a/b"}, "invalid --name"),
    ({"cluster_name": ""}, "invalid --cluster-name"),
])
def test_a_cluster_member_refuses_what_makes_no_sense(config, words):
    with pytest.raises(ValueError, match=words):
        cluster_core(FakeClock(), **config)


# --- rule 10: an observer ---------------------------------------------------------------------


def test_an_observer_fetches_and_watches_but_never_takes_a_lease():
    clock = FakeClock()
    m = Membership(clock, "", {}, ttl=TTL, register=False)
    (fetch,) = actions(m.start())
    assert isinstance(fetch, Fetch) and m.state is Registration.OBSERVING
    members = {"b1": {"frontend": "tcp://h:1", "boot": "x"}}
    out = m.handle(Snapshot(fetch.seq, members, 7))
    (watch,) = actions(out)
    assert isinstance(watch, Watch) and watch.start_revision == 8
    assert m.members == members
    m.handle(MemberPut(watch.seq, "b2", {"frontend": "tcp://h:2"}, 9))
    out = m.handle(MemberDeleted(watch.seq, "b1", 10))
    assert set(m.members) == {"b2"}
    assert [a.name for a in out if isinstance(a, Alert)] == ["member_left"]
    for _ in range(20):  # time passes: no grant, no refresh, nothing at all while the watch runs
        clock.advance(1.0)
        assert actions(m.tick()) == []
    assert m.stop() == []  # no lease: nothing to revoke


def test_an_observer_fetches_again_after_a_failure_and_says_etcd_is_unreachable():
    clock = FakeClock()
    m = Membership(clock, "", {}, ttl=TTL, register=False)
    (fetch,) = actions(m.start())
    out = m.handle(ExchangeFailed(fetch.seq, "fetch", "cannot connect"))
    assert [(a.name, a.state) for a in out if isinstance(a, Alert)] == [("etcd_unreachable", RAISED)]
    assert actions(m.tick()) == []
    clock.advance(EVERY)
    (again,) = actions(m.tick())
    assert isinstance(again, Fetch)
    out = m.handle(Snapshot(again.seq, {}, 3))
    assert [(a.name, a.state) for a in out if isinstance(a, Alert)] == [("etcd_unreachable", RESOLVED)]


def test_an_observer_counts_a_member_with_any_name_as_one_of_the_others():
    m = Membership(FakeClock(), "", {}, ttl=TTL, register=False)
    (fetch,) = actions(m.start())
    m.handle(Snapshot(fetch.seq, {}, 1))
    out = m.handle(MemberPut(m._watch_seq or 0, "zrpc", {"frontend": "tcp://h:1"}, 2))
    assert [a.subject for a in out if isinstance(a, Alert)] == ["zrpc"]
