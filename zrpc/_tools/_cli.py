"""The `zrpc` command line (click): every command explains itself with --help and answers a
user mistake with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
from typing import Any, Sequence

import click

from zrpc._core._config import ENV, LOCAL_PAIR, check_endpoint, is_loopback, resolve_brokers
from zrpc import __version__
from zrpc._errors import RemoteError, Timeout, ZrpcError
from zrpc._core._service import Service

LB_CHOICES = ["least-outstanding", "round-robin", "random", "weighted", "p2c-ewma"]
ROLE_PORTS = {"primary": (5555, 5565, 5575), "backup": (5556, 5566, 5576)}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)


def _brokers_option(f: Any) -> Any:
    return click.option(
        "--brokers", envvar=ENV, show_envvar=True, metavar="EP[,EP]",
        help=f"Broker endpoints, comma-separated (default: the local pair {','.join(LOCAL_PAIR)}).",
    )(f)


def _curve_client_options(f: Any) -> Any:
    f = click.option("--curve-secret", type=click.Path(dir_okay=False), envvar="ZRPC_CURVE_SECRET",
                     show_envvar=True, help="This process's key pair (NAME.key_secret from `zrpc keygen`).")(f)
    return click.option("--curve-server-key", type=click.Path(dir_okay=False), envvar="ZRPC_CURVE_SERVER_KEY",
                        show_envvar=True, help="The brokers' public key (their NAME.key).")(f)


def _log_option(f: Any) -> Any:
    return click.option("--log-level", default="info", show_default=True,
                        type=click.Choice(["debug", "info", "warning", "error"]),
                        help="How much to log on stderr.")(f)


def _brokers(value: str | None) -> list[str]:
    try:
        return resolve_brokers(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--brokers") from None


def _endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_endpoint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


SERVING = "zrpc.serving"
"""Set in the context's meta once a broker or worker loop runs: from then on an exception
is a bug, not a user mistake, and shows its traceback."""


def _serving() -> None:
    click.get_current_context().meta[SERVING] = True


class _Group(click.Group):
    """Turns expected failures into one line on stderr (exit 1); --help stays click's."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ZrpcError, OSError, ValueError, TypeError, OverflowError) as exc:
            if isinstance(exc, click.ClickException) or os.environ.get("ZRPC_DEBUG") \
                    or ctx.meta.get(SERVING):
                raise  # ZRPC_DEBUG=1 shows the traceback behind a one-line error
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="zrpc")
def main() -> None:
    """zrpc: RPC over ZeroMQ with high availability built in.

    A broker (or a primary/backup pair) dispatches calls to workers; clients call services
    through it. Every command finds the brokers with --brokers or $ZRPC_BROKERS, else uses
    the local pair (tcp://127.0.0.1:5555 and :5556). Errors are one line; set ZRPC_DEBUG=1
    to see the traceback behind one.
    """


# --- broker ------------------------------------------------------------------------------


@main.command()
@click.option("--role", type=click.Choice(["primary", "backup"]), default="primary", show_default=True,
              help="This broker's place in a Binary Star pair.")
@click.option("--frontend", callback=_endpoint, metavar="EP",
              help="Endpoint clients and workers connect to (default tcp://127.0.0.1:5555 for "
                   "primary, :5556 for backup).")
@click.option("--state", callback=_endpoint, metavar="EP",
              help="Endpoint where this broker publishes its state to its peer.")
@click.option("--peer-state", callback=_endpoint, metavar="EP",
              help="The peer broker's state endpoint (omit to run alone).")
@click.option("--monitor", callback=_endpoint, metavar="EP",
              help="Endpoint where alerts and metrics are published.")
@click.option("--lb", type=click.Choice(LB_CHOICES), default="least-outstanding", show_default=True,
              help="How calls are spread over workers.")
@click.option("--queue-limit", type=click.IntRange(1, 10_000_000), default=1000, show_default=True,
              help="Calls that may wait per service when every worker is busy; beyond it, Overloaded.")
@click.option("--queue-bytes", type=click.IntRange(1024, 2**40), default=32 * 1024 * 1024, show_default=True,
              help="Bytes of call bodies that may wait in all queues; beyond, Overloaded.")
