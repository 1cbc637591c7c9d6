"""Monitor: turns what a broker sees into alerts and metrics, sans-IO.

Early warning (DESIGN.md §4): a phi-accrual detector on each worker's heartbeats says
"suspect" well before the hard liveness timeout; latency EWMAs compared with a worker's
service peers say "degraded"; windowed p99 latency and error ratio per service are held
against thresholds. Every condition is raised once and resolved once (with hysteresis), so a
dashboard sees a start and an end, never a stream of duplicates.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zrpc._core._clock import Clock
from zrpc._defaults import HEARTBEAT_INTERVAL

if TYPE_CHECKING:  # the dispatcher imports ewma() from here: no import back at load time
    from zrpc.broker._core._bstar import PeerAlert
    from zrpc.broker._core._dispatch import Notice

RAISED, RESOLVED, EVENT = "raised", "resolved", "event"
IN_FORCE = "in_force"
"""An alert raised earlier, published again for a monitor that subscribed since."""

CATALOGUE = {
    # name: (severity, what it means)
    "worker_joined": ("info", "a worker registered"),
    "worker_leaving": ("info", "a worker is draining before it leaves"),
    "worker_lost": ("critical", "a worker died or hung; resolved when a worker of its services joins"),
    "worker_suspect": ("warning", "a worker's heartbeats are late or irregular (phi-accrual)"),
    "worker_degraded": ("warning", "a worker's latency is an outlier among its service's workers"),
    "worker_ejected": ("warning", "an outlier is kept out of dispatch for a while"),
    "service_unavailable": ("critical", "a service has no worker"),
    "redundancy_lost": ("warning", "a service is down to one worker"),
    "queue_backlog": ("warning", "calls are waiting in a service's queue"),
    "latency_slo": ("warning", "a service's p99 latency is above its objective"),
    "error_rate": ("warning", "a service's error ratio is above the threshold"),
    "failover": ("critical", "the backup took over; resolved when its peer is back (with --elect: "
                 "this broker took the active role from another; resolved when it no longer "
                 "holds it)"),
    "split_brain": ("critical", "both brokers were active; resolved when one stepped down"),
    "dual_passive": ("warning", "both brokers were passive"),
    "peer_lost": ("warning", "the peer broker is silent"),
    "peer_back": ("info", "the peer broker is back"),
    "unauthorized": ("warning", "a peer's CURVE key was refused (one alert per address and key a "
                     "minute; the next one counts the repeats)"),
    "internal_error": ("critical", "a loop caught a bug of its own and dropped one message (at most "
                       "one alert per subject in 10 s, with the count)"),
    "broker_restarted": ("warning", "a supervisor restarted this broker after it died"),
    "role_conflict": ("critical", "both brokers have the same role (two primaries or two backups): "
                      "neither will serve"),
    "peer_unreachable": ("warning", "a backup that has never heard its primary: it will not serve"),
    "member_joined": ("info", "a broker joined the cluster (or came back with a new run)"),
    "member_left": ("warning", "a broker left the cluster (its lease expired or was revoked); "
                    "resolved when it joins again"),
    "etcd_unreachable": ("warning", "etcd does not answer: this member keeps serving with the "
                         "membership it last saw, and nobody new can join; resolved when it answers "
                         "(with --elect: no candidate can take the role meanwhile)"),
    "worker_restarted": ("warning", "a prefork worker's supervisor restarted one of its processes "
                         "after it died (the count of restarts so far)"),
    "result_mismatch": ("warning", "a call run on two workers (redundant) got different replies: "
                        "one of the two workers answers wrongly"),
    "lease_lost": ("critical", "the active broker of an election could not renew its etcd lease in "
                   "time (or lost its key) and stopped serving before the lease could expire; "
                   "resolved when its lease is renewed again"),
}

CLUSTER_CONDITIONS = frozenset({"member_left", "etcd_unreachable"})
"""Cluster conditions (subject: the member, or "etcd"), raised and resolved as the membership
core says (its `resolved` flag)."""

PAIR_CONDITIONS = frozenset({"failover", "split_brain", "dual_passive", "role_conflict", "peer_unreachable"})
"""Conditions of the pair as a whole: raised and resolved with the subject "pair"."""

ELECTION_SUBJECT = "election"
ELECTION_CONDITIONS = frozenset({"failover", "lease_lost"})
"""Conditions of an elected broker (`--elect`), raised and resolved as its election core says,
with the subject "election"."""


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    severity: str
    state: str  # raised, resolved, or event (an instant with nothing to resolve)
    subject: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Eject:
    worker_id: bytes
    ejected: bool


Output = Alert | Eject


PHI_MAX = 300.0
"""phi's ceiling: a 1-in-10^300 chance is past every threshold, and stays a finite number."""

