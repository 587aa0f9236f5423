"""Who is there: whether a request found anybody subscribed, and whether this connection is settled.

The broker asks a worker whose heartbeat is late on the worker's ping subject. NATS answers "no
responders" at once when nobody is subscribed there, which tells a process whose connection is
closed from a slow one; it proves something only while this side's own connection is up and has
been for a while (after an outage the others reconnect a little later).
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.errors

from ._bus import Bus

__all__ = ("LinkStatus", "link_status", "nobody_subscribed")



def nobody_subscribed(exc: BaseException) -> bool:
    """True if ``exc`` (a :class:`~bus.RequestError`) came from a request that nobody was subscribed to."""
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            return False
        if isinstance(cur, nats.errors.NoRespondersError):
            return True
        cur = cur.__cause__
    return False


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """This process's connection to NATS: up or not, and how many times it was re-established."""

    connected: bool
    reconnects: int


def link_status(bus: Bus) -> LinkStatus:
    """The connection's status now."""
    nc = bus.nc
    return LinkStatus(nc.is_connected, int(nc.stats.get("reconnects", 0)))
