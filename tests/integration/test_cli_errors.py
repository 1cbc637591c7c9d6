"""Every user mistake on the command line is one clear error line and a non-zero exit, never a
traceback: bad endpoints and numbers, modules that are missing or fail to import, things that
are not services, unreadable key files, ports in use. Each case fails before any network wait.
A bug once a broker or worker is serving is the opposite: it shows its traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests import REPO
from zrpc._tools._procs import TRACEBACK, free_port


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "bad.key").write_text("not a key\n")
    (d / "empty.key_secret").write_text("")
    (d / "authorized").mkdir()
    (d / "syntax_error_mod.py").write_text("def f(:\n")
    (d / "raising_mod.py").write_text("raise RuntimeError('broken at import')\n")
    (d / "no_methods_mod.py").write_text("import zrpc\nsvc = zrpc.Service('empty')\n")
    (d / "a_file").write_text("")
    return d


@pytest.fixture(scope="module")
def busy_port():
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def zrpc_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrpc", *args], capture_output=True, text=True, timeout=30,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}{os.pathsep}{cwd}",
                                        **(env or {})})


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def pair_ports(*fixed: int) -> list[str]:
    p = [*fixed, *free_ports(6 - len(fixed))]
    return ["--frontend-ports", f"{p[0]},{p[1]}", "--state-ports", f"{p[2]},{p[3]}",
            "--monitor-ports", f"{p[4]},{p[5]}"]


def ep(port: int | None = None) -> str:
    return f"tcp://127.0.0.1:{port or free_ports(1)[0]}"


CASES: list[tuple[str, object, list[str]]] = [
    # (id, args or a function of (files, busy_port) giving them, words expected in the error)
    ("broker-bad-endpoint", ["broker", "--frontend", "tcp://nohost"], ["invalid endpoint"]),
    ("broker-bad-port", ["broker", "--frontend", "tcp://127.0.0.1:70000"], ["invalid port"]),
    ("broker-unbindable-ipc", ["broker", "--frontend", "ipc:///nonexistent/dir/sock"], ["cannot bind frontend"]),
    ("broker-unbindable-address", ["broker", "--frontend", "tcp://999.1.1.1:5555"], ["cannot bind frontend"]),
    ("broker-half-a-pair", ["broker", "--state", "tcp://127.0.0.1:1"], ["go together"]),
    ("broker-bad-number", ["broker", "--queue-limit", "abc"], ["--queue-limit"]),
    ("broker-number-out-of-range", ["broker", "--heartbeat-interval", "0"], ["--heartbeat-interval"]),
    ("broker-bad-role", ["broker", "--role", "tertiary"], ["tertiary"]),
    ("broker-frontend-in-use", lambda f, port: ["broker", "--frontend", ep(port)], ["cannot bind frontend", "in use"]),
    ("broker-state-in-use", lambda f, port: ["broker", "--frontend", ep(), "--state", ep(port),
                                             "--peer-state", ep()], ["cannot bind state", "in use"]),
    ("broker-monitor-in-use", lambda f, port: ["broker", "--frontend", ep(), "--monitor", ep(port)],
     ["cannot bind monitor", "in use"]),
    ("broker-metrics-port-in-use", lambda f, port: ["broker", "--frontend", ep(), "--metrics-port", str(port)],
     ["metrics", "in use"]),
    ("broker-missing-key", lambda f, port: ["broker", "--curve-secret", str(f / "nope.key_secret"),
                                            "--curve-authorized", str(f / "authorized")], ["does not exist"]),
    ("broker-garbage-key", lambda f, port: ["broker", "--curve-secret", str(f / "bad.key"),
                                            "--curve-authorized", str(f / "authorized")], ["not a zmq.auth key file"]),
    ("broker-empty-key", lambda f, port: ["broker", "--curve-secret", str(f / "empty.key_secret"),
                                          "--curve-authorized", str(f / "authorized")], ["not a zmq.auth key file"]),
    ("broker-key-is-a-directory", lambda f, port: ["broker", "--curve-secret", str(f),
                                                   "--curve-authorized", str(f / "authorized")], ["is a directory"]),
    ("broker-missing-authorized-dir", lambda f, port: ["broker", "--curve-secret", str(f / "nope.key_secret"),
                                                       "--curve-authorized", str(f / "nodir")], ["does not exist"]),
    ("worker-no-service", ["worker"], ["Missing argument"]),
    ("worker-missing-module", ["worker", "no_such_module_xyz"], ["cannot import"]),
    ("worker-module-with-syntax-error", ["worker", "syntax_error_mod"], ["SyntaxError", "line 1"]),
    ("worker-module-raising-at-import", ["worker", "raising_mod"], ["RuntimeError: broken at import"]),
    ("worker-missing-attribute", ["worker", "examples.calc:nothing"], ["no attribute"]),
    ("worker-not-a-service", ["worker", "examples.calc:add"], ["not a zrpc.Service"]),
    ("worker-service-without-methods", ["worker", "no_methods_mod"], ["at least one @method"]),
    ("worker-empty-module-name", ["worker", ":calc"], ["expected MODULE"]),
    ("worker-middleware-missing-module", ["worker", "examples.calc:calc", "--middleware", "no_such_module_xyz:M"],
     ["--middleware", "cannot import"]),
    ("worker-middleware-without-attribute", ["worker", "examples.calc:calc", "--middleware", "zrpc.middleware"],
     ["--middleware", "expected MODULE:ATTR"]),
    ("worker-middleware-not-one", ["worker", "examples.calc:calc", "--middleware", "examples.calc:calc"],
     ["--middleware", "is not a zrpc.Middleware"]),
    ("worker-cluster-and-brokers", ["worker", "examples.calc:calc", "--brokers", "tcp://127.0.0.1:1",
                                    "--cluster", "etcd://127.0.0.1:1"], ["give one of them"]),
    ("worker-bad-cluster", ["worker", "examples.calc:calc", "--cluster", "http://x"], ["expected etcd://"]),
    ("worker-bad-brokers", ["worker", "examples.calc:calc", "--brokers", "nonsense"], ["invalid endpoint"]),
    ("worker-seventeen-brokers", ["worker", "examples.calc:calc", "--brokers",
                                  ",".join(f"tcp://h{i}:1" for i in range(17))], ["at most 16 brokers"]),
    ("call-three-brokers", ["call", "calc.add", "1", "2", "--brokers", "tcp://a:1,tcp://b:2,tcp://c:3"],
     ["at most two"]),
    ("worker-bad-concurrency", ["worker", "examples.calc:calc", "--concurrency", "0"], ["--concurrency"]),
    ("worker-half-the-keys", lambda f, port: ["worker", "examples.calc:calc", "--curve-secret", str(f / "bad.key")],
     ["both"]),
    ("worker-garbage-keys", lambda f, port: ["worker", "examples.calc:calc", "--curve-secret", str(f / "bad.key"),
                                             "--curve-server-key", str(f / "bad.key")], ["not a zmq.auth key file"]),
    ("call-no-dot", ["call", "calcadd"], ["SERVICE.METHOD"]),
    ("call-empty-method", ["call", "calc."], ["SERVICE.METHOD"]),
    ("call-bad-brokers", ["call", "calc.add", "--brokers", "nonsense"], ["invalid endpoint"]),
    ("call-no-brokers", ["call", "calc.add", "--brokers", ","], ["no broker endpoint"]),
    ("call-bad-kw", ["call", "calc.add", "--kw", "1x=2"], ["KEY=VALUE"]),
    ("call-bad-timeout", ["call", "calc.add", "--timeout", "abc"], ["--timeout"]),
    ("call-unsendable-number", ["call", "calc.add", "1" * 30, "--brokers", ep()], ["msgpack"]),
    ("call-garbage-keys", lambda f, port: ["call", "calc.add", "--curve-secret", str(f / "bad.key"),
                                           "--curve-server-key", str(f / "bad.key")], ["not a zmq.auth key file"]),
    ("call-missing-key", lambda f, port: ["call", "calc.add", "--curve-secret", str(f / "nope"),
                                          "--curve-server-key", str(f / "nope")], ["does not exist"]),
    ("status-bad-brokers", ["status", "--brokers", "tcp://a:1,tcp://b:2,tcp://c:3"], ["at most two"]),
    ("status-bad-watch", ["status", "--watch", "0"], ["--watch"]),
    ("status-garbage-keys", lambda f, port: ["status", "--curve-secret", str(f / "bad.key"),
                                             "--curve-server-key", str(f / "bad.key")], ["not a zmq.auth key file"]),
    ("monitor-bad-endpoint", ["monitor", "--monitors", "nonsense"], ["invalid endpoint"]),
    ("monitor-bad-webhook", ["monitor", "--webhook", "ftp://x"], ["http://"]),
    ("monitor-bad-count", ["monitor", "--count", "0"], ["--count"]),
    ("monitor-half-the-keys", lambda f, port: ["monitor", "--curve-secret", str(f / "bad.key")], ["both"]),
    ("keygen-into-a-file", lambda f, port: ["keygen", str(f / "a_file")], ["is a file"]),
    ("keygen-unwritable", ["keygen", "/proc/no/such/dir"], ["cannot write keys"]),
    ("keygen-bad-name", lambda f, port: ["keygen", str(f / "keys"), "--name", "../x"], ["invalid key name"]),
    ("pair-bad-ports", ["pair", "--frontend-ports", "a,b"], ["expected two ports"]),
    ("pair-same-ports", ["pair", "--frontend-ports", "5,5"], ["two different ports"]),
    ("pair-port-in-two-options", ["pair", "--state-ports", "43001,43002", "--monitor-ports", "43002,43003"],
     ["more than one socket", "six different ports"]),
    ("pair-unknown-host", ["pair", "--host", "no-such-host.invalid"], ["cannot use host"]),
    ("pair-port-in-use", lambda f, port: ["pair", *pair_ports(port)], ["is in use"]),
    ("pair-half-the-keys", lambda f, port: ["pair", "--curve-secret", str(f / "bad.key")], ["go together"]),
    ("pair-garbage-key", lambda f, port: ["pair", *pair_ports(), "--curve-secret", str(f / "bad.key"),
                                          "--curve-authorized", str(f / "authorized")], ["not a zmq.auth key file"]),
    ("pair-missing-authorized-dir", lambda f, port: ["pair", *pair_ports(), "--curve-secret", str(f / "nope"),
                                                     "--curve-authorized", str(f / "nodir")], ["does not exist"]),
    ("demo-bad-option", ["demo", "--bogus"], ["No such option"]),
    ("no-such-command", ["nosuchcommand"], ["No such command"]),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_clear_line(args, words, files, busy_port):
    argv = args(files, busy_port) if callable(args) else args
    p = zrpc_cli(argv, cwd=files)
    assert p.returncode != 0
    assert TRACEBACK not in p.stdout + p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, p.stderr  # one line says what is wrong (click adds a usage line)
    for w in words:
        assert w in errors[0], p.stderr
    assert "pair: primary" not in p.stderr  # a pair refused it before starting any broker


def test_bad_brokers_from_the_environment_are_one_line(files):
    p = zrpc_cli(["call", "calc.add"], cwd=files, env={"ZRPC_BROKERS": "nonsense"})
    assert p.returncode != 0 and TRACEBACK not in p.stderr and "invalid endpoint" in p.stderr


def test_zrpc_debug_shows_the_traceback_behind_the_line(files):
    p = zrpc_cli(["worker", "raising_mod"], cwd=files, env={"ZRPC_DEBUG": "1"})
    assert p.returncode != 0 and TRACEBACK in p.stderr and "broken at import" in p.stderr


@pytest.mark.parametrize("command", ["broker", "worker"])
def test_a_bug_while_serving_shows_its_traceback(command, monkeypatch, tmp_path):
    """A ValueError escaping a running loop is a bug, not a user mistake: it must not be
    turned into a tidy 'error:' line that hides where it came from."""
    from zrpc._tools.cli import main

    def crash(self):
        raise ValueError("a bug in the loop")

    if command == "broker":
        from zrpc.broker import _loop

        monkeypatch.setattr(_loop.Broker, "bind", lambda self: None)
        monkeypatch.setattr(_loop.Broker, "run", crash)
        argv = ["broker", "--frontend", ep()]
    else:
        from zrpc._io import _worker

        monkeypatch.setattr(_worker.Worker, "run", crash)
        argv = ["worker", "examples.calc:calc", "--brokers", ep()]
    monkeypatch.delenv("ZRPC_DEBUG", raising=False)
    result = CliRunner().invoke(main, argv)
    assert isinstance(result.exception, ValueError), result.output
    assert "error: a bug in the loop" not in result.output
