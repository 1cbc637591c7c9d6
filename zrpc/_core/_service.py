"""Service: a named registry of handler functions, declared with decorators."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

RESERVED = "zrpc"
"""The broker answers this service itself (zrpc.status, zrpc.services)."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_METHOD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
"""A CURVE public key as Z85 text (what `zrpc keygen` writes, and the broker says in `caller`)."""


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    func: Callable[..., Any]
    idempotent: bool
    is_async: bool
    inline: bool = False  # run on the worker's I/O thread (short sync handlers only)
    allow: frozenset[str] | None = None  # the caller keys that may call it (None: every caller)


class Service:
    """A set of methods served under one name; a worker may serve several services."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"invalid service name {name!r}: use letters, digits, '_', '-', '.'")
        if name == RESERVED or name.startswith(RESERVED + "."):
            raise ValueError(f"service name {name!r} is reserved for the broker")
        self.name = name
        self._methods: dict[str, Method] = {}

    @overload
    def method(self, func: F) -> F: ...

    @overload
    def method(self, *, name: str | None = None, idempotent: bool = True,
               inline: bool = False, allow: Iterable[str] | None = None) -> Callable[[F], F]: ...

    def method(self, func: Any = None, *, name: str | None = None, idempotent: bool = True,
               inline: bool = False, allow: Iterable[str] | None = None) -> Any:
        """Registers a handler. Idempotent methods (the default) may be retried on another
        worker when one dies; `idempotent=False` ones are never executed twice.

        `inline=True` declares a short sync handler (microseconds, no I/O): the worker runs it
        on its I/O thread, which saves two thread hand-offs per call. A call that takes longer
        holds the worker's heartbeats back meanwhile: past INLINE_LIMIT (20 ms) the method
        moves to the thread pool for good, with a warning; one that never returns hangs the
        whole worker, which its brokers then treat as dead.

        `allow=[key, ...]` names the callers that may call this method, by their CURVE public
        keys as Z85 text (`zmq.auth.load_certificate("client.key")[0].decode()`): the worker
        answers any other caller Unauthorized without running it, and so every caller when
        the broker runs without keys (it then names no caller). Example:

            @svc.method(allow=[ADMIN_KEY])
            def reset() -> None: ..."""
        keys = _allowed(allow)

        def register(f: F) -> F:
            mname = name or f.__name__
            if not _METHOD.match(mname):
                raise ValueError(f"invalid method name {mname!r}")
            if mname in self._methods:
                raise ValueError(f"method {self.name}.{mname} is defined twice")
            is_async = inspect.iscoroutinefunction(f)
            if inline and is_async:
                raise ValueError(f"method {self.name}.{mname}: inline is for sync handlers "
                                 "(async ones already run on the worker's event loop)")
            self._methods[mname] = Method(mname, f, idempotent, is_async, bool(inline), keys)
            return f

        if func is not None:
            return register(func)
        return register

    @property
    def methods(self) -> Mapping[str, Method]:
        return dict(self._methods)

    def get(self, method: str) -> Method | None:
        return self._methods.get(method)

    def spec(self) -> dict[str, bool]:
        """method -> idempotent: what a worker announces in READY."""
        return {m.name: m.idempotent for m in self._methods.values()}

    def __repr__(self) -> str:
        return f"<Service {self.name} methods={sorted(self._methods)}>"


def _allowed(allow: Iterable[str] | None) -> frozenset[str] | None:
    """`allow=` as a set of Z85 keys; a key that is not one is refused now, not at a call."""
    if allow is None:
        return None
    keys = [allow] if isinstance(allow, str) else list(allow)
    if not keys:
        raise ValueError("allow= names no caller, so nobody could call the method: "
                         "leave it out to allow every caller")
    for key in keys:
        if not isinstance(key, str) or not _Z85_KEY.match(key):
            raise ValueError(f"allow=: {key!r} is not a CURVE public key (40 characters of Z85, "
                             "e.g. zmq.auth.load_certificate('NAME.key')[0].decode())")
    return frozenset(keys)
