"""The command line as a user runs it: results as JSON, one-line errors, no tracebacks."""

import json
import subprocess
import sys

import pytest

from tests import REPO
from zrpc.testing import free_port


def zrpc_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrpc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def assert_clean_error(p: subprocess.CompletedProcess, *words: str) -> None:
    """A non-zero exit and one line that says what is wrong: the error itself on one line
    (click's usage errors add their "Usage:" and "Try ... --help" lines around it)."""
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Usage:", "Try '"))]
    assert len(said) == 1, p.stderr
    for w in words:
        assert w in said[0], p.stderr


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    """A runtime error (no usage text): stderr is exactly one line."""
    assert_clean_error(p, *words)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.fixture
def ep(cluster):
    ep = cluster.broker()
    cluster.worker(ep)
    return ep


def test_call_prints_json(ep):
    p = zrpc_cli("call", "calc.add", "1", "2", "--brokers", ep)
    assert p.returncode == 0 and p.stdout.strip() == "3"
    p = zrpc_cli("call", "calc.echo", "hello", "--brokers", ep)
    assert json.loads(p.stdout) == "hello"
    p = zrpc_cli("call", "calc.echo", '{"a": [1, 2]}', "--brokers", ep, "--json")
    assert json.loads(p.stdout) == {"result": {"a": [1, 2]}}
    p = zrpc_cli("call", "calc.slow_square", "3", "--kw", "delay=0", "--brokers", ep)
    assert p.stdout.strip() == "9"


def test_call_errors(ep):
    p = zrpc_cli("call", "calc.div", "1", "0", "--brokers", ep)
    assert_one_line_error(p, "ZeroDivisionError", "division by zero")
    p = zrpc_cli("call", "calc.div", "1", "0", "--brokers", ep, "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["error"]["type"] == "ZeroDivisionError"
    assert_clean_error(zrpc_cli("call", "nosuch.x", "--brokers", ep), "ServiceUnavailable")
    assert_clean_error(zrpc_cli("call", "calc.nope", "--brokers", ep), "MethodNotFound")


def test_status_table_and_json(ep):
    p = zrpc_cli("status", "--brokers", ep)
    assert p.returncode == 0 and "calc" in p.stdout and "active" in p.stdout
    st = json.loads(zrpc_cli("status", "--brokers", ep, "--json").stdout)
    assert st["brokers"][0]["endpoint"] == ep and st["brokers"][0]["state"] == "active"
    assert st["brokers"][0]["role"] == "primary"
    assert st["services"][0]["name"] == "calc" and st["services"][0]["workers"] == 1
    w = st["workers"][0]
    assert {"id", "services", "capacity", "outstanding"} <= set(w)


def test_unreachable_broker_is_one_line():
    dead = f"tcp://127.0.0.1:{free_port()}"
    assert_one_line_error(zrpc_cli("call", "calc.add", "1", "2", "--brokers", dead, "--timeout", "0.5"),
                          "Timeout", "is a broker running")
    assert_one_line_error(zrpc_cli("status", "--brokers", dead, "--timeout", "0.3"), "no broker answered")


@pytest.mark.parametrize(
    "args, words",
    [
        (["call", "calcadd"], ["SERVICE.METHOD"]),
        (["call", "calc.add", "--brokers", "nonsense"], ["invalid endpoint"]),
        (["call", "calc.add", "--kw", "oops"], ["KEY=VALUE"]),
        (["call", "calc.add", "--timeout", "-1"], ["--timeout"]),
        (["status", "--brokers", "tcp://a:1,tcp://b:2,tcp://c:3"], ["at most two"]),
        (["worker", "no_such_module_xyz"], ["cannot import"]),
        (["worker", "examples.calc:nothing"], ["no attribute"]),
        (["worker", "examples.calc:add"], ["not a zrpc.Service"]),
        (["broker", "--frontend", "tcp://nohost"], ["invalid endpoint"]),
        (["broker", "--lb", "fastest"], ["fastest"]),
        (["nosuchcommand"], ["No such command"]),
    ],
)
def test_bad_arguments_get_one_line(args, words):
    assert_clean_error(zrpc_cli(*args, timeout=20), *words)


def test_broker_port_in_use_is_one_line(ep):
    assert_one_line_error(zrpc_cli("broker", "--frontend", ep), "cannot bind")


def test_help_explains_every_command():
    from zrpc._tools.cli import main

    documented = {"pair", "broker", "worker", "call", "status", "monitor", "demo", "keygen"}  # DESIGN.md §7
    assert documented <= set(main.commands)  # type: ignore[attr-defined]
    top = zrpc_cli("--help")
    assert top.returncode == 0
    for cmd in sorted(main.commands):  # type: ignore[attr-defined]
        assert cmd in top.stdout
        p = zrpc_cli(cmd, "--help")
        assert p.returncode == 0 and f"Usage: python -m zrpc {cmd}" in p.stdout and len(p.stdout) > 200, cmd
        for param in main.commands[cmd].params:  # type: ignore[attr-defined]
            if not getattr(param, "hidden", False) and param.param_type_name == "option":
                assert param.opts[0] in p.stdout, (cmd, param.opts[0])