@click.option("--service-grace", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
              help="Seconds a call to a service with no worker waits for one to register.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.01, 60), default=0.25, show_default=True,
              help="Seconds between heartbeats (announced to workers and clients).")
@click.option("--liveness", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Silent intervals after which a worker is declared dead.")
@click.option("--max-message-size", type=click.IntRange(1024, 2**31 - 1), default=16 * 1024 * 1024,
              show_default=True, help="Bytes; larger messages drop the sender's connection.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics.")
@click.option("--eject-outliers", is_flag=True,
              help="Keep a degraded worker out of dispatch for a while (never a service's last).")
@click.option("--latency-slo", type=click.FloatRange(0.001, 3600), default=1.0, show_default=True,
              help="Seconds; alert latency_slo when a service's p99 is above it.")
@click.option("--error-rate", type=click.FloatRange(0.0001, 1), default=0.1, show_default=True,
              help="Alert error_rate when this share of a service's calls fail.")
@click.option("--phi-threshold", type=click.FloatRange(1, 100), default=8.0, show_default=True,
              help="Alert worker_suspect when phi-accrual suspicion reaches it.")
@click.option("--backlog", type=click.IntRange(1, 10_000_000), default=100, show_default=True,
              help="Alert queue_backlog when this many calls wait.")
@click.option("--max-inflight-per-client", type=click.IntRange(1, 10_000_000), default=10_000,
              show_default=True, help="Calls one client may have queued or running; beyond, Overloaded.")
@click.option("--curve-secret", type=click.Path(dir_okay=False),
              help="This broker's key pair (NAME.key_secret): encrypts every socket.")
@click.option("--curve-authorized", type=click.Path(file_okay=False),
              help="Directory of public keys (*.key) admitted; reloaded on SIGHUP.")
@click.option("--restarts", type=click.IntRange(0), default=0, hidden=True,
              help="How many times a supervisor (zrpc pair) has restarted this broker.")
@_log_option
def broker(role: str, frontend: str | None, state: str | None, peer_state: str | None,
           monitor: str | None, lb: str, queue_limit: int, queue_bytes: int, service_grace: float,
           heartbeat_interval: float, liveness: int, max_message_size: int, metrics_port: int | None,
           eject_outliers: bool, latency_slo: float, error_rate: float, phi_threshold: float,
           backlog: int, max_inflight_per_client: int, curve_secret: str | None,
           curve_authorized: str | None, restarts: int, log_level: str) -> None:
    """Run a broker: routes calls from clients to workers until SIGTERM or Ctrl-C."""
    from zrpc.broker import Broker, BrokerConfig
    from zrpc.broker._core._monitor import Thresholds

    _setup_logging(log_level)
    fport = ROLE_PORTS[role][0]
    config = BrokerConfig(
        frontend=frontend or f"tcp://127.0.0.1:{fport}", role=role, state=state,
        peer_state=peer_state, monitor=monitor, lb=lb, queue_limit=queue_limit, queue_bytes=queue_bytes,
        service_grace=service_grace, heartbeat_interval=heartbeat_interval, liveness=liveness,
        max_message=max_message_size, metrics_port=metrics_port,
        thresholds=Thresholds(phi=phi_threshold, latency_slo=latency_slo, error_rate=error_rate,
                              backlog=backlog, eject=eject_outliers),
        curve_secret=curve_secret, curve_authorized=curve_authorized,
        max_inflight_per_client=max_inflight_per_client,
        **_supported(BrokerConfig, restarts=restarts),
    )
    if not is_loopback(config.frontend) and curve_secret is None:
        click.echo(f"warning: {config.frontend} is reachable from other hosts and no CURVE keys "
                   "are set: anyone who can connect can call and serve.", err=True)
    b = Broker(config)
    b.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: b.stop())
    signal.signal(signal.SIGHUP, lambda *_: b.reload_keys())
    _serving()
    b.run()


