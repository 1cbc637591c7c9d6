"""`zrpc worker`: serve the services a Python module defines, through the brokers, until told
to stop."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from zrpc import _defaults as D
from zrpc._core._config import MAX_WORKER_BROKERS
from zrpc._core._service import Service
from zrpc._tools._prefork import DEFAULT_PROCESSES, MAX_PROCESSES, Prefork
from zrpc._tools.cli._options import (
    brokers_option,
    brokers_or_cluster,
    cluster_name_option,
    cluster_option,
    curve_client_options,
    log_option,
    serving,
    setup_logging,
)


def _import(spec: str, hint: str, example: str) -> tuple[Any, str, str]:
    """MODULE[:ATTR] imported from the current directory first: (module, its name, ATTR or '').
    A user's mistake or a module failing at import is a BadParameter naming `hint`."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    modname, _, attr = spec.partition(":")
    if not modname or modname.startswith("."):
        raise click.BadParameter(f"{spec!r}: expected MODULE or MODULE:ATTR, e.g. {example}", param_hint=hint)
    try:
        mod = importlib.import_module(modname)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {modname!r}: {exc}", param_hint=hint) from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        if os.environ.get("ZRPC_DEBUG"):
            raise
        raise click.BadParameter(f"importing {modname!r} failed: {_where(exc)} "
                                 "(ZRPC_DEBUG=1 shows the traceback)", param_hint=hint) from None
    return mod, modname, attr


def _attribute(mod: Any, modname: str, attr: str, hint: str) -> list[Any]:
    """ATTR of the module, a list or tuple as its items."""
    try:
        obj = getattr(mod, attr)
    except AttributeError:
        raise click.BadParameter(f"module {modname!r} has no attribute {attr!r}", param_hint=hint) from None
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def load_services(specs: Sequence[str]) -> list[Service]:
    """MODULE:ATTR (a Service or a list of them) or MODULE (every Service it defines)."""
    out: list[Service] = []
    for spec in specs:
        mod, modname, attr = _import(spec, "SERVICE", "examples.calc:calc")
        if attr:
            found = _attribute(mod, modname, attr, "SERVICE")
        else:
            found = [v for v in vars(mod).values() if isinstance(v, Service)]
        if not found or not all(isinstance(s, Service) for s in found):
            raise click.BadParameter(f"{spec!r} is not a zrpc.Service", param_hint="SERVICE")
        out.extend(found)
    return out


HOOKS = ("before", "after", "on_error")


def load_middleware(specs: Sequence[str]) -> list[object]:
    """MODULE:ATTR each: a middleware (zrpc.Middleware, or any object with a `before`, `after`
    or `on_error` hook), a class of them (made with no arguments), or a list of them; in the
    order given (the first runs first before a call)."""
    out: list[object] = []
    for spec in specs:
        mod, modname, attr = _import(spec, "--middleware", "zrpc.middleware:Timing")
        if not attr:
            raise click.BadParameter(f"{spec!r}: expected MODULE:ATTR, e.g. zrpc.middleware:Timing",
                                     param_hint="--middleware")
        for obj in _attribute(mod, modname, attr, "--middleware"):
            if isinstance(obj, type) and any(hasattr(obj, h) for h in HOOKS):
                try:
                    obj = obj()
                except Exception as exc:  # noqa: BLE001 - the user's class failed to build
                    raise click.BadParameter(f"{spec!r}: {obj.__name__}() failed: {_where(exc)}",
                                             param_hint="--middleware") from None
            if isinstance(obj, type) or not any(callable(getattr(obj, h, None)) for h in HOOKS):
                raise click.BadParameter(f"{spec!r} is not a zrpc.Middleware (or a list of them)",
                                         param_hint="--middleware")
            out.append(obj)
    return out


def _where(exc: BaseException) -> str:
    """'Type: message (file, line N)' for an exception raised in a user's module."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


@click.command("worker")
@click.argument("services", nargs=-1, required=True, metavar="MODULE[:SERVICE]...")
@brokers_option
@cluster_option
@cluster_name_option
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=D.WORKER_CONCURRENCY, show_default=True,
              help="Calls handled at once (thread pool size).")
@click.option("--prefetch", type=click.IntRange(0, 10_000), default=D.WORKER_PREFETCH, show_default=True,
              help="Calls taken beyond --concurrency, waiting here for a thread (the capacity announced "
                   "is concurrency + prefetch): faster pipelines, but a worker that dies takes its "
                   "waiting non-idempotent calls with it (answered CallStateUnknown).")
@click.option("--weight", type=click.FloatRange(0.001, 1e6), default=1.0, show_default=True,
              help="Relative share of calls under --lb weighted.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.01, 60), default=D.HEARTBEAT_INTERVAL,
              show_default=True, help="Seconds between heartbeats to each broker (a broker's own setting wins).")
@click.option("--liveness", type=click.IntRange(1, 100), default=D.LIVENESS, show_default=True,
              help="Silent intervals after which a broker is presumed dead and reconnected.")
@click.option("--send-tracebacks/--no-send-tracebacks", default=None,
              help="Send handlers' tracebacks to clients (default: only when every broker is on loopback).")
@click.option("--middleware", "middleware", multiple=True, metavar="MODULE:ATTR",
              help="Middleware around every call (a zrpc.Middleware, a class of them, or a list), "
                   "repeatable, in order: e.g. zrpc.middleware:Timing.")
@click.option("--processes", type=click.IntRange(1, MAX_PROCESSES), default=DEFAULT_PROCESSES,
              show_default=True,
              help="Worker processes, forked from this one once the services are imported (each with "
                   "its own --concurrency threads and --prefetch), supervised: one that dies is "
                   "restarted with backoff, and SIGTERM drains them all.")
@curve_client_options
@log_option
def command(services: tuple[str, ...], brokers: str | None, cluster: str | None, cluster_name: str,
            concurrency: int, prefetch: int, weight: float,
            heartbeat_interval: float, liveness: int, send_tracebacks: bool | None,
            middleware: tuple[str, ...], processes: int,
            curve_server_key: str | None, curve_secret: str | None, log_level: str) -> None:
    """Serve the services defined in MODULE (e.g. `zrpc worker examples.calc:calc`).

    With --cluster, it serves every broker registered in the cluster's etcd, follows them as
    they join and leave, and announces to each a share of its capacity.

    With --processes N, the services are imported once and N worker processes are forked
    from this one before any socket or thread exists; this process supervises them (a process
    that dies is restarted with backoff, and each restart is printed and told to the brokers).

    SIGTERM or Ctrl-C finishes the calls in flight, then leaves; a second one stops at once.
    """
    from zrpc._io._worker import Worker

    setup_logging(log_level)
    eps, url = brokers_or_cluster(brokers, cluster, MAX_WORKER_BROKERS)
    svcs = load_services(services)
    chain = load_middleware(middleware)

    def make() -> Worker:
        return Worker(svcs, eps or None, cluster=url, cluster_name=cluster_name,
                      concurrency=concurrency,
                      prefetch=prefetch, weight=weight, heartbeat_interval=heartbeat_interval,
                      liveness=liveness, send_tracebacks=send_tracebacks,
                      curve_server_key=curve_server_key, curve_secret=curve_secret,
                      middleware=chain)

    if processes > 1:  # the Worker is built in each forked process, never here
        code = Prefork(processes, make).run(on_ready=serving)
        if code:
            click.get_current_context().exit(code)
        return
    w = make()
    serving()
    w.run()
