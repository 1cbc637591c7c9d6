"""Every default of zrpc, named once, with the reason it is what it is.

Protocol limits (head size, id length, budgets) are the protocol's and live with the codec in
zrpc._core._frames; this module holds what an operator may change.
"""

from __future__ import annotations

HEARTBEAT_INTERVAL = 0.25
"""Seconds between heartbeats, both ways. With LIVENESS 3 a dead or hung peer is found in under
a second, at four tiny messages a second per link."""

LIVENESS = 3
"""Heartbeat intervals of silence before a peer counts as dead: one late packet is no death."""

CALL_TIMEOUT = 10.0
"""A client's default deadline per call (seconds): long enough for a failover and a retry."""

WORKER_CONCURRENCY = 8
"""Calls a worker runs at once: its handler threads."""

WORKER_PREFETCH = 0
"""Calls a worker takes beyond those it runs, waiting for a thread (its capacity is concurrency
plus prefetch). More keeps the next call at hand when a thread frees instead of a broker round
trip away (measured: +30-40 % pipelined calls/s at 8), but a call held by a worker that dies
cannot run elsewhere unless it is idempotent, and waits behind that worker's calls when another
worker is free: so none by default."""

INLINE_LIMIT = 0.02
"""Seconds an inline handler (`@method(inline=True)`) may take: one that takes longer has held
the worker's heartbeats back, so its method goes to the thread pool from then on."""

DRAIN_TIMEOUT = 30.0
"""Seconds a stopping worker waits for its calls in flight before it leaves anyway."""

LOCAL_HOST = "127.0.0.1"
ROLES = ("primary", "backup")
FRONTEND_PORTS = (5555, 5556)
"""The local pair's frontends (primary, backup): where clients and workers connect."""
STATE_PORTS = (5565, 5566)
"""The local pair's Binary Star state links (each broker publishes on its own)."""
MONITOR_PORTS = (5575, 5576)
"""The local pair's monitor sockets (alerts and metrics)."""
LOCAL_PAIR = tuple(f"tcp://{LOCAL_HOST}:{p}" for p in FRONTEND_PORTS)
LOCAL_MONITORS = tuple(f"tcp://{LOCAL_HOST}:{p}" for p in MONITOR_PORTS)

MAX_MESSAGE = 16 * 1024 * 1024
"""Bytes a socket accepts in one message (ZMQ_MAXMSGSIZE): a larger one is dropped by libzmq
before it costs memory."""

QUEUE_LIMIT = 1000
"""Calls a broker holds per service while no worker is free; one more is Overloaded."""

QUEUE_BYTES = 32 * 1024 * 1024
"""Bytes of queued calls a broker holds over all its services: a bound on memory, not only on
count."""

SERVICE_GRACE = 1.0
"""Seconds a call waits for a worker of a service nobody serves (one may be restarting) before
it fails with ServiceUnavailable."""

MAX_INFLIGHT_PER_CLIENT = 10_000
"""Calls one client may have inside a broker: one runaway client can't take every slot."""

CLUSTER_NAME = "zrpc"
"""The cluster a member broker joins when none is named: its key is
/zrpc/<cluster name>/brokers/<broker name>, so several clusters can share one etcd."""

LEASE_TTL = 3
"""Seconds a member's etcd lease lives unrenewed (whole seconds: etcd's unit), renewed every
third of it: a killed broker leaves the membership within about 3 s, and one slow renewal
(a loaded machine, an etcd election) still leaves two more chances before it expires."""

ETCD_TIMEOUT = 1.0
"""Seconds one request to one etcd endpoint may take: a third of LEASE_TTL, so a renewal that
hangs on one endpoint still leaves time to try the next before the lease expires."""

ELECTION_NAME = "zrpc"
"""The election a broker started with --elect stands in when none is named: the active role is
the key /zrpc/elections/<name>/active, so several pairs can share one etcd."""

ELECTION_TTL = 3
"""Seconds the active broker's etcd lease lives unrenewed (whole seconds: etcd's unit). It bounds
failover: a killed active broker's key is gone within it (plus etcd's half-second expiry check),
and it is renewed four times per TTL, so one slow renewal is no step-down."""

ELECTION_MARGIN = 0.2
"""The share of the lease TTL the active broker gives back: it stops serving 0.8 x TTL after its
last successful renewal was *sent*, so its own clock may run up to 20 % slow, or etcd's up to
20 % fast (10 % each way at once), and it still stops before etcd could expire the lease and
hand the role to another broker. Real clocks drift by parts per million."""

ELECTION_DEFER = 0.5
"""Seconds a backup waits before it campaigns when the role was not a primary's (at start, or
after a backup held it): a primary trying at the same moment creates the key first (an etcd
round trip is milliseconds). A primary's vacancy is raced at once by everyone."""
