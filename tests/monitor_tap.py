"""A SUB socket on brokers' monitor endpoints that records every event with its arrival time."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import zmq

from zrpc.testing import wait_until


class MonitorTap:
    def __init__(self, *endpoints: str) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        for ep in endpoints:
            self._sub.connect(ep)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(50):
                topic, body = self._sub.recv_multipart()
                with self._lock:
                    self.events.append((time.monotonic(), topic.decode(), msgpack.unpackb(body)))

    def alerts(self, name: str, state: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, e) for t, topic, e in self.events
                    if topic == "alert." + name and (state is None or e["state"] == state)]

    def wait(self, name: str, state: str = "raised", timeout: float = 10.0,
             subject: str | None = None) -> tuple[float, dict[str, Any]]:
        def found():
            hits = [(t, e) for t, e in self.alerts(name, state) if subject is None or e["subject"] == subject]
            return hits[0] if hits else None

        return wait_until(found, timeout, what=f"alert {name} {state}")  # type: ignore[return-value]

    def wait_metrics(self, timeout: float = 5.0) -> dict[str, Any]:
        def found():
            with self._lock:
                hits = [e for _, topic, e in self.events if topic == "metrics"]
            return hits[-1] if hits else None

        return wait_until(found, timeout, what="a metrics snapshot")  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sub.close()
        self._ctx.term()
