"""Core (not stored) subscriptions for readers outside ``bus.transport``, as cadenza types.

* :func:`subscribe_callback`: a subscription owned by the bus's connection, whose handler nats-py's
  dispatcher calls for each message (no task of the caller's: it ends when the bus closes): the
  session client's announcements.
* :func:`subscribe_now`: the same with a plain function, called as the connection reads each message
  (no task in between; it must not block): a caller's results, the cancel router.
* :func:`core_messages`: the messages on a subject as an async iterator (``cadenza tail``).
* :func:`new_inbox` / :func:`flush`: a reply subject of this connection, and a round trip that makes
  sure the server has every subscription made before it.

Messages come out as :class:`~bus.transport.Received` (``seq`` 0, no store time); engine errors as
:class:`~bus.BusError` (``engine_errors``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

import anyio
from nats.aio.msg import Msg

from ._bus import Bus
from ._direct import subscribe_direct
from ._errors import engine_errors
from ._streams import Received

__all__ = ("core_messages", "flush", "new_inbox", "subscribe_callback", "subscribe_now")


def new_inbox(bus: Bus) -> str:
    """A fresh reply subject under the connection's inbox prefix."""
    return bus.nc.new_inbox()


async def subscribe_callback(
    bus: Bus, subject: str, on_msg: Callable[[Received], Awaitable[None]], *, pending_msgs: int = 1_000_000
) -> None:
    """Call ``on_msg`` for each message on ``subject`` until the bus closes (one at a time, in order).

    Raises:
        BusError: the subscription could not be made (a closed connection, a bad subject).
    """

    async def cb(msg: Msg) -> None:
        await on_msg(Received(msg.subject, msg.data, msg.headers))

    with engine_errors(f"subscribing to {subject}"):
        await bus.nc.subscribe(subject, cb=cb, pending_msgs_limit=pending_msgs)


async def subscribe_now(
    bus: Bus, subject: str, take: Callable[[Received], None]
) -> Callable[[], Awaitable[None]]:
    """Call ``take`` for each message on ``subject`` as the connection reads it, until the bus
    closes or the returned function is awaited (it unsubscribes; best effort): in order, in
    nats-py's read loop (``take`` must not block; it may start a task).

    Raises:
        BusError: the subscription could not be made (a closed connection, a bad subject).
    """

    def each(msg: Msg) -> None:
        take(Received(msg.subject, msg.data, msg.headers))

    with engine_errors(f"subscribing to {subject}"):
        sub = await subscribe_direct(bus.nc, subject, each)

    async def unsubscribe() -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    return unsubscribe


async def flush(bus: Bus, timeout: float | None = None) -> None:
    """One round trip to the server (default bound: ``Timeouts.request``, whole seconds, at least 1).

    Raises:
        BusError: no answer in time (transient).
    """
    with engine_errors("flushing the connection"):
        await bus.nc.flush(timeout=max(1, int(bus.timeouts.request if timeout is None else timeout)))


async def core_messages(bus: Bus, subject: str) -> AsyncGenerator[Received, None]:
    """Every message published on ``subject`` from now on, stored or not, until the caller stops
    (close it with ``contextlib.aclosing`` to unsubscribe at once).

    Raises:
        BusError: the subscription could not be made.
    """
    with engine_errors(f"subscribing to {subject}"):
        sub = await bus.nc.subscribe(subject)
    try:
        async for msg in sub.messages:
            yield Received(msg.subject, msg.data, msg.headers)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