def _supported(cls: Any, **values: Any) -> dict[str, Any]:
    """The keywords `cls` (a dataclass) has fields for: an option the broker does not know yet
    is dropped, never a TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _ports(value: str, default: tuple[int, int]) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected two ports, e.g. {default[0]},{default[1]}") from None
    if not (0 < a < 65536 and 0 < b < 65536) or a == b:
        raise click.BadParameter(f"{value!r}: two different ports between 1 and 65535")
    return a, b


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface both brokers bind.")
@click.option("--frontend-ports", default="5555,5556", show_default=True, metavar="P,B",
              help="Client/worker ports of the primary and the backup.")
@click.option("--state-ports", default="5565,5566", show_default=True, metavar="P,B",
              help="Ports where each broker publishes its state to the other.")
@click.option("--monitor-ports", default="5575,5576", show_default=True, metavar="P,B",
              help="Ports of the alert and metrics sockets.")
@click.option("--lb", type=click.Choice(LB_CHOICES), default="least-outstanding", show_default=True)
@click.option("--heartbeat-interval", type=click.FloatRange(0.01, 60), default=0.25, show_default=True)
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Restart a broker that dies (it comes back passive).")
@click.option("--curve-secret", type=click.Path(dir_okay=False),
              help="The brokers' key pair (both share it): encrypts every socket.")
@click.option("--curve-authorized", type=click.Path(file_okay=False),
              help="Directory of public keys admitted.")
@_log_option
def pair(host: str, frontend_ports: str, state_ports: str, monitor_ports: str, lb: str,
         heartbeat_interval: float, restart: bool, curve_secret: str | None,
         curve_authorized: str | None, log_level: str) -> None:
    """Run a primary and a backup broker on this machine (the local pair every command uses
    by default). Either can die: the other takes over when a client needs it."""
    from zrpc._tools._pair import DEFAULT_PORTS, PairPorts, run_pair

    ports = PairPorts(_ports(frontend_ports, DEFAULT_PORTS["frontend"]),
                      _ports(state_ports, DEFAULT_PORTS["state"]),
                      _ports(monitor_ports, DEFAULT_PORTS["monitor"]))
    extra = ["--lb", lb, "--heartbeat-interval", str(heartbeat_interval), "--log-level", log_level]
    if (curve_secret is None) != (curve_authorized is None):
        raise click.UsageError("--curve-secret and --curve-authorized go together")
    if curve_secret is not None and curve_authorized is not None:
        from zrpc._io._security import load_authorized, server_keys

        server_keys(curve_secret)  # what the brokers would fail on, said once, before any start
        load_authorized(curve_authorized)
        extra += ["--curve-secret", os.path.abspath(curve_secret),
                  "--curve-authorized", os.path.abspath(curve_authorized)]
    sys.exit(run_pair(host, ports, extra, restart))


# --- worker ------------------------------------------------------------------------------


def load_services(specs: Sequence[str]) -> list[Service]:
    """MODULE:ATTR (a Service or a list of them) or MODULE (every Service it defines)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    out: list[Service] = []
    for spec in specs:
        modname, _, attr = spec.partition(":")
        if not modname or modname.startswith("."):
            raise click.BadParameter(f"{spec!r}: expected MODULE or MODULE:SERVICE, e.g. examples.calc:calc",
                                     param_hint="SERVICE")
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            raise click.BadParameter(f"cannot import {modname!r}: {exc}", param_hint="SERVICE") from None
        except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
            if os.environ.get("ZRPC_DEBUG"):
                raise
            raise click.BadParameter(f"importing {modname!r} failed: {_where(exc)} "
                                     "(ZRPC_DEBUG=1 shows the traceback)", param_hint="SERVICE") from None
        if attr:
            try:
                obj = getattr(mod, attr)
            except AttributeError:
                raise click.BadParameter(f"module {modname!r} has no attribute {attr!r}",
                                         param_hint="SERVICE") from None
            found = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        else:
            found = [v for v in vars(mod).values() if isinstance(v, Service)]
        if not found or not all(isinstance(s, Service) for s in found):
            raise click.BadParameter(f"{spec!r} is not a zrpc.Service", param_hint="SERVICE")
        out.extend(found)
    return out


