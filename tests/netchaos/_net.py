"""Throwaway hosts on one machine: a network namespace per host, joined by a bridge in a
namespace of its own, with faults per link and direction made by nftables inside the hosts.

Nothing here touches the root namespace: every command runs in a namespace (`ip -n NS`, `ip
netns exec NS`), the addresses (10.213.N.0/24) exist only inside the namespaces, and each host's
faults are rules of its own table (`inet zrnet`) in its own namespace.

Delay and jitter: `tc netem` when the kernel has sch_netem (`has_netem()` tries it once), else
a userspace relay inside the host (tests/netchaos/_relay.py) that holds each chunk delay ±
jitter. Kernels without sch_netem answer "Specified qdisc kind is unknown"; the scenario that
delays prints which of the two ran.

One-way faults and TCP: dropping the packets of one direction kills a TCP connection both ways
(no ACK comes back), so `one_way` is a packet fault. A message link heard by one side only (a
state socket one broker no longer hears) is `block_port`: a cut of the one TCP flow that
carries it, while every other flow between the two hosts still works.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "zr"
"""Every namespace made here is named zr<pid>-<n><host>: a sweep knows whose it is."""
SUBNET = "10.213"
TABLE = "zrnet"
HOSTS = ("a", "b", "c", "d", "e")
"""a: primary broker, b: backup broker, c and d: workers, e: clients."""
DEVICE = "eth0"
"""Each host's one interface (a name inside its own namespace, so no host clashes with another)."""
BRIDGE = "br0"
CMD_TIMEOUT = 15.0
STALE = re.compile(rf"^{PREFIX}(\d+)-")

_counter = itertools.count()
_netem: tuple[bool, str] | None = None
LIVE: set[Net] = set()
"""Nets made and not yet deleted (an exit handler deletes what a hard stop left)."""


class NetError(RuntimeError):
    """A namespace, link or firewall command failed."""


