"""Following the ``activity`` stream: every stored activity event in stream order, from a position on.

The stream is the activities' store: the recorder and every other reader fold what this delivers
(see ``bus.tracking._fold``).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus
from opentelemetry.trace import SpanKind

from schemas import Event

from ..transport._bus import Bus
from ..transport._streams import Received, follow_events
from ..transport._tracing import SYSTEM, extract_context, instruments, traced_receive, tracer
from ._fold import ACTIVITY_EVENTS, ActivityEvent

__all__ = ("follow_activity_events",)


async def follow_activity_events(
    bus: Bus,
    on_event: Callable[[ActivityEvent | None, int, bytes], None],
    *,
    after: Callable[[], int] = lambda: 0,
    consumer: str | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_event(event, stream_seq, body)`` for each stored activity event after ``after()``,
    then live (``body``: the bytes the event was decoded from).

    An ordered consumer (no acks, no state on the server): one delivery per event. ``after`` is read
    at each (re)start, so a follower started again by :func:`run_restarting` resumes where its
    reader is. Input that does not validate is passed as ``None`` (dead-lettered under ``consumer``
    first, when given), so the reader's position still moves on. Ready once the events stored
    before the start were delivered.
    """
    name = consumer or "activity-reader"

    def on_msg(msg: Received, event: Event | None) -> None:
        seq = msg.seq
        if event is None:
            on_event(None, seq, msg.data)
            return
        assert isinstance(event, ACTIVITY_EVENTS)
        instruments.pending[name] = msg.pending
        # A consumer span per event, the child of its publisher's (one trace from caller to recorder),
        # as bus.consume gives its handlers.
        headers = msg.headers or {}
        if not traced_receive(headers):
            on_event(event, seq, msg.data)  # nothing would be traced: no span (see bus.transport._tracing)
        else:
            with tracer.start_as_current_span(
                f"process {msg.subject}", context=extract_context(headers), kind=SpanKind.CONSUMER,
                attributes={"messaging.system": SYSTEM, "messaging.operation.type": "process",
                            "messaging.destination.name": msg.subject, "messaging.consumer.group.name": name,
                            "messaging.message.id": event.event_id, "messaging.nats.stream_sequence": seq},
            ):  # fmt: skip
                on_event(event, seq, msg.data)
        instruments.handled.add(1, {"consumer": name})

    await follow_events(bus, "activity", ACTIVITY_EVENTS, on_msg, after=after(), consumer=consumer,
                        task_status=task_status)  # fmt: skip
