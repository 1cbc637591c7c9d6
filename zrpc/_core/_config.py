"""Where the brokers are: --brokers or ZRPC_BROKERS, --cluster or ZRPC_CLUSTER, or the local pair."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from zrpc._core._membership import ENV as CLUSTER_ENV
from zrpc._core._membership import parse_cluster
from zrpc._defaults import LOCAL_PAIR

ENV = "ZRPC_BROKERS"

_ENDPOINT = re.compile(r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-*]+):\d{1,5}|ipc://.+|inproc://.+)$")


def check_endpoint(ep: str) -> str:
    """Raises ValueError with the expected shape for a malformed endpoint."""
    ep = ep.strip()
    if not _ENDPOINT.match(ep):
        raise ValueError(f"invalid endpoint {ep!r}: expected tcp://HOST:PORT (or ipc://PATH)")
    if ep.startswith("tcp://"):
        port = int(ep.rsplit(":", 1)[1])
        if not 0 < port < 65536:
            raise ValueError(f"invalid port in endpoint {ep!r}")
    return ep


MAX_WORKER_BROKERS = 16
"""Brokers one worker serves at most: a pair, or every broker standing in one election."""


def resolve_brokers(brokers: Sequence[str] | str | None = None, most: int = 2) -> list[str]:
    """Explicit list or comma-separated string, else $ZRPC_BROKERS, else the local pair. A
    client follows one pair (`most` 2); a worker may serve more brokers (every candidate of an
    election), so it asks for MAX_WORKER_BROKERS."""
    if brokers is None:
        brokers = os.environ.get(ENV) or list(LOCAL_PAIR)
    if isinstance(brokers, str):
        brokers = [b for b in brokers.split(",") if b.strip()]
    out = [check_endpoint(b) for b in brokers]
    if not out:
        raise ValueError("no broker endpoint given")
    if len(out) > most:
        raise ValueError(f"at most two brokers (a primary/backup pair), got {len(out)}" if most == 2
                         else f"at most {most} brokers, got {len(out)}")
    return out


def is_loopback(ep: str) -> bool:
    """Whether an endpoint stays on this machine (tcp on 127.x/localhost/::1, ipc, inproc)."""
    if not ep.startswith("tcp://"):
        return True
    host = ep[6:].rsplit(":", 1)[0]
    return host in ("localhost", "[::1]") or host.startswith("127.")


def resolve_cluster(brokers: Sequence[str] | str | None, cluster: str | None) -> str | None:
    """The etcd URL to find the brokers through (cluster mode), or None for a pair.

    What is given wins over the environment: `cluster`, else None when `brokers` is given,
    else $ZRPC_CLUSTER (before $ZRPC_BROKERS, as on the command line). Both given is a
    ValueError, as is a malformed URL."""
    if cluster is not None:
        if brokers is not None:
            raise ValueError("give brokers or a cluster, not both")
        parse_cluster(cluster)
        return cluster.strip()
    if brokers is not None:
        return None
    url = os.environ.get(CLUSTER_ENV)
    if url:
        parse_cluster(url)
        return url.strip()
    return None
