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
from dataclasses import dataclass, field
from typing import Any, Union

from zrpc._clock import Clock

from ._bstar import PeerAlert
from ._dispatch import LATENCY_BUCKETS, Notice

RAISED, RESOLVED, EVENT = "raised", "resolved", "event"

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
    "failover": ("critical", "the backup took over; resolved when its peer is back"),
    "split_brain": ("critical", "both brokers were active; resolved when one stepped down"),
    "dual_passive": ("warning", "both brokers were passive"),
    "peer_lost": ("warning", "the peer broker is silent"),
    "peer_back": ("info", "the peer broker is back"),
    "unauthorized": ("warning", "a peer's CURVE key was refused (at most one alert per address a minute)"),
}


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


Output = Union[Alert, Eject]


class PhiAccrual:
    """Hayashibara et al.'s phi-accrual failure detector over heartbeat inter-arrival times.

    phi = -log10(P(a heartbeat arrives later than now)), assuming normal inter-arrivals:
    phi 1 means a 10 % chance the peer is fine, phi 8 one in 10^8.
    """

    def __init__(self, first_interval: float, window: int = 100, min_std_ratio: float = 0.1,
                 acceptable_pause: float | None = None) -> None:
        self._gaps: deque[float] = deque(maxlen=window)
        self._last: float | None = None
        self._first = first_interval
        self._min_std_ratio = min_std_ratio
        # as Akka's acceptable-heartbeat-pause: a busy loop delays a beat a little without
        # that being news (measured: a loaded 2-core machine delays beats by ~100 ms)
        self._pause = 0.4 * first_interval if acceptable_pause is None else acceptable_pause

    def heartbeat(self, now: float) -> None:
        if self._last is not None:
            self._gaps.append(now - self._last)
        self._last = now

    def phi(self, now: float) -> float:
        if self._last is None:
            return 0.0
        gaps = self._gaps
        mean = statistics.fmean(gaps) if gaps else self._first
        std = statistics.pstdev(gaps) if len(gaps) > 1 else 0.0
        std = max(std, mean * self._min_std_ratio, 1e-3)
        mean += self._pause
        y = (now - self._last - mean) / std
        # logistic approximation of the normal CDF (as Akka and Cassandra do): stable in the tail
        e = math.exp(-y * (1.5976 + 0.070566 * y * y)) if y > -30 else math.inf
        if now - self._last > mean:
            return -math.log10(e / (1.0 + e)) if e > 0 else 300.0
        return -math.log10(1.0 - 1.0 / (1.0 + e))


@dataclass
class Thresholds:
    phi: float = 8.0
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


