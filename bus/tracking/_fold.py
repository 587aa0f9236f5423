"""The activity fold: events of one activity -> its :class:`~schemas.StoredActivity` (record + fold state).

Pure functions, shared by the recorder and by every reader that follows the ``activity`` stream itself
(:func:`bus.watch_activities`, the console): the stream is the store, and anyone folding it in stream
order gets the same records. Folding does not depend on the order events arrive in: "latest" fields
follow the highest ``rev``, message seqs are kept as a set of ranges (a redelivered batch adds
nothing), and the first terminal status wins. An update or message without ``rev`` (0: a client that
does not count, such as ``nats pub``) applies in arrival order. A version-2 completion that carries
``start`` announces the activity too (one event for an activity that ended before it was announced).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from schemas import (
    ActivityCompleted,
    ActivityFold,
    ActivityMessage,
    ActivityRecord,
    ActivityStart,
    ActivityStarted,
    ActivityStatus,
    ActivityUpdated,
    StoredActivity,
    cut_text,
)
from schemas._json import parse_json

from ._api import clamp_progress

__all__ = (
    "ACTIVITY_EVENTS",
    "ActivityEvent",
    "Entry",
    "FirstEvent",
    "StreamFold",
    "announcement",
    "fold_activity_event",
    "fold_completed",
    "fold_message",
    "fold_started",
    "fold_updated",
)

_log = logging.getLogger("cadenza.recorder")

ACTIVITY_EVENTS = (ActivityStarted, ActivityUpdated, ActivityMessage, ActivityCompleted)
ActivityEvent = ActivityStarted | ActivityUpdated | ActivityMessage | ActivityCompleted
Stored = StoredActivity


class FirstEvent:
    """An activity known by one event, a completion carrying its start (a quick activity), kept as
    that event: its record is folded on first use (a request, a later event), not on arrival, since
    most are never asked for before they are pruned or dropped. Building and keeping every record on
    arrival cost about 30 us per event in a recorder holding 20,000 (most of it the garbage collector
    walking the kept models), against 1 us kept as the event. What pruning needs (the environment,
    when it ended) is kept beside it.

    Given the event's ``body`` (the bytes it was decoded from), it keeps those instead of the model
    and decodes them again on first use: bytes are nothing the garbage collector walks, where the
    model is seven objects it does (a loaded recorder spent 10-19% of its CPU in the collector,
    most of it walking kept completions), and they take a third of the memory."""

    __slots__ = ("_body", "_event", "_stored", "activity_id", "ended_at", "environment_id")

    def __init__(self, event: ActivityCompleted, body: bytes | None = None) -> None:
        assert event.start is not None, "a FirstEvent is a completion that carries its start"
        self.activity_id = event.activity_id
        self.environment_id = event.start.environment_id
        self.ended_at: datetime = event.time
        self._body = body
        self._event = event if body is None else None
        self._stored: Stored | None = None

    @property
    def event(self) -> ActivityCompleted:
        """The completion (decoded again from its body, the first time it is asked for)."""
        if self._event is None:
            assert self._body is not None
            self._event = _decoded_again(self._body)
        return self._event

    @property
    def stored(self) -> Stored:
        """The folded record and fold state (folded now, on first use)."""
        if self._stored is None:
            event = self.event
            assert event.start is not None
            self._stored = _first_event(event, event.start)
        return self._stored

    @property
    def folded_yet(self) -> bool:
        """True once :attr:`stored` was asked for."""
        return self._stored is not None

    @property
    def record(self) -> ActivityRecord:
        return self.stored.record

    @property
    def fold(self) -> ActivityFold:
        return self.stored.fold


def _decoded_again(body: bytes) -> ActivityCompleted:
    """A completion from the body it was decoded from once (so valid): parsed as the transport's
    ``decode`` parses, then validated."""
    return ActivityCompleted.model_validate(parse_json(body))


#: What a reader holds per activity: a folded record, or a quick activity's one event.
Entry = Stored | FirstEvent


class StreamFold:
    """The ``activity`` stream folded in stream order by a reader that follows it (the recorder, the
    console, :func:`bus.watch_activities`): the records by id, the stream position reached, and, for
    a reader that cannot see the recorder's pruning, a bound on the finished activities it keeps.

    Args:
        keep_finished: finished activities kept; the one that ended first goes first (None: all of
            them, for a reader that prunes with :meth:`forget`, as the recorder does).
        on_forget: called with the id of each activity dropped by the bound.
    """

    def __init__(self, keep_finished: int | None, on_forget: Callable[[str], None] | None = None) -> None:
        self.records: dict[str, Entry] = {}
        self.position = 0
        self.keep_finished = keep_finished
        self._on_forget = on_forget
        self._finished: OrderedDict[str, None] = OrderedDict()

    def apply(self, event: ActivityEvent | None, seq: int, body: bytes | None = None) -> Entry | None:
        """Fold the event stored at ``seq`` (None: one that did not validate; ``body``: the bytes it
        was decoded from); the new state, or None when nothing changed (or ``seq`` was folded
        already, as after a follower's restart). A completion that carries its start, of an activity
        not seen before, is kept as a :class:`FirstEvent` (finished; folded on first use; kept as
        its body when given)."""
        if seq <= self.position:
            return None
        self.position = seq
        if event is None:
            return None
        current = self.records.get(event.activity_id)
        new: Entry | None
        if current is None and isinstance(event, ActivityCompleted) and event.start is not None:
            new = FirstEvent(event, body)  # the common case: one event for a quick activity
        else:
            new = fold_activity_event(current.stored if isinstance(current, FirstEvent) else current, event)
        if new is None:
            return None
        self.records[event.activity_id] = new
        if (isinstance(new, FirstEvent) or new.record.terminal) and self.keep_finished is not None:
            self._finished[event.activity_id] = None
            while len(self._finished) > self.keep_finished:
                gone = self._finished.popitem(last=False)[0]
                self.records.pop(gone, None)
                if self._on_forget is not None:
                    self._on_forget(gone)
        return new

    def forget(self, activity_id: str) -> None:
        """Drop an activity's record (pruned): a later event of it folds from nothing."""
        self.records.pop(activity_id, None)
        self._finished.pop(activity_id, None)


def fold_activity_event(stored: Stored | None, event: ActivityEvent) -> Stored | None:
    """``stored`` with ``event`` folded in, or None when the event changes nothing."""
    if isinstance(event, ActivityStarted):
        return fold_started(stored, event)
    if isinstance(event, ActivityUpdated):
        return fold_updated(stored, event)
    if isinstance(event, ActivityMessage):
        return fold_message(stored, event)
    return fold_completed(stored, event)


def _add_range(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]] | None:
    """``ranges`` with [lo, hi] added (merged), or None if it was covered already."""
    for a, b in ranges:
        if a <= lo and hi <= b:
            return None
    merged: list[tuple[int, int]] = []
    for a, b in sorted([*ranges, (lo, hi)]):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _duration_ms(start: datetime | None, end: datetime) -> int | None:
    return None if start is None else max(0, int((end - start).total_seconds() * 1000))


