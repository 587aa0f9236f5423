"""The state of a bus's connection, for the services that watch it (``cadenza tail``, the console's
health page, the commands that ride out a server restart), without reaching into nats-py's client.
Whether it is up and how many times it was made again: :func:`bus.transport.link_status`.

nats-py gives no event for a change of connection state: these are reads, polled by the callers.
"""

from __future__ import annotations

from typing import Any

from ._bus import Bus

__all__ = ("is_closed", "keep_reconnecting", "server_info")


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
