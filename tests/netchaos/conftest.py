"""Fixtures for the network scenarios: throwaway hosts (tests/netchaos/_net.py) and the processes
on them (tests/netchaos/_lab.py), all gone after each test, also when it fails or times out.

Skipped, with the reason, where hosts cannot be built (not root, no `ip` or `nft`, namespaces
refused). The first test sweeps the namespaces that runs killed outright left behind (those of
pids that are gone); an exit handler deletes what a hard stop of this run leaves.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import CHILD_ENV, REPO
from tests.netchaos import _net
from tests.netchaos._lab import Lab
from tests.netchaos._net import Net, NetError
from zrpc.testing import Processes


def _delete_live() -> None:
    for net in list(_net.LIVE):
        net.delete()


atexit.register(_delete_live)


@pytest.fixture(scope="session")
def netns_ready() -> None:
    reason = _net.missing()
    if reason:
        pytest.skip(f"network scenarios: {reason}")
    _net.sweep_stale()
    probe = Net(hosts=("a",))
    try:
        probe.create()
    except NetError as exc:
        pytest.skip(f"network scenarios: cannot build network namespaces here: {exc}")
    finally:
        probe.delete()


@pytest.fixture
def lab(netns_ready: None, tmp_path: Path) -> Iterator[Lab]:
    """Hosts a..e on a fresh bridge and a Processes for the children on them. Teardown stops
    every child, deletes every namespace, then fails the test on any child problem."""
    net = Net().create()
    procs = Processes(log_dir=tmp_path / "logs", env=CHILD_ENV, cwd=REPO)
    exits: list[str] = []
    leftovers: list[str] = []
    try:
        with procs:  # SIGTERM to pytest unwinds through here too
            yield Lab(net, procs, tmp_path)
            exits = procs.exit_problems()  # before close() kills what is left
    finally:
        procs.close()
        leftovers = net.delete()
    problems = exits + procs.log_problems() + leftovers
    if problems:
        pytest.fail(f"{len(problems)} problem(s) after the scenario:\n\n" + "\n\n".join(problems), pytrace=False)
