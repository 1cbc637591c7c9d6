"""Prometheus metrics for one broker (prometheus-client), read from its latest snapshots."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from zrpc._defaults import LOCAL_HOST
from zrpc.broker._core._dispatch import LATENCY_BUCKETS

if TYPE_CHECKING:
    from zrpc.broker._loop import Broker


class BrokerCollector:
    """Collects at scrape time from the status the core stores every second (a whole new dict
    each time, so this HTTP thread never reads a structure the loop is changing)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        st = self.broker.last_status
        if not st:
            return
        b = st["broker"]
        labels = {"role": b["role"], "state": b["state"]}
        active = GaugeMetricFamily("zrpc_broker_active", "1 if this broker serves clients",
                                   labels=list(labels))
        active.add_metric(list(labels.values()), 1.0 if b["state"] == "active" else 0.0)
        yield active
        calls = CounterMetricFamily("zrpc_calls", "Calls answered by workers", labels=["service"])
        errors = CounterMetricFamily("zrpc_errors", "Calls answered with an error", labels=["service"])
        queued = GaugeMetricFamily("zrpc_queue_depth", "Calls waiting for a worker", labels=["service"])
        workers = GaugeMetricFamily("zrpc_workers", "Workers serving the service", labels=["service"])
        outstanding = GaugeMetricFamily("zrpc_outstanding", "Calls in flight", labels=["service"])
        hist = HistogramMetricFamily("zrpc_call_latency_seconds", "Broker-to-reply latency",
                                     labels=["service"])
        for s in st["services"]:
            n = [s["name"]]
            calls.add_metric(n, s["calls"])
            errors.add_metric(n, s["errors"])
            queued.add_metric(n, s["queued"])
            workers.add_metric(n, s["workers"])
            outstanding.add_metric(n, s["outstanding"])
            cum, buckets = 0, []
            for upper, count in zip(LATENCY_BUCKETS, s["latency_buckets"]):
                cum += count
                buckets.append(("+Inf" if upper == float("inf") else repr(upper), cum))
            hist.add_metric(n, buckets, sum_value=_non_negative(s.get("latency_sum", 0.0)))
        yield from (calls, errors, queued, workers, outstanding, hist)
        w_out = GaugeMetricFamily("zrpc_worker_outstanding", "Calls in flight per worker", labels=["worker"])
        w_ewma = GaugeMetricFamily("zrpc_worker_latency_ewma_seconds", "Latency EWMA per worker",
                                   labels=["worker"])
        w_phi = GaugeMetricFamily("zrpc_worker_phi", "Phi-accrual suspicion per worker", labels=["worker"])
        for w in st["workers"]:
            n = [w["name"]]
            w_out.add_metric(n, w["outstanding"])
            w_ewma.add_metric(n, w["ewma_ms"] / 1000)
            w_phi.add_metric(n, _non_negative(w.get("phi", 0.0)))
        yield from (w_out, w_ewma, w_phi)
        alerts = GaugeMetricFamily("zrpc_alerts_active", "Alerts raised and not resolved", labels=["name"])
        counts: dict[str, int] = {}
        for a in st["alerts"]:
            counts[a["name"]] = counts.get(a["name"], 0) + 1
        for name, c in counts.items():
            alerts.add_metric([name], c)
        yield alerts


def _non_negative(v: Any) -> float:
    """A gauge or sum that cannot be below zero, as Prometheus should read it: never -0.0
    (which a rounding of a tiny negative gives), never NaN or infinite."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if f > 0.0 and math.isfinite(f) else 0.0


def serve_prometheus(broker: Broker, port: int, addr: str = LOCAL_HOST) -> None:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {addr}:{port}: {exc.strerror}") from None