def run(argv: Sequence[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if check and p.returncode != 0:
        raise NetError(f"{' '.join(argv)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def missing() -> str | None:
    """Why these hosts cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 nftables)"
    return None


def namespaces() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Deletes the zr<pid>-* namespaces of processes that are gone (a run killed outright)."""
    gone = []
    for name in namespaces():
        m = STALE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            run(["ip", "netns", "del", name], check=False)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class Fault:
    """Rules in `host`'s firewall about its traffic with `peer`."""

    host: str
    peer: str
    kind: str  # cut | one_way | loss | port
    arg: int = 0  # loss: percent; port: the TCP port of the flow

    def rules(self, peer_ip: str) -> list[str]:
        out, inp = f"out ip daddr {peer_ip}", f"in ip saddr {peer_ip}"
        if self.kind == "cut":
            return [f"{out} drop", f"{inp} drop"]
        if self.kind == "one_way":
            return [f"{out} drop"]
        if self.kind == "loss":
            return [f"{chain} numgen random mod 100 < {self.arg} drop" for chain in (out, inp)]
        if self.kind == "port":
            return [f"{chain} tcp {field} {self.arg} drop" for chain in (out, inp) for field in ("sport", "dport")]
        raise ValueError(f"unknown fault {self.kind!r}")


class Net:
    """Hosts a..e on one bridge. Faults are kept as a list and each host's rules are rewritten
    in one nft transaction whenever its faults change."""

    def __init__(self, hosts: Sequence[str] = HOSTS) -> None:
        n = next(_counter)
        self.tag = f"{PREFIX}{os.getpid()}-{n}"
        self.subnet = f"{SUBNET}.{n % 256}"
        self.hosts = tuple(hosts)
        self.faults: list[Fault] = []
        self.history: list[tuple[float, str]] = []  # (time.monotonic(), what changed)
        self.delayed: set[str] = set()
        self._made: list[str] = []

    # --- names -------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} (hosts: {', '.join(self.hosts)})")
        return f"{self.tag}{host}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}br"

    def port(self, host: str) -> str:
        """The bridge's end of host's link (a name inside the bridge's namespace)."""
        return f"port-{host}"

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host` (ip netns exec execs it: the pid is the program's own)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    # --- life --------------------------------------------------------------------------

    def create(self) -> Net:
        LIVE.add(self)
        try:
            self._add_ns(self.bridge_ns)
            run(["ip", "-n", self.bridge_ns, "link", "add", "name", BRIDGE, "type", "bridge"])
            run(["ip", "-n", self.bridge_ns, "link", "set", "dev", BRIDGE, "up"])
            for h in self.hosts:
                ns = self._add_ns(self.ns(h))
                run(["ip", "-n", self.bridge_ns, "link", "add", "name", self.port(h), "type", "veth", "peer",
                     "name", DEVICE, "netns", ns])
                run(["ip", "-n", self.bridge_ns, "link", "set", "dev", self.port(h), "master", BRIDGE, "up"])
                run(["ip", "-n", ns, "addr", "add", f"{self.ip(h)}/24", "dev", DEVICE])
                run(["ip", "-n", ns, "link", "set", DEVICE, "up"])
                run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=(
                    f"add table inet {TABLE}\n"
                    f"add chain inet {TABLE} in {{ type filter hook input priority 0; policy accept; }}\n"
                    f"add chain inet {TABLE} out {{ type filter hook output priority 0; policy accept; }}\n"))
        except BaseException:
            self.delete()
            raise
        return self

    def _add_ns(self, name: str) -> str:
        run(["ip", "netns", "add", name])
        self._made.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def delete(self) -> list[str]:
        """Deletes every namespace this Net made; returns the commands that failed."""
        failed = []
        for name in reversed(self._made):
            p = run(["ip", "netns", "del", name], check=False)
            if p.returncode != 0:
                failed.append(f"ip netns del {name}: {p.stderr.strip()}")
        self._made.clear()
        LIVE.discard(self)
        return failed

    # --- faults ------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """Nothing passes between a and b, either way."""
        self._add(Fault(a, b, "cut"))

    def one_way(self, src: str, dst: str) -> None:
        """Packets from src to dst are dropped; dst to src still pass (TCP between them dies)."""
        self._add(Fault(src, dst, "one_way"))

    def loss(self, a: str, b: str, percent: int) -> None:
        """Each packet between a and b, either way, is dropped with this probability."""
        if not 0 < percent <= 100:
            raise ValueError(f"loss must be 1..100 %, not {percent}")
        self._add(Fault(a, b, "loss", percent))

    def block_port(self, a: str, b: str, port: int) -> None:
        """The TCP flows between a and b that use `port` (either end) are cut; the rest pass."""
        self._add(Fault(a, b, "port", port))

    def isolate(self, host: str) -> None:
        """`host` is cut from every other host (its own loopback still works)."""
        for other in self.hosts:
            if other != host:
                self._add(Fault(host, other, "cut"), apply=False)
        self._apply({host})

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        """Removes the faults between a and b, those of a with anyone, or all."""
        def involved(f: Fault) -> bool:
            if a is None:
                return True
            ends = {f.host, f.peer}
            return a in ends and (b is None or b in ends)

        hit = [f for f in self.faults if involved(f)]
        self.faults = [f for f in self.faults if not involved(f)]
        self._apply({f.host for f in hit})
        self.history.append((time.monotonic(), f"heal {a or 'all'}{'-' + b if b else ''}"))

    def _add(self, fault: Fault, apply: bool = True) -> None:
        for h in (fault.host, fault.peer):
            self.ns(h)
        if fault not in self.faults:
            self.faults.append(fault)
        if apply:
            self._apply({fault.host})
        self.history.append((time.monotonic(), f"{fault.kind} {fault.host}-{fault.peer}"
                             + (f" {fault.arg}" if fault.arg else "")))

    def _apply(self, hosts: set[str]) -> None:
        for h in sorted(hosts):
            lines = [f"flush chain inet {TABLE} in", f"flush chain inet {TABLE} out"]
            for f in self.faults:
                if f.host == h:
                    lines += [f"add rule inet {TABLE} {r}" for r in f.rules(self.ip(f.peer))]
            run(["ip", "netns", "exec", self.ns(h), "nft", "-f", "-"], stdin="\n".join(lines) + "\n")

    def ruleset(self, host: str) -> str:
        return run(["ip", "netns", "exec", self.ns(host), "nft", "list", "table", "inet", TABLE]).stdout

    # --- delay (tc netem, when the kernel has it) ----------------------------------------

    def has_netem(self) -> tuple[bool, str]:
        """(whether `tc qdisc ... netem` works here, what tc said), tried once per run."""
        global _netem
        if _netem is None:
            ns = self.ns(self.hosts[-1])
            p = run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                    check=False)
            if p.returncode == 0:
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"], check=False)
                _netem = (True, "tc netem")
            else:
                _netem = (False, (p.stderr or p.stdout).strip() or f"tc exit {p.returncode}")
        return _netem

    def delay(self, host: str, ms: float, jitter_ms: float) -> None:
        """netem on both directions of host's link: its interface and its bridge port."""
        for ns, dev in ((self.ns(host), DEVICE), (self.bridge_ns, self.port(host))):
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
                 "delay", f"{ms}ms", f"{jitter_ms}ms"])
        self.delayed.add(host)

    def undelay(self, host: str) -> None:
        for ns, dev in ((self.ns(host), DEVICE), (self.bridge_ns, self.port(host))):
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        self.delayed.discard(host)
