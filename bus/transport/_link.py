"""The state of a bus's connection, for the services that watch it (``cadenza tail``, the console's
health page, the commands that ride out a server restart, the broker's probes), without reaching
into nats-py's client: up or not and how many times it was made again (:func:`link_status`), closed
for good, reconnecting for as long as it takes, the server's INFO.

The broker asks a worker whose heartbeat is late on the worker's ping subject. NATS answers "no
responders" at once when nobody is subscribed there (:func:`nobody_subscribed`), which tells a
process whose connection is closed from a slow one; it proves something only while this side's own
connection is up and has been for a while (after an outage the others reconnect a little later).

nats-py gives no event for a change of connection state: these are reads, polled by the callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats.errors

from ._bus import Bus

__all__ = ("LinkStatus", "is_closed", "keep_reconnecting", "link_status", "nobody_subscribed", "server_info")


def is_closed(bus: Bus) -> bool:
    """True once the connection is closed for good (the bus was closed, or reconnecting gave up)."""
    return bool(bus.nc.is_closed)


def keep_reconnecting(bus: Bus, wait: float) -> None:
    """From now on, reconnect for as long as it takes, trying every ``wait`` seconds (nats-py reads
    these options at each reconnect, so a first connect still fails fast)."""
    bus.nc.options["max_reconnect_attempts"] = -1
    bus.nc.options["reconnect_time_wait"] = wait


def server_info(bus: Bus) -> dict[str, Any]:
    """The INFO the server sent when this connection was made (``server_name``, ``version``, ...; empty
    when not known)."""
    return dict(getattr(bus.nc, "_server_info", {}) or {})


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
