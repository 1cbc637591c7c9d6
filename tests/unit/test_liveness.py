import random

import pytest

from zrpc._core._liveness import Backoff, LivenessTracker
from zrpc.testing import FakeClock


def test_silent_peer_expires_after_interval_times_liveness():
    clock = FakeClock()
    t = LivenessTracker(clock, interval=0.25, liveness=3)
    t.seen("w")
    clock.advance(0.74)
    assert t.expired() == []
    clock.advance(0.02)
    assert t.expired() == ["w"]
    assert t.expired() == []  # reported once


def test_any_traffic_resets_the_clock():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("w")
    for _ in range(10):
        clock.advance(0.5)
        t.seen("w")
    assert t.expired() == []
    assert t.silence("w") == 0.0 and t.silence("other") == float("inf")


def test_next_deadline_is_the_earliest_of_beat_and_expiry():
    clock = FakeClock(100.0)
    t = LivenessTracker(clock, 0.25, 3)
    assert t.beat()  # first beat at once
    assert not t.beat()
    assert t.next_deadline() == pytest.approx(100.25)
    t.seen("w")
    clock.advance(0.2)
    assert t.next_deadline() == pytest.approx(100.25)
    clock.advance(0.1)
    assert t.beat()
    assert t.next_deadline() == pytest.approx(100.55)


def test_configure_follows_new_settings():
    clock = FakeClock()
    t = LivenessTracker(clock, 1.0, 3)
    t.seen("w")
    t.configure(0.1, 2)
    clock.advance(0.21)
    assert t.expired() == ["w"]
    with pytest.raises(ValueError):
        t.configure(0, 3)


def test_backoff_doubles_to_a_cap_with_jitter_and_resets():
    b = Backoff(0.25, 8.0, jitter=0.2, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    bases = [0.25, 0.5, 1, 2, 4, 8, 8, 8]
    for d, base in zip(delays, bases):
        assert base * 0.8 <= d <= base * 1.2
    b.reset()
    assert b.next_delay() <= 0.3


def test_pause_shifts_every_peer_by_our_own_stall():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("a")
    clock.advance(0.5)
    t.seen("b")
    clock.advance(2.0)  # we were stopped: nobody was read
    t.pause(2.0)
    assert t.expired() == []  # our silence is not theirs
    assert t.silence("a") == pytest.approx(0.5) and t.silence("b") == pytest.approx(0.0)
    clock.advance(0.26)
    assert t.expired() == ["a"]  # "a" was already silent for 0.5 s before the stall


def test_pause_never_moves_last_seen_past_now():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("w")
    t.pause(100.0)
    assert t.silence("w") == 0.0
    clock.advance(0.76)
    assert t.expired() == ["w"]  # a dead peer is still found, one timeout after the stall


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan")])
def test_pause_ignores_non_positive_and_nan(seconds):
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("w")
    clock.advance(0.5)
    t.pause(seconds)
    assert t.silence("w") == pytest.approx(0.5)


def test_forget_stops_watching_a_peer():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("w")
    t.forget("w")
    t.forget("never-seen")
    clock.advance(1.0)
    assert t.expired() == [] and "w" not in t


def test_pause_moves_a_peer_once_per_sighting_so_a_dead_one_is_still_found():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("dead")
    t.seen("alive")
    for _ in range(20):  # a loop that stalls over and over
        clock.advance(0.5)
        t.pause(0.5)
        t.seen("alive")
    assert t.expired() == ["dead"]  # one stall's grace, not twenty


def test_pause_forgives_again_after_the_peer_was_heard():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    t.seen("w")
    clock.advance(2.0)
    t.pause(2.0)
    t.seen("w")
    clock.advance(2.0)
    t.pause(2.0)  # heard in between: this stall is forgiven too
    assert t.expired() == []


def test_repr_shows_peers_silence_and_settings():
    clock = FakeClock()
    t = LivenessTracker(clock, 0.25, 3)
    assert repr(t) == "<LivenessTracker peers=0 timeout=0.75s (0.25s x 3)>"
    t.seen("a")
    clock.advance(0.5)
    t.seen("b")
    assert repr(t) == "<LivenessTracker peers=2 most_silent=0.500s timeout=0.75s (0.25s x 3)>"


def test_backoff_repr_shows_the_next_base_delay():
    b = Backoff(0.25, 8.0, jitter=0.2, rng=random.Random(1))
    b.next_delay()
    assert repr(b) == "<Backoff next=0.5s initial=0.25s maximum=8s jitter=20%>"
