"""Load-balancing strategies: each picks what its name says, for the reason it says."""

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from zrpc.broker._core._lb import STRATEGIES, LeastOutstanding, P2CEwma, Random, RoundRobin, Weighted, make_strategy


@dataclass
class W:
    name: str
    outstanding: int = 0
    capacity: int = 4
    weight: float = 1.0
    ewma: float = 0.0


def picks(strategy, ws, n):
    return [strategy.choose(ws).name for _ in range(n)]


def test_least_outstanding_prefers_idle():
    ws = [W("a", 3), W("b", 0), W("c", 2)]
    assert LeastOutstanding().choose(ws).name == "b"


def test_least_outstanding_is_relative_to_capacity():
    """2 of 8 busy is less loaded than 1 of 2: the count alone would pick the wrong one."""
    ws = [W("small", 1, capacity=2), W("big", 2, capacity=8)]
    assert picks(LeastOutstanding(), ws, 10) == ["big"] * 10


def test_least_outstanding_ties_go_round_robin():
    ws = [W("a", 1), W("b", 1), W("c", 3)]
    got = picks(LeastOutstanding(), ws, 10)
    assert set(got) == {"a", "b"}
    assert all(x != y for x, y in zip(got, got[1:])), got  # they alternate


def test_round_robin_cycles():
    ws = [W("a"), W("b"), W("c")]
    got = picks(RoundRobin(), ws, 30)
    assert Counter(got) == {"a": 10, "b": 10, "c": 10}
    assert all(len(set(got[i:i + 3])) == 3 for i in range(28)), got  # every window of 3 visits all


def test_round_robin_ignores_load():
    ws = [W("busy", 3), W("idle", 0)]
    assert Counter(picks(RoundRobin(), ws, 10)) == {"busy": 5, "idle": 5}


def test_weighted_follows_weights():
    ws = [W("a", weight=3), W("b", weight=1)]
    wrr = Weighted()
    assert Counter(wrr.choose(ws).name for _ in range(40)) == {"a": 30, "b": 10}


def test_weighted_is_smooth():
    """Smooth (as nginx): equal weights alternate, a heavy worker's turns are spread out."""
    assert picks(Weighted(), [W("a", weight=4), W("b", weight=4)], 8) in (
        ["a", "b"] * 4, ["b", "a"] * 4)
    got = picks(Weighted(), [W("a", weight=5), W("b", weight=1), W("c", weight=1)], 7)
    assert Counter(got) == {"a": 5, "b": 1, "c": 1}
    assert max(len(run) for run in "".join(got).replace("b", " ").replace("c", " ").split()) <= 3, got


def test_random_spreads_and_ignores_order():
    ws = [W("a"), W("b"), W("c")]
    counts = Counter(picks(Random(random.Random(3)), ws, 300))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60, counts


def test_p2c_ewma_shuns_the_slow_worker():
    for ws in ([W("fast", ewma=0.001), W("slow", ewma=0.5)], [W("slow", ewma=0.5), W("fast", ewma=0.001)]):
        p = P2CEwma(random.Random(1))
        assert Counter(p.choose(ws).name for _ in range(50))["fast"] == 50


def test_p2c_ewma_weighs_outstanding_calls():
    """Equal latency: the worker with fewer calls in flight is cheaper (cost ~ ewma x (n + 1))."""
    for ws in ([W("idle", 0, ewma=0.01), W("busy", 3, ewma=0.01)], [W("busy", 3, ewma=0.01), W("idle", 0, ewma=0.01)]):
        assert Counter(picks(P2CEwma(random.Random(2)), ws, 40)) == {"idle": 40}


def test_p2c_ewma_samples_two_among_many():
    """Power of two choices: the worst of five is never picked, everyone else sometimes is."""
    ws = [W(f"w{i}", ewma=0.01 * (i + 1)) for i in range(5)]
    counts = Counter(picks(P2CEwma(random.Random(5)), ws, 500))
    assert "w4" not in counts and set(counts) == {"w0", "w1", "w2", "w3"}, counts


@pytest.mark.parametrize("name, cls", [("least-outstanding", LeastOutstanding), ("round-robin", RoundRobin),
                                       ("random", Random), ("weighted", Weighted), ("p2c-ewma", P2CEwma)])
def test_every_lb_name_makes_its_own_strategy(name, cls):
    """`--lb NAME` (DESIGN.md §4): each name gives the strategy of that name, a fresh one each time."""
    s = make_strategy(name)
    assert type(s) is cls and s.name == name
    assert make_strategy(name) is not s


def test_the_lb_names_are_exactly_the_documented_ones():
    assert set(STRATEGIES) == {"least-outstanding", "round-robin", "random", "weighted", "p2c-ewma"}
    with pytest.raises(ValueError, match="fastest"):
        make_strategy("fastest")
