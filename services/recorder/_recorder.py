"""The recorder: folds activity events into queryable state and answers list/get/tail/cancel.

The ``activity`` stream is the store. Every replica follows it in stream order with an ordered
consumer (no acks, nothing written back) and folds each event into its own in-memory records with
the pure folds of ``bus._fold``; replicas reading the same stream in the same order hold the same
records, so any of them answers a request (after catching up with the stream's end as it was when
the request came, so a caller that saw its result sees the record). A restarted recorder reads the
stream again from its start. Folding does not depend on the order events arrive in: "latest"
fields follow the highest ``rev``, message seqs are kept as a set of ranges, and the first terminal
status wins (the stream itself refuses a second completion: see ``ActivityCompleted``).

Nothing is dropped in silence: input that does not validate is dead-lettered (consumer
``recorder``); an event that validates is folded, or is stale by the rules above (older ``rev``,
after the end, a redelivered seq), which changes nothing by design. docs/wire.md lists what each
consumer does with bad input.

Host loss: the recorder follows ``<prefix>.worker.*.*`` (the stream keeps each worker's last
started / heartbeat / stopped) and ends as ``failed`` every running activity whose worker stopped or
sent no heartbeat for ``host_timeout`` (default: 3 x the worker's own heartbeat interval).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus

import bus
from bus._activity_client import read_activity_messages
from bus._fold import ActivityEvent, _first_event, fold_activity_event
from bus._watch import WORKER_EVENTS, follow_activity_events, follow_worker_events, last_stored_seq
from schemas import (
    ENDPOINTS,
    ActivityCompleted,
    ActivityFold,
    ActivityLevel,
    ActivityMessage,
    ActivityRecord,
    ActivityStatus,
    CancelActivityReply,
    CancelActivityRequest,
    CancelCause,
    CancelKind,
    GetActivityReply,
    GetActivityRequest,
    ListActivitiesReply,
    ListActivitiesRequest,
    MessageEntry,
    StoredActivity,
    TailActivityReply,
    TailActivityRequest,
    WorkerStopped,
    utcnow,
)

__all__ = ("Recorder", "RecorderConfig", "Stored")

_log = logging.getLogger("cadenza.recorder")

#: The record of one activity and its fold state (what a recorder replica holds per activity).
Stored = StoredActivity


@dataclass(frozen=True)
class RecorderConfig:
    """Tunables of the recorder.

    Attributes:
        retention_days: finished activities older than this are pruned (0: never by age).
        retention_count: finished activities beyond this many per environment are pruned (0: no cap).
        prune_interval: seconds between prune passes.
        host_timeout: seconds without a heartbeat before a worker's activities are finalised
            (None: ``host_timeout_factor`` x the worker's own interval).
        host_timeout_factor: see ``host_timeout``.
        default_interval: heartbeat interval assumed for a worker never heard from.
        sweep_interval: seconds between host-lost checks.
    """

    retention_days: float = 30.0
    retention_count: int = 1000
    prune_interval: float = 60.0
    host_timeout: float | None = None
    host_timeout_factor: float = 3.0
    default_interval: float = 5.0
    sweep_interval: float = 0.5


class _FirstEvent:
    """An activity known by one event, a completion carrying its start (a quick activity), kept as
    that event: its record is folded on first use (a request, a later event), not on arrival, since
    most are never asked for before they are pruned. What pruning needs is read from the event."""

    __slots__ = ("_stored", "event")

    def __init__(self, event: ActivityCompleted) -> None:
        self.event = event
        self._stored: StoredActivity | None = None

    @property
    def stored(self) -> StoredActivity:
        if self._stored is None:
            assert self.event.start is not None
            self._stored = _first_event(self.event, self.event.start)
        return self._stored

    @property
    def record(self) -> ActivityRecord:
        return self.stored.record

    @property
    def fold(self) -> ActivityFold:
        return self.stored.fold

    @property
    def environment_id(self) -> str:
        assert self.event.start is not None
        return self.event.start.environment_id

    @property
    def ended_at(self) -> datetime:
        return self.event.time


@dataclass
class _WorkerSeen:
    last_seen: datetime
    interval: float
    stopped: str | None = None


@dataclass
class Recorder:
    """The recorder service. Run with ``await tg.start(recorder.run)`` (ready once it serves)."""

    bus: bus.Bus
    config: RecorderConfig = field(default_factory=RecorderConfig)
    #: The records by activity id (an activity known by its completion alone is folded on first use).
    cache: dict[str, Stored | _FirstEvent] = field(default_factory=dict)
    workers: dict[str, _WorkerSeen] = field(default_factory=dict)
    finalised: int = 0
    pruned: int = 0
    #: Ids of the cached activities not ended yet (what the host-lost sweep looks at).
    _open: set[str] = field(default_factory=set)
    _finalising: dict[str, float] = field(default_factory=dict)
    _started_at: datetime = field(default_factory=utcnow)
    #: Stream sequence of the last activity event folded (the follower resumes after it).
    position: int = 0
    #: Readers waiting for ``position`` to reach a sequence.
    _waiting: list[tuple[int, anyio.Event]] = field(default_factory=list)

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        self._started_at = utcnow()
        async with anyio.create_task_group() as tg:
            # Ready once the stream's events were folded (a request never sees a half-read store).
            follow = functools.partial(follow_activity_events, b, self._on_stored, after=lambda: self.position,
                                       consumer="recorder")  # fmt: skip
            await tg.start(bus.run_restarting, "activity follower", follow)
            workers = functools.partial(follow_worker_events, b, self._on_worker, consumer="recorder-workers")
            await tg.start(bus.run_restarting, "heartbeat follower", workers)
            handlers = {"list": self.list, "get": self.get, "tail": self.tail, "cancel": self.cancel}
            for endpoint in ENDPOINTS:
                if endpoint.served_by == "recorder":
                    serve = functools.partial(b.serve, name=f"recorder-{endpoint.method}")
                    await tg.start(serve, b.rpc_subject("recorder", endpoint.method), endpoint.request,
                                   handlers[endpoint.method])  # fmt: skip
            tg.start_soon(self._sweep_loop)
            tg.start_soon(self._prune_loop)
            task_status.started()

    # ------------------------------------------------------------ the records (every replica)

    def _on_stored(self, event: ActivityEvent | None, seq: int) -> None:
        if seq <= self.position:
            return  # delivered again after a restart of the follower: folded already
        self.position = seq
        if event is not None:
            self.fold(event)
        if self._waiting:
            still = []
            for target, ready in self._waiting:
                if seq >= target:
                    ready.set()
                else:
                    still.append((target, ready))
            self._waiting = still

    def fold(self, event: ActivityEvent) -> StoredActivity | _FirstEvent | None:
        """Fold one event into the records; returns the new record state, None if nothing changed."""
        current = self.cache.get(event.activity_id)
        if current is None and isinstance(event, ActivityCompleted) and event.start is not None:
            # The common case, one event for a quick activity: kept as it is, folded when asked for.
            first = self.cache[event.activity_id] = _FirstEvent(event)
            self._open.discard(event.activity_id)
            self._finalising.pop(event.activity_id, None)
            return first
        if isinstance(current, _FirstEvent):
            current = current.stored
        new = fold_activity_event(current, event)
        if new is not None:
            self._put(new)
        return new

    async def caught_up(self, timeout: float | None = None) -> bool:
        """Wait until every activity event stored before this call is folded; False if that took
        longer than ``timeout`` (default: a third of the request timeout, so the answer, from what
        is folded by then, still reaches a requester that waits the whole request timeout)."""
        b = self.bus
        bound = b.timeouts.request / 3 if timeout is None else timeout
        with anyio.move_on_after(bound):
            try:
                target = await last_stored_seq(b, "activity")
            except nats.errors.Error as exc:
                _log.info("cannot read the end of the activity stream (%r); answering from what is folded", exc)
                return False
            if self.position >= target:
                return True
            ready = anyio.Event()
            self._waiting.append((target, ready))
            await ready.wait()
            return True
        _log.info("the activity stream was not folded up to its end within %.1fs; answering from what is folded",
                  bound)  # fmt: skip
        return False

    def _put(self, stored: Stored) -> None:
        """Cache a record, with the index the sweep uses (no scans of the cache)."""
        aid = stored.record.id
        self.cache[aid] = stored
        if stored.record.terminal:
            self._open.discard(aid)
            self._finalising.pop(aid, None)
        else:
            self._open.add(aid)

    def _drop(self, activity_id: str) -> None:
        self.cache.pop(activity_id, None)
        self._open.discard(activity_id)

    # ------------------------------------------------------------ workers and host loss

    def _on_worker(self, event: object, _stored_at: datetime) -> None:
        self._saw_worker(event)

    def _saw_worker(self, event: object) -> None:
        assert isinstance(event, WORKER_EVENTS)
        seen = self.workers.get(event.worker_id)
        if seen is not None and seen.stopped is not None:
            return  # a worker id is one process start: once stopped, it stays stopped
        if isinstance(event, WorkerStopped):
            self.workers[event.worker_id] = _WorkerSeen(event.time, event.interval, event.reason or "stopped")
        elif seen is None or event.time > seen.last_seen:
            self.workers[event.worker_id] = _WorkerSeen(event.time, event.interval)

    def host_gone(self, record: ActivityRecord, now: datetime | None = None) -> str | None:
        """Why the host of ``record`` is considered gone, or None while it lives (or is unknown)."""
        if not record.worker_id:
            return None
        now = now or utcnow()
        seen = self.workers.get(record.worker_id)
        if seen is not None and seen.stopped is not None:
            return f"host lost: worker {record.worker_id} stopped ({seen.stopped}) while the activity was running"
        interval = seen.interval if seen is not None else self.config.default_interval
        timeout = self.config.host_timeout or self.config.host_timeout_factor * interval
        if seen is not None:
            silent = (now - seen.last_seen).total_seconds()
            if silent > timeout:
                return f"host lost: no heartbeat from worker {record.worker_id} for {silent:.1f}s"
            return None
        since = max(record.updated_at or self._started_at, self._started_at)
        if (now - since).total_seconds() > timeout:
            return f"host lost: worker {record.worker_id} was never heard from"
        return None

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except (bus.CadenzaError, nats.errors.Error, TimeoutError) as exc:
                _log.warning("host-lost sweep failed: %r", exc)
            except Exception:
                _log.exception("host-lost sweep failed unexpectedly")

    async def sweep(self) -> int:
        """Finalise the running activities whose host is gone; returns how many."""
        now = utcnow()
        clock = anyio.current_time()
        done = 0
        for activity_id in list(self._open):
            stored = self.cache.get(activity_id)
            if stored is None:
                self._open.discard(activity_id)
                continue
            record = stored.record
            if record.terminal or not stored.fold.announced:
                continue
            if clock - self._finalising.get(record.id, -1e9) < 10.0:
                continue
            why = self.host_gone(record, now)
            if why is None:
                continue
            self._finalising[record.id] = clock
            _log.warning("activity %s: %s", record.id, why)
            await self.finalise(record, ActivityStatus.FAILED, why, why)
            done += 1
        self.finalised += done
        return done

    async def _last_seq(self, record: ActivityRecord) -> int:
        subject = self.bus.subjects.build("activity", record.id, "message")
        try:
            with anyio.fail_after(self.bus.timeouts.request):
                msg = await self.bus.js.get_last_msg(self.bus.topology.stream_name("activity"), subject)
        except nats.js.errors.NotFoundError:
            return record.last_seq
        except (TimeoutError, nats.errors.Error) as exc:
            raise bus.BusError(f"cannot read the last message of {record.id}: {exc!r}") from exc
        try:
            event = bus.decode(msg.data or b"", msg.headers, [ActivityMessage])
        except bus.ValidationError:
            return record.last_seq
        return max(record.last_seq, event.last_seq)

    async def finalise(
        self, record: ActivityRecord, status: ActivityStatus, final: str, error: str | None, warning: str = ""
    ) -> None:
        """End an activity nobody runs any more. The completion's event id is the activity's own
        (``<id>.completed``), so it cannot overwrite a real ending: the first one stays."""
        seq = await self._last_seq(record) + 1
        if warning:
            await self.bus.publish(
                ActivityMessage(
                    event_id=f"{record.id}.msg.{seq}",
                    activity_id=record.id,
                    seq=seq,
                    entries=[MessageEntry(level=ActivityLevel.WARNING, message=warning)],
                )
            )
            seq += 1
        level = ActivityLevel.WARNING if status is ActivityStatus.CANCELLED else ActivityLevel.ERROR
        event = ActivityCompleted(
            event_id=f"{record.id}.completed", activity_id=record.id, status=status, error=error,
            final=MessageEntry(level=level, message=final), final_seq=seq, host_lost=True,
        )  # fmt: skip
        try:
            await self.bus.publish(event, headers=bus.FIRST_COMPLETION)
        except bus.PublishError as exc:
            if not bus.completed_already(exc):
                raise
            _log.info("activity %s: a completion was stored first; it stays", record.id)

    # ------------------------------------------------------------ pruning

    async def _prune_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.prune_interval)
            try:
                await self.prune()
            except (bus.CadenzaError, nats.errors.Error, TimeoutError) as exc:
                _log.warning("prune failed: %r", exc)
            except Exception:
                _log.exception("prune failed unexpectedly")

    def prune_candidates(self, now: datetime | None = None) -> list[ActivityRecord]:
        """Finished activities beyond the age or count limits (running ones never)."""
        now = now or utcnow()
        days, count = self.config.retention_days, self.config.retention_count
        # (environment, when it ended, the entry) of each finished activity; an entry known by its
        # completion alone says both without being folded, and only the pruned ones are.
        by_env: dict[str, list[tuple[datetime, Stored | _FirstEvent]]] = {}
        for stored in self.cache.values():
            if isinstance(stored, _FirstEvent) and stored._stored is None:
                by_env.setdefault(stored.environment_id, []).append((stored.ended_at, stored))
            elif stored.record.terminal:
                r = stored.record
                by_env.setdefault(r.environment_id, []).append((r.ended_at or r.updated_at or now, stored))
        out: list[ActivityRecord] = []
        for entries in by_env.values():
            entries.sort(key=lambda e: e[0], reverse=True)
            for i, (ended, stored) in enumerate(entries):
                if (days > 0 and now - ended > timedelta(days=days)) or (count > 0 and i >= count):
                    out.append(stored.record)
        return out

    async def prune(self) -> int:
        """Delete pruned activities' events (their messages and record) and forget them; returns how many."""
        stream = self.bus.topology.stream_name("activity")
        n = 0
        for record in self.prune_candidates():
            try:
                await self.bus.js.purge_stream(stream, subject=self.bus.subjects.filter("activity", record.id))
            except nats.errors.Error as exc:
                raise bus.BusError(f"cannot prune activity {record.id}: {exc!r}") from exc
            self._drop(record.id)
            n += 1
        self.pruned += n
        return n

    # ------------------------------------------------------------ endpoints

    async def list(self, req: ListActivitiesRequest) -> ListActivitiesReply:
        await self.caught_up()
        statuses = set(req.status)
        needle = req.search.strip().lower()
        items = []
        for stored in self.cache.values():
            r = stored.record
            if not stored.fold.announced or r.environment_id != req.environment_id:
                continue
            if (statuses and r.status not in statuses) or (req.type and r.type != req.type):
                continue
            if (req.resource_type and r.resource_type != req.resource_type) or (
                req.batch_id and r.batch_id != req.batch_id
            ):
                continue
            if needle and not _matches(r, needle):
                continue
            items.append(r)
        epoch = datetime.min.replace(tzinfo=UTC)
        items.sort(key=lambda r: (r.terminal, -(r.created_at or epoch).timestamp(), r.id))
        page = items[req.offset : req.offset + req.limit]
        nxt = req.offset + req.limit if req.offset + req.limit < len(items) else None
        return ListActivitiesReply(items=page, total=len(items), offset=req.offset, limit=req.limit, next_offset=nxt)

    async def _record(self, activity_id: str) -> ActivityRecord:
        await self.caught_up()
        stored = self.cache.get(activity_id)
        if stored is None or not stored.fold.announced:
            raise bus.ActivityNotFoundError(f"activity {activity_id} not found")
        return stored.record

    async def get(self, req: GetActivityRequest) -> GetActivityReply:
        record = await self._record(req.activity_id)
        if req.limit == 0:
            return GetActivityReply(activity=record, messages=[])
        batch = await read_activity_messages(self.bus, req.activity_id, keep_last=req.limit)
        return GetActivityReply(activity=record, messages=batch.messages)

    async def tail(self, req: TailActivityRequest) -> TailActivityReply:
        record = await self._record(req.activity_id)
        wait = 0.0 if record.terminal else req.wait
        batch = await read_activity_messages(
            self.bus, req.activity_id, after_seq=req.after_seq, cursor=req.cursor, wait=wait, soft_limit=req.limit
        )
        last = batch.messages[-1].seq if batch.messages else req.after_seq
        if batch.completed is not None and not record.terminal:
            record = await self._record(req.activity_id)
        done = batch.completed is not None or (record.terminal and not batch.messages and last >= record.last_seq)
        status = batch.completed.status if batch.completed is not None else record.status
        return TailActivityReply(messages=batch.messages, last_seq=last, cursor=batch.cursor, status=status, done=done)

    async def cancel(self, req: CancelActivityRequest) -> CancelActivityReply:
        record = await self._record(req.activity_id)
        if record.terminal:
            raise bus.ActivityNotCancellableError(
                f"activity {req.activity_id} is {record.status.value}: it cannot be cancelled"
            )
        who = req.who.strip() or "user"
        why = self.host_gone(record)
        if why is not None:
            # Nobody runs it: end it here (never over a real ending, see finalise).
            await self.finalise(
                record, ActivityStatus.CANCELLED, "Cancelled by user", None, warning=f"Cancellation requested by {who}"
            )
            return CancelActivityReply(outcome="finalised", activity=record)
        await bus.request_cancel(
            self.bus, "activity", req.activity_id, CancelCause(kind=CancelKind.USER, who=who, reason=req.reason)
        )
        return CancelActivityReply(outcome="accepted", activity=record)


def _matches(r: ActivityRecord, needle: str) -> bool:
    """``list.search``: an id (activity, session, worker, batch, resource) starting with the needle, or
    the needle anywhere in the type, resource name, latest message, step or error (case-insensitive)."""
    ids = (r.id, r.session_id, r.worker_id, r.batch_id, r.resource_id)
    if any(x and x.lower().startswith(needle) for x in ids):
        return True
    hay = " ".join(x or "" for x in (r.type, r.resource_name, r.latest_message, r.step, r.error)).lower()
    return needle in hay