class Monitor:
    """Alert rules for one broker: feed it heartbeats, notices and snapshots; it says what to
    publish (and, with ejection on, which worker to keep out of dispatch)."""

    def __init__(self, clock: Clock, interval: float, thresholds: Thresholds | None = None) -> None:
        self._clock = clock
        self.interval = interval
        self.t = thresholds or Thresholds()
        self._raised: dict[tuple[str, str], Alert] = {}
        self._phi: dict[bytes, PhiAccrual] = {}
        self._phi_now: dict[bytes, float] = {}
        self._lost_services: dict[str, set[str]] = {}  # lost worker name -> its services
        self._ejected: dict[bytes, float] = {}  # worker -> readmission time
        self._eject_next: dict[bytes, float] = {}  # worker -> next ejection's length
        self._prev: dict[str, dict[str, Any]] = {}  # service -> last cumulative counters
        self._windows: dict[str, deque[tuple[int, int, list[int]]]] = {}
        self._last_metrics: float | None = None
        self._since: dict[tuple[str, str], float] = {}  # (name, subject) -> condition began
        self._refused_at: dict[str, float] = {}  # address -> last unauthorized alert

    # --- dedup ---------------------------------------------------------------------------

    @property
    def active(self) -> list[Alert]:
        return list(self._raised.values())

    def _raise(self, name: str, subject: str, **detail: Any) -> list[Output]:
        key = (name, subject)
        if key in self._raised:
            return []
        a = Alert(name, CATALOGUE[name][0], RAISED, subject, detail)
        self._raised[key] = a
        return [a]

    def _resolve(self, name: str, subject: str, **detail: Any) -> list[Output]:
        if self._raised.pop((name, subject), None) is None:
            return []
        return [Alert(name, CATALOGUE[name][0], RESOLVED, subject, detail)]

    def _sustained(self, name: str, subject: str, holds: bool, now: float) -> bool:
        """True once `holds` has been true for `sustain` seconds: no flapping on one spike."""
        key = (name, subject)
        if not holds:
            self._since.pop(key, None)
            return False
        start = self._since.setdefault(key, now)
        return now - start >= self.t.sustain

    def _event(self, name: str, subject: str, **detail: Any) -> list[Output]:
        return [Alert(name, CATALOGUE[name][0], EVENT, subject, detail)]

    # --- inputs --------------------------------------------------------------------------

    def worker_heartbeat(self, worker_id: bytes) -> None:
        det = self._phi.get(worker_id)
        if det is None:
            det = self._phi[worker_id] = PhiAccrual(self.interval)
        det.heartbeat(self._clock())

    def phi(self, worker_id: bytes) -> float:
        return self._phi_now.get(worker_id, 0.0)

    def notice(self, n: Notice) -> list[Output]:
        """Events the dispatcher reported (worker_joined, worker_lost, worker_leaving...)."""
        out: list[Output] = []
        if n.name == "worker_joined":
            out += self._event("worker_joined", n.subject, **n.detail)
            services = set(n.detail.get("services", ()))
            for name, lost_services in list(self._lost_services.items()):
                if name == n.subject or lost_services & services:
                    del self._lost_services[name]
                    out += self._resolve("worker_lost", name, replaced_by=n.subject)
        elif n.name == "worker_lost":
            self._lost_services[n.subject] = set(n.detail.get("services", ()))
            out += self._raise("worker_lost", n.subject, **n.detail)
            for name in ("worker_suspect", "worker_degraded", "worker_ejected"):
                out += self._resolve(name, n.subject, reason="worker lost")
        elif n.name == "worker_leaving":
            out += self._event("worker_leaving", n.subject, **n.detail)
        elif n.name == "unauthorized":
            now = self._clock()
            if now - self._refused_at.get(n.subject, -math.inf) >= 60.0:  # rate-limited
                if len(self._refused_at) >= 10_000:  # many addresses: forget the old ones
                    self._refused_at = {a: t for a, t in self._refused_at.items() if now - t < 60.0}
                self._refused_at[n.subject] = now
                out += self._event("unauthorized", n.subject, **n.detail)
        return out

    def peer(self, a: PeerAlert) -> list[Output]:
        """Binary Star events: failover, split_brain, dual_passive, peer_lost, peer_back."""
        if a.name == "peer_back":
            return [*self._event("peer_back", "peer", **a.detail),
                    *self._resolve("failover", "pair", reason="peer back")]
        subject = "pair" if a.name in ("failover", "split_brain", "dual_passive") else "peer"
        if a.resolved:
            return self._resolve(a.name, subject, **a.detail)
        return self._raise(a.name, subject, **a.detail)

    def evaluate(self, snap: dict[str, Any]) -> list[Output]:
        """Conditions on a dispatcher snapshot: suspects, outliers, capacity, queues."""
        now = self._clock()
        out: list[Output] = []
        workers = snap["workers"]
        live = {bytes.fromhex(w["id"]) for w in workers}
        for wid in [w for w in self._phi if w not in live]:
            del self._phi[wid]
            self._phi_now.pop(wid, None)
            self._ejected.pop(wid, None)
            self._eject_next.pop(wid, None)
        by_name: dict[str, dict[str, Any]] = {}
        for w in workers:
            wid = bytes.fromhex(w["id"])
            by_name[w["name"]] = w
            det = self._phi.get(wid)
            phi = det.phi(now) if det is not None else 0.0
            self._phi_now[wid] = phi
            if phi >= self.t.phi:
                out += self._raise("worker_suspect", w["name"], phi=round(phi, 2))
            elif phi < self.t.phi / 2:
                out += self._resolve("worker_suspect", w["name"], phi=round(phi, 2))
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
                ewma = w["ewma_ms"] / 1000
                limit = max(t.degraded_factor * base, base + t.degraded_min)
                if ewma > 0.7 * limit and ("worker_degraded", w["name"]) in self._raised:
                    degraded.add(w["name"])  # hysteresis: stays degraded until well below
                if self._sustained("worker_degraded", w["name"], ewma > limit, now):
                    degraded.add(w["name"])
                    out += self._raise("worker_degraded", w["name"], service=s["name"],
                                       ewma_ms=w["ewma_ms"], peers_median_ms=round(base * 1000, 3))
                    if t.eject and bytes.fromhex(w["id"]) not in self._ejected:
                        healthy = [o for o in ws if not o.get("ejected") and o is not w]
                        if healthy:  # never eject the last worker of a service
                            out += self._eject(w, now)
        for name in [n for (a, n) in list(self._raised) if a == "worker_degraded"]:
            w = by_name.get(name)
            healthy = w is not None and name not in degraded and not w.get("ejected")
            if self._sustained("worker_healthy", name, healthy, now):
                out += self._resolve("worker_degraded", name, ewma_ms=w["ewma_ms"])  # type: ignore[index]
        for wid, until in list(self._ejected.items()):
            if now >= until:
                name = next((w["name"] for w in snap["workers"] if w["id"] == wid.hex()), None)
                del self._ejected[wid]
                out.append(Eject(wid, False))
                if name is not None:
                    out += self._resolve("worker_ejected", name)
                    out += self._resolve("worker_degraded", name, reason="readmitted")
        return out

    def _eject(self, w: dict[str, Any], now: float) -> list[Output]:
        wid = bytes.fromhex(w["id"])
        duration = self._eject_next.get(wid, self.t.eject_time)
        self._ejected[wid] = now + duration
        self._eject_next[wid] = min(duration * 2, 300.0)  # repeat offenders wait longer
        return [Eject(wid, True), *self._raise("worker_ejected", w["name"], seconds=duration)]

    # --- metrics -------------------------------------------------------------------------

    def metrics(self, snap: dict[str, Any]) -> tuple[dict[str, Any], list[Output]]:
        """A snapshot for the `metrics` topic (rates over the last second), and the alerts
        judged over the window (latency_slo, error_rate)."""
        now = self._clock()
        dt = (now - self._last_metrics) if self._last_metrics is not None else 1.0
        dt = max(dt, 1e-3)
        self._last_metrics = now
        out: list[Output] = []
        services: dict[str, Any] = {}
        for s in snap["services"]:
            name = s["name"]
            prev = self._prev.get(name, {"calls": 0, "errors": 0, "buckets": [0] * len(LATENCY_BUCKETS)})
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
                               "ewma_ms": w["ewma_ms"], "phi": round(self.phi(bytes.fromhex(w["id"])), 2),
                               "ejected": w.get("ejected", False)}
                   for w in snap["workers"]}
        return {"services": services, "workers": workers, "alerts": len(self._raised)}, out


def quantile(buckets: list[int], q: float) -> float | None:
    """Estimate from histogram counts (linear inside a bucket, as Prometheus does)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for upper, n in zip(LATENCY_BUCKETS, buckets):
        if seen + n >= rank and n > 0:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
        lower = upper
    return lower


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)
