"""The recorder: folds activity events into queryable state and answers list/get/tail/cancel.

The ``activity`` stream is the store. Every replica follows it in stream order with an ordered
consumer (no acks, nothing written back) and folds each event into its own in-memory records with
the pure folds of ``bus.tracking._fold``; replicas reading the same stream in the same order hold the same
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
sent no heartbeat for ``host_timeout`` (default: 3 x the worker's own heartbeat interval), and
every activity whose task that worker left in its inbox unfinished (``_orphans``: a quick activity is
announced by its completion alone, so a killed worker's leaves no other trace).
"""

from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
from anyio.abc import TaskStatus

import bus
from bus.tracking import (
    ActivityEvent,
    Entry,
    FirstEvent,
    StreamFold,
    follow_activity_events,
    read_activity_messages,
    store_first_completion,
)
from bus.transport import (
    WORKER_EVENTS,
    follow_worker_events,
    last_event,
    last_stored_seq,
    purge_below,
    purge_subject,
)
from schemas import (
    ENDPOINTS,
    ActivityCompleted,
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

from ._orphans import OrphanSweep

__all__ = ("Recorder", "RecorderConfig", "RecorderState", "Stored")

_log = logging.getLogger("cadenza.recorder")

#: The record of one activity and its fold state (what a recorder replica holds per activity).
Stored = StoredActivity


class RecorderState(enum.Enum):
    """Where a :class:`Recorder` is in its life (it runs once, like a :class:`bus.Worker`)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


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


@dataclass
class _WorkerSeen:
    last_seen: datetime
    interval: float
    stopped: str | None = None


@dataclass
class Recorder:
    """The recorder service. Run with ``await tg.start(recorder.run)`` (ready once it serves), once."""

    bus: bus.Bus
    config: RecorderConfig = field(default_factory=RecorderConfig)
    workers: dict[str, _WorkerSeen] = field(default_factory=dict)
    finalised: int = 0
    pruned: int = 0
    state: RecorderState = RecorderState.NEW
    #: The ``activity`` stream folded (bus.tracking's StreamFold, unbounded: the recorder prunes itself).
    folded: StreamFold = field(default_factory=lambda: StreamFold(keep_finished=None))
    #: Ids of the cached activities not ended yet (what the host-lost sweep looks at).
    _open: set[str] = field(default_factory=set)
    _finalising: dict[str, float] = field(default_factory=dict)
    _started_at: datetime = field(default_factory=utcnow)
    #: The look at gone workers' inboxes (tasks they never finished).
    orphans: OrphanSweep = field(default_factory=OrphanSweep)
    #: Readers waiting for ``position`` to reach a sequence.
    _waiting: list[tuple[int, anyio.Event]] = field(default_factory=list)
    #: Stream sequences of each cached activity's first and last event (what pruning purges below).
    _first_stored: dict[str, int] = field(default_factory=dict)
    _last_stored: dict[str, int] = field(default_factory=dict)

    @property
    def cache(self) -> dict[str, Entry]:
        """The records by activity id (those pruned are gone); a quick activity is kept as its one
        event (:class:`bus.tracking.FirstEvent`, folded on first use: ``.record``, ``.fold``)."""
        return self.folded.records

    @property
    def position(self) -> int:
        """Stream sequence of the last activity event folded (the follower resumes after it)."""
        return self.folded.position

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the streams and serve the endpoints until cancelled.

        Raises:
            bus.UsageError: it was run before (a recorder runs once; make a new one).
        """
        if self.state is not RecorderState.NEW:
            raise bus.UsageError(f"a Recorder runs once (this one is {self.state.value})")
        try:
            await self._serve(task_status)
        finally:
            self.state = RecorderState.STOPPED

    async def _serve(self, task_status: TaskStatus[None]) -> None:
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
            self.state = RecorderState.RUNNING
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self.state = RecorderState.STOPPING

    # ------------------------------------------------------------ the records (every replica)

    def _on_stored(self, event: ActivityEvent | None, seq: int, body: bytes | None = None) -> None:
        if seq <= self.position:
            return  # delivered again after a restart of the follower: folded already
        if event is not None:
            self._first_stored.setdefault(event.activity_id, seq)
            self._last_stored[event.activity_id] = seq
        new = self.folded.apply(event, seq, body)
        if new is not None:
            self._index(new)
        if self._waiting:
            still = []
            for target, ready in self._waiting:
                if seq >= target:
                    ready.set()
                else:
                    still.append((target, ready))
            self._waiting = still

    async def caught_up(self, timeout: float | None = None) -> bool:
        """Wait until every activity event stored before this call is folded; False if that took
        longer than ``timeout`` (default: a third of the request timeout, so the answer, from what
        is folded by then, still reaches a requester that waits the whole request timeout)."""
        b = self.bus
        bound = b.timeouts.request / 3 if timeout is None else timeout
        with anyio.move_on_after(bound):
            try:
                target = await last_stored_seq(b, "activity")
            except bus.BusError as exc:
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

    def _index(self, stored: Entry) -> None:
        """Keep the index the sweep uses (no scans of the records) up to date with a new record state."""
        if isinstance(stored, FirstEvent):  # finished, and not folded for this
            self._open.discard(stored.activity_id)
            self._finalising.pop(stored.activity_id, None)
            return
        aid = stored.record.id
        if stored.record.terminal:
            self._open.discard(aid)
            self._finalising.pop(aid, None)
        else:
            self._open.add(aid)

    def _drop(self, activity_id: str) -> None:
        self.folded.forget(activity_id)
        self._first_stored.pop(activity_id, None)
        self._last_stored.pop(activity_id, None)
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
        if seen is not None:
            return self._gone(record.worker_id, seen, now)
        timeout = self.config.host_timeout or self.config.host_timeout_factor * self.config.default_interval
        since = max(record.updated_at or self._started_at, self._started_at)
        if (now - since).total_seconds() > timeout:
            return f"host lost: worker {record.worker_id} was never heard from"
        return None

    def _gone(self, wid: str, seen: _WorkerSeen, now: datetime) -> str | None:
        """Why the worker ``wid``, last seen as ``seen``, is gone (None while it lives)."""
        if seen.stopped is not None:
            return f"host lost: worker {wid} stopped ({seen.stopped}) while the activity was running"
        silent = (now - seen.last_seen).total_seconds()
        if silent > (self.config.host_timeout or self.config.host_timeout_factor * seen.interval):
            return f"host lost: no heartbeat from worker {wid} for {silent:.1f}s"
        return None

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except (bus.CadenzaError, TimeoutError) as exc:
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
        # Work a gone worker never announced (a quick activity, a task still queued): services/recorder/_orphans.py.
        gone = {wid: why for wid, seen in self.workers.items() if (why := self._gone(wid, seen, now)) is not None}
        done += await self.orphans.sweep(self.bus, gone, self.cache.get)
        self.finalised += done
        return done

    async def _last_seq(self, record: ActivityRecord) -> int:
        subject = self.bus.subjects.build("activity", record.id, "message")
        try:
            stored = await last_event(self.bus, "activity", subject, [ActivityMessage])
        except bus.BusError as exc:
            raise bus.BusError(f"cannot read the last message of {record.id}: {exc.__cause__ or exc!r}") from exc
        event = stored.event if stored is not None else None
        return max(record.last_seq, event.last_seq) if isinstance(event, ActivityMessage) else record.last_seq

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
        if not await store_first_completion(self.bus, event):
            _log.info("activity %s: a completion was stored first; it stays", record.id)

    # ------------------------------------------------------------ pruning

    async def _prune_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.prune_interval)
            try:
                await self.prune()
            except (bus.CadenzaError, TimeoutError) as exc:
                _log.warning("prune failed: %r", exc)
            except Exception:
                _log.exception("prune failed unexpectedly")

    def prune_candidates(self, now: datetime | None = None) -> list[str]:
        """Ids of the finished activities beyond the age or count limits (running ones never).

        An entry known by its completion alone (:class:`FirstEvent`) says its environment and when it
        ended without being folded, and is not folded for this: folding each pruned quick activity
        only to read its id cost the recorder a full CPU for 4.5 s after 60,000 of them."""
        now = now or utcnow()
        days, count = self.config.retention_days, self.config.retention_count
        # (when it ended, id) of each finished activity, by environment.
        by_env: dict[str, list[tuple[datetime, str]]] = {}
        for aid, stored in self.cache.items():
            if isinstance(stored, FirstEvent) and not stored.folded_yet:
                by_env.setdefault(stored.environment_id, []).append((stored.ended_at, aid))
            elif stored.record.terminal:
                r = stored.record
                by_env.setdefault(r.environment_id, []).append((r.ended_at or r.updated_at or now, aid))
        out: list[str] = []
        for entries in by_env.values():
            entries.sort(key=lambda e: e[0], reverse=True)
            for i, (ended, aid) in enumerate(entries):
                if (days > 0 and now - ended > timedelta(days=days)) or (count > 0 and i >= count):
                    out.append(aid)
        return out

    async def prune(self) -> int:
        """Delete pruned activities' events (their messages and record) and forget them; returns how many.

        Everything stored before the first event of every activity kept (running, or within the
        limits) belongs to activities pruned now (or to input that never validated, dead-lettered
        already): one purge below that sequence removes it, however many activities it holds. Only
        a pruned activity with events after it (it ended after a kept one started: a long activity
        still running holds that floor back) is purged by its own subject, one request each (before,
        every pruned activity was: under a steady 2,500 activities/s a pass purged 150,000 subjects,
        one request at a time, for longer than the pass interval)."""
        candidates = self.prune_candidates()
        if not candidates:
            return 0
        gone, cache = set(candidates), self.cache
        for stray in [aid for aid in self._first_stored if aid not in cache]:  # no record to keep
            self._first_stored.pop(stray)
            self._last_stored.pop(stray, None)
        # Not above what this replica has folded: what it has not seen yet may be kept.
        floor = min((s for aid, s in self._first_stored.items() if aid not in gone), default=self.position + 1)
        floor = min(floor, self.position + 1)
        if floor > 1:
            try:
                await purge_below(self.bus, "activity", floor)
            except bus.BusError as exc:
                raise bus.BusError(f"cannot prune activities: {exc.__cause__ or exc!r}") from exc
        n = 0
        for aid in candidates:
            if self._last_stored.get(aid, floor) >= floor:
                try:
                    await purge_subject(self.bus, "activity", self.bus.subjects.filter("activity", aid))
                except bus.BusError as exc:
                    raise bus.BusError(f"cannot prune activity {aid}: {exc.__cause__ or exc!r}") from exc
            self._drop(aid)
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