MIN_STD_RATIO = 0.15
MAX_STD_RATIO = 0.2
"""The bounds of phi's standard deviation, in intervals (PhiAccrual says why)."""

PAUSE_RATIO = 0.4
"""The delay, in intervals, a beat may have without being news (Akka's acceptable heartbeat
pause): measured, a loaded 2-core machine delays beats by ~100 ms at 250 ms intervals."""

_LN10 = math.log(10.0)
_MAX_GAP = 86_400.0  # a longer silence is "very long" all the same, and sums stay finite
_MIN_INTERVAL = 1e-3


def _clamp(v: float, lo: float, hi: float, default: float) -> float:
    """`v` within [lo, hi]; `default` for NaN (configuration and clocks are not trusted)."""
    if v != v:
        return default
    return lo if v < lo else hi if v > hi else float(v)


class PhiAccrual:
    """Hayashibara et al.'s phi-accrual failure detector over heartbeat inter-arrival times.

    phi = -log10(P(a heartbeat arrives later than now)), assuming normal inter-arrivals:
    phi 1 means a 10 % chance the peer is fine, phi 8 one in 10^8. It starts as if
    `min_samples` beats had come exactly `first_interval` apart (the interval the broker
    announces), so a first gap of 1 ms (two beats at registration) is not taken for the
    rhythm (the Monitor also waits for `Thresholds.phi_samples` real gaps before it judges).
    The learned standard deviation is kept within [min_std_ratio, max_std_ratio] x interval:
    below, a perfectly regular worker would be suspect the first time a 2-core machine stalls;
    above, a jittery one would reach the liveness timeout (3 intervals) before it could ever be
    suspect, and the early warning would be no warning. With the defaults, phi reaches 8 about
    300 ms after a regular beat was due (550 ms of silence at 250 ms), 390 ms for a jittery one.

    Total by construction: any float input (NaN, infinities, time going backwards) gives a
    finite phi in [0, PHI_MAX], and phi never decreases as `now` grows.
    """

    def __init__(self, first_interval: float, window: int = 100, min_std_ratio: float = MIN_STD_RATIO,
                 acceptable_pause: float | None = None, min_samples: int = 4,
                 max_std_ratio: float = MAX_STD_RATIO) -> None:
        interval = _clamp(first_interval, _MIN_INTERVAL, _MAX_GAP, HEARTBEAT_INTERVAL)
        self.min_samples = max(0, min_samples)
        self.samples = 0  # real gaps seen (counted up to the window)
        self._window = max(1, window, self.min_samples)
        self._gaps: deque[float] = deque(maxlen=self._window)
        self._gaps.extend([interval] * self.min_samples)
        self._last: float | None = None
        self._interval = interval
        self._std_min = max(_clamp(min_std_ratio, 0.0, 100.0, MIN_STD_RATIO) * interval, 1e-3)
        self._std_max = max(_clamp(max_std_ratio, 0.0, 100.0, MAX_STD_RATIO) * interval, self._std_min)
        pause = PAUSE_RATIO * interval if acceptable_pause is None else acceptable_pause
        self._pause = _clamp(pause, 0.0, _MAX_GAP, PAUSE_RATIO * interval)
        self._sum = math.fsum(self._gaps)
        self._sumsq = math.fsum(g * g for g in self._gaps)
        self._appended = 0
        self._fit()

    def heartbeat(self, now: float) -> None:
        if not math.isfinite(now):
            return  # a clock that says NaN or infinity tells nothing of the rhythm
        last = self._last
        if last is not None:
            if now < last:
                return  # time went backwards: keep the later beat, learn nothing
            gap = min(now - last, _MAX_GAP)  # now - last may overflow to inf: min() tames it
            gaps = self._gaps
            if len(gaps) == self._window:
                old = gaps[0]
                self._sum -= old
                self._sumsq -= old * old
            gaps.append(gap)
            self._sum += gap
            self._sumsq += gap * gap
            self._appended += 1
            if self._appended >= len(gaps):  # running sums drift: refit exactly now and then
                self._appended = 0
                self._sum = math.fsum(gaps)
                self._sumsq = math.fsum(g * g for g in gaps)
            if self.samples < self._window:
                self.samples += 1
            self._fit()
        self._last = now

    def _fit(self) -> None:
        n = len(self._gaps)
        mean = self._sum / n if n else self._interval
        var = self._sumsq / n - mean * mean if n else 0.0
        std = math.sqrt(var) if var > 0.0 else 0.0
        self._std = _clamp(std, self._std_min, self._std_max, self._std_min)
        self._late = mean + self._pause  # how late "on time" may be

    def phi(self, now: float) -> float:
        last = self._last
        if last is None or now != now:
            return 0.0
        y = ((now - last) - self._late) / self._std  # +-inf at worst, never NaN
        # logistic approximation of the normal CDF (as Akka and Cassandra do):
        # phi = log10(1 + e^z), z = y (1.5976 + 0.070566 y^2), increasing in y; computed
        # without ever overflowing exp (z >= 700 is past PHI_MAX anyway)
        z = y * (1.5976 + 0.070566 * y * y)
        if z >= 700.0:
            return PHI_MAX
        v = math.log1p(math.exp(z)) / _LN10
        return v if v < PHI_MAX else PHI_MAX