def _placeholder(activity_id: str, time: datetime) -> Stored:
    return Stored(record=ActivityRecord(id=activity_id, updated_at=time))


def fold_started(stored: Stored | None, e: ActivityStarted) -> Stored | None:
    if stored is not None and stored.fold.announced:
        return None
    s = stored or _placeholder(e.activity_id, e.time)
    r = s.record
    late = s.fold.rev > 0  # messages or updates were folded before the announce
    record = r.model_copy(
        update={
            "environment_id": e.environment_id,
            "type": e.activity_type,
            "status": r.status if r.terminal else e.status,
            "resource_type": e.resource_type,
            "resource_id": e.resource_id,
            "resource_name": e.resource_name,
            "step": r.step if late and r.step else e.step,
            "latest_message": r.latest_message if late and r.latest_message else cut_text(e.message),
            "progress": r.progress if late or r.terminal else clamp_progress(e.progress),
            "started_by": e.started_by,
            "started_at": e.time,
            "metadata": e.metadata,
            "batch_id": e.batch_id,
            "worker_id": e.worker_id,
            "session_id": e.session_id,
            "created_at": e.time,
            "updated_at": max(e.time, r.updated_at or e.time),
            "duration_ms": _duration_ms(e.time, r.ended_at) if r.ended_at else None,
        }
    )
    return Stored(record=record, fold=s.fold.model_copy(update={"announced": True}))


def fold_updated(stored: Stored | None, e: ActivityUpdated) -> Stored | None:
    s = stored or _placeholder(e.activity_id, e.time)
    r = s.record
    if r.terminal or (e.rev and e.rev < s.fold.rev):
        return None
    update: dict[str, object] = {"updated_at": e.time}
    if e.status is not None and r.status is ActivityStatus.QUEUED:
        update["status"] = ActivityStatus.RUNNING
    if e.step is not None:
        update["step"] = e.step
    if e.progress is not None:
        update["progress"] = clamp_progress(e.progress)
    if e.message is not None and cut_text(e.message):
        update["latest_message"] = cut_text(e.message)
    return Stored(record=r.model_copy(update=update), fold=s.fold.model_copy(update={"rev": max(e.rev, s.fold.rev)}))


