"""Reading activities: the recorder's endpoints as typed calls, the message reader, the live change feed.

Messages are not copied anywhere: they are the ``activity`` stream's ``message`` events (and the
final message of the first ``completed`` event), read back with a short-lived consumer filtered on
``<prefix>.activity.<id>.*``. The records are the stream folded in stream order (``bus.tracking._fold``): the
recorder holds them and answers for them; a dashboard folds the stream itself with
:func:`watch_activities`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from schemas import (
    ActivityCompleted,
    ActivityMessage,
    ActivityRecord,
    CancelActivityReply,
    CancelActivityRequest,
    GetActivityReply,
    GetActivityRequest,
    ListActivitiesReply,
    ListActivitiesRequest,
    MessageEntry,
    MessageRecord,
    TailActivityReply,
    TailActivityRequest,
    cut_text,
)

from .._context import loop_time
from .._exceptions import BusError, ValidationError
from ..transport._bus import Bus
from ..transport._codec import decode
from ..transport._streams import Received, StreamReader, open_reader
from ._api import clamp_progress
from ._fold import ACTIVITY_EVENTS

__all__ = (
    "ActivityClient",
    "MessageBatch",
    "read_activity_messages",
    "watch_activities",
)

#: Finished activities :func:`watch_activities` remembers (a late event for an older one is stale).
_WATCH_FINISHED = 100_000


@dataclass
class MessageBatch:
    """Messages read from the stream, and where to continue.

    Attributes:
        messages: by seq, oldest first, each seq once.
        cursor: stream sequence to continue from (pass it back to read only newer events).
        completed: the activity's first completion event, if it was among the events read.
        events: stream events read.
    """

    messages: list[MessageRecord] = field(default_factory=list)
    cursor: int = 0
    completed: ActivityCompleted | None = None
    events: int = 0


def _record(activity_id: str, seq: int, e: MessageEntry) -> MessageRecord:
    return MessageRecord(
        activity_id=activity_id,
        seq=seq,
        level=e.level,
        message=cut_text(e.message),
        payload=e.payload,
        step=e.step,
        progress=None if e.progress is None else clamp_progress(e.progress),
        created_at=e.created_at,
    )


async def read_activity_messages(
    bus: Bus,
    activity_id: str,
    *,
    after_seq: int = 0,
    cursor: int = 0,
    wait: float = 0.0,
    soft_limit: int = 0,
    keep_last: int = 0,
) -> MessageBatch:
    """Read the messages of an activity with seq > ``after_seq`` from the stream.

    Args:
        after_seq: only messages after this seq.
        cursor: start at this stream sequence (from an earlier batch) instead of the beginning.
        wait: when nothing newer is stored, wait up to this long for it (a live tail).
        soft_limit: stop reading events once this many messages are collected (0: read all).
        keep_last: return only the last this many messages (0: all).

    Raises:
        BusError: the stream could not be read.
    """
    stream = bus.topology.stream_name("activity")
    what = f"cannot read the messages of activity {activity_id}"
    try:
        with anyio.fail_after(bus.timeouts.request + wait):
            reader = await open_reader(bus, stream, bus.subjects.filter("activity", activity_id), start_seq=cursor)
    except (TimeoutError, BusError) as exc:
        raise BusError(f"{what}: {exc.__cause__ or exc!r}") from exc
    out = _Collected(activity_id, after_seq, MessageBatch(cursor=cursor))
    try:
        await _read_until_done(bus, reader, out, wait, soft_limit)
    except BusError as exc:
        if exc.__cause__ is None:
            raise  # said already
        raise BusError(f"{what}: {exc.__cause__!r}") from exc.__cause__
    finally:
        await reader.close()
    seqs = sorted(out.seen)
    if keep_last:
        seqs = seqs[-keep_last:]
    out.batch.messages = [_record(activity_id, s, out.seen[s]) for s in seqs]
    return out.batch


@dataclass
class _Collected:
    """What :func:`read_activity_messages` has read so far: the messages by seq, the first completion."""

    activity_id: str
    after_seq: int
    batch: MessageBatch
    seen: dict[int, MessageEntry] = field(default_factory=dict)
    caught_up: bool = False

    def add(self, msg: Received) -> None:
        """Take one stored event (its messages after ``after_seq``, a first completion)."""
        out = self.batch
        out.cursor = msg.seq + 1
        out.events += 1
        if msg.pending == 0:
            self.caught_up = True
        try:
            event = decode(msg.data, msg.headers, ACTIVITY_EVENTS)
        except ValidationError:
            return  # dead-lettered by the recorder; nothing to show
        if isinstance(event, ActivityMessage):
            for i, entry in enumerate(event.entries):
                if event.seq + i > self.after_seq and entry.message.strip():
                    self.seen.setdefault(event.seq + i, entry)
        elif isinstance(event, ActivityCompleted) and out.completed is None:
            out.completed = event
            final = event.final
            if final is not None and event.final_seq > self.after_seq and final.message.strip():
                self.seen.setdefault(event.final_seq, final)


async def _read_until_done(bus: Bus, reader: StreamReader, out: _Collected, wait: float, soft_limit: int) -> None:
    """Fetch until the stream's end as it was at the start (then up to ``wait`` s more while nothing
    was found), or until ``soft_limit`` messages were collected."""
    out.caught_up = await reader.pending() == 0
    deadline = loop_time() + wait
    while True:
        if out.caught_up:
            left = deadline - loop_time()
            if out.seen or out.batch.completed is not None or left <= 0:
                return
            batch_size, timeout = 64, left
        else:
            batch_size, timeout = 256, bus.timeouts.fetch + 1.0
        msgs = await reader.fetch(batch_size, timeout)
        if not msgs and not out.caught_up:
            raise BusError(f"reading activity {out.activity_id}: the server stopped sending")
        for msg in msgs:
            out.add(msg)
        if soft_limit and len(out.seen) >= soft_limit:
            return


async def watch_activities(bus: Bus) -> AsyncIterator[ActivityRecord]:
    """Every activity as the stream holds it, then each change, live (for a dashboard).

    Folds the ``activity`` stream here with the recorder's folds (no recorder needed, no state on the
    server): each record is yielded when an event changes it, announced activities only. Rides
    through server restarts (the follower starts again where it was).
    """
    from ..transport._retry import run_restarting
    from ._fold import StreamFold
    from ._follow import follow_activity_events

    folded = StreamFold(keep_finished=_WATCH_FINISHED)  # bounded: a dashboard runs for good
    send, receive = anyio.create_memory_object_stream[ActivityRecord](100_000)

    def on_event(event: Any, seq: int, body: bytes) -> None:
        new = folded.apply(event, seq, body)
        if new is not None and new.fold.announced:
            try:
                send.send_nowait(new.record)
            except anyio.WouldBlock:
                pass  # the reader is far behind: it sees this activity at its next change

    async with anyio.create_task_group() as tg:
        # Resumes where it was after a server restart or a lost consumer (never from the start again).
        follow = functools.partial(follow_activity_events, bus, on_event, after=lambda: folded.position)
        await tg.start(run_restarting, "activity watch", follow)
        try:
            async with receive:
                async for record in receive:
                    yield record
        finally:
            tg.cancel_scope.cancel()


class ActivityClient:
    """The recorder's endpoints (``<prefix>.rpc.recorder.<name>``) as typed calls.

    Raises (every method):
        RemoteError: the recorder answered with an error; ``remote_code`` is ``not_found``,
            ``not_cancellable``, ``validation``, ...
        RequestError: no recorder answered.
    """

    def __init__(self, bus: Bus, *, timeout: float | None = None) -> None:
        self.bus = bus
        self.timeout = timeout

    def _subject(self, name: str) -> str:
        return self.bus.rpc_subject("recorder", name)

    async def list(self, req: ListActivitiesRequest | None = None, **filters: Any) -> ListActivitiesReply:
        """Activities of an environment, active first, then newest first."""
        req = req or ListActivitiesRequest.model_validate(filters)
        return await self.bus.request(self._subject("list"), req, ListActivitiesReply, timeout=self.timeout)

    async def get(self, activity_id: str, limit: int = 500) -> GetActivityReply:
        """One activity with its last ``limit`` (<= 500) messages, oldest first."""
        req = GetActivityRequest(activity_id=activity_id, limit=limit)
        return await self.bus.request(self._subject("get"), req, GetActivityReply, timeout=self.timeout)

    async def tail(
        self, activity_id: str, *, after_seq: int = 0, cursor: int = 0, wait: float = 0.0, limit: int = 500
    ) -> TailActivityReply:
        """Messages after ``after_seq`` (waiting up to ``wait`` s for some)."""
        req = TailActivityRequest(activity_id=activity_id, after_seq=after_seq, cursor=cursor, wait=wait, limit=limit)
        timeout = (self.timeout or self.bus.timeouts.request) + wait
        return await self.bus.request(self._subject("tail"), req, TailActivityReply, timeout=timeout)

    async def follow(self, activity_id: str, *, after_seq: int = 0, wait: float = 5.0) -> AsyncIterator[MessageRecord]:
        """Every message after ``after_seq``, live, until the activity ends."""
        cursor = 0
        while True:
            reply = await self.tail(activity_id, after_seq=after_seq, cursor=cursor, wait=wait)
            for message in reply.messages:
                yield message
            after_seq = max(after_seq, reply.last_seq)
            cursor = reply.cursor
            if reply.done:
                return

    async def cancel(self, activity_id: str, *, who: str = "", reason: str = "") -> CancelActivityReply:
        """Ask for a user's cancellation (``not_found`` / ``not_cancellable`` errors otherwise)."""
        req = CancelActivityRequest(activity_id=activity_id, who=who, reason=reason)
        return await self.bus.request(self._subject("cancel"), req, CancelActivityReply, timeout=self.timeout)
