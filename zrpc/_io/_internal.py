"""Internal errors: a loop's own bug costs one message, never the process.

Every socket loop (broker, worker I/O, client I/O thread, AsyncClient reader) handles each
message inside `InternalErrors.contain()`. An unexpected exception is counted, logged with its
traceback the first time its code site fails (a short line after that, rate-limited), and
the loop goes on. Tests fail on any "internal error" line, so containment never hides a bug.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MARK = "internal error"
"""Every line this module logs starts with it (test fixtures look for it)."""


def _site(exc: BaseException) -> tuple[str, int]:
    """Where the exception was raised: the innermost frame of its traceback."""
    tb = exc.__traceback__
    if tb is None:
        return ("?", 0)
    frames = traceback.extract_tb(tb)
    last = frames[-1]
    return (last.filename, last.lineno or 0)


class InternalErrors:
    """Counts and reports a loop's unexpected exceptions."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[Any], where: str) -> None:
        self._log = log
        self.where = where
        self.count = 0
        self._sites: dict[tuple[str, int], int] = {}
        self.last: str | None = None  # "Type: message" of the latest, for status and alerts

    def record(self, exc: BaseException, what: str = "a message") -> bool:
        """Counts `exc`; True when it is the first failure at its code site."""
        self.count += 1
        site = _site(exc)
        n = self._sites.get(site, 0) + 1
        if len(self._sites) < 1000 or site in self._sites:  # bounded: a bug has few sites
            self._sites[site] = n
        try:
            text = f"{type(exc).__name__}: {exc}"
        except Exception:  # noqa: BLE001 - an exception whose __str__ raises
            text = type(exc).__name__
        self.last = text[:500]
        if n == 1:
            self._log.error("%s in %s while handling %s (dropped it, carrying on): %s",
                            MARK, self.where, what, self.last, exc_info=exc)
        elif n <= 10 or n % 1000 == 0:
            self._log.error("%s #%d in %s at %s:%d: %s", MARK, n, self.where, site[0], site[1],
                            self.last)
        return n == 1

    @contextmanager
    def contain(self, what: str = "a message") -> Iterator[None]:
        """`with errors.contain("a frontend message"): handle(msg)` - never lets it escape."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - that is the point
            self.record(exc, what)
