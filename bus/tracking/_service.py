"""The bus-backed activity service: :class:`Service`, :class:`MessageAppender` and :class:`Tracker` at once.

``async with BusActivityService(bus) as svc:`` owns a task group with a :class:`CancelRouter` (cancel
events reach the work of this process in one NATS hop) and, unless told the process heartbeats
already, a :class:`Heartbeater` (the recorder finalises the activities of a process whose heartbeats
stop). Each activity's events are published one at a time under a per-activity lock, so its message
``seq`` is gap-free; an event that was not acknowledged is kept and published again, unchanged,
before anything newer of that activity (so a retry never re-numbers or duplicates a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
from anyio.abc import TaskGroup

from schemas import (
    ActivityCompleted,
    ActivityLevel,
    ActivityMessage,
    ActivityRecord,
    ActivityStart,
    ActivityStarted,
    ActivityStatus,
    ActivityUpdated,
    CancelCause,
    CancelKind,
    Event,
    MessageEntry,
    MessageRecord,
    cut_text,
    utcnow,
)

from .._cancel import CancelRouter
from .._context import CancelToken, Context, loop_time
from .._exceptions import ActivityError, CadenzaError, UsageError
from .._heartbeat import Heartbeater, ProcessLoad, new_worker_id
from ..transport._bus import Bus
from ..transport._retry import backoff_delay
from ._api import (
    FIRST_COMPLETION,
    ActivityAlreadyStartedError,
    ActivityFinishedError,
    AppendMessageRequest,
    StartRequest,
    UpdateRequest,
    clamp_progress,
    store_first_completion,
)
from ._fold import announcement
from ._writer import ActivityWriter, TextSink, flush_writer

__all__ = ("BusActivityService", "ServiceState")

_log = logging.getLogger("cadenza.activity")

_LEVEL_OF = {
    ActivityStatus.SUCCESS: ActivityLevel.SUCCESS,
    ActivityStatus.CANCELLED: ActivityLevel.WARNING,
    ActivityStatus.FAILED: ActivityLevel.ERROR,
}


class ServiceState(enum.Enum):
    """Lifecycle of a :class:`BusActivityService`."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


#: The fields of a start request whose announcement is the default one but for its type, worker and
#: session (``status`` is not part of it).
_PLAIN_START = frozenset({"id", "type", "status", "worker_id", "session_id"})


@dataclass(eq=False)
class _Track:
    """What this process knows about one activity it runs."""

    id: str
    started_at: datetime
    #: The record as started (see :attr:`record`).
    built: ActivityRecord | None = None
    #: What :attr:`record` is built from when the start did not build it (a deferred announcement:
    #: a quick activity never needs it).
    req: StartRequest | None = None
    worker_id: str = ""
    #: An asyncio lock (nats-py makes every cadenza process asyncio): made in a microsecond and,
    #: uncontended (the usual case), taken without a trip through the event loop; anyio's costs 6 µs
    #: to make, per activity.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rev: int = 0
    next_seq: int = 1
    #: Events not acknowledged yet, with the batch they carry (to recognise a writer's retry).
    pending: list[tuple[Event, object]] = field(default_factory=list)
    #: The tokens cancels of the activity are routed to (one per :meth:`BusActivityService.track`).
    routed: list[CancelToken] = field(default_factory=list)
    token: CancelToken | None = None
    #: The announcement not published yet (``start_activity(announce_after=...)``): it goes out
    #: before any other event of the activity, after ``announce_after`` seconds while it runs, or
    #: inside the completion (one event for an activity that ends quickly).
    deferred: StartRequest | None = None
    #: The context the activity started in (its trace), for an announcement published later.
    context: contextvars.Context | None = None
    #: Its id was made here (not given): nobody could cancel it before it started.
    fresh_id: bool = False
    writers: list[ActivityWriter] = field(default_factory=list)
    warned: bool = False
    #: The status of a completion that is not stored yet (kept in ``pending``, retried by the outbox).
    completing: ActivityStatus | None = None
    #: The outbox task retrying ``pending`` in the background, while one runs.
    retrying: bool = False

    @property
    def record(self) -> ActivityRecord:
        """The activity's record as started (built on first use after a deferred start)."""
        if self.built is None:
            assert self.req is not None
            self.built = _start_record(self.req, self.started_at, self.worker_id)
        return self.built