def _where(exc: BaseException) -> str:
    """'Type: message (file, line N)' for an exception raised in a user's module."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


@main.command()
@click.argument("services", nargs=-1, required=True, metavar="MODULE[:SERVICE]...")
@_brokers_option
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=8, show_default=True,
              help="Calls handled at once (thread pool size; the capacity announced).")
@click.option("--weight", type=click.FloatRange(0.001, 1e6), default=1.0, show_default=True,
              help="Relative share of calls under --lb weighted.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.01, 60), default=0.25, show_default=True,
              help="Seconds between heartbeats to each broker (a broker's own setting wins).")
@click.option("--liveness", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Silent intervals after which a broker is presumed dead and reconnected.")
@click.option("--send-tracebacks/--no-send-tracebacks", default=None,
              help="Send handlers' tracebacks to clients (default: only when every broker is on loopback).")
@_curve_client_options
@_log_option
def worker(services: tuple[str, ...], brokers: str | None, concurrency: int, weight: float,
           heartbeat_interval: float, liveness: int, send_tracebacks: bool | None,
           curve_server_key: str | None, curve_secret: str | None, log_level: str) -> None:
    """Serve the services defined in MODULE (e.g. `zrpc worker examples.calc:calc`).

    SIGTERM or Ctrl-C finishes the calls in flight, then leaves; a second one stops at once.
    """
    from zrpc._io._worker import Worker

    _setup_logging(log_level)
    w = Worker(load_services(services), _brokers(brokers), concurrency=concurrency,
               weight=weight, heartbeat_interval=heartbeat_interval, liveness=liveness,
               send_tracebacks=send_tracebacks, curve_server_key=curve_server_key,
               curve_secret=curve_secret)
    _serving()
    w.run()


# --- call --------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """JSON literal if it parses, else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@main.command()
@click.argument("target", metavar="SERVICE.METHOD")
@click.argument("args", nargs=-1)
@click.option("--kw", "kwargs", multiple=True, metavar="KEY=VALUE",
              help="A keyword argument (VALUE as JSON, else a string); repeatable.")
@_brokers_option
@click.option("--timeout", type=click.FloatRange(0.001, 86400), default=5.0, show_default=True,
              help="Seconds to wait for the reply.")
@click.option("--json", "as_json", is_flag=True, help='Print {"result": ...} or {"error": {...}}.')
@_curve_client_options
def call(target: str, args: tuple[str, ...], kwargs: tuple[str, ...], brokers: str | None,
         timeout: float, as_json: bool, curve_server_key: str | None, curve_secret: str | None) -> None:
    """Call SERVICE.METHOD with ARGS (JSON literals, else strings) and print the result as JSON.

    Example: zrpc call calc.add 1 2
    """
    from zrpc._io._client import Client

    service, dot, method = target.rpartition(".")
    if not dot or not service or not method:
        raise click.BadParameter(f"{target!r}: expected SERVICE.METHOD, e.g. calc.add",
                                 param_hint="SERVICE.METHOD")
    kw: dict[str, Any] = {}
    for item in kwargs:
        key, eq, val = item.partition("=")
        if not eq or not key.isidentifier():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--kw")
        kw[key] = _parse_value(val)
    eps = _brokers(brokers)
    with Client(eps, timeout=timeout, curve_server_key=curve_server_key, curve_secret=curve_secret) as client:
        try:
            result = client.call(service, method, *[_parse_value(a) for a in args], **kw)
        except ZrpcError as exc:
            kind = exc.remote_type if isinstance(exc, RemoteError) else type(exc).__name__
            message = exc.message if isinstance(exc, RemoteError) else str(exc)
            if isinstance(exc, Timeout):
                message += f" (is a broker running at {', '.join(eps)}?)"
            if as_json:
                click.echo(json.dumps({"error": {"type": kind, "message": message,
                                                 "remote": isinstance(exc, RemoteError)}}))
            else:
                click.echo(f"error: {kind}: {message}", err=True)
            sys.exit(1)
    out = _jsonable(result)
    click.echo(json.dumps({"result": out} if as_json else out))


# --- status ------------------------------------------------------------------------------


