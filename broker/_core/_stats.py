"""The Dispatcher's statistics: its counters, the per-service latency histogram, and the
plain-data snapshot that `zrpc.status`, the monitor and Prometheus read.

Counting and reporting only: nothing here changes where a call goes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from zrpc.broker._core._monitor import ewma

if TYPE_CHECKING:  # the records size their histogram from here: no import back at load time
    from zrpc.broker._core._records import ServiceState, WorkerState

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, float("inf"))
"""Upper bounds (seconds) of the per-service latency histogram (Prometheus-style buckets)."""

COUNTERS: dict[str, str] = {
    "requests": "requests past the activity and per-client checks",
    "replies": "answers from workers to calls they were given (run or probed)",
    "duplicates": "requests for a call held already, or already answered and not to run again",
    "late_replies": "answers from a worker the call had moved away from",
    "orphan_replies": "answers for calls this broker never saw",
    "retries": "calls of a lost worker sent again",
    "overloaded": "calls refused: a full queue (calls or bytes), or a client over its limit",
    "timeouts": "calls answered Timeout",
    "unavailable": "calls answered ServiceUnavailable",
    "state_unknown": "calls answered CallStateUnknown",
    "method_not_found": "calls of a method the service does not have",
    "probes": "re-sent calls whose workers were asked whether they already ran",
    "foreign_replies": "answers from a worker never given the call",
    "not_active_calls": "calls answered NotActive (this broker is not the active one)",
    "inflight_expired": "calls still at a worker past their deadline and its grace",
    "workers_refused": "READY messages refused (too many services)",
    "bad_statuses": "worker answers with a status the protocol does not define",
    "hedges": "copies of hedged calls sent to another worker",
    "hedges_skipped": "hedges not sent when due: no retry token, or no other worker with room",
    "hedges_ignored": "hedged calls not hedged: the method is not idempotent",
    "redundant_copies": "copies of redundant calls sent past the first",
    "redundant_short": "redundant calls run on fewer workers than asked (workers or tokens)",
    "copies_refused": "hedged or redundant calls refused: not idempotent, or a malformed header",
    "cancelled_replies": "answers from copies of a call another copy answered first (dropped)",
    "result_mismatches": "redundant calls whose copies answered differently",
}
"""Every counter the Dispatcher keeps, and what it counts (in the order they are reported)."""


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def record_reply(worker: WorkerState, svc: ServiceState | None, latency: float, ok: bool,
                 alpha: float) -> None:
    """A worker answered a call it ran: its latency EWMA and the service's histogram move."""
    worker.ewma = ewma(worker.ewma, latency, alpha)
    worker.served += 1
    if svc is not None:
        svc.calls += 1
        svc.buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1
        svc.latency_sum += latency
    if not ok:
        worker.errors += 1
        if svc is not None:
            svc.errors += 1


def service_view(s: ServiceState) -> dict[str, Any]:
    return {
        "name": s.name,
        "workers": sum(1 for w in s.workers if not w.leaving),
        "outstanding": sum(w.outstanding for w in s.workers),
        "queued": s.queued,
        "methods": sorted(s.methods),
        "calls": s.calls,
        "errors": s.errors,
        "latency_buckets": list(s.buckets),
        "latency_sum": s.latency_sum,
        "max_workers": s.max_workers,
    }


def worker_view(w: WorkerState) -> dict[str, Any]:
    return {
        "id": w.id.hex(),
        "name": w.name,
        "services": list(w.services),
        "capacity": w.capacity,
        "outstanding": w.outstanding,
        "weight": w.weight,
        "ewma_ms": round(w.ewma * 1000, 3),
        "served": w.served,
        "errors": w.errors,
        "leaving": w.leaving,
        "ejected": w.ejected,
        **{k: v for k, v in w.info.items() if k in ("host", "pid", "prefork", "restarts")},
    }


def snapshot(services: Iterable[ServiceState], workers: Iterable[WorkerState],
             counters: dict[str, int], *, lb: str, inflight: int, queued_bytes: int,
             active: bool) -> dict[str, Any]:
    """Plain data (sorted by name, copied) for `zrpc.status`, the monitor and metrics."""
    return {
        "services": [service_view(s) for s in sorted(services, key=lambda s: s.name)],
        "workers": [worker_view(w) for w in sorted(workers, key=lambda w: w.name)],
        "counters": dict(counters),
        "lb": lb,
        "inflight": inflight,
        "queued_bytes": queued_bytes,
        "active": active,
    }
