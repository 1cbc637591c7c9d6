"""`zrpc demo`: show the whole story (a pair, workers, load, kills, failover, alerts) on this
machine in under a minute."""

from __future__ import annotations

import sys

import click


@click.command("demo")
@click.option("--plain", is_flag=True, help="Plain text output (for logs and CI).")
def command(plain: bool) -> None:
    """Start a broker and workers of examples/calc.py, make calls, show what happened."""
    from zrpc._tools._demo import run_demo

    sys.exit(run_demo(plain=plain))
