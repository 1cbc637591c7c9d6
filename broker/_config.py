"""BrokerConfig: what one broker process is told, each setting with its default, its valid range
and its `zrpc broker` flag and help, written once (the command line is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from zrpc import _defaults as D
from zrpc.broker._core._lb import STRATEGIES
from zrpc.broker._core._monitor import Thresholds


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line. Plain data (no click here: the library
    does not depend on its command line); zrpc._tools.cli turns it into a click option."""

    help: str | None
    name: str | None = None
    """The flag, when it is not --FIELD-NAME."""
    range: tuple[float | None, float | None] | None = None
    """Inclusive bounds of a number (None: unbounded on that side)."""
    choices: tuple[str, ...] | None = None
    kind: Literal["endpoint", "file", "dir", "cluster"] | None = None
    hidden: bool = False
    unset: bool = False
    """Absent from the command line unless given: the command computes the default (the
    help says how)."""


FLAG = "zrpc.flag"
"""The metadata key of a field's Flag (or, for a nested config, of its fields' Flags)."""


def flag(help: str | None, **how: Any) -> dict[str, Flag]:
    """A field's metadata: its Flag, under the key the command line reads."""
    return {FLAG: Flag(help, **how)}


def local_frontend(role: str) -> str:
    """Where the local pair's broker of `role` serves clients and workers."""
    return f"tcp://{D.LOCAL_HOST}:{D.FRONTEND_PORTS[D.ROLES.index(role)]}"


THRESHOLD_FLAGS: dict[str, Flag] = {
    "eject": Flag("Keep a degraded worker out of dispatch for a while (never a service's last).",
                  name="--eject-outliers"),
    "latency_slo": Flag("Seconds; alert latency_slo when a service's p99 is above it.",
                        range=(0.001, 3600)),
    "error_rate": Flag("Alert error_rate when this share of a service's calls fail.",
                       range=(0.0001, 1)),
    "phi": Flag("Alert worker_suspect when phi-accrual suspicion reaches it.",
                name="--phi-threshold", range=(1, 100)),
    "backlog": Flag("Alert queue_backlog when this many calls wait.", range=(1, 10_000_000)),
}
"""The monitor's thresholds an operator sets, by Thresholds field (their defaults are
Thresholds'); the others keep their defaults."""


@dataclass
class BrokerConfig:
    """One broker's settings. The field order is the historical one (positional use keeps
    working); `zrpc broker --help` lists them in HELP_ORDER."""

    frontend: str = field(default=local_frontend(D.ROLES[0]), metadata=flag(
        f"Endpoint clients and workers connect to (default {local_frontend(D.ROLES[0])} for "
        f"primary, :{D.FRONTEND_PORTS[1]} for backup).", kind="endpoint", unset=True))
    role: str = field(default=D.ROLES[0], metadata=flag(
        "This broker's place in a Binary Star pair.", choices=D.ROLES))
    state: str | None = field(default=None, metadata=flag(
        "Endpoint where this broker publishes its state to its peer.", kind="endpoint"))
    peer_state: str | None = field(default=None, metadata=flag(
        "The peer broker's state endpoint (omit to run alone).", kind="endpoint"))
    monitor: str | None = field(default=None, metadata=flag(
        "Endpoint where alerts and metrics are published.", kind="endpoint"))
    lb: str = field(default="least-outstanding", metadata=flag(
        "How calls are spread over workers.", choices=tuple(STRATEGIES)))
    queue_limit: int = field(default=D.QUEUE_LIMIT, metadata=flag(
        "Calls that may wait per service when every worker is busy; beyond it, Overloaded.",
        range=(1, 10_000_000)))
    queue_bytes: int = field(default=D.QUEUE_BYTES, metadata=flag(
        "Bytes of call bodies that may wait in all queues; beyond, Overloaded.",
        range=(1024, 2**40)))
    service_grace: float = field(default=D.SERVICE_GRACE, metadata=flag(
        "Seconds a call to a service with no worker waits for one to register.", range=(0, 3600)))
    heartbeat_interval: float = field(default=D.HEARTBEAT_INTERVAL, metadata=flag(
        "Seconds between heartbeats (announced to workers and clients).", range=(0.01, 60)))
    liveness: int = field(default=D.LIVENESS, metadata=flag(
        "Silent intervals after which a worker is declared dead.", range=(1, 100)))
    max_message: int = field(default=D.MAX_MESSAGE, metadata=flag(
        "Bytes; larger messages drop the sender's connection.", name="--max-message-size",
        range=(1024, 2**31 - 1)))
    metrics_port: int | None = field(default=None, metadata=flag(
        f"Serve Prometheus metrics on http://{D.LOCAL_HOST}:PORT/metrics.", range=(1, 65535)))
    curve_secret: str | None = field(default=None, metadata=flag(
        "This broker's key pair (NAME.key_secret): encrypts every socket.", kind="file"))
    curve_authorized: str | None = field(default=None, metadata=flag(
        "Directory of public keys (*.key) admitted, with their roles if it holds a roles.toml "
        "(who may serve and call what: docs/operations.md §7); reloaded on SIGHUP.", kind="dir"))
    max_inflight_per_client: int = field(default=D.MAX_INFLIGHT_PER_CLIENT, metadata=flag(
        "Calls one client may have queued or running; beyond, Overloaded.", range=(1, 10_000_000)))
    thresholds: Thresholds = field(default_factory=Thresholds, metadata={FLAG: THRESHOLD_FLAGS})
    restarts: int = field(default=0, metadata=flag(
        "How many times a supervisor (zrpc pair) has restarted this broker.", range=(0, None),
        hidden=True))
    cluster: str | None = field(default=None, metadata=flag(
        "Join the cluster whose etcd is at etcd://HOST:PORT[,HOST:PORT...] as a member broker "
        "(serves every service alone: no --role, --state or --peer-state; needs --name).",
        kind="cluster"))
    name: str | None = field(default=None, metadata=flag(
        "This member's name in the cluster (its key: /zrpc/<cluster-name>/brokers/<name>)."))
    cluster_name: str = field(default=D.CLUSTER_NAME, metadata=flag(
        "Which cluster of that etcd to join (several may share one etcd)."))
    elect: str | None = field(default=None, metadata=flag(
        "Take the active role through the etcd at etcd://HOST:PORT[,HOST:PORT...] instead of "
        "the Binary Star client vote: the active broker holds the key "
        "/zrpc/elections/<election>/active on its lease, fenced by epoch (two or more brokers "
        "may stand; --role orders who tries first; no --state or --peer-state).", kind="cluster"))
    election: str = field(default=D.ELECTION_NAME, metadata=flag(
        "Which election of that etcd to stand in (with --elect; several pairs may share one etcd)."))


HELP_ORDER = (
    "role",
    "frontend",
    "state",
    "peer_state",
    "elect",
    "election",
    "cluster",
    "name",
    "cluster_name",
    "monitor",
    "lb",
    "queue_limit",
    "queue_bytes",
    "service_grace",
    "heartbeat_interval",
    "liveness",
    "max_message",
    "metrics_port",
    "thresholds",
    "max_inflight_per_client",
    "curve_secret",
    "curve_authorized",
    "restarts",
)
"""The order `zrpc broker --help` lists the settings in (role first: it sets the others' defaults)."""
