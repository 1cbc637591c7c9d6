"""A worker for the election tests: `zrpc worker` serving `ledger`, whose non-idempotent
`charge` appends every execution to the ledger file ($ZRPC_LEDGER) with the epoch the broker
stamped on the call that ran it, the time and this process's pid.

Run as `python -m tests.elect._worker --brokers EP,EP...` (the rest of `zrpc worker`'s options
follow). A handler sees only its arguments, so the epoch is noted when the worker's core
admits the call (WorkerCore._request, wrapped here and nowhere else) and read back by the
handler, keyed by the account, which every test call makes unique."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import zrpc
from zrpc._core import _worker as core
from zrpc._core._frames import H_EPOCH, WorkerRequest
from zrpc._core._serial import unpack_call

ledger = zrpc.Service("ledger")

_EPOCHS: dict[str, Any] = {}
"""account -> the epoch of the call admitted for it (the loop thread writes, a handler pops)."""


@ledger.method(inline=True)
def add(a: int, b: int) -> int:
    return a + b


@ledger.method(idempotent=False)
def charge(account: str, cents: int, delay: float = 0.0) -> dict[str, Any]:
    epoch = _EPOCHS.pop(account, None)
    line = json.dumps({"account": account, "epoch": epoch, "t": time.monotonic(), "pid": os.getpid()})
    with open(os.environ["ZRPC_LEDGER"], "a") as f:  # one short append per line: whole lines
        f.write(line + "\n")
    if delay:
        time.sleep(delay)  # noqa: sleep (a handler that takes a while)
    return {"account": account, "charged": cents, "epoch": epoch, "pid": os.getpid()}


def install() -> None:
    """Notes each admitted charge's epoch (only calls that start: not duplicates, nor refusals)."""
    original = core.WorkerCore._request

    def _request(self: core.WorkerCore, link: int, req: WorkerRequest) -> list[core.Action]:
        before = self.calls
        out = original(self, link, req)
        if self.calls > before and req.method == "charge":
            args, _ = unpack_call(req.body)
            _EPOCHS[str(args[0])] = req.headers.get(H_EPOCH)
        return out

    core.WorkerCore._request = _request  # type: ignore[method-assign]  # the test's probe, above


if __name__ == "__main__":
    from tests.elect import _worker  # the module `zrpc worker` loads the service from

    _worker.install()
    from zrpc._tools.cli import main

    sys.argv = ["zrpc", "worker", "tests.elect._worker:ledger", *sys.argv[1:]]
    main()
