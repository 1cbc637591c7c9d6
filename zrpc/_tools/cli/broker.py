"""`zrpc broker`: run one broker, alone or as one side of a Binary Star pair; its options are
BrokerConfig's fields."""

from __future__ import annotations

import signal
from typing import Any

import click

from zrpc._core._config import is_loopback
from zrpc._tools.cli._options import ConfigOptions, log_option, serving, setup_logging
from zrpc.broker._config import HELP_ORDER, BrokerConfig, local_frontend

OPTIONS = ConfigOptions(BrokerConfig, order=HELP_ORDER)


@click.command("broker")
@OPTIONS
@log_option
def command(log_level: str, **settings: Any) -> None:
    """Run a broker: routes calls from clients to workers until SIGTERM or Ctrl-C."""
    from zrpc.broker import Broker

    setup_logging(log_level)
    keywords = OPTIONS.keywords(settings)
    keywords.setdefault("frontend", local_frontend(keywords["role"]))
    config = BrokerConfig(**keywords)
    if not is_loopback(config.frontend) and config.curve_secret is None:
        click.echo(f"warning: {config.frontend} is reachable from other hosts and no CURVE keys "
                   "are set: anyone who can connect can call and serve.", err=True)
    b = Broker(config)
    b.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: b.stop())
    signal.signal(signal.SIGHUP, lambda *_: b.reload_keys())
    serving()
    b.run()