def fold_message(stored: Stored | None, e: ActivityMessage) -> Stored | None:
    s = stored or _placeholder(e.activity_id, e.time)
    ranges = _add_range(s.fold.ranges, e.seq, e.last_seq)
    if ranges is None:
        return None  # already folded (a redelivery)
    r = s.record
    update: dict[str, object] = {
        "message_count": sum(b - a + 1 for a, b in ranges),
        "last_seq": max(r.last_seq, e.last_seq),
    }
    fold = s.fold.model_copy(update={"ranges": ranges})
    if not r.terminal and (not e.rev or e.rev >= s.fold.rev):
        fold = fold.model_copy(update={"rev": max(e.rev, s.fold.rev)})
        update["updated_at"] = e.time
        for entry in e.entries:
            text = cut_text(entry.message)
            if text:
                update["latest_message"] = text
            if entry.step is not None:
                update["step"] = entry.step
            if entry.progress is not None:
                update["progress"] = clamp_progress(entry.progress)
    return Stored(record=r.model_copy(update=update), fold=fold)


def announcement(
    activity_id: str, start: ActivityStart, status: ActivityStatus = ActivityStatus.RUNNING
) -> ActivityStarted:
    """The ``started`` event for ``start`` (what a version-2 completion's ``start`` stands for)."""
    fields = {k: v for k, v in start if k != "started_at"}
    return ActivityStarted(event_id=f"{activity_id}.started", time=start.started_at, activity_id=activity_id,
                           status=status, **fields)  # fmt: skip


def _first_event(e: ActivityCompleted, start: ActivityStart) -> Stored:
    """The record of an activity whose first event is a completion carrying its announcement: the
    same as folding the announcement and then the completion, in one step (the common case: a quick
    activity is one event)."""
    text = cut_text(e.final.message) if e.final is not None and e.final_seq > 0 else ""
    final = bool(text)
    success = e.status is ActivityStatus.SUCCESS
    record = ActivityRecord(
        id=e.activity_id, environment_id=start.environment_id, type=start.activity_type, status=e.status,
        resource_type=start.resource_type, resource_id=start.resource_id, resource_name=start.resource_name,
        progress=100.0 if success else clamp_progress(start.progress), step=e.step or start.step,
        latest_message=text or cut_text(start.message), started_by=start.started_by, started_at=start.started_at,
        ended_at=e.time, duration_ms=_duration_ms(start.started_at, e.time),
        error=cut_text(e.error) if e.error else None,
        metadata=start.metadata, batch_id=start.batch_id, worker_id=start.worker_id, session_id=start.session_id,
        result=e.result, message_count=1 if final else 0, last_seq=e.final_seq if final else 0,
        created_at=start.started_at, updated_at=e.time,
    )  # fmt: skip
    ranges = [(e.final_seq, e.final_seq)] if final else []
    fold = ActivityFold(announced=True, rev=0, ranges=ranges, completed_event=e.event_id,
                                        host_lost=e.host_lost)  # fmt: skip
    return Stored(record=record, fold=fold)


def fold_completed(stored: Stored | None, e: ActivityCompleted) -> Stored | None:
    if stored is None and e.start is not None:
        return _first_event(e, e.start)
    if e.start is not None and (stored is None or not stored.fold.announced):
        if stored is None or not stored.record.terminal:
            stored = fold_started(stored, announcement(e.activity_id, e.start)) or stored
    s = stored or _placeholder(e.activity_id, e.time)
    r = s.record
    if r.terminal:
        if s.fold.completed_event != e.event_id:
            _log.info("activity %s: second completion (%s) ignored: already %s", r.id, e.status, r.status.value)
        return None
    update: dict[str, object] = {
        "status": e.status,
        "error": cut_text(e.error) if e.error else None,
        "ended_at": e.time,
        "duration_ms": _duration_ms(r.started_at, e.time),
        "updated_at": e.time,
        "result": e.result,
    }
    if e.status is ActivityStatus.SUCCESS:
        update["progress"] = 100.0
    if e.step:
        update["step"] = e.step
    fold = s.fold.model_copy(update={"completed_event": e.event_id, "host_lost": e.host_lost})
    if e.final is not None and e.final_seq > 0 and cut_text(e.final.message):
        update["latest_message"] = cut_text(e.final.message)
        ranges = _add_range(fold.ranges, e.final_seq, e.final_seq)
        if ranges is not None:
            fold = fold.model_copy(update={"ranges": ranges})
            update["message_count"] = sum(b - a + 1 for a, b in ranges)
            update["last_seq"] = max(r.last_seq, e.final_seq)
    return Stored(record=r.model_copy(update=update), fold=fold)
