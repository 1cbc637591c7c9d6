import random
from collections import Counter
from dataclasses import dataclass

from zrpc._lb import LeastOutstanding, P2CEwma, RoundRobin, Weighted


@dataclass
class W:
    name: str
    outstanding: int = 0
    capacity: int = 4
    weight: float = 1.0
    ewma: float = 0.0


def test_least_outstanding_prefers_idle():
    ws = [W("a", 3), W("b", 0), W("c", 2)]
    assert LeastOutstanding().choose(ws).name == "b"


def test_round_robin_cycles():
    ws = [W("a"), W("b"), W("c")]
    rr = RoundRobin()
    assert Counter(rr.choose(ws).name for _ in range(30)) == {"a": 10, "b": 10, "c": 10}


def test_weighted_follows_weights():
    ws = [W("a", weight=3), W("b", weight=1)]
    wrr = Weighted()
    assert Counter(wrr.choose(ws).name for _ in range(40)) == {"a": 30, "b": 10}


def test_p2c_ewma_shuns_the_slow_worker():
    ws = [W("fast", ewma=0.001), W("slow", ewma=0.5)]
    p = P2CEwma(random.Random(1))
    assert Counter(p.choose(ws).name for _ in range(50))["fast"] == 50
