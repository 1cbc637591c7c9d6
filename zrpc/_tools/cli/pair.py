"""`zrpc pair`: run a primary and a backup broker on this machine, supervised, as the local pair
every other command finds by default."""

from __future__ import annotations

import os
import sys

import click

from zrpc import _defaults as D
from zrpc._tools.cli._options import ConfigOptions, log_option
from zrpc.broker._config import BrokerConfig

BROKER_OPTIONS = ConfigOptions(BrokerConfig, ["lb", "heartbeat_interval"], help=False)
"""Passed on to both brokers: the same range and default as `zrpc broker`'s."""


def _pair_default(ports: tuple[int, int]) -> str:
    return ",".join(str(p) for p in ports)


def _ports(value: str, default: tuple[int, int]) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected two ports, e.g. {default[0]},{default[1]}") from None
    if not (0 < a < 65536 and 0 < b < 65536) or a == b:
        raise click.BadParameter(f"{value!r}: two different ports between 1 and 65535")
    return a, b


@click.command("pair")
@click.option("--host", default=D.LOCAL_HOST, show_default=True, help="Interface both brokers bind.")
@click.option("--frontend-ports", default=_pair_default(D.FRONTEND_PORTS), show_default=True, metavar="P,B",
              help="Client/worker ports of the primary and the backup.")
@click.option("--state-ports", default=_pair_default(D.STATE_PORTS), show_default=True, metavar="P,B",
              help="Ports where each broker publishes its state to the other.")
@click.option("--monitor-ports", default=_pair_default(D.MONITOR_PORTS), show_default=True, metavar="P,B",
              help="Ports of the alert and metrics sockets.")
@BROKER_OPTIONS
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Restart a broker that dies (it comes back passive).")
@click.option("--curve-secret", type=click.Path(dir_okay=False),
              help="The brokers' key pair (both share it): encrypts every socket.")
@click.option("--curve-authorized", type=click.Path(file_okay=False),
              help="Directory of public keys admitted.")
@log_option
def command(host: str, frontend_ports: str, state_ports: str, monitor_ports: str, lb: str,
            heartbeat_interval: float, restart: bool, curve_secret: str | None,
            curve_authorized: str | None, log_level: str) -> None:
    """Run a primary and a backup broker on this machine (the local pair every command uses
    by default). Either can die: the other takes over when a client needs it."""
    from zrpc._tools._pair import PairPorts, run_pair

    ports = PairPorts(_ports(frontend_ports, D.FRONTEND_PORTS), _ports(state_ports, D.STATE_PORTS),
                      _ports(monitor_ports, D.MONITOR_PORTS))
    extra = ["--lb", lb, "--heartbeat-interval", str(heartbeat_interval), "--log-level", log_level]
    if (curve_secret is None) != (curve_authorized is None):
        raise click.UsageError("--curve-secret and --curve-authorized go together")
    if curve_secret is not None and curve_authorized is not None:
        from zrpc._io._security import load_authorized, server_keys

        server_keys(curve_secret)  # what the brokers would fail on, said once, before any start
        load_authorized(curve_authorized)
        extra += ["--curve-secret", os.path.abspath(curve_secret),
                  "--curve-authorized", os.path.abspath(curve_authorized)]
    sys.exit(run_pair(host, ports, extra, restart))
