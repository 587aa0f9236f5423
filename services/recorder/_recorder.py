"""The recorder: folds activity events into queryable state and answers list/get/tail/cancel.

State: one value per activity in the ``activities`` bucket, written by compare-and-set, so several
replicas (sharing one durable consumer) never double-apply an event. Folding does not depend on the
order events arrive in: "latest" fields follow the highest ``rev``, message seqs are kept as a set
of ranges (a redelivered batch adds nothing), and the first terminal status wins. An update or message
without ``rev`` (0: a client that does not count, such as ``nats pub``) applies in arrival order.

Nothing is dropped in silence: input that does not validate is dead-lettered by the bus; an event that
validates is folded, or is stale by the rules above (older ``rev``, after the end, a redelivered seq),
which changes nothing by design. docs/wire.md lists what each consumer does with bad input.

Host loss: the recorder follows ``<prefix>.worker.*.*`` (the stream keeps each worker's last
started / heartbeat / stopped) and ends as ``failed`` every running activity whose worker stopped or
sent no heartbeat for ``host_timeout`` (default: 3 x the worker's own heartbeat interval).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import nats.errors
import nats.js.errors
import pydantic
from anyio.abc import TaskStatus
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

import bus
from bus import Delivery
from bus._activity_client import activity_kv_key, read_activity_messages
from schemas import (
    ENDPOINTS,
    ActivityCompleted,
    ActivityFold,
    ActivityLevel,
    ActivityMessage,
    ActivityRecord,
    ActivityStarted,
    ActivityStatus,
    ActivityUpdated,
    CancelActivityReply,
    CancelActivityRequest,
    CancelCause,
    CancelKind,
    Event,
    GetActivityReply,
    GetActivityRequest,
    ListActivitiesReply,
    ListActivitiesRequest,
    MessageEntry,
    StoredActivity,
    TailActivityReply,
    TailActivityRequest,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
    cut_text,
    utcnow,
)

__all__ = ("Recorder", "RecorderConfig")

_log = logging.getLogger("cadenza.recorder")

ACTIVITY_EVENTS = (ActivityStarted, ActivityUpdated, ActivityMessage, ActivityCompleted)
WORKER_EVENTS = (WorkerStarted, WorkerHeartbeat, WorkerStopped)


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


#: The fold state and the bucket value are wire shapes (schemas/json/kv.activities.json).
_Fold = ActivityFold
Stored = StoredActivity


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
    cache: dict[str, Stored] = field(default_factory=dict)
    workers: dict[str, _WorkerSeen] = field(default_factory=dict)
    finalised: int = 0
    pruned: int = 0
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)
    #: The bucket revision of each cached record (compare-and-set from the cache, no read per event).
    _revisions: dict[str, int] = field(default_factory=dict)
    #: Ids of the cached activities not ended yet (what the host-lost sweep looks at).
    _open: set[str] = field(default_factory=set)
    #: Revisions this replica wrote and has not seen come back through the watcher yet.
    _own: OrderedDict[int, None] = field(default_factory=OrderedDict)
    #: Bucket key -> activity id (a delete in the bucket names the key).
    _key_ids: dict[str, str] = field(default_factory=dict)
    _finalising: dict[str, float] = field(default_factory=dict)
    _started_at: datetime = field(default_factory=utcnow)
    _kv: KeyValue | None = None

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        self._kv = await b.kv("activities")
        self._started_at = utcnow()
        # Folding is idempotent (rev, seq ranges, first terminal wins): an ack lost on the way only
        # means a redelivery that changes nothing, so acks are not awaited.
        # Up to 20 deliveries (the backoff's last step, 5 s, repeats): a fold failing on a cluster's
        # election is retried inside the handler first and then redelivered for over a minute before
        # it is dead-lettered, so a leader election never costs an event. An ack wait of 10 s (folds
        # are short; a long one keeps itself alive): an event delivered to a recorder that was killed,
        # or whose delivery a node restart lost, is handed out again within seconds, not half a minute.
        spec = bus.ConsumerSpec("recorder", b.subjects.domain_wildcard("activity"), max_deliver=20, ack_sync=False,
                                ack_wait=10.0)  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(bus.run_restarting, "activities watcher", self._watch_store)
            await tg.start(bus.run_restarting, "heartbeat follower", self._watch_workers)
            await tg.start(b.consume, spec, ACTIVITY_EVENTS, self._on_event)
            handlers = {"list": self.list, "get": self.get, "tail": self.tail, "cancel": self.cancel}
            for endpoint in ENDPOINTS:
                if endpoint.served_by == "recorder":
                    serve = functools.partial(b.serve, name=f"recorder-{endpoint.method}")
                    await tg.start(serve, b.rpc_subject("recorder", endpoint.method), endpoint.request,
                                   handlers[endpoint.method])  # fmt: skip
            tg.start_soon(self._sweep_loop)
            tg.start_soon(self._prune_loop)
            task_status.started()

    # ------------------------------------------------------------ the cache (every replica)

    async def _watch_store(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self._kv is not None
        watcher = await self._kv.watchall()
        ready = False
        try:
            async for entry in watcher:
                if entry is None:
                    if not ready:
                        ready = True
                        task_status.started()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._forget_key(entry.key)
                elif self._own.pop(entry.revision, None) is not None:
                    pass  # this replica's own write, cached when it was made: nothing to parse
                else:
                    try:
                        stored = Stored.model_validate_json(entry.value)
                    except pydantic.ValidationError as exc:
                        # Another writer put a value that is no activity: keep a copy and say why.
                        _log.error("activities bucket: key %s does not hold an activity", entry.key)
                        await self._reject_value(entry.key, entry.value, entry.revision or 0, exc)
                        continue
                    if entry.revision >= self._revisions.get(stored.record.id, 0):
                        self._put(stored)
                        self._revisions[stored.record.id] = entry.revision
                if not ready and entry.delta == 0:
                    ready = True
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated

    async def _reject_value(self, key: str, value: bytes, revision: int, exc: pydantic.ValidationError) -> None:
        b = self.bus
        bucket = b.topology.bucket_name("activities")
        with contextlib.suppress(bus.CadenzaError):  # the watcher goes on; the error is logged above
            await b.dead_letter(
                consumer="recorder-store", subject=f"$KV.{bucket}.{key}", data=value, headers=None,
                reason=f"not a kv.activities value: {exc.errors()[0]['msg']} at "
                f"{'.'.join(map(str, exc.errors()[0]['loc'])) or '(value)'}",
                error_type="bad_shape", stream=f"KV_{bucket}", stream_seq=revision,
            )  # fmt: skip

    def _put(self, stored: Stored) -> None:
        """Cache a record, with the indexes the sweep and the watcher use (no scans of the cache)."""
        aid = stored.record.id
        self.cache[aid] = stored
        self._key_ids[activity_kv_key(aid)] = aid
        if stored.record.terminal:
            self._open.discard(aid)
        else:
            self._open.add(aid)

    def _drop(self, activity_id: str) -> None:
        self.cache.pop(activity_id, None)
        self._revisions.pop(activity_id, None)
        self._open.discard(activity_id)
        self._key_ids.pop(activity_kv_key(activity_id), None)

    def _forget_key(self, key: str) -> None:
        activity_id = self._key_ids.get(key)
        if activity_id is not None:
            self._drop(activity_id)

    async def _load(self, activity_id: str) -> tuple[Stored | None, int]:
        assert self._kv is not None
        kv, key = self._kv, activity_kv_key(activity_id)
        try:
            entry = await bus.retry_transient(lambda: kv.get(key), what=f"read activity {activity_id}")
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        except nats.errors.Error as exc:
            raise bus.BusError(f"cannot read activity {activity_id}: {exc!r}") from exc
        if not entry.value:
            return None, entry.revision or 0
        return Stored.model_validate_json(entry.value), entry.revision or 0

    async def _write(self, key: str, value: bytes, revision: int) -> int:
        assert self._kv is not None
        return await self._kv.update(key, value, last=revision) if revision else await self._kv.create(key, value)

    async def _apply(self, activity_id: str, change: Callable[[Stored | None], Stored | None]) -> Stored | None:
        """Fold one change by compare-and-set; ``change`` returns None when nothing changes."""
        assert self._kv is not None
        lock = self._locks.setdefault(activity_id, anyio.Lock())
        async with lock:
            try:
                # First from the cache (this replica's writes and the bucket's watcher keep it with
                # its revision); a conflict means another replica wrote: then read the bucket.
                known = self._revisions.get(activity_id)
                cached = self.cache.get(activity_id) if known is not None else None
                fresh = cached is None and known is not None
                for _ in range(50):
                    if fresh:
                        stored, revision = await self._load(activity_id)
                    elif cached is not None and known is not None:
                        stored, revision = cached, known
                    else:
                        stored, revision = None, 0  # never seen: try to create it
                    fresh = True
                    new = change(stored)
                    if new is None:
                        return stored
                    value = new.model_dump_json().encode()
                    key = activity_kv_key(activity_id)
                    try:
                        written = await bus.retry_transient(
                            functools.partial(self._write, key, value, revision), what=f"store activity {activity_id}"
                        )
                    except nats.js.errors.KeyWrongLastSequenceError:
                        continue  # another replica folded something first: read again
                    except nats.errors.Error as exc:
                        raise bus.BusError(f"cannot store activity {activity_id}: {exc!r}") from exc
                    self._own[written] = None
                    while len(self._own) > 10_000:
                        self._own.popitem(last=False)
                    if written > self._revisions.get(activity_id, 0):
                        # (Unless the watcher already brought a newer write of another replica.)
                        self._put(new)
                        self._revisions[activity_id] = written
                    return new
            finally:
                if not lock.statistics().tasks_waiting:
                    self._locks.pop(activity_id, None)
        raise bus.BusError(f"activity {activity_id}: too many concurrent updates", retry_delay=0.2)

    # ------------------------------------------------------------ folding

    async def _on_event(self, event: Event, delivery: Delivery) -> None:
        assert isinstance(event, ACTIVITY_EVENTS)
        if isinstance(event, ActivityStarted):
            await self._apply(event.activity_id, lambda s: fold_started(s, event))
        elif isinstance(event, ActivityUpdated):
            await self._apply(event.activity_id, lambda s: fold_updated(s, event))
        elif isinstance(event, ActivityMessage):
            await self._apply(event.activity_id, lambda s: fold_message(s, event))
        elif isinstance(event, ActivityCompleted):
            await self._apply(event.activity_id, lambda s: fold_completed(s, event))

    # ------------------------------------------------------------ workers and host loss

    async def _watch_workers(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        stream = b.topology.stream_name("worker")
        sub = await b.js.subscribe(
            b.subjects.domain_wildcard("worker"),
            stream=stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=1_000_000,
        )
        try:
            task_status.started()
            async for msg in sub.messages:
                try:
                    event = bus.decode(msg.data, msg.headers, WORKER_EVENTS)
                except bus.ValidationError as exc:
                    meta = msg.metadata
                    with contextlib.suppress(bus.CadenzaError):
                        await b.dead_letter(
                            consumer="recorder-workers",
                            subject=msg.subject,
                            data=msg.data,
                            headers=msg.headers,
                            reason=exc.message,
                            error_type=exc.kind,
                            stream=meta.stream,
                            stream_seq=meta.sequence.stream,
                        )
                    continue
                self._saw_worker(event)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(b.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _saw_worker(self, event: Event) -> None:
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
        await self.bus.publish(
            ActivityCompleted(
                event_id=f"{record.id}.completed",
                activity_id=record.id,
                status=status,
                error=error,
                final=MessageEntry(level=level, message=final),
                final_seq=seq,
                host_lost=True,
            )
        )

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
        by_env: dict[str, list[ActivityRecord]] = {}
        for stored in self.cache.values():
            if stored.record.terminal:
                by_env.setdefault(stored.record.environment_id, []).append(stored.record)
        out: list[ActivityRecord] = []
        for records in by_env.values():
            records.sort(key=lambda r: r.ended_at or r.updated_at or now, reverse=True)
            for i, r in enumerate(records):
                ended = r.ended_at or r.updated_at or now
                if (days > 0 and now - ended > timedelta(days=days)) or (count > 0 and i >= count):
                    out.append(r)
        return out

    async def prune(self) -> int:
        """Delete pruned activities' state and messages; returns how many."""
        assert self._kv is not None
        stream = self.bus.topology.stream_name("activity")
        n = 0
        for record in self.prune_candidates():
            try:
                await self.bus.js.purge_stream(stream, subject=self.bus.subjects.filter("activity", record.id))
                await self._kv.purge(activity_kv_key(record.id))
            except nats.errors.Error as exc:
                raise bus.BusError(f"cannot prune activity {record.id}: {exc!r}") from exc
            self._drop(record.id)
            n += 1
        self.pruned += n
        return n

    # ------------------------------------------------------------ endpoints

    async def list(self, req: ListActivitiesRequest) -> ListActivitiesReply:
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
        stored, _ = await self._load(activity_id)
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


# ---------------------------------------------------------------- pure folds


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
            "progress": r.progress if late or r.terminal else bus.clamp_progress(e.progress),
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
        update["progress"] = bus.clamp_progress(e.progress)
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
                update["progress"] = bus.clamp_progress(entry.progress)
    return Stored(record=r.model_copy(update=update), fold=fold)


def fold_completed(stored: Stored | None, e: ActivityCompleted) -> Stored | None:
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
