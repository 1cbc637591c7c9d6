"""Child zrpc processes (brokers, workers) for `zrpc demo`, `zrpc pair` and tests: started in
their own process group, and always killed, even when the parent fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
"""The source checkout (examples/ lives here)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("terminated")


def port_free(host: str, port: int) -> bool:
    """Whether a broker could bind it (SO_REUSEADDR as libzmq sets it: TIME_WAIT is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.02,
               what: str = "condition") -> object:
    """Polls `pred` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:g}s")
        time.sleep(interval)  # noqa: sleep (polling with a deadline)


class Processes:
    """Starts `python -m zrpc ...` children and kills every one on close()."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None):
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), **(env or {})}
        self.env.pop("ZRPC_BROKERS", None)

    def zrpc(self, *args: str, name: str | None = None, env: dict[str, str] | None = None,
             inherit: bool = False) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-m", "zrpc", *args], name=name, env=env, inherit=inherit)

    def spawn(self, argv: Sequence[str], name: str | None = None, env: dict[str, str] | None = None,
              inherit: bool = False) -> subprocess.Popen[bytes]:
        """Output goes to LOG_DIR/NAME.log, to our own stdout/stderr (`inherit`), or nowhere."""
        out: int | object | None = None if inherit else subprocess.DEVNULL
        if self.log_dir is not None and not inherit:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            label = name or f"p{len(self.procs)}"
            out = open(self.log_dir / f"{label}.log", "ab")
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
                                env={**self.env, **(env or {})}, start_new_session=True)  # type: ignore[arg-type]
        if out not in (subprocess.DEVNULL, None):
            out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        self.signal(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            return None

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process must die too
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                self.signal(proc, sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.kill(p)
        self.procs.clear()

    def __enter__(self) -> "Processes":
        # SIGTERM would end this process without unwinding, leaving the children (in their
        # own sessions) running: turn it into an exception so close() runs
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _terminated)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
