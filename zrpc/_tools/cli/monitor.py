"""`zrpc monitor`: follow the brokers' live alerts and metrics, and hand each alert to a command
or a webhook."""

from __future__ import annotations

import sys

import click

from zrpc import _defaults as D
from zrpc._tools.cli._options import check_endpoint_param, curve_client_options


@click.command("monitor")
@click.option("--monitors", envvar="ZRPC_MONITORS", show_envvar=True, metavar="EP[,EP]",
              help="Monitor endpoints of the brokers (default: the local pair, "
                   f":{D.MONITOR_PORTS[0]} and :{D.MONITOR_PORTS[1]}).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Run CMD for each alert, with the alert as JSON on stdin (a failure is reported).")
@click.option("--webhook", metavar="URL", help="POST each alert as JSON to URL (bounded retries).")
@click.option("--metrics/--no-metrics", default=True, show_default=True,
              help="Show the brokers' metrics snapshots (one a second each).")
@click.option("--count", type=click.IntRange(1), help="Stop after this many alerts.")
@click.option("--duration", type=click.FloatRange(0.1), help="Stop after this many seconds.")
@curve_client_options
def command(monitors: str | None, as_json: bool, exec_cmd: str | None, webhook: str | None,
            metrics: bool, count: int | None, duration: float | None, curve_server_key: str | None,
            curve_secret: str | None) -> None:
    """Show live alerts (worker lost, suspect, failover...) and metrics from both brokers."""
    from zrpc._tools._monitor_view import watch

    eps = [check_endpoint_param(e, "--monitors") for e in (monitors.split(",") if monitors else D.LOCAL_MONITORS)]
    if webhook and not webhook.startswith(("http://", "https://")):
        raise click.BadParameter(f"{webhook!r}: expected an http:// or https:// URL", param_hint="--webhook")
    from zrpc._io._security import client_keys

    keys = client_keys(curve_server_key, curve_secret)
    sys.exit(watch(eps, as_json=as_json, exec_cmd=exec_cmd, webhook=webhook, metrics=metrics,
                   count=count, duration=duration, curve=keys))
