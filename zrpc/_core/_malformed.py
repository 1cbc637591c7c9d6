"""Malformed: what every core keeps of input it could not decode, so the broker, the worker and
the clients count and report it the same way (a count, the last reason, a few lines logged)."""

from __future__ import annotations

LOG_FIRST = 10
"""Reasons a loop logs in full; after these, one line in LOG_EVERY (a flood must not fill disks)."""
LOG_EVERY = 1000


class Malformed:
    """A count of undecodable messages and the reason for the last one."""

    __slots__ = ("count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.last = ""

    def add(self, reason: str) -> bool:
        """Counts one; True when the loop should log it."""
        self.count += 1
        self.last = reason
        return self.count <= LOG_FIRST or self.count % LOG_EVERY == 0

    def __repr__(self) -> str:
        return f"<Malformed count={self.count} last={self.last!r}>"