def _start_record(req: StartRequest, now: datetime, worker_id: str) -> ActivityRecord:
    # (Validated in pydantic-core: faster than model_construct, which is Python, for this many fields.)
    return ActivityRecord(
        id=req.id, environment_id=req.environment_id, type=req.type, status=req.status,
        resource_type=req.resource_type, resource_id=req.resource_id, resource_name=req.resource_name,
        progress=clamp_progress(req.progress), step=req.step, latest_message=cut_text(req.message),
        started_by=req.started_by, started_at=now, ended_at=None, duration_ms=None, error=None,
        metadata=req.metadata, batch_id=req.batch_id, worker_id=req.worker_id or worker_id,
        session_id=req.session_id, result=None, message_count=0, last_seq=0, created_at=now, updated_at=now,
    )  # fmt: skip


def _warns(track: _Track, cause: CancelCause) -> bool:
    """Whether ``cause`` still owes the activity its "Cancellation requested by" warning (a user's
    cancel, not warned yet)."""
    return cause.kind is CancelKind.USER and not track.warned


class BusActivityService:
    """Tracks activities on the bus (implements ``Service``, ``MessageAppender`` and ``Tracker``).

    Args:
        bus: the bus to publish on.
        worker_id: this process's id in the activities' ``worker_id`` (default: a fresh one).
        heartbeat: run a :class:`Heartbeater` for ``worker_id``; pass False when the process
            heartbeats already under that id (a session ``Worker`` does).
        heartbeat_interval: seconds between heartbeats (the recorder's host-lost timeout is a
            multiple of it).
        router: a :class:`CancelRouter` already running in this process (default: own one).
        writer_flush_timeout: bound of :func:`flush_writer` and of flushing writers at completion.
    """

    def __init__(
        self,
        bus: Bus,
        worker_id: str | None = None,
        *,
        heartbeat: bool = True,
        heartbeat_interval: float = 5.0,
        router: CancelRouter | None = None,
        writer_flush_timeout: float = 30.0,
    ) -> None:
        self.bus = bus
        self.worker_id = worker_id or new_worker_id("act")
        self.state = ServiceState.NEW
        self.heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.writer_flush_timeout = writer_flush_timeout
        self._own_router = router is None
        self.router = router or CancelRouter(bus)
        self.heartbeater: Heartbeater | None = None
        self._tracks: dict[str, _Track] = {}
        self._finished: OrderedDict[str, ActivityStatus] = OrderedDict()
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        #: Deferred announcements by due time (activities start in time order: a queue suffices).
        self._due: deque[tuple[float, str]] = deque()
        self._due_added = anyio.Event()

    def __repr__(self) -> str:
        return f"<BusActivityService {self.worker_id} {self.state.value} running={len(self._tracks)}>"

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> BusActivityService:
        if self.state is not ServiceState.NEW:
            raise UsageError("a BusActivityService can be opened once")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            if self._own_router:
                await self._tg.start(self.router.run)
            self._tg.start_soon(self._announce_due, name="activity-announcer")
            if self.heartbeat:
                self.heartbeater = Heartbeater(
                    self.bus,
                    worker_id=self.worker_id,
                    interval=self.heartbeat_interval,
                    load=lambda: ProcessLoad(running_activities=len(self._tracks)),
                )
                await self._tg.start(self.heartbeater.run)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self.state = ServiceState.OPEN
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End activities still open as ``failed`` (the service stopped), store queued output, stop.

        Safe to call twice. Bounded by the bus's shutdown timeout per activity.
        """
        if self.state is not ServiceState.OPEN:
            self.state = ServiceState.CLOSED
            return
        self.state = ServiceState.CLOSED
        with anyio.CancelScope(shield=True):
            for activity_id in list(self._tracks):
                with anyio.move_on_after(self.bus.timeouts.shutdown):
                    with contextlib.suppress(CadenzaError):
                        await self.complete_activity(
                            activity_id,
                            ActivityStatus.FAILED,
                            "the service stopped before the activity ended",
                            "the service stopped before the activity ended",
                            _closing=True,
                        )
        assert self._tg is not None and self._stack is not None
        self._tg.cancel_scope.cancel()
        await self._stack.__aexit__(None, None, None)

    def _check_open(self) -> TaskGroup:
        if self.state is not ServiceState.OPEN or self._tg is None:
            raise UsageError("the activity service is not open (use `async with BusActivityService(bus)`)")
        return self._tg

    def running(self) -> list[str]:
        """Ids of the activities this service runs now."""
        return list(self._tracks)

    def ended(self, activity_id: str) -> ActivityStatus | None:
        """How an activity of this service ended (None: running, or not known here; the last
        100,000 are kept)."""
        return self._finished.get(activity_id)

    # ------------------------------------------------------------ publishing

    async def _send(self, event: Event, timeout: float | None = None) -> None:
        """Store one event; a completion only if none of the activity is stored (first one wins)."""
        if not isinstance(event, ActivityCompleted):
            await self.bus.publish(event)
            return
        if not await store_first_completion(self.bus, event, timeout=timeout):
            # Another ending is stored (the recorder finalised it, or this very one on a retry after
            # the window of duplicates): the activity has ended, which is what this publish wanted.
            _log.info("activity %s: a completion was stored before this one; the first stays", event.activity_id)

    def _undefer(self, track: _Track) -> None:
        """Queue the deferred announcement in front of every other event of the activity."""
        if track.deferred is not None:
            track.pending.insert(0, (self._started_event(track, track.deferred), None))
            track.deferred = None

    async def _publish_locked(
        self, track: _Track, event: Event, batch: object = None, timeout: float | None = None
    ) -> None:
        if not isinstance(event, ActivityCompleted):
            self._undefer(track)
        try:
            # Older unacknowledged events first, unchanged: same id, same seq (dedupe on the server).
            while track.pending:
                old, old_batch = track.pending[0]
                await self._send(old)
                track.pending.pop(0)
                if batch is not None and old_batch is batch:
                    return
            await self._send(event, timeout)
        except CadenzaError as exc:
            if not exc.non_retryable:
                # Kept behind the older ones (once: a writer retrying a batch brings the same batch).
                if not any(e is event or (batch is not None and b is batch) for e, b in track.pending):
                    track.pending.append((event, batch))
                self._retry_later(track)
            raise

    def store_later(self, event: ActivityCompleted) -> None:
        """Store an event of an activity that ended here through the outbox (retried with backoff in
        the background while the service is open): a completion whose caller was answered without it
        being stored (a session worker's given-back task during a leader election)."""
        self._retry_later(_Track(id=event.activity_id, started_at=utcnow(), pending=[(event, None)]))

    def _retry_later(self, track: _Track) -> None:
        """The outbox: events not stored yet (a node restart outlasted the publish retries) are
        retried in the background, with backoff, until the server acknowledges them, so a completion
        the caller already saw does not wait for an event of the activity that may never come."""
        if track.retrying or self._tg is None or self.state is not ServiceState.OPEN:
            return
        track.retrying = True
        self._tg.start_soon(self._drain_outbox, track, name=f"activity-outbox-{track.id}")

    async def _drain_outbox(self, track: _Track) -> None:
        attempt = 0
        try:
            while track.pending and self.state is ServiceState.OPEN:
                await anyio.sleep(0.2 + backoff_delay(attempt, base=0.2, cap=5.0))
                attempt += 1
                async with track.lock:
                    try:
                        while track.pending:
                            await self._send(track.pending[0][0])
                            track.pending.pop(0)
                    except CadenzaError as exc:
                        if exc.non_retryable:
                            _log.error("activity %s: an event cannot be stored, dropped: %s", track.id, exc)
                            track.pending.pop(0)
                        elif attempt in (1, 10) or attempt % 50 == 0:
                            _log.warning("activity %s: %d event(s) not stored yet (attempt %d): %s",
                                         track.id, len(track.pending), attempt, exc)  # fmt: skip
                        continue
                    if track.completing is not None and track.id in self._tracks:
                        self._finish(track.id, track.completing)
        finally:
            track.retrying = False

    def _track(self, activity_id: str) -> _Track:
        track = self._tracks.get(activity_id)
        if track is None:
            if activity_id in self._finished:
                raise ActivityFinishedError(
                    f"activity {activity_id} has finished ({self._finished[activity_id].value})"
                )
            raise ActivityError(f"activity {activity_id} is not running in this service", non_retryable=True)
        return track

    # ------------------------------------------------------------ Service

    async def start_activity(
        self, req: StartRequest, *, wait: bool = True, announce_after: float | None = None
    ) -> ActivityRecord:
        """Announce an activity (event id ``<id>.started``).

        With ``wait=False`` the activity is registered at once and the announcement is stored in the
        background (every later event of the activity is published after it, and retries it if it
        failed). With ``announce_after=t`` it is not published unless the activity still runs ``t``
        seconds later or publishes another event first; an activity that ends sooner is announced by
        its completion alone (one stored event, see :class:`~schemas.ActivityStart`). The session
        worker uses this: a quick activity costs one event, a long one shows as running after ``t``.

        Raises:
            UsageError: the service is not open.
            ActivityAlreadyStartedError: the id is already running (or ran) here.
            PublishError / ValidationError: the announce was not stored.
        """
        if announce_after is not None:
            return self._start_deferred(req, announce_after).record
        tg = self._check_open()
        if req.id in self._tracks or req.id in self._finished:
            raise ActivityAlreadyStartedError(f"activity {req.id} was started already")
        now = utcnow()
        record = _start_record(req, now, self.worker_id)
        fresh = "id" not in req.model_fields_set
        track = _Track(id=req.id, started_at=now, built=record, fresh_id=fresh)
        event = self._started_event(track, req)
        if not wait:
            track.pending.append((event, None))
            self._tracks[req.id] = track
            tg.start_soon(self._publish_pending, track, name=f"activity-start-{req.id}")
            return record
        await self.bus.publish(event)
        self._tracks[req.id] = track
        return record

    def _start_deferred(self, req: StartRequest, announce_after: float) -> _Track:
        """``start_activity(req, announce_after=...)`` without building the start record (a quick
        activity never needs it: the session worker's path)."""
        self._check_open()
        if req.id in self._tracks or req.id in self._finished:
            raise ActivityAlreadyStartedError(f"activity {req.id} was started already")
        track = self._tracks[req.id] = _Track(
            id=req.id, started_at=utcnow(), req=req, worker_id=self.worker_id, deferred=req,
            context=contextvars.copy_context(), fresh_id="id" not in req.model_fields_set,
        )  # fmt: skip
        self._due.append((loop_time() + announce_after, req.id))
        self._due_added.set()
        return track

    def _started_event(self, track: _Track, req: StartRequest) -> ActivityStarted:
        return announcement(req.id, self._start_fields(track, req), req.status)

    def _plain_start(self, track: _Track, req: StartRequest) -> dict[str, Any] | None:
        """The fields of :meth:`_start_fields` for a request that sets nothing but the plain ones (a
        session worker's every activity), only those that differ from the defaults (pydantic
        validates what it is given: the same event in 2.2 µs instead of 3.2); None for another."""
        if not req.model_fields_set <= _PLAIN_START:
            return None
        return {"started_at": track.started_at, "activity_type": req.type,
                "worker_id": req.worker_id or self.worker_id, "session_id": req.session_id}  # fmt: skip

    def _start_fields(self, track: _Track, req: StartRequest) -> ActivityStart:
        """The announcement a completion carries for an activity that was never announced (what its
        start record says, from the request it was started with)."""
        plain = self._plain_start(track, req)
        if plain is not None:
            return ActivityStart(**plain)
        return ActivityStart(
            started_at=track.started_at, environment_id=req.environment_id, activity_type=req.type,
            resource_type=req.resource_type, resource_id=req.resource_id, resource_name=req.resource_name,
            step=req.step, message=cut_text(req.message), progress=clamp_progress(req.progress),
            started_by=req.started_by, metadata=req.metadata, batch_id=req.batch_id,
            worker_id=req.worker_id or self.worker_id, session_id=req.session_id,
        )  # fmt: skip

    async def _announce_due(self) -> None:
        """Publish the deferred announcements of activities still running when they fall due."""
        while True:
            if not self._due:
                await self._due_added.wait()
                self._due_added = anyio.Event()
                continue
            due, activity_id = self._due[0]
            wait = due - loop_time()
            if wait > 0:
                # Not less than 50 ms: one wake-up takes every announcement due by then (a steady
                # flow of activities would otherwise wake this loop once per activity).
                await anyio.sleep(max(wait, 0.05))
                continue
            self._due.popleft()
            track = self._tracks.get(activity_id)
            if track is not None and track.deferred is not None:
                assert self._tg is not None and track.context is not None
                # In the activity's own context: the announcement joins the trace of its work.
                name = f"activity-announce-{track.id}"
                start = functools.partial(self._tg.start_soon, self._announce, track, name=name)
                track.context.run(start)

    async def _announce(self, track: _Track) -> None:
        async with track.lock:
            if track.deferred is None or track.id not in self._tracks:
                return
            self._undefer(track)
            try:
                while track.pending:
                    await self._send(track.pending[0][0])
                    track.pending.pop(0)
            except CadenzaError as exc:
                _log.warning("activity %s: announcement not stored yet: %s", track.id, exc)
                if not exc.non_retryable:
                    self._retry_later(track)

    async def _publish_pending(self, track: _Track) -> None:
        async with track.lock:
            if not track.pending:
                return
            try:
                await self._publish_locked(track, track.pending.pop(0)[0])
            except CadenzaError as exc:
                # Kept pending (retryable) and retried by the outbox, or before the next event.
                _log.warning("activity %s: announcement not stored yet: %s", track.id, exc)

    async def update_activity(self, activity_id: str, req: UpdateRequest) -> None:
        """Change step / progress / latest message (and ``queued`` -> ``running``)."""
        track = self._track(activity_id)
        async with track.lock:
            track.rev += 1
            event = ActivityUpdated(
                event_id=f"{activity_id}.upd.{track.rev}",
                activity_id=activity_id,
                rev=track.rev,
                status=ActivityStatus.RUNNING if req.running else None,
                step=req.step,
                progress=None if req.progress is None else clamp_progress(req.progress),
                message=None if req.message is None else cut_text(req.message),
            )
            await self._publish_locked(track, event)

    async def complete_activity(
        self,
        activity_id: str,
        status: ActivityStatus,
        final_message: str = "",
        error: str | None = None,
        *,
        final_step: str | None = None,
        result: Any = None,
        _closing: bool = False,
        _publish_timeout: float | None = None,
    ) -> ActivityRecord:
        """End an activity (event id ``<id>.completed``); the first completion wins.

        Output queued in this activity's writers is stored first, so the final message is the last.
        The cancel registration of the activity is released.

        Raises:
            ActivityFinishedError: it was completed before.
            UsageError: ``status`` is not terminal.
            ActivityError: the activity is not running here.
            PublishError: not stored (the activity stays open here; call again to retry).
        """
        track, event, text, _ = await self._end_activity(activity_id, status, final_message, error,
                                                        final_step=final_step, result=result,
                                                        _publish_timeout=_publish_timeout)  # fmt: skip
        return track.record.model_copy(
            update={
                "status": status,
                "error": event.error,
                "ended_at": event.time,
                "latest_message": text or track.record.latest_message,
                "progress": 100.0 if status is ActivityStatus.SUCCESS else track.record.progress,
                "result": result,
                "last_seq": track.next_seq - 1,
            }
        )

    async def _end_activity(
        self,
        activity_id: str,
        status: ActivityStatus,
        final_message: str = "",
        error: str | None = None,
        *,
        final_step: str | None = None,
        result: Any = None,
        _publish_timeout: float | None = None,
        _store_ack_to: str = "",
    ) -> tuple[_Track, ActivityCompleted, str, bool]:
        """:meth:`complete_activity` without building the ending record (the session worker does
        not use it); returns the activity's track, its completion, the final message and whether
        the completion was handed off.

        ``_store_ack_to``: send the completion without waiting, its acknowledgement routed there (the
        caller's inbox: the caller judges it and acks the task), unless older events of the
        activity still wait in the outbox (then it is stored here, after them, as always)."""
        if not status.terminal:
            raise UsageError(f"{status.value} is not a terminal status")
        track = self._track(activity_id)
        if track.writers:
            await self._close_writers(track)
        await self._warn_cancelled(track)
        async with track.lock:
            if activity_id not in self._tracks:
                raise ActivityFinishedError(f"activity {activity_id} has finished")
            text = cut_text(final_message)
            event = self._completion(track, status, text, error, final_step, result)
            track.completing = status
            handed = bool(_store_ack_to) and not track.pending
            if handed:
                try:
                    await self.bus.send_stored_to(event, _store_ack_to, FIRST_COMPLETION)
                except CadenzaError:  # the connection would not take it: stored here, with retries
                    handed = False
            if not handed:
                # Not stored: PublishError to the caller; the outbox keeps the completion and retries it.
                await self._publish_locked(track, event, timeout=_publish_timeout)
            self._finish(activity_id, status)
        return track, event, text, handed

    async def _close_writers(self, track: _Track) -> None:
        """Close the activity's writers and store what they queued (bounded: see ``writer_flush_timeout``)."""
        for writer in list(track.writers):
            writer.close()
            try:
                with anyio.move_on_after(self.writer_flush_timeout):
                    await flush_writer(writer, timeout=self.writer_flush_timeout)
            except TimeoutError:
                # Lines still queued (the server would not store them in time) must not keep the
                # activity open forever: the completion goes out; the recorder keeps what arrived.
                _log.warning("activity %s: a writer's lines were not stored within %gs; completing anyway",
                             track.record.id, self.writer_flush_timeout)  # fmt: skip

    def _completion(
        self, track: _Track, status: ActivityStatus, text: str, error: str | None, final_step: str | None, result: Any
    ) -> ActivityCompleted:
        """The completion event of ``track`` (its rev and message seq counted; under the track's lock)."""
        activity_id = track.id
        final = MessageEntry(level=_LEVEL_OF[status], message=text, step=final_step) if text else None
        final_seq = track.next_seq if final is not None else 0
        track.rev += 1
        # Never announced (it ended within announce_after, with no other event): the completion
        # announces it, unless an older event still waits in the outbox (then it goes first).
        # Only what differs from the defaults is passed, the announcement of a plain start as the
        # fields themselves (pydantic validates what it is given, in one call: 4.2 µs instead of 6.1).
        fields: dict[str, Any] = {"event_id": f"{activity_id}.completed", "source": self.bus.source,
                                  "activity_id": activity_id, "rev": track.rev, "status": status}  # fmt: skip
        if track.deferred is not None and not track.pending:
            req = track.deferred
            track.deferred = None
            plain = self._plain_start(track, req)
            fields["start"] = plain if plain is not None else self._start_fields(track, req)
        else:
            self._undefer(track)
        if final is not None:
            fields["final"], fields["final_seq"] = final, final_seq
            track.next_seq += 1
        if error:
            fields["error"] = cut_text(error)
        if final_step is not None:
            fields["step"] = final_step
        if result is not None:
            fields["result"] = result
        return ActivityCompleted(**fields)

    def _finish(self, activity_id: str, status: ActivityStatus) -> None:
        track = self._tracks.pop(activity_id)
        self._finished[activity_id] = status
        while len(self._finished) > 100_000:
            self._finished.popitem(last=False)
        for token in track.routed:
            self.router.discard(activity_id, token)
        if track.token is not None:
            track.token.release()
        # The token's callback holds the track: unlinked here, the track and what hangs on it are
        # freed at once (the deferred-announcement queue holds ids, not tracks), not left as a cycle
        # for the garbage collector to find (under load a worker spent 16-19% of its CPU in the
        # collector, 7-8% with the cycle gone, none since the queue let go of tracks: freed by the
        # queue in bursts, 50 ms of tracks at a time, they left the collector's count of new objects
        # climbing, which frees at a count of zero do not lower, and a collection every 80 activities).
        track.routed.clear()
        track.token = track.context = None

    # ------------------------------------------------------------ MessageAppender

    async def append_message(self, activity_id: str, req: AppendMessageRequest) -> MessageRecord | None:
        """Store one message (trimmed, cut to 8192 bytes); blank text is not stored (returns None)."""
        text = cut_text(req.message)
        if not text:
            return None
        entry = MessageEntry(
            level=req.level,
            message=text,
            payload=req.payload,
            step=req.step,
            progress=None if req.progress is None else clamp_progress(req.progress),
        )
        seq = await self.append_entries(activity_id, [entry])
        return MessageRecord(activity_id=activity_id, seq=seq, **entry.model_dump())

    async def append_entries(self, activity_id: str, entries: list[MessageEntry]) -> int:
        """Store consecutive messages as one event; returns the seq of the last one.

        If the event is not acknowledged it is kept and sent again before anything newer; calling
        again with the same ``entries`` object only resends it (the writer's retry).
        """
        track = self._track(activity_id)
        async with track.lock:
            if activity_id not in self._tracks:
                raise ActivityFinishedError(f"activity {activity_id} has finished")
            for event, batch in track.pending:
                if batch is entries:
                    await self._publish_locked(track, event, batch)
                    assert isinstance(event, ActivityMessage)
                    return event.last_seq
            track.rev += 1
            event = ActivityMessage(
                event_id=f"{activity_id}.msg.{track.next_seq}",
                activity_id=activity_id,
                rev=track.rev,
                seq=track.next_seq,
                entries=entries,
            )
            track.next_seq += len(entries)
            await self._publish_locked(track, event, entries)
            return event.last_seq

    def open_writer(self, activity_id: str, *, underlying: TextSink | None = None) -> ActivityWriter:
        """A writer for ``activity_id`` whose pump runs in this service (see :func:`new_writer`)."""
        tg = self._check_open()
        track = self._track(activity_id)
        writer = ActivityWriter(
            activity_id, self.append_entries, underlying=underlying, flush_timeout=self.writer_flush_timeout
        )
        writer._pumping = True
        track.writers.append(writer)
        tg.start_soon(writer.pump, name=f"activity-writer-{activity_id}")
        return writer

    # ------------------------------------------------------------ Tracker

    async def track(
        self, ctx: Context, activity_id: str, *, check_now: bool = True, check_stored: bool = True
    ) -> Context:
        """A child of ``ctx`` bound to ``activity_id``: cancel events for it cancel the child's token.

        A cancel stored a moment before this call is found and applied (before returning; with
        ``check_now=False`` right after, in the background, so the work can start meanwhile). A user's
        cancel also appends the warning "Cancellation requested by <name>" to the activity's messages.
        ``check_stored=False`` skips the look-up (the router was listening before any cancel for
        ``activity_id`` could be published; it keeps recent cancels for ids not registered yet).
        """
        tg = self._check_open()
        track = self._track(activity_id)
        work = ctx.child(activity_id=activity_id)
        self.router.add(activity_id, work.token)
        track.routed.append(work.token)
        track.token = work.token
        # No task per activity: the warning is scheduled only if a user cancelled the token.
        work.token.on_cancel(lambda cause: self._cancelled(track, cause))
        if check_stored and track.fresh_id:
            # An id made by start_activity cannot have been cancelled before it existed: if the router
            # was listening then, it heard (and keeps) every cancel for it; no look-up needed.
            check_stored = not self.router.seen_since(track.started_at)
        if not check_stored:
            pass  # the caller knows the router heard every cancel that could target this id
        elif check_now:
            await self.router.check_stored(activity_id, work.token)
        else:
            tg.start_soon(self.router.check_stored, activity_id, work.token, name=f"activity-stored-{activity_id}")
        return work

    def _cancelled(self, track: _Track, cause: CancelCause) -> None:
        """The token's callback, run where the cancel is delivered (often the connection's read
        loop, before the activity's own task has seen it): the warning's task is started on the
        loop's next turn, after the activity's wake that the cancel scheduled first."""
        if _warns(track, cause):
            asyncio.get_running_loop().call_soon(self._start_warning, track)

    def _start_warning(self, track: _Track) -> None:
        if self._tg is not None and self.state is ServiceState.OPEN and track.id in self._tracks:
            self._tg.start_soon(self._warn_cancelled, track, name=f"activity-cancel-{track.id}")

    async def _warn_cancelled(self, track: _Track) -> None:
        """Append "Cancellation requested by <name>" once, when a user cancelled the activity."""
        cause = track.token.cause if track.token is not None else None
        if cause is None or not _warns(track, cause):
            return
        track.warned = True
        try:
            await self.append_message(
                track.id,
                AppendMessageRequest(
                    message=f"Cancellation requested by {cause.who or 'user'}", level=ActivityLevel.WARNING
                ),
            )
        except CadenzaError as exc:
            _log.info("activity %s: cancel warning not stored: %s", track.id, exc)
