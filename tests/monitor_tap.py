"""EventFeed with waits: block until an alert arrives, with a deadline."""

from __future__ import annotations

from typing import Any

from zrpc._tools._monitor_view import EventFeed
from zrpc.testing import wait_until


class MonitorTap(EventFeed):
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

    def wait_snapshots(self, n: int, since: float, timeout: float = 10.0) -> None:
        """Waits for `n` metrics snapshots that arrived after `since` (time.monotonic()): the
        broker's own once-a-second beat, e.g. to let a detector see several heartbeats."""
        def found() -> bool:
            with self._lock:
                return sum(1 for t, topic, _ in self.events if topic == "metrics" and t > since) >= n

        wait_until(found, timeout, what=f"{n} metrics snapshots")
