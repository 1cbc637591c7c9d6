"""Properties of every numeric rule fed from the network or the clock, over their whole input
domain: no exception, finite results, within bounds, monotonic where the rule promises it."""

from __future__ import annotations

import math
import random

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zrpc._core._clock import budget_ms, deadline_from_budget, timeout_ms
from zrpc._core._liveness import Backoff
from zrpc._errors import ProtocolError
from zrpc.broker._core._bstar import decode_state
from zrpc.broker._core._dispatch import LATENCY_BUCKETS
from zrpc.broker._core._monitor import PHI_MAX, PhiAccrual, ewma, quantile

# the machine is shared: how long an example takes must never decide pass or fail (set per
# test, so that other test modules keep their own settings)
relaxed = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

any_float = st.floats(allow_nan=True, allow_infinity=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
times = st.one_of(finite, st.floats(min_value=-1e6, max_value=1e6), st.floats(min_value=0, max_value=1e-6))


# --- phi accrual --------------------------------------------------------------------------------


def in_range(p: float) -> bool:
    return isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= PHI_MAX and math.copysign(1.0, p) == 1.0


@relaxed
@given(interval=any_float, beats=st.lists(times, max_size=30), now=any_float)
@example(interval=0.25, beats=[0.0, 0.001], now=0.077)  # the overflow a tiny first gap caused
@example(interval=0.25, beats=[0.0, 0.001], now=0.08)
@example(interval=0.25, beats=[1e308, -1e308, 1e308], now=-1e308)
@example(interval=5e-324, beats=[0.0, 5e-324], now=1e-300)
@example(interval=1e308, beats=[-1e308, 1e308], now=0.0)
def test_phi_is_total_finite_and_bounded(interval, beats, now):
    d = PhiAccrual(interval)
    for t in beats:
        d.heartbeat(t)
    assert in_range(d.phi(now))


@relaxed
@given(interval=any_float, beats=st.lists(any_float, max_size=30), now=any_float)
def test_phi_survives_non_finite_clocks(interval, beats, now):
    d = PhiAccrual(interval)
    for t in beats:
        d.heartbeat(t)
    assert in_range(d.phi(now))


@relaxed
@given(interval=st.one_of(any_float, st.floats(0.01, 10)), beats=st.lists(times, max_size=30),
       a=any_float, b=any_float)
@example(interval=0.25, beats=[0.0, 0.001], a=0.07, b=0.08)
def test_phi_never_decreases_as_time_goes_on(interval, beats, a, b):
    d = PhiAccrual(interval)
    for t in beats:
        d.heartbeat(t)
    if math.isnan(a) or math.isnan(b):
        return
    lo, hi = min(a, b), max(a, b)
    assert d.phi(lo) <= d.phi(hi)


@relaxed
@given(interval=st.floats(0.01, 10), gaps=st.lists(st.floats(0, 100), min_size=1, max_size=150),
       offsets=st.lists(st.floats(0, 1000), min_size=2, max_size=20))
def test_phi_is_monotonic_along_a_realistic_history(interval, gaps, offsets):
    d = PhiAccrual(interval)
    t = 0.0
    for g in gaps:
        d.heartbeat(t)
        t += g
    values = [d.phi(t + o) for o in sorted(offsets)]
    assert values == sorted(values)
    assert all(in_range(v) for v in values)


# --- latency EWMA --------------------------------------------------------------------------------


@relaxed
@given(prev=non_negative, sample=non_negative, alpha=st.floats(0.0, 1.0))
@example(prev=0.0, sample=0.25, alpha=0.2)
@example(prev=1.7976931348623157e308, sample=0.0, alpha=1.0)
@example(prev=0.1, sample=0.30000000000000004, alpha=1.0)
def test_ewma_stays_between_prev_and_sample(prev, sample, alpha):
    v = ewma(prev, sample, alpha)
    assert math.isfinite(v)
    assert min(prev, sample) <= v <= max(prev, sample)
    if prev == 0.0:
        assert v == sample  # the first sample seeds it, as the dispatcher's does


@relaxed
@given(prev=any_float, sample=any_float, alpha=any_float)
def test_ewma_is_total(prev, sample, alpha):
    v = ewma(prev, sample, alpha)
    assert math.isfinite(v) and v >= 0.0


# --- histogram quantiles ---------------------------------------------------------------------------

counts = st.lists(st.integers(min_value=0, max_value=2**64), min_size=len(LATENCY_BUCKETS),
                  max_size=len(LATENCY_BUCKETS))
BOUNDS = [0.0, *LATENCY_BUCKETS]


def bucket_of(buckets: list[int], q: float) -> tuple[float, float]:
    """The bounds of the bucket where the q-quantile falls (the top one's lower bound if it is
    the open-ended one)."""
    rank = q * sum(buckets)
    seen = 0
    for i, n in enumerate(buckets):
        if n > 0 and seen + n >= rank:
            upper = BOUNDS[i + 1]
            return BOUNDS[i], BOUNDS[i] if math.isinf(upper) else upper
        seen += n
    last = max(i for i, n in enumerate(buckets) if n > 0)
    return BOUNDS[last], BOUNDS[last] if math.isinf(BOUNDS[last + 1]) else BOUNDS[last + 1]


@relaxed
@given(buckets=counts, q=st.floats(0.0, 1.0))
@example(buckets=[0] * (len(LATENCY_BUCKETS) - 1) + [5], q=0.99)
@example(buckets=[2**54 - 1] + [0] * (len(LATENCY_BUCKETS) - 1), q=1.0)
def test_quantile_is_finite_and_within_its_bucket(buckets, q):
    v = quantile(buckets, q)
    if sum(buckets) == 0:
        assert v is None
        return
    assert v is not None and math.isfinite(v)
    assert 0.0 <= v <= LATENCY_BUCKETS[-2]
    if sum(buckets) < 2**53:  # exact ranks: the bucket is known
        lo, hi = bucket_of(buckets, q)
        assert lo <= v <= hi


@relaxed
@given(buckets=counts, a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_quantile_is_monotonic_in_q(buckets, a, b):
    lo, hi = quantile(buckets, min(a, b)), quantile(buckets, max(a, b))
    assert (lo is None) == (hi is None)
    if lo is not None and hi is not None:
        assert lo <= hi


@relaxed
@given(buckets=st.lists(st.integers(min_value=-(2**64), max_value=2**64), max_size=30), q=any_float)
def test_quantile_survives_any_counts_and_q(buckets, q):
    v = quantile(buckets, q)
    assert v is None or (math.isfinite(v) and 0.0 <= v <= LATENCY_BUCKETS[-2])


# --- budgets and deadlines (zrpc/_core/_clock.py) -------------------------------------------------


@relaxed
@given(deadline=st.floats(-1e12, 1e12), now=st.floats(-1e12, 1e12))
def test_budget_ms_is_never_negative(deadline, now):
    b = budget_ms(deadline, now)
    assert type(b) is int and b >= 0


@relaxed
@given(deadline=finite, now=finite)
@example(deadline=1e308, now=-1e308)
def test_budget_ms_is_total_for_finite_inputs(deadline, now):
    b = budget_ms(deadline, now)
    assert type(b) is int and b >= 0


@relaxed
@given(deadline=st.floats(-1e12, 1e12), now=st.floats(-1e12, 1e12), cap=st.none() | st.floats(0.0, 1e6))
def test_timeout_ms_is_a_non_negative_int_or_none(deadline, now, cap):
    for d in (deadline, None):
        t = timeout_ms(d, now, cap)
        if d is None and cap is None:
            assert t is None
        else:
            assert type(t) is int and t >= 0


@relaxed
@given(deadline=st.none() | finite, now=finite, cap=st.none() | finite)
@example(deadline=None, now=0.0, cap=-5.0)
@example(deadline=1e308, now=-1e308, cap=None)
def test_timeout_ms_is_total_for_finite_inputs(deadline, now, cap):
    t = timeout_ms(deadline, now, cap)
    assert t is None if deadline is None and cap is None else (type(t) is int and t >= 0)


@relaxed
@given(budget=st.integers(min_value=0, max_value=2**64 - 1), now=st.floats(-1e12, 1e12))
def test_deadline_from_a_wire_budget_round_trips(budget, now):
    d = deadline_from_budget(budget, now)
    assert math.isfinite(d) and d >= now
    if abs(now) < 1e6 and budget < 2**40:  # the precision a monotonic clock has
        assert abs(budget_ms(d, now) - budget) <= 1


@relaxed
@given(budget=st.integers(min_value=-(2**80), max_value=2**80) | finite, now=finite)
def test_deadline_from_budget_is_total(budget, now):
    d = deadline_from_budget(budget, now)
    assert isinstance(d, float) and not math.isnan(d)


# --- reconnect backoff (zrpc/_core/_liveness.py) ----------------------------------------------------


@relaxed
@given(initial=st.floats(1e-3, 10.0), factor=st.floats(1.0, 1000.0), jitter=st.floats(0.0, 0.99),
       seed=st.integers(0, 2**32), n=st.integers(1, 60), reset_at=st.integers(0, 60))
def test_backoff_delays_stay_within_bounds_and_reset(initial, factor, jitter, seed, n, reset_at):
    maximum = initial * factor
    b = Backoff(initial, maximum, jitter, rng=random.Random(seed))
    flat = Backoff(initial, maximum, 0.0)
    last_base = 0.0
    for i in range(n):
        if i == reset_at:
            b.reset()
            flat.reset()
            last_base = 0.0
            assert flat.next_delay() == initial  # back to the start
            assert initial * (1 - jitter) <= b.next_delay() <= initial * (1 + jitter)
            continue
        base = flat.next_delay()
        assert base >= last_base and initial <= base <= maximum  # never shrinks, capped
        last_base = base
        d = b.next_delay()
        assert math.isfinite(d)
        assert initial * (1 - jitter) * (1 - 1e-12) <= d <= maximum * (1 + jitter) * (1 + 1e-12)
        assert base * (1 - jitter) * (1 - 1e-12) <= d <= base * (1 + jitter) * (1 + 1e-12)


# --- the Binary Star state message (broker/_core/_bstar.py) --------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20)
state_like = st.lists(msgpack_values, max_size=6).map(lambda xs: ["ZRPC1S", *xs]) | st.tuples(
    st.just("ZRPC1S"), st.sampled_from(["primary", "backup", "active", "passive", "PRIMARY", ""]),
    msgpack_values | st.integers(-1, 2**64 - 1), st.sampled_from(["primary", "backup", "x"]) | msgpack_values,
).map(list)


def only_protocol_errors(frames: list[bytes]) -> None:
    try:
        decoded = decode_state(frames)
    except ProtocolError:
        return
    state, epoch = decoded[0], decoded[1]
    assert type(epoch) is int and 0 <= epoch < 2**64
    assert state.value in ("primary", "backup", "active", "passive")


@relaxed
@given(frames=st.lists(st.binary(max_size=64), max_size=3))
def test_decode_state_of_arbitrary_bytes_raises_only_protocol_error(frames):
    only_protocol_errors(frames)


@relaxed
@given(fields=state_like)
def test_decode_state_of_arbitrary_msgpack_raises_only_protocol_error(fields):
    only_protocol_errors([msgpack.packb(fields, use_bin_type=True)])
