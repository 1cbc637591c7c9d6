"""What the commands share: where the brokers are, CURVE keys, the log level, endpoint checks,
and click options generated from a config dataclass's fields (each described once, there)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from zrpc._core._config import ENV, check_endpoint, resolve_brokers
from zrpc._core._membership import ENV as CLUSTER_ENV
from zrpc._core._membership import parse_cluster
from zrpc._defaults import CLUSTER_NAME, LOCAL_PAIR
from zrpc.broker._config import FLAG, Flag

F = TypeVar("F", bound=Callable[..., Any])

SERVING = "zrpc.serving"
"""Set in the context's meta once a broker or worker loop runs: from then on an exception
is a bug, not a user mistake, and shows its traceback."""


def serving() -> None:
    click.get_current_context().meta[SERVING] = True


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    # the etcd client's HTTP library logs every request at debug level: a line a second per
    # lease renewal says nothing a broker's own log does not
    logging.getLogger("urllib3").setLevel(max(logging.INFO, getattr(logging, level.upper())))


def brokers_option(f: F) -> F:
    return click.option(
        "--brokers", envvar=ENV, show_envvar=True, metavar="EP[,EP]",
        help=f"Broker endpoints, comma-separated (default: the local pair {','.join(LOCAL_PAIR)}).",
    )(f)


def cluster_option(f: F) -> F:
    return click.option(
        "--cluster", envvar=CLUSTER_ENV, show_envvar=True, metavar="etcd://H:P[,H:P]",
        callback=cluster_url, help="The cluster's etcd endpoints: its member brokers instead of --brokers.",
    )(f)


def cluster_url(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """Click callback: an etcd://H:P[,H:P] option's value, checked."""
    if value is None:
        return None
    try:
        parse_cluster(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.strip()


def cluster_name_option(f: F) -> F:
    return click.option("--cluster-name", default=CLUSTER_NAME, show_default=True,
                        help="Which cluster of that etcd (with --cluster).")(f)


def brokers_or_cluster(brokers: str | None, cluster: str | None,
                       most: int = 2) -> tuple[list[str], str | None]:
    """--brokers or --cluster (each maybe from the environment): the command line wins over
    the environment, a cluster over brokers; both on the command line is a usage error."""
    ctx = click.get_current_context()
    typed = {name for name in ("brokers", "cluster")
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}
    if typed == {"brokers", "cluster"}:
        raise click.UsageError("--brokers and --cluster: give one of them")
    if cluster is not None and "brokers" not in typed:
        return [], cluster
    return broker_endpoints(brokers, most), None


def curve_client_options(f: F) -> F:
    f = click.option("--curve-secret", type=click.Path(dir_okay=False), envvar="ZRPC_CURVE_SECRET",
                     show_envvar=True, help="This process's key pair (NAME.key_secret from `zrpc keygen`).")(f)
    return click.option("--curve-server-key", type=click.Path(dir_okay=False), envvar="ZRPC_CURVE_SERVER_KEY",
                        show_envvar=True, help="The brokers' public key (their NAME.key).")(f)


def log_option(f: F) -> F:
    return click.option("--log-level", default="info", show_default=True,
                        type=click.Choice(["debug", "info", "warning", "error"]),
                        help="How much to log on stderr.")(f)


def broker_endpoints(value: str | None, most: int = 2) -> list[str]:
    """--brokers (or $ZRPC_BROKERS, or the local pair) as endpoints; a bad one is a usage error."""
    try:
        return resolve_brokers(value, most)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--brokers") from None


def endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: an endpoint option's value, checked."""
    if value is None:
        return None
    try:
        return check_endpoint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def check_endpoint_param(value: str, hint: str) -> str:
    try:
        return check_endpoint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


class ConfigOptions:
    """Click options for the fields of a config dataclass that carry a Flag (a nested config's
    Flags make options of their own), and the way back from parsed values to its keywords.

    A default, a range and a help text are then written once, on the field."""

    def __init__(self, cls: type[Any], only: Sequence[str] | None = None, *, help: bool = True,
                 order: Sequence[str] | None = None) -> None:
        """`order`: the field names in the order the options are listed (default: the fields')."""
        self._options: list[tuple[str, str, dict[str, Any]]] = []  # flag, parameter, click keywords
        self._paths: dict[str, tuple[str, ...]] = {}  # click parameter -> field (, subfield)
        self._nested: dict[str, type[Any]] = {}
        self._help = help
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        if order is not None:
            fields = tuple(sorted(fields, key=lambda f: order.index(f.name)))
        for f in fields:
            meta = f.metadata.get(FLAG)
            if meta is None or (only is not None and f.name not in only):
                continue
            if isinstance(meta, Flag):
                self._add((f.name,), f, hints[f.name], meta)
                continue
            nested = hints[f.name]
            self._nested[f.name] = nested
            sub = {g.name: g for g in dataclasses.fields(nested)}
            subhints = typing.get_type_hints(nested)
            for name, m in meta.items():
                self._add((f.name, name), sub[name], subhints[name], m)

    def _add(self, path: tuple[str, ...], f: dataclasses.Field[Any], hint: Any, meta: Flag) -> None:
        opt = meta.name or "--" + path[-1].replace("_", "-")
        param = opt.lstrip("-").replace("-", "_")
        if param in self._paths:
            raise ValueError(f"two settings would be {opt}")
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        default = None if meta.unset else f.default
        attrs: dict[str, Any] = {"help": meta.help if self._help else None, "hidden": meta.hidden}
        if default is not None and default is not False:  # else click's own "not given"
            attrs["default"] = default
            if base is not bool and not meta.hidden:
                attrs["show_default"] = True
        if base is bool:
            attrs["is_flag"] = True
        elif meta.choices is not None:
            attrs["type"] = click.Choice(list(meta.choices))
        elif meta.range is not None:
            lo, hi = meta.range
            if base is int:
                attrs["type"] = click.IntRange(None if lo is None else int(lo), None if hi is None else int(hi))
            else:
                attrs["type"] = click.FloatRange(lo, hi)
        if meta.kind == "endpoint":
            attrs.update(callback=endpoint, metavar="EP")
        elif meta.kind == "cluster":
            attrs.update(callback=cluster_url, metavar="etcd://H:P[,H:P]")
        elif meta.kind == "file":
            attrs["type"] = click.Path(dir_okay=False)
        elif meta.kind == "dir":
            attrs["type"] = click.Path(file_okay=False)
        self._options.append((opt, param, attrs))
        self._paths[param] = path

    def __call__(self, f: F) -> F:
        for opt, param, attrs in reversed(self._options):
            f = click.option(opt, param, **attrs)(f)
        return f

    def keywords(self, values: dict[str, Any]) -> dict[str, Any]:
        """The dataclass's keywords for what click parsed: a setting left unset (None) keeps
        the dataclass's default."""
        out: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in self._nested}
        for param, path in self._paths.items():
            value = values[param]
            if value is None:
                continue
            if len(path) == 1:
                out[path[0]] = value
            else:
                nested[path[0]][path[1]] = value
        for name, cls in self._nested.items():
            out[name] = cls(**nested[name])
        return out