def fetch_status(endpoints: Sequence[str], timeout: float, **keys: Any) -> dict[str, Any]:
    """Asks each broker for zrpc.status; merges into the `zrpc status --json` shape."""
    from zrpc._io._client import Client

    brokers: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for ep in endpoints:
        with Client([ep], timeout=timeout, **keys) as c:
            try:
                st = c.call("zrpc", "status")
            except ZrpcError as exc:
                brokers.append({"endpoint": ep, "role": None, "state": "unreachable",
                                "peer_state": None, "error": str(exc)})
                continue
        info = dict(st["broker"])
        info["endpoint"] = ep
        info["counters"] = st.get("counters", {})
        brokers.append(info)
        if best is None or info.get("state") == "active":
            best = st
    return {"brokers": brokers, "services": (best or {}).get("services", []),
            "workers": (best or {}).get("workers", []), "alerts": (best or {}).get("alerts", [])}


@main.command()
@_brokers_option
@click.option("--timeout", type=click.FloatRange(0.01, 600), default=2.0, show_default=True,
              help="Seconds to wait for each broker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--watch", "watch_s", type=click.FloatRange(0.2, 3600), is_flag=False, flag_value=1.0,
              default=None, metavar="[SECONDS]", help="Refresh every SECONDS (default 1) until Ctrl-C.")
@_curve_client_options
def status(brokers: str | None, timeout: float, as_json: bool, watch_s: float | None,
           curve_server_key: str | None, curve_secret: str | None) -> None:
    """Show brokers (role, state, peer), services, workers (outstanding calls, latency,
    phi suspicion), queues and the alerts in force."""
    eps = _brokers(brokers)
    keys = {"curve_server_key": curve_server_key, "curve_secret": curve_secret}
    if watch_s is not None and not as_json:
        _watch_status(eps, timeout, watch_s, keys)
        return
    st = fetch_status(eps, timeout, **keys)
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        from rich.console import Console

        Console().print(status_view(st))
    if all(b["state"] == "unreachable" for b in st["brokers"]):
        click.echo(f"error: no broker answered at {', '.join(eps)} within {timeout:g}s "
                   "(is one running? see `zrpc pair --help`)", err=True)
        sys.exit(1)


def _watch_status(eps: list[str], timeout: float, every: float, keys: dict[str, Any]) -> None:
    import time

    from rich.live import Live

    try:
        with Live(status_view(fetch_status(eps, timeout, **keys)), auto_refresh=False) as live:
            while True:
                time.sleep(every)  # noqa: sleep (the refresh period)
                live.update(status_view(fetch_status(eps, timeout, **keys)), refresh=True)
    except KeyboardInterrupt:
        pass


