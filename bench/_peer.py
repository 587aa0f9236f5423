"""The interface every system of the benchmark implements, one method per scenario."""

from __future__ import annotations

import re
from pathlib import Path

from ._common import NotAvailable, Sizes

__all__ = ("Peer", "notes_from")


def notes_from(doc: str | None) -> dict[str, str]:
    """The ``(a) ...`` paragraphs of a module docstring, by scenario letter."""
    found = re.findall(r"^\((\w)\) (.*?)(?=^\(\w\)|^\s*$|\Z)", doc or "", re.S | re.M)
    return {k: " ".join(v.split()) for k, v in found}


class Peer:
    """One system under test. A method that cannot run raises :class:`NotAvailable` with the reason.

    Times are seconds; the harness converts. Every method leaves the system as it found it, so the
    rounds of different systems can be interleaved.
    """

    name = "?"
    #: What each scenario measures on this system, printed under the table.
    notes: dict[str, str] = {}

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        self.sizes = sizes
        self.workdir = workdir

    async def start(self) -> None:
        """Bring the system up (servers, long-lived processes)."""

    async def close(self) -> None:
        """Stop everything it started; safe to call twice and after a failed start."""

    async def check(self) -> None:
        """Before each measurement: bring back a long-lived process that died (and say so in ``meta``)."""

    async def create_first(self, n: int) -> list[float]:
        """(a) ``n`` times: create a session, run one activity in it, get its result."""
        raise NotAvailable("not implemented")

    async def round_trip(self, n: int) -> list[float]:
        """(b) ``n`` sequential activity round trips inside one session."""
        raise NotAvailable("not implemented")

    async def throughput(self, sessions: int, ops: int) -> float:
        """(c) ``ops`` activities over ``sessions`` concurrent sessions; activities per second."""
        raise NotAvailable("not implemented")

    async def cancel(self, n: int) -> list[float]:
        """(d) ``n`` cancels: request -> the running activity sees it."""
        raise NotAvailable("not implemented")

    async def worker_loss(self, n: int, heartbeat_timeout: float) -> list[float]:
        """(e) ``n`` times: SIGKILL a worker holding a session -> the caller learns the session failed."""
        raise NotAvailable("not implemented")

    async def heartbeats(
        self, sessions: int, workers: int, heartbeat_timeout: float, window: float
    ) -> dict[str, float]:
        """(f) messages per second with ``sessions`` open sessions on ``workers`` idle workers."""
        raise NotAvailable("not implemented")

    async def memory(self, sessions: int, workers: int) -> dict[str, float]:
        """(g) resident memory (MB) with ``sessions`` open sessions on ``workers`` workers."""
        raise NotAvailable("not implemented")