def ewma(prev: float, sample: float, alpha: float) -> float:
    """The dispatcher's latency EWMA: the first sample (prev 0) seeds it, then each moves it by
    `alpha`. Clamped between prev and sample, so no input (a clock's NaN, a rounding) can push
    it outside what it has seen, and it is never negative."""
    if not (sample >= 0.0 and math.isfinite(sample)):
        return prev if prev >= 0.0 and math.isfinite(prev) else 0.0
    if not (prev > 0.0 and math.isfinite(prev)):
        return float(sample)
    a = _clamp(alpha, 0.0, 1.0, 0.0)
    v = prev + a * (sample - prev)
    lo, hi = (prev, sample) if prev <= sample else (sample, prev)
    return lo if v < lo else hi if v > hi else v


@dataclass(slots=True)
class _Tally:
    """A rate-limited alert's memory: when it last went out, how many since, how many ever."""

    last: float
    since: int = 0
    total: int = 0


def _make_room(tallies: dict[Any, _Tally], cap: int) -> None:
    """Bounded memory for a rate limit: beyond `cap` the least recently touched goes first
    (its repeats are then alerted as new; nothing is ever silently unbounded)."""
    while len(tallies) >= cap:
        del tallies[next(iter(tallies))]


@dataclass
class Thresholds:
    phi: float = 8.0
    phi_samples: int = 6  # heartbeat gaps seen after joining (or a takeover) before phi is judged
    latency_slo: float = 1.0  # seconds, p99 over the window
    error_rate: float = 0.1
    min_calls: int = 20  # in the window, before latency or error rate are judged
    backlog: int = 100  # queued calls
    degraded_factor: float = 3.0  # EWMA against the median of the service's other workers
    degraded_min: float = 0.05  # seconds above that median, so that fast services stay quiet
    degraded_samples: int = 10  # calls served before a worker is judged
    sustain: float = 0.5  # seconds an outlier must stay one (or stay healthy) before it changes
    window: int = 5  # seconds of metrics for latency and error rate
    eject: bool = False
    eject_time: float = 10.0


WORKER_CONDITIONS = ("worker_suspect", "worker_degraded", "worker_ejected")
SERVICE_CONDITIONS = ("service_unavailable", "redundancy_lost", "queue_backlog", "latency_slo", "error_rate")


