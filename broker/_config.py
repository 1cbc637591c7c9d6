"""BrokerConfig: what one broker process is told, with the defaults from zrpc._defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from zrpc import _defaults as D
from zrpc.broker._core._monitor import Thresholds


@dataclass
class BrokerConfig:
    frontend: str = f"tcp://{D.LOCAL_HOST}:{D.FRONTEND_PORTS[0]}"
    role: str = "primary"
    state: str | None = None
    peer_state: str | None = None
    monitor: str | None = None
    lb: str = "least-outstanding"
    queue_limit: int = D.QUEUE_LIMIT
    queue_bytes: int = D.QUEUE_BYTES
    service_grace: float = D.SERVICE_GRACE
    heartbeat_interval: float = D.HEARTBEAT_INTERVAL
    liveness: int = D.LIVENESS
    max_message: int = D.MAX_MESSAGE
    metrics_port: int | None = None
    curve_secret: str | None = None  # this broker's key pair (NAME.key_secret)
    curve_authorized: str | None = None  # directory of the public keys admitted
    max_inflight_per_client: int = D.MAX_INFLIGHT_PER_CLIENT
    thresholds: Thresholds = field(default_factory=Thresholds)
    restarts: int = 0  # how many times a supervisor (zrpc pair) restarted this broker
