"""Test helpers: a clock that moves only when told, and process/port helpers for loopback tests
(`Processes` also reports children that died unasked or logged a traceback: `ProcessError`)."""

from __future__ import annotations

import random

from zrpc._tools._procs import ProcessError, Processes, free_port, wait_until

__all__ = ["FakeClock", "ProcessError", "Processes", "free_port", "hostile_message", "wait_until"]


class FakeClock:
    """Monotonic seconds that advance only through `advance()`: HA rules tested in microseconds."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time can't go backwards")
        self._now += seconds
        return self._now


def hostile_message(rng: random.Random, i: int) -> list[bytes]:
    """One malformed or adversarial message for a broker's frontend (fuzzing): random frames,
    valid heads with garbage, huge or deeply nested msgpack, wrong header types, absurd
    deadlines, duplicate request ids, replies from unknown workers, absurd READYs."""
    import os

    import msgpack

    from zrpc._core._frames import CLIENT, WORKER

    def pk(o: object) -> bytes:
        return bytes(msgpack.packb(o, use_bin_type=True))

    kind = i % 16
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 6))]
    if kind == 1:
        return [pk([CLIENT, 1, i, "calc", "add", {"budget_ms": rng.choice(["x", -5, 2**63, None, 1.5])}]), b""]
    if kind == 2:
        return [pk([CLIENT, 1, i, "calc", "add", {}])[: rng.randrange(1, 12)], b""]  # truncated head
    if kind == 3:
        return [pk([WORKER, 3, "evil", {"calc": {"add": True}}, rng.choice([0, -1, 10**9, "8"])]), b""]
    if kind == 4:
        return [pk([WORKER, 2, os.urandom(16), i, 0]), b"result"]  # a reply nobody asked for
    if kind == 5:
        return [pk(["ZRPC1C", rng.randrange(-3, 50)]), b""]
    if kind == 6:
        return [pk([CLIENT, 1, i, "calc", "add", {"budget_ms": 1000}]), rng.randbytes(20)]  # bad body
    if kind == 7:
        return [pk([CLIENT, 1, i, "calc", "add", {"budget_ms": rng.choice([0, 2**40])}]), pk([[1, 2], {}])]
    if kind == 8:
        return [pk([CLIENT, 2, i, 0]), b""]  # a reply sent to a broker
    if kind == 9:
        return [pk([CLIENT, 1, i, "x" * 5000, "add", {}]), b""]
    if kind == 10:
        return [pk({f"k{j}": j for j in range(rng.randrange(1000, 5000))}), b""]  # huge map head
    if kind == 11:
        return [b"\x91" * rng.randrange(100, 60000) + b"\xc0", b""]  # deep nesting
    if kind == 12:
        return [pk([CLIENT, 1, 7, "calc", "add", {"budget_ms": 500}]), pk([[1, 2], {}])]  # same id again
    if kind == 13:
        return [pk([CLIENT, 1, i, "calc", "add", {"idempotent": "yes", "attempt": 10**6}]), b""]
    if kind == 14:
        return [pk([WORKER, 3, "w", {f"s{j}": {"m": True} for j in range(2000)}, 8]), b""]  # too many
    return [pk([CLIENT, 1, i, "calc", "add", {"budget_ms": 100}]), pk([list(range(50000)), {}])]