class Monitor:
    """Alert rules for one broker: feed it heartbeats, notices and snapshots; it says what to
    publish (and, with ejection on, which worker to keep out of dispatch).

    Memory is bounded by what is alive: a worker's state goes with `forget()` or when it is
    absent from a snapshot, a service's when it is absent, a lost worker nobody replaced after
    LOST_TTL, rate-limit memories past their caps."""

    LOST_TTL = 600.0  # seconds a worker_lost waits for a replacement before it is let go
    LOST_MAX = 1000  # lost workers remembered at once
    REFUSED_WINDOW = 60.0  # one unauthorized alert per (address, key) in this many seconds
    REFUSED_MAX = 10_000
    INTERNAL_WINDOW = 10.0  # one internal_error alert per subject in this many seconds
    INTERNAL_MAX = 1000
    EJECT_MAX = 300.0  # seconds: a repeat offender's ejection doubles up to this

    def __init__(self, clock: Clock, interval: float, thresholds: Thresholds | None = None) -> None:
        self._clock = clock
        self.interval = interval
        self.t = thresholds or Thresholds()
        self._raised: dict[tuple[str, str], Alert] = {}
        self._subjects: dict[str, dict[str, None]] = {}  # alert name -> subjects raised, in order
        self._phi: dict[bytes, PhiAccrual] = {}
        self._lost_services: dict[str, tuple[float, frozenset[str]]] = {}  # name -> (when, services)
        self._ejected: dict[bytes, float] = {}  # worker -> readmission time
        self._eject_next: dict[bytes, float] = {}  # worker -> next ejection's length
        self._prev: dict[str, dict[str, Any]] = {}  # service -> last cumulative counters
        self._windows: dict[str, deque[tuple[int, int, list[int]]]] = {}
        self._last_metrics: float | None = None
        self._since: dict[tuple[str, str], float] = {}  # (name, subject) -> condition began
        self._refused: dict[tuple[str, str | None], _Tally] = {}  # (address, key) -> its alerts
        self._internal: dict[str, _Tally] = {}  # subject -> its internal_error alerts
        self.unauthorized_repeats = 0
        """Refused connections not alerted (the same address and key within the minute)."""

    def __repr__(self) -> str:
        ejected = f" ejected={len(self._ejected)}" if self._ejected else ""
        return f"<Monitor alerts=[{', '.join(self._subjects)}] workers={len(self._phi)}{ejected}>"

    # --- dedup ---------------------------------------------------------------------------

    @property
    def active(self) -> list[Alert]:
        return list(self._raised.values())

    @staticmethod
    def _severity(name: str, default: str = "warning") -> str:
        known = CATALOGUE.get(name)
        return known[0] if known is not None else default

    # positional-only: a detail may carry keys named "name" or "subject"
    def _raise(self, name: str, subject: str, severity: str = "warning", /, **detail: Any) -> list[Output]:
        key = (name, subject)
        if key in self._raised:
            return []
        a = Alert(name, self._severity(name, severity), RAISED, subject, detail)
        self._raised[key] = a
        self._subjects.setdefault(name, {})[subject] = None
        return [a]

    def _raised_for(self, name: str) -> list[str]:
        """Subjects with `name` raised (a copy: resolving while iterating is fine)."""
        return list(self._subjects.get(name, ()))

    def _resolve(self, name: str, subject: str, /, **detail: Any) -> list[Output]:
        a = self._raised.pop((name, subject), None)
        if a is None:
            return []
        subjects = self._subjects[name]
        subjects.pop(subject, None)
        if not subjects:
            del self._subjects[name]
        return [Alert(name, a.severity, RESOLVED, subject, detail)]

    def _sustained(self, name: str, subject: str, holds: bool, now: float) -> bool:
        """True once `holds` has been true for `sustain` seconds: no flapping on one spike."""
        key = (name, subject)
        if not holds:
            self._since.pop(key, None)
            return False
        start = self._since.setdefault(key, now)
        return now - start >= self.t.sustain

    def _event(self, name: str, subject: str, severity: str = "info", /, **detail: Any) -> list[Output]:
        return [Alert(name, self._severity(name, severity), EVENT, subject, detail)]

    # --- inputs --------------------------------------------------------------------------

    def worker_heartbeat(self, worker_id: bytes) -> None:
        det = self._phi.get(worker_id)
        if det is None:
            det = self._phi[worker_id] = PhiAccrual(self.interval)
        det.heartbeat(self._clock())

    def phi(self, worker_id: bytes) -> float:
        """The worker's phi now (0 before its first heartbeat, or after a takeover)."""
        det = self._phi.get(worker_id)
        return det.phi(self._clock()) if det is not None else 0.0

    def forget(self, worker_id: bytes) -> None:
        """The worker is gone (lost, or left cleanly): drop what was kept about it. The loop
        calls it in every state, so a passive broker's detectors do not pile up."""
        self._phi.pop(worker_id, None)
        self._ejected.pop(worker_id, None)
        self._eject_next.pop(worker_id, None)

    def became_active(self) -> list[Output]:
        """This broker takes over: what it saw of heartbeats while passive is not held against
        the workers (their links to it may have been reconnecting); every detector starts
        again from the announced interval. Resolves suspicions left from an earlier term."""
        self._phi.clear()
        out: list[Output] = []
        for subject in self._raised_for("worker_suspect"):
            out += self._resolve("worker_suspect", subject, reason="this broker took over: detectors reset")
        return out

    def notice(self, n: Notice) -> list[Output]:
        """Events the dispatcher and the loop report (worker_joined, worker_lost, worker_leaving,
        unauthorized, internal_error, broker_restarted, role_conflict, peer_unreachable), the
        cluster's (member_joined, member_left, etcd_unreachable) and an election's (failover,
        lease_lost, etcd_unreachable)."""
        out: list[Output] = []
        if n.name == "worker_joined":
            out += self._event("worker_joined", n.subject, **n.detail)
            services = set(n.detail.get("services", ()))
            for name, (_, lost_services) in list(self._lost_services.items()):
                if name == n.subject or lost_services & services:
                    del self._lost_services[name]
                    out += self._resolve("worker_lost", name, replaced_by=n.subject)
        elif n.name == "worker_lost":
            now = self._clock()
            self._lost_services.pop(n.subject, None)  # re-inserted last: the dict stays in age order
            self._lost_services[n.subject] = (now, frozenset(n.detail.get("services", ())))
            out += self._raise("worker_lost", n.subject, **n.detail)
            for name in WORKER_CONDITIONS:
                out += self._resolve(name, n.subject, reason="worker lost")
            out += self._expire_lost(now)
        elif n.name == "worker_leaving":
            out += self._event("worker_leaving", n.subject, **n.detail)
        elif n.name == "unauthorized":
            out += self._unauthorized(n.subject, n.detail)
        elif n.name == "internal_error":
            out += self.internal_error(n.subject, n.detail)
        elif n.name == "broker_restarted":  # in force for a minute: subscribers reconnect
            detail = {k: v for k, v in n.detail.items() if k != "resolved"}
            if n.detail.get("resolved"):
                out += self._resolve("broker_restarted", n.subject, **detail)
            else:
                out += self._raise("broker_restarted", n.subject, **detail)
        elif n.name == "member_joined":
            out += self._event("member_joined", n.subject, **n.detail)
        elif n.name in ("worker_restarted", "result_mismatch"):
            out += self._event(n.name, n.subject, "warning", **n.detail)
        elif n.name in CLUSTER_CONDITIONS:
            detail = {k: v for k, v in n.detail.items() if k != "resolved"}
            if n.detail.get("resolved"):
                out += self._resolve(n.name, n.subject, **detail)
            else:
                out += self._raise(n.name, n.subject, **detail)
        elif n.name in ELECTION_CONDITIONS and n.subject == ELECTION_SUBJECT:
            detail = {k: v for k, v in n.detail.items() if k != "resolved"}
            if n.detail.get("resolved"):
                out += self._resolve(n.name, n.subject, **detail)
            else:
                out += self._raise(n.name, n.subject, **detail)
        elif n.name in PAIR_CONDITIONS:
            detail = {k: v for k, v in n.detail.items() if k != "resolved"}
            if n.detail.get("resolved"):
                out += self._resolve(n.name, "pair", **detail)
            else:
                out += self._raise(n.name, "pair", **detail)
        return out

    def _unauthorized(self, address: str, detail: Mapping[str, Any]) -> list[Output]:
        """One alert per new (address, key); the same pair again within the window is counted,
        and the next alert of that pair says how many were not alerted."""
        now = self._clock()
        raw = detail.get("key")
        key = raw.hex() if isinstance(raw, (bytes, bytearray)) else raw if isinstance(raw, str) else None
        pair = (address, key)
        seen = self._refused.get(pair)
        if seen is not None and now - seen.last < self.REFUSED_WINDOW:
            seen.since += 1
            seen.total += 1
            self.unauthorized_repeats += 1
            return []
        if seen is None:
            _make_room(self._refused, self.REFUSED_MAX)
            seen = _Tally(now)
        else:
            del self._refused[pair]  # re-inserted last: the dict stays in order of alerts
        repeats, seen.since, seen.last = seen.since, 0, now
        seen.total += 1
        self._refused[pair] = seen
        out = dict(detail)
        if key is not None:
            out["key"] = key
        if repeats:
            out["repeats"] = repeats
        return self._event("unauthorized", address, **out)

    def internal_error(self, subject: str, detail: Mapping[str, Any] | None = None) -> list[Output]:
        """A loop contained a bug of its own (`subject` says where). At most one alert per
        subject in INTERNAL_WINDOW seconds; `count` says how many since the previous alert
        (this one included), `total` how many ever."""
        now = self._clock()
        tally = self._internal.get(subject)
        if tally is None:
            _make_room(self._internal, self.INTERNAL_MAX)
            tally = _Tally(-math.inf)
        else:
            del self._internal[subject]  # re-inserted last: the dict stays in order of alerts
        self._internal[subject] = tally
        tally.since += 1
        tally.total += 1
        if now - tally.last < self.INTERNAL_WINDOW:
            return []
        count, tally.since, tally.last = tally.since, 0, now
        return self._event("internal_error", subject, "critical",
                           **{**(detail or {}), "count": count, "total": tally.total})

    def peer(self, a: PeerAlert) -> list[Output]:
        """Binary Star events: failover, split_brain, dual_passive, role_conflict and
        peer_unreachable (conditions of the pair), peer_lost, peer_back, and the events
        internal_error and broker_restarted."""
        if a.name == "peer_back":
            return [*self._event("peer_back", "peer", **a.detail),
                    *self._resolve("failover", "pair", reason="peer back")]
        if a.name == "internal_error":
            detail = dict(a.detail)
            return self.internal_error(str(detail.pop("subject", "pair")), detail)
        if a.name == "broker_restarted":
            detail = dict(a.detail)
            return self._event("broker_restarted", str(detail.pop("subject", "broker")), a.severity, **detail)
        subject = "pair" if a.name in PAIR_CONDITIONS else "peer"
        if a.resolved:
            return self._resolve(a.name, subject, **a.detail)
        return self._raise(a.name, subject, a.severity, **a.detail)

    def evaluate(self, snap: dict[str, Any]) -> list[Output]:
        """Conditions on a dispatcher snapshot: suspects, outliers, capacity, queues."""
        now = self._clock()
        out: list[Output] = []
        workers = snap["workers"]
        self._keep_only({bytes.fromhex(w["id"]) for w in workers})
        by_name: dict[str, dict[str, Any]] = {}
        for w in workers:
            wid = bytes.fromhex(w["id"])
            by_name[w["name"]] = w
            det = self._phi.get(wid)
            phi = det.phi(now) if det is not None else 0.0
            if phi >= self.t.phi and det is not None and det.samples >= self.t.phi_samples:
                out += self._raise("worker_suspect", w["name"], phi=round(phi, 2))
            elif phi < self.t.phi / 2:
                out += self._resolve("worker_suspect", w["name"], phi=round(phi, 2))
        out += self._gone(by_name, {s["name"] for s in snap["services"]})
        out += self._outliers(snap, by_name, now)
        for s in snap["services"]:
            name, n = s["name"], s["workers"]
            if n == 0 and s.get("max_workers", 0) > 0:
                out += self._raise("service_unavailable", name)
            elif n > 0:
                out += self._resolve("service_unavailable", name, workers=n)
            if n == 1 and s.get("max_workers", 0) >= 2:
                out += self._raise("redundancy_lost", name, workers=n, was=s["max_workers"])
            elif n >= 2:
                out += self._resolve("redundancy_lost", name, workers=n)
            if s["queued"] >= self.t.backlog:
                out += self._raise("queue_backlog", name, queued=s["queued"])
            elif s["queued"] <= self.t.backlog // 2:
                out += self._resolve("queue_backlog", name, queued=s["queued"])
        out += self._expire_lost(now)
        return out

    def _keep_only(self, live: set[bytes]) -> None:
        """Forgets every worker the dispatcher no longer has (however it left)."""
        for d in (self._phi, self._ejected, self._eject_next):
            for wid in [w for w in d if w not in live]:
                del d[wid]

    def _gone(self, workers: Mapping[str, Any], services: set[str]) -> list[Output]:
        """Resolves the conditions of workers and services that are no more (a clean leave
        has no worker_lost to resolve them), and forgets their pending conditions."""
        out: list[Output] = []
        for name in WORKER_CONDITIONS:
            for subject in self._raised_for(name):
                if subject not in workers:
                    out += self._resolve(name, subject, reason="worker gone")
        for name in SERVICE_CONDITIONS:
            for subject in self._raised_for(name):
                if subject not in services:
                    out += self._resolve(name, subject, reason="service gone")
        for key in [k for k in self._since if k[1] not in workers
                    and k[0] in ("worker_degraded", "worker_healthy")]:
            del self._since[key]
        return out

    def _expire_lost(self, now: float) -> list[Output]:
        """Lets go of lost workers nobody replaced within LOST_TTL (or beyond LOST_MAX): their
        worker_lost is resolved, so that neither the alert nor its memory lives forever."""
        out: list[Output] = []
        lost = self._lost_services
        while lost:
            name, (since, _) = next(iter(lost.items()))
            if now - since < self.LOST_TTL and len(lost) <= self.LOST_MAX:
                break
            del lost[name]
            if now - since >= self.LOST_TTL:
                why = f"forgotten: not replaced within {self.LOST_TTL:.0f}s"
            else:
                why = f"forgotten: more than {self.LOST_MAX} lost workers"
            out += self._resolve("worker_lost", name, reason=why)
        return out

    def _outliers(self, snap: dict[str, Any], by_name: dict[str, dict[str, Any]], now: float) -> list[Output]:
        out: list[Output] = []
        t = self.t
        degraded: set[str] = set()
        for s in snap["services"]:
            ws = [w for w in snap["workers"] if s["name"] in w["services"] and not w.get("leaving")]
            judged = [w for w in ws if w["served"] >= t.degraded_samples]
            for w in judged:
                others = [o["ewma_ms"] / 1000 for o in judged if o is not w]
                if not others:
                    continue
                base = statistics.median(others)
                ewma_s = w["ewma_ms"] / 1000
                limit = max(t.degraded_factor * base, base + t.degraded_min)
                if ewma_s > 0.7 * limit and ("worker_degraded", w["name"]) in self._raised:
                    degraded.add(w["name"])  # hysteresis: stays degraded until well below
                if self._sustained("worker_degraded", w["name"], ewma_s > limit, now):
                    degraded.add(w["name"])
                    out += self._raise("worker_degraded", w["name"], service=s["name"],
                                       ewma_ms=w["ewma_ms"], peers_median_ms=round(base * 1000, 3))
                    if t.eject and bytes.fromhex(w["id"]) not in self._ejected:
                        others_in = [o for o in ws if not o.get("ejected") and o is not w]
                        if others_in:  # never eject the last worker of a service
                            out += self._eject(w, now)
        for name in self._raised_for("worker_degraded"):
            w = by_name.get(name)
            if w is None:
                continue  # gone: _gone() resolved it
            healthy = name not in degraded and not w.get("ejected")
            if self._sustained("worker_healthy", name, healthy, now):
                out += self._resolve("worker_degraded", name, ewma_ms=w["ewma_ms"])
        for wid, until in list(self._ejected.items()):
            if now >= until:
                gone = next((w["name"] for w in snap["workers"] if w["id"] == wid.hex()), None)
                del self._ejected[wid]
                out.append(Eject(wid, False))
                if gone is not None:
                    out += self._resolve("worker_ejected", gone)
                    out += self._resolve("worker_degraded", gone, reason="readmitted")
        return out

    def _eject(self, w: dict[str, Any], now: float) -> list[Output]:
        wid = bytes.fromhex(w["id"])
        duration = self._eject_next.get(wid, self.t.eject_time)
        self._ejected[wid] = now + duration
        self._eject_next[wid] = min(duration * 2, self.EJECT_MAX)  # repeat offenders wait longer
        return [Eject(wid, True), *self._raise("worker_ejected", w["name"], seconds=duration)]

    # --- metrics -------------------------------------------------------------------------

    def metrics(self, snap: dict[str, Any]) -> tuple[dict[str, Any], list[Output]]:
        """A snapshot for the `metrics` topic (rates over the last second), and the alerts
        judged over the window (latency_slo, error_rate). Runs in every state, so it is also
        where the state of workers and services that are gone is dropped."""
        now = self._clock()
        dt = (now - self._last_metrics) if self._last_metrics is not None else 1.0
        dt = max(dt, 1e-3)
        self._last_metrics = now
        self._keep_only({bytes.fromhex(w["id"]) for w in snap["workers"]})
        names = {s["name"] for s in snap["services"]}
        for d in (self._prev, self._windows):
            for name in [n for n in d if n not in names]:
                del d[name]
        out: list[Output] = []
        for name in ("latency_slo", "error_rate"):
            for subject in self._raised_for(name):
                if subject not in names:
                    out += self._resolve(name, subject, reason="service gone")
        services: dict[str, Any] = {}
        zero = [0] * len(_bounds())
        for s in snap["services"]:
            name = s["name"]
            prev = self._prev.get(name, {"calls": 0, "errors": 0, "buckets": zero})
            if s["calls"] < prev["calls"] or s["errors"] < prev["errors"] or any(
                    a < b for a, b in zip(s["latency_buckets"], prev["buckets"])):
                prev = {"calls": 0, "errors": 0, "buckets": zero}  # the counters were reset
            d_calls = s["calls"] - prev["calls"]
            d_errors = s["errors"] - prev["errors"]
            d_buckets = [a - b for a, b in zip(s["latency_buckets"], prev["buckets"])]
            self._prev[name] = {"calls": s["calls"], "errors": s["errors"], "buckets": s["latency_buckets"]}
            win = self._windows.setdefault(name, deque(maxlen=self.t.window))
            win.append((d_calls, d_errors, d_buckets))
            w_calls = sum(c for c, _, _ in win)
            w_errors = sum(e for _, e, _ in win)
            w_buckets = [sum(col) for col in zip(*(b for _, _, b in win))]
            p99 = quantile(w_buckets, 0.99)
            services[name] = {
                "workers": s["workers"], "queued": s["queued"], "outstanding": s["outstanding"],
                "calls_s": round(d_calls / dt, 1), "errors_s": round(d_errors / dt, 1),
                "p50_ms": _ms(quantile(d_buckets, 0.5)), "p99_ms": _ms(quantile(d_buckets, 0.99)),
            }
            if w_calls >= self.t.min_calls and p99 is not None:
                if p99 > self.t.latency_slo:
                    out += self._raise("latency_slo", name, p99_ms=_ms(p99), slo_ms=self.t.latency_slo * 1000)
                elif p99 < 0.8 * self.t.latency_slo:
                    out += self._resolve("latency_slo", name, p99_ms=_ms(p99))
            if w_calls >= self.t.min_calls:
                ratio = w_errors / w_calls
                if ratio >= self.t.error_rate:
                    out += self._raise("error_rate", name, ratio=round(ratio, 3), calls=w_calls)
                elif ratio < self.t.error_rate / 2:
                    out += self._resolve("error_rate", name, ratio=round(ratio, 3))
            elif w_calls == 0:
                out += self._resolve("latency_slo", name, reason="no calls")
                out += self._resolve("error_rate", name, reason="no calls")
        workers = {w["name"]: {"outstanding": w["outstanding"], "capacity": w["capacity"],
                               "ewma_ms": w["ewma_ms"], "phi": _phi_out(self.phi(bytes.fromhex(w["id"]))),
                               "ejected": w.get("ejected", False)}
                   for w in snap["workers"]}
        return {"services": services, "workers": workers, "alerts": len(self._raised),
                "unauthorized_repeats": self.unauthorized_repeats}, out


