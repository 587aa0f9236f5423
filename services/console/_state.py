"""What the console knows, kept in memory and followed live (never read per page view).

Started once, at start-up, and then followed:

* the ``sessions`` and ``workers`` buckets (the broker's records) and the ``activities`` bucket (the
  recorder's folded records: the console indexes them by session and worker, and learns which types
  and environments exist), each through a watcher (:func:`bus.transport._follow.follow_bucket`);
* the ``worker`` stream, last message per subject (every worker's last started / heartbeat /
  stopped: host, slots, heartbeat age, why it stopped), like the broker and the recorder do;
* the ``dlq`` stream from its last :attr:`ConsoleConfig.dead_letters` entries on, into a ring;
* every service process's ``<prefix>.rpc.services.info`` answer, asked every few seconds.

Activity lists themselves come from the recorder's ``list`` endpoint (filtered and paged there);
an activity's messages from its ``get`` / ``tail`` endpoints. Each change bumps a counter per kind
and wakes whoever waits in :meth:`ConsoleState.wait_change` (the browser's change feed).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import pydantic
from anyio.abc import TaskStatus

import bus
from bus import run_restarting
from bus.tracking import ActivityEvent, StreamFold, follow_activity_events
from bus.transport import (
    STREAMS,
    Received,
    account_usage,
    follow_bucket,
    follow_events,
    follow_worker_events,
    gather_service_info,
    link_status,
    server_info,
    stream_status,
)
from schemas import (
    ActivityRecord,
    DeadLetter,
    ServiceInfo,
    SessionRecord,
    SessionState,
    WorkerHeartbeat,
    WorkerRecord,
    WorkerStarted,
    WorkerStopped,
    utcnow,
)

__all__ = ("KINDS", "ConsoleConfig", "ConsoleState", "DeadLetterEntry", "ServiceSeen", "WorkerBeat")

_log = logging.getLogger("cadenza.console")

#: What can change (one counter each in the change feed).
KINDS = ("workers", "sessions", "activities", "dead_letters", "health")


@dataclass(frozen=True)
class ConsoleConfig:
    """Tunables of the console's caches.

    Attributes:
        dead_letters: how many of the newest dead letters are kept.
        services_interval: seconds between two ``services.info`` rounds.
        services_window: seconds one round waits for answers.
        lost_factor: a worker silent for this many heartbeat intervals is shown as lost.
        finished_activities: how many finished activities are kept (the oldest ended first go; the
            recorder's pruning is not an event the console can follow, so it keeps its own bound).
    """

    dead_letters: int = 1000
    finished_activities: int = 20_000
    services_interval: float = 3.0
    services_window: float = 0.5
    lost_factor: float = 3.0


@dataclass
class WorkerBeat:
    """A worker's last sign of life, from the ``worker`` stream."""

    worker_id: str
    host_name: str
    pid: int
    tasklist: str
    sessions_enabled: bool
    max_sessions: int
    open_sessions: int
    running_activities: int
    interval: float
    last_seen: datetime
    started_at: datetime | None = None
    stopped: str | None = None


@dataclass
class DeadLetterEntry:
    """One dead letter of the ring: its stream position and the parsed entry (or why it is not one)."""

    seq: int
    time: datetime
    letter: DeadLetter | None
    raw: str = ""


@dataclass
class ServiceSeen:
    info: ServiceInfo
    last_seen: datetime


@dataclass
class ConsoleState:
    """The console's caches. Run with ``await tg.start(state.run)`` (ready once every cache is loaded)."""

    bus: bus.Bus
    config: ConsoleConfig = field(default_factory=ConsoleConfig)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    worker_records: dict[str, WorkerRecord] = field(default_factory=dict)
    beats: dict[str, WorkerBeat] = field(default_factory=dict)
    activities: dict[str, ActivityRecord] = field(default_factory=dict)
    by_session: dict[str, set[str]] = field(default_factory=dict)
    open_activities: set[str] = field(default_factory=set)
    #: Worker id -> ids of its activities not ended yet (the workers page, without a scan).
    open_by_worker: dict[str, set[str]] = field(default_factory=dict)
    types: set[str] = field(default_factory=set)
    environments: set[str] = field(default_factory=set)
    tasklists: set[str] = field(default_factory=set)
    dead_letters: deque[DeadLetterEntry] = field(default_factory=deque)
    dead_letters_seen: int = 0
    services: dict[str, ServiceSeen] = field(default_factory=dict)
    recorder_rtt_ms: float | None = None
    recorder_error: str = ""
    versions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _folded: StreamFold = field(init=False)

    def __post_init__(self) -> None:
        self.dead_letters = deque(maxlen=self.config.dead_letters)
        self._folded = StreamFold(keep_finished=self.config.finished_activities, on_forget=self._forget)

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        async with anyio.create_task_group() as tg:
            await tg.start(follow_bucket, b, "sessions", self._put_session, self._del_session)
            await tg.start(follow_bucket, b, "workers", self._put_worker, self._del_worker)
            follow = functools.partial(follow_activity_events, b, self._on_activity_event,
                                       after=lambda: self._folded.position)  # fmt: skip
            await tg.start(run_restarting, "console activity follower", follow)
            await tg.start(follow_worker_events, b, self._saw)
            await tg.start(self._follow_dead_letters)
            await tg.start(self._services_loop)
            task_status.started()

    def _notify(self, kind: str) -> None:
        self.versions[kind] += 1
        event, self._changed = self._changed, anyio.Event()
        event.set()

    async def wait_change(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for any change; True if one came."""
        with anyio.move_on_after(timeout):
            await self._changed.wait()
            return True
        return False

    # ------------------------------------------------------------ buckets

    def _put_session(self, key: str, value: bytes, _revision: int) -> None:
        try:
            record = SessionRecord.model_validate_json(value)
        except pydantic.ValidationError:
            _log.error("sessions bucket: key %s does not hold a session", key)
            return
        self.sessions[key] = record
        self.tasklists.add(record.tasklist)
        self._notify("sessions")

    def _del_session(self, key: str) -> None:
        if self.sessions.pop(key, None) is not None:
            self._notify("sessions")

    def _put_worker(self, key: str, value: bytes, _revision: int) -> None:
        try:
            record = WorkerRecord.model_validate_json(value)
        except pydantic.ValidationError:
            _log.error("workers bucket: key %s does not hold a worker", key)
            return
        self.worker_records[key] = record
        self.tasklists.add(record.tasklist)
        self._notify("workers")

    def _del_worker(self, key: str) -> None:
        if self.worker_records.pop(key, None) is not None:
            self._notify("workers")

    def _on_activity_event(self, event: ActivityEvent | None, seq: int, body: bytes | None = None) -> None:
        """Fold the activity stream here, as the recorder does (the stream is the activities' store)."""
        new = self._folded.apply(event, seq, body)
        if new is not None and new.fold.announced:
            self._put_activity(new.record)

    def _put_activity(self, record: ActivityRecord) -> None:
        if not record.type:
            return  # messages folded before the announce: not listed by the recorder either
        self.activities[record.id] = record
        if record.session_id:
            self.by_session.setdefault(record.session_id, set()).add(record.id)
        if record.terminal:
            self._close(record)
        else:
            self.open_activities.add(record.id)
            if record.worker_id:
                self.open_by_worker.setdefault(record.worker_id, set()).add(record.id)
        self.types.add(record.type)
        self.environments.add(record.environment_id)
        self._notify("activities")

    def _forget(self, activity_id: str) -> None:
        """Drop a finished activity beyond the fold's bound (a late event for it is stale anyway)."""
        record = self.activities.pop(activity_id, None)
        if record is not None and record.session_id in self.by_session:
            self.by_session[record.session_id].discard(activity_id)
            if not self.by_session[record.session_id]:
                del self.by_session[record.session_id]

    def _close(self, record: ActivityRecord) -> None:
        self.open_activities.discard(record.id)
        if record.worker_id and record.worker_id in self.open_by_worker:
            ids = self.open_by_worker[record.worker_id]
            ids.discard(record.id)
            if not ids:
                del self.open_by_worker[record.worker_id]

    # ------------------------------------------------------------ workers' signs of life

    def _saw(self, event: WorkerStarted | WorkerHeartbeat | WorkerStopped, at: datetime) -> None:
        cur = self.beats.get(event.worker_id)
        if cur is not None and cur.stopped is not None:
            return  # a worker id is one process start: once stopped it stays stopped
        if cur is not None and at < cur.last_seen and not isinstance(event, WorkerStopped):
            return
        beat = WorkerBeat(
            worker_id=event.worker_id, host_name=event.host_name, pid=event.pid, tasklist=event.tasklist,
            sessions_enabled=event.sessions_enabled, max_sessions=event.max_sessions,
            open_sessions=event.open_sessions, running_activities=event.running_activities,
            interval=event.interval, last_seen=max(at, cur.last_seen) if cur else at,
            started_at=event.time if isinstance(event, WorkerStarted) else (cur.started_at if cur else None),
            stopped=(event.reason or "stopped") if isinstance(event, WorkerStopped) else None,
        )  # fmt: skip
        self.beats[event.worker_id] = beat
        if event.tasklist:
            self.tasklists.add(event.tasklist)
        self._notify("workers")

    def worker_state(self, beat: WorkerBeat | None, now: datetime | None = None) -> tuple[str, str]:
        """``("live" | "lost" | "stopped" | "unknown", cause)`` of a worker."""
        if beat is None:
            return "unknown", "no heartbeat seen yet"
        if beat.stopped is not None:
            return "stopped", f"stopped: {beat.stopped}"
        age = ((now or utcnow()) - beat.last_seen).total_seconds()
        if age > self.config.lost_factor * beat.interval:
            return "lost", f"no heartbeat for {age:.0f}s (every {beat.interval:g}s expected)"
        return "live", ""

    def running_on(self, worker_id: str) -> list[ActivityRecord]:
        """The activities not ended yet whose host is ``worker_id``."""
        ids = self.open_by_worker.get(worker_id, ())
        out = [a for aid in ids if (a := self.activities.get(aid)) is not None and not a.terminal]
        out.sort(key=lambda a: a.created_at or a.updated_at or utcnow())
        return out

    def in_session(self, session_id: str) -> list[ActivityRecord]:
        out = [a for aid in self.by_session.get(session_id, ()) if (a := self.activities.get(aid)) is not None]
        out.sort(key=lambda a: a.created_at or a.updated_at or utcnow())
        return out

    # ------------------------------------------------------------ dead letters

    async def _follow_dead_letters(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        stream = b.topology.stream_name("dlq")
        try:
            info = await stream_status(b, stream)
        except bus.BusError as exc:
            raise bus.BusError(f"cannot read the dead-letter stream {stream}: {exc.__cause__ or exc}") from exc
        start = max(info.first_seq, info.last_seq - self.config.dead_letters + 1, 1)

        def on_msg(msg: Received, _event: object) -> None:
            self._add_dead_letter(msg.seq, msg.time or utcnow(), msg.data)

        # Raw messages (no event types: a dead letter is not an event), ready once the last stored one came.
        await follow_events(b, "dlq", (), on_msg, after=start - 1, task_status=task_status)

    def _add_dead_letter(self, seq: int, at: datetime, data: bytes) -> None:
        try:
            letter: DeadLetter | None = DeadLetter.model_validate_json(data)
            raw = ""
        except pydantic.ValidationError:
            letter, raw = None, data[:4096].decode(errors="replace")
        self.dead_letters.appendleft(DeadLetterEntry(seq=seq, time=at, letter=letter, raw=raw))
        self.dead_letters_seen += 1
        self._notify("dead_letters")

    # ------------------------------------------------------------ services

    async def _services_loop(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            await self.refresh_services()
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(self.config.services_interval)

    async def refresh_services(self) -> None:
        """One round: every service process's answer, and the recorder's round trip."""
        now = utcnow()
        for info in await gather_service_info(self.bus, window=self.config.services_window):
            self.services[info.instance] = ServiceSeen(info, now)
        t0 = time.perf_counter()
        try:
            await bus.ActivityClient(self.bus, timeout=2.0).list(limit=1)
        except bus.CadenzaError as exc:
            self.recorder_rtt_ms, self.recorder_error = None, exc.message
        else:
            self.recorder_rtt_ms, self.recorder_error = (time.perf_counter() - t0) * 1000, ""
        self._notify("health")

    # ------------------------------------------------------------ queries (pure, from the caches)

    def session_rows(self, states: Iterable[SessionState], tasklist: str) -> list[SessionRecord]:
        wanted = set(states)
        rows = [
            s for s in self.sessions.values()
            if (not wanted or s.state in wanted) and (not tasklist or s.tasklist == tasklist)
        ]  # fmt: skip
        rows.sort(key=lambda r: (r.state is not SessionState.OPEN, -(r.requested_at or _EPOCH).timestamp()))
        return rows

    async def server_health(self) -> dict[str, object]:
        """The server as this client sees it: its INFO, the JetStream account, the streams."""
        info = server_info(self.bus)
        out: dict[str, object] = {
            "url": self.bus.url,
            "server_name": info.get("server_name", ""),
            "server_id": info.get("server_id", ""),
            "version": info.get("version", ""),
            "cluster": info.get("cluster", ""),
            "jetstream": bool(info.get("jetstream", False)),
            "connected": link_status(self.bus).connected,
            "max_payload": info.get("max_payload", 0),
        }
        try:
            out["account"] = dataclasses.asdict(await account_usage(self.bus))
        except bus.BusError as exc:
            out["account_error"] = f"JetStream account info is not available: {exc.__cause__ or exc!r}"
        streams = []
        for spec in STREAMS:
            name = self.bus.topology.stream_name(spec.domain)
            try:
                si = await stream_status(self.bus, name)
                streams.append({"name": name, "messages": si.messages, "bytes": si.bytes,
                                "consumers": si.consumers, "replicas": si.replicas})  # fmt: skip
            except bus.BusError as exc:
                streams.append({"name": name, "error": repr(exc.__cause__ or exc)})
        out["streams"] = streams
        return out


_EPOCH = datetime(1970, 1, 1).astimezone()