def status_view(st: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    t = Table(title="brokers", title_justify="left")
    for col in ("endpoint", "role", "state", "peer", "epoch", "pid", "uptime", "restarts",
                "internal errors"):
        t.add_column(col)
    for b in st["brokers"]:
        style = {"active": "green", "unreachable": "red"}.get(str(b["state"]), "")
        restarts = b.get("restarts")
        internal = b.get("counters", {}).get("internal_errors")
        t.add_row(b["endpoint"], str(b.get("role") or "-"), f"[{style}]{b['state']}[/]" if style else str(b["state"]),
                  str(b.get("peer_state") or "-"), str(b.get("epoch") if b.get("epoch") is not None else "-"),
                  str(b.get("pid", "-")), f"{b['uptime_s']:.0f}s" if "uptime_s" in b else "-",
                  "-" if restarts is None else f"[yellow]{restarts}[/]" if restarts else "0",
                  "-" if internal is None else f"[red]{internal}[/]" if internal else "0")
    parts: list[Any] = [t]
    t = Table(title="services", title_justify="left")
    for col in ("service", "workers", "outstanding", "queued", "calls", "errors"):
        t.add_column(col, justify="left" if col == "service" else "right")
    for s in st["services"]:
        t.add_row(s["name"], str(s["workers"]), str(s["outstanding"]), str(s["queued"]),
                  str(s.get("calls", "-")), str(s.get("errors", "-")))
    parts.append(t)
    t = Table(title="workers", title_justify="left")
    for col in ("worker", "services", "capacity", "outstanding", "ewma ms", "phi", "served", "errors"):
        t.add_column(col, justify="left" if col in ("worker", "services") else "right")
    for w in st["workers"]:
        flags = "".join(f" ({f})" for f in ("leaving", "ejected") if w.get(f))
        t.add_row(w["name"] + flags, ",".join(w["services"]), str(w["capacity"]), str(w["outstanding"]),
                  f"{w['ewma_ms']:.2f}", f"{w.get('phi', 0):.1f}", str(w["served"]), str(w["errors"]))
    parts.append(t)
    if st.get("alerts"):
        t = Table(title="alerts in force", title_justify="left")
        for col in ("severity", "alert", "subject", "detail"):
            t.add_column(col)
        for a in st["alerts"]:
            t.add_row(a["severity"], a["name"], a["subject"],
                      " ".join(f"{k}={v}" for k, v in a.get("detail", {}).items()))
        parts.append(t)
    return Group(*parts)


# --- monitor -----------------------------------------------------------------------------


@main.command()
@click.option("--monitors", envvar="ZRPC_MONITORS", show_envvar=True, metavar="EP[,EP]",
              help="Monitor endpoints of the brokers (default: the local pair, :5575 and :5576).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Run CMD for each alert, with the alert as JSON on stdin (a failure is reported).")
@click.option("--webhook", metavar="URL", help="POST each alert as JSON to URL (bounded retries).")
@click.option("--metrics/--no-metrics", default=True, show_default=True,
              help="Show the brokers' metrics snapshots (one a second each).")
@click.option("--count", type=click.IntRange(1), help="Stop after this many alerts.")
@click.option("--duration", type=click.FloatRange(0.1), help="Stop after this many seconds.")
@_curve_client_options
def monitor(monitors: str | None, as_json: bool, exec_cmd: str | None, webhook: str | None,
            metrics: bool, count: int | None, duration: float | None, curve_server_key: str | None,
            curve_secret: str | None) -> None:
    """Show live alerts (worker lost, suspect, failover...) and metrics from both brokers."""
    from zrpc._tools._monitor_view import LOCAL_MONITORS, watch

    eps = [check_endpoint_param(e, "--monitors") for e in (monitors.split(",") if monitors else LOCAL_MONITORS)]
    if webhook and not webhook.startswith(("http://", "https://")):
        raise click.BadParameter(f"{webhook!r}: expected an http:// or https:// URL", param_hint="--webhook")
    from zrpc._io._security import client_keys

    keys = client_keys(curve_server_key, curve_secret)
    sys.exit(watch(eps, as_json=as_json, exec_cmd=exec_cmd, webhook=webhook, metrics=metrics,
                   count=count, duration=duration, curve=keys))


def check_endpoint_param(value: str, hint: str) -> str:
    try:
        return check_endpoint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


# --- keygen ------------------------------------------------------------------------------


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="zrpc", show_default=True, help="Base name of the two files.")
def keygen(directory: str, name: str) -> None:
    """Create a CURVE key pair in DIRECTORY: NAME.key (public) and NAME.key_secret (0600)."""
    from zrpc._io._security import keygen as make_keys

    try:
        public, secret = make_keys(directory, name)
    except OSError as exc:
        raise click.ClickException(f"cannot write keys in {directory}: {exc.strerror or exc}") from None
    click.echo(f"wrote {public} (public: give it to peers) and {secret} (secret: keep it, mode 0600)")
    click.echo("broker:          zrpc broker --curve-secret BROKER.key_secret --curve-authorized DIR_OF_CLIENT_KEYS")
    click.echo("client, worker:  --curve-secret OWN.key_secret --curve-server-key BROKER.key "
               "(and copy OWN.key into the broker's authorized directory)")


# --- demo --------------------------------------------------------------------------------


@main.command()
@click.option("--plain", is_flag=True, help="Plain text output (for logs and CI).")
def demo(plain: bool) -> None:
    """Start a broker and workers of examples/calc.py, make calls, show what happened."""
    from zrpc._tools._demo import run_demo

    sys.exit(run_demo(plain=plain))