def _bounds() -> tuple[float, ...]:
    """The dispatcher's latency histogram bounds, looked up when first needed (the
    dispatcher imports ewma() from this module, so it is not imported at load time)."""
    from zrpc.broker._core._dispatch import LATENCY_BUCKETS

    return LATENCY_BUCKETS


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """Estimate from histogram counts (linear inside a bucket, as Prometheus does): None when
    there is nothing to estimate; otherwise within the bucket the rank falls in, never above the
    highest finite bound, and non-decreasing in q. Negative counts (a reset seen as a
    difference) count as none."""
    bounds = _bounds()
    counts = [n if n > 0 else 0 for n in buckets[:len(bounds)]]
    total = sum(counts)
    if total == 0 or q != q:
        return None
    rank: float | int = min(_clamp(q, 0.0, 1.0, 0.5) * total, total)  # q * total may round up
    seen = 0
    lower = 0.0
    for upper, n in zip(bounds, counts):
        if n > 0 and seen + n >= rank:
            if math.isinf(upper):
                return lower
            frac = _clamp((rank - seen) / n, 0.0, 1.0, 0.0)
            v = lower + (upper - lower) * frac
            return lower if v < lower else upper if v > upper else v
        seen += n
        lower = upper
    return lower  # not reached: the last non-empty bucket holds the rank


def _phi_out(phi: float) -> float:
    """phi as published: rounded, never negative zero, NaN or out of [0, PHI_MAX]."""
    if not phi > 0.0:
        return 0.0
    return round(min(phi, PHI_MAX), 2) + 0.0


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)
