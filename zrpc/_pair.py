"""`zrpc pair`: a primary and a backup broker on this machine, as supervised children."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import click

from ._procs import Processes, port_free

DEFAULT_PORTS = {"frontend": (5555, 5556), "state": (5565, 5566), "monitor": (5575, 5576)}


@dataclass(frozen=True)
class PairPorts:
    frontend: tuple[int, int] = DEFAULT_PORTS["frontend"]
    state: tuple[int, int] = DEFAULT_PORTS["state"]
    monitor: tuple[int, int] = DEFAULT_PORTS["monitor"]


def broker_args(role: str, host: str, ports: PairPorts) -> list[str]:
    """The `zrpc broker` arguments for one side of a pair on `host`."""
    me, peer = (0, 1) if role == "primary" else (1, 0)
    return ["--role", role,
            "--frontend", f"tcp://{host}:{ports.frontend[me]}",
            "--state", f"tcp://{host}:{ports.state[me]}",
            "--peer-state", f"tcp://{host}:{ports.state[peer]}",
            "--monitor", f"tcp://{host}:{ports.monitor[me]}"]


def check_free(host: str, ports: Sequence[int]) -> None:
    for port in ports:
        if not port_free(host, port):
            raise OSError(f"port {port} on {host} is in use (another pair running? "
                          "see `zrpc status`, or choose other ports)")


def run_pair(host: str, ports: PairPorts, extra: Sequence[str], restart: bool) -> int:
    check_free(host, [*ports.frontend, *ports.state, *ports.monitor])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Processes() as procs:
        children = {role: procs.zrpc("broker", *broker_args(role, host, ports), *extra, inherit=True)
                    for role in ("primary", "backup")}
        eps = ",".join(f"tcp://{host}:{p}" for p in ports.frontend)
        click.echo(f"pair: primary tcp://{host}:{ports.frontend[0]} (pid {children['primary'].pid}), "
                   f"backup tcp://{host}:{ports.frontend[1]} (pid {children['backup'].pid})", err=True)
        click.echo(f"pair: clients and workers use ZRPC_BROKERS={eps} (the default); Ctrl-C stops both",
                   err=True)
        while not stop.wait(0.2):
            for role, proc in list(children.items()):
                code = proc.poll()
                if code is None:
                    continue
                if not restart:
                    click.echo(f"pair: {role} exited ({code}); stopping", err=True)
                    stop.set()
                    break
                click.echo(f"pair: {role} exited ({code}); restarting it in 1s", err=True)
                time.sleep(1.0)  # noqa: sleep (a restart delay, not synchronisation)
                children[role] = procs.zrpc("broker", *broker_args(role, host, ports), *extra,
                                            inherit=True)
        click.echo("pair: stopping", err=True)
        for proc in children.values():
            procs.terminate(proc, timeout=5)
    return 0
