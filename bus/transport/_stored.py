"""Reading what a stream still stores on one subject, without a consumer.

A work-queue stream (the ``task`` stream) allows one consumer per subject, and a worker's inbox has
its own; a reader that must look at the tasks a lost worker left behind reads them by "next message
on this subject from sequence N" gets instead (the JetStream API's ``STREAM.MSG.GET``), one request
per message, oldest first.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from schemas import Event

from .._exceptions import NotFoundError, ValidationError
from ._bus import Bus
from ._codec import decode
from ._errors import engine_errors

__all__ = ("stored_events",)


async def stored_events(
    bus: Bus, domain: str, subject: str, accept: Sequence[type[Event]], *, limit: int = 1000
) -> list[tuple[int, Event | None]]:
    """``(stream sequence, event)`` of the messages ``domain``'s stream stores on ``subject``, oldest
    first, at most ``limit``; ``None`` for a message that does not validate.

    Raises:
        BusError: the engine did not answer (transient ones retry in the caller's loop).
    """
    stream = bus.topology.stream_name(domain)
    found: list[tuple[int, Event | None]] = []
    seq = 1
    while len(found) < limit:
        try:
            with engine_errors(f"reading {subject}"), anyio.fail_after(bus.timeouts.request):
                msg = await bus.js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break  # nothing more on the subject
        try:
            event: Event | None = decode(msg.data or b"", msg.headers, accept)
        except ValidationError:
            event = None
        at = msg.seq or seq
        found.append((at, event))
        seq = at + 1
    return found

