"""The session broker: places sessions on workers, frees slots, fails sessions of lost workers.

State lives in two key-value buckets, changed by compare-and-set only:

* ``workers``: one :class:`~schemas.WorkerRecord` per live session worker; its ``sessions`` list is
  the slots in use. A session id is added before the session opens (never past ``max_sessions``)
  and removed after the session ended and the worker was told.
* ``sessions``: one :class:`~schemas.SessionRecord` per session: ``pending`` -> ``open`` ->
  ``completed`` / ``failed``, or ``pending`` -> ``rejected``.

Every step is idempotent, so a request redelivered to a restarted broker (or to another replica)
continues where the last one stopped. Outcomes are announced with fixed event ids, so the stream
stores each once. Every replica follows both buckets (watchers) and the workers' heartbeats; the
sweep fails the sessions of silent workers, ends expired sessions, releases slots whose session
ended, and announces outcomes a crash cut off.

Liveness: the worker stream keeps each worker's last heartbeat; a (re)started broker reads the
server's timestamps of those, so it does not declare a worker lost merely because it was down.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import nats.errors
import nats.js.errors
import pydantic
from anyio.abc import TaskGroup, TaskStatus
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

import bus
from bus import ConsumerSpec, Delivery
from schemas import (
    CancelCause,
    CancelKind,
    Event,
    SessionAssigned,
    SessionClosed,
    SessionCompleted,
    SessionCompleteRequested,
    SessionFailed,
    SessionFailure,
    SessionOpened,
    SessionRecord,
    SessionRejected,
    SessionRejectReason,
    SessionRequested,
    SessionState,
    WorkerHeartbeat,
    WorkerPing,
    WorkerPong,
    WorkerRecord,
    WorkerStarted,
    WorkerStopped,
    utcnow,
)

from ._tokens import TokenError, TokenSigner, WorkerClaim

__all__ = ("Broker", "BrokerConfig")

_log = logging.getLogger("cadenza.broker")

WORKER_EVENTS = (WorkerStarted, WorkerHeartbeat, WorkerStopped)
#: Key of the generated token key (used only without CADENZA_TOKEN_KEY) in the broker-only bucket;
#: brokers before 2026-12 kept it under the same key in the sessions bucket (moved at start).
KEY_ENTRY = "_broker-token-key"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Knobs of the broker.

    Attributes:
        sweep_interval: seconds between checks for lost workers and expired sessions (the detection
            latency is at most the session's ``heartbeat_timeout`` plus this).
        placeable_factor: a worker silent for more than this many heartbeat intervals gets no new session.
        forget_factor: a worker silent this many intervals, with no session left, is removed.
        request_concurrency: creation requests handled at once (each may wait for a slot).
        request_ack_wait: seconds before a request held by a dead broker is handed to another.
        token_key: key of the recreate tokens (default: ``CADENZA_TOKEN_KEY``, else one generated
            and kept in the broker-only bucket; see :meth:`Broker._token_key`).
        orphan_grace: seconds a slot reserved for a session that has no record is kept before it is freed.
        retention: seconds an ended session's record is kept (then deleted from the bucket).
        token_max_age: seconds a recreate token stays valid after it was issued.
    """

    sweep_interval: float = 0.1
    placeable_factor: float = 2.5
    forget_factor: float = 6.0
    request_concurrency: int = 4096
    request_ack_wait: float = 5.0
    token_key: bytes | None = None
    orphan_grace: float = 60.0
    retention: float = 7 * 86_400.0
    token_max_age: float = 7 * 86_400.0


@dataclass
class _Seen:
    """A worker's last sign of life, on this broker's monotonic clock."""

    at: float
    interval: float
    stopped: str = ""
    #: Set once two pings in a row found nobody on the worker's ping subject: its process is gone.
    gone: str = ""
    probed_at: float = 0.0
    suspect: int = 0


@dataclass
class _Cached:
    value: pydantic.BaseModel
    revision: int


class Broker:
    """Run with ``await tg.start(Broker(b).run)``; several replicas may run at once."""

    def __init__(self, bus_: bus.Bus, config: BrokerConfig | None = None) -> None:
        self.bus = bus_
        self.config = config or BrokerConfig()
        self.sessions: dict[str, _Cached] = {}
        self.workers: dict[str, _Cached] = {}
        self.seen: dict[str, _Seen] = {}
        self._changed = anyio.Event()
        self._locks: dict[str, anyio.Lock] = {}
        #: Slots waiting to be released, by worker (see :meth:`_release`).
        self._releasing: dict[str, set[str]] = {}
        self._ending: set[str] = set()
        self._orphans: dict[str, float] = {}
        #: Requests looking for a slot now (session id -> tasklist).
        self.waiting: dict[str, str] = {}
        self._reconnects = (0, 0.0)
        self._stored: dict[str, tuple[float, float]] = {}
        self._kv_sessions: KeyValue | None = None
        self._kv_workers: KeyValue | None = None
        self._signer: TokenSigner | None = None
        self._tg: TaskGroup | None = None
        # Sessions open, slots free on live workers, requests waiting for a slot (OpenTelemetry API:
        # recorded only if the application set a meter provider).
        metrics.get_meter("cadenza.broker").create_observable_gauge(
            "cadenza.broker.sessions", callbacks=[self._observe], description="sessions open / slots free / waiting"
        )

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        self._kv_sessions = await b.kv("sessions")
        self._kv_workers = await b.kv("workers")
        self._signer = TokenSigner(await self._token_key())
        s = b.subjects
        requests = ConsumerSpec(
            durable="broker-requests", filter_subject=s.filter("session", event="requested"),
            ack_wait=self.config.request_ack_wait, max_ack_pending=50_000, max_deliver=50,
            backoff=(0.1, 0.5, 1.0, 2.0), deliver_new=True,
        )  # fmt: skip
        control = ConsumerSpec(
            durable="broker-control", filter_subject=s.filter("session", event="complete"),
            ack_wait=10.0, max_ack_pending=50_000, max_deliver=50, backoff=(0.1, 0.5, 1.0, 2.0), deliver_new=True,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(bus.run_restarting, "workers watcher",
                           functools.partial(self._watch, self._kv_workers, self.workers, WorkerRecord))  # fmt: skip
            await tg.start(bus.run_restarting, "sessions watcher",
                           functools.partial(self._watch, self._kv_sessions, self.sessions, SessionRecord))  # fmt: skip
            await tg.start(bus.run_restarting, "heartbeat follower", self._follow_workers)
            await tg.start(lambda task_status: b.consume(
                requests, [SessionRequested], self._on_request, concurrency=self.config.request_concurrency,
                task_status=task_status))  # fmt: skip
            await tg.start(lambda task_status: b.consume(
                control, [SessionCompleteRequested], self._on_complete, concurrency=256,
                task_status=task_status))  # fmt: skip
            tg.start_soon(self._sweep_loop)
            task_status.started()

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        open_ = sum(1 for c in self.sessions.values() if getattr(c.value, "state", None) is SessionState.OPEN)
        free = sum(max(0, w.max_sessions - len(w.sessions)) for c in self.workers.values()
                   if isinstance(w := c.value, WorkerRecord) and self._placeable(w.worker_id))  # fmt: skip
        yield Observation(open_, {"cadenza.metric": "sessions_open"})
        yield Observation(free, {"cadenza.metric": "slots_free"})
        yield Observation(len(self.waiting), {"cadenza.metric": "requests_waiting"})

    async def _token_key(self) -> bytes:
        """The recreate-token key: ``token_key``, else ``CADENZA_TOKEN_KEY``, else one generated once and
        kept in the broker-only bucket (refused when ``CADENZA_REQUIRE_TOKEN_KEY`` is set, as deploy/
        does). Older brokers kept the generated key in the sessions bucket, which callers may read: it
        is moved (so tokens stay valid) and purged from there, history included.

        Raises:
            bus.CadenzaError: no key is given and the environment requires one.
        """
        assert self._kv_sessions is not None
        legacy: bytes | None = None
        stale = False  # older revisions may remain under a delete marker (a purge leaves none)
        try:
            legacy = (await self._kv_sessions.get(KEY_ENTRY)).value
        except nats.js.errors.KeyNotFoundError as exc:  # nats-py reports a deleted key this way, with its op
            stale = exc.op == "DEL"
        key = self.config.token_key or os.environ.get("CADENZA_TOKEN_KEY", "").encode()
        if not key:
            if os.environ.get("CADENZA_REQUIRE_TOKEN_KEY", "").lower() not in ("", "0", "false", "no"):
                raise bus.CadenzaError(
                    "CADENZA_TOKEN_KEY is not set and CADENZA_REQUIRE_TOKEN_KEY is: give every broker replica "
                    "the same key of at least 16 bytes (e.g. `openssl rand -hex 32`)", non_retryable=True,
                )  # fmt: skip
            _log.warning("CADENZA_TOKEN_KEY is not set: using a generated key kept in the broker-only bucket "
                         "(set the variable in production; see deploy/)")  # fmt: skip
            vault = await self.bus.kv("broker")
            try:
                await vault.create(KEY_ENTRY, legacy or secrets.token_hex(32).encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # another replica made (or moved) it first
            key = (await vault.get(KEY_ENTRY)).value or b""
        if legacy is not None or stale:
            # Copied above (or superseded by the configured key): no revision may stay readable.
            await self._kv_sessions.purge(KEY_ENTRY)
            _log.warning("removed an older broker's token key from the sessions bucket (callers can read it)")
        return key

    # ------------------------------------------------------------ caches (every replica)

    async def _watch(
        self, kv: KeyValue, cache: dict[str, _Cached], model: type[pydantic.BaseModel],
        *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        watcher = await kv.watchall()
        ready = False
        try:
            async for entry in watcher:
                if entry is not None and not entry.key.startswith("_"):
                    cur = cache.get(entry.key)
                    if cur is None or entry.revision > cur.revision:
                        if entry.operation in ("DEL", "PURGE") or not entry.value:
                            cache.pop(entry.key, None)
                        else:
                            try:
                                cache[entry.key] = _Cached(model.model_validate_json(entry.value), entry.revision)
                            except pydantic.ValidationError as exc:
                                await self._bad_value(kv, entry.key, entry.value, entry.revision, model, exc)
                        self._notify()
                if not ready and (entry is None or entry.delta == 0):
                    ready = True
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated

    async def _bad_value(
        self, kv: KeyValue, key: str, value: bytes, revision: int, model: type[pydantic.BaseModel],
        exc: pydantic.ValidationError,
    ) -> None:  # fmt: skip
        """A bucket value that is no record: skipped by the cache, dead-lettered with the reason."""
        bucket = kv._name
        _log.error("%s bucket: key %s does not hold a %s", bucket, key, model.__name__)
        first = exc.errors()[0]
        with contextlib.suppress(bus.CadenzaError):  # the watcher goes on; the error is logged above
            await self.bus.dead_letter(
                consumer=f"broker-{bucket.rsplit('_', 1)[-1]}", subject=f"$KV.{bucket}.{key}", data=value,
                headers=None, reason=f"not a {model.__name__}: {first['msg']} at "
                f"{'.'.join(map(str, first['loc'])) or '(value)'}",
                error_type="bad_shape", stream=f"KV_{bucket}", stream_seq=revision,
            )  # fmt: skip

    def _notify(self) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()

    def _store(self, cache: dict[str, _Cached], key: str, value: pydantic.BaseModel, revision: int) -> None:
        cur = cache.get(key)
        if cur is None or revision > cur.revision:
            cache[key] = _Cached(value, revision)
            self._notify()

    async def _cas(
        self, kv: KeyValue, cache: dict[str, _Cached], model: type[pydantic.BaseModel], key: str,
        change: Callable[[pydantic.BaseModel | None], pydantic.BaseModel | None],
    ) -> pydantic.BaseModel | None:  # fmt: skip
        """Apply ``change`` to the stored value by compare-and-set, retrying on conflicts.

        ``change`` gets the current value (None: no key) and returns the new one, or None for "no
        change". Returns the value stored afterwards (None if there is none).
        """
        cached = cache.get(key)
        current = cached.value if cached is not None else None
        revision = cached.revision if cached is not None else 0
        for _attempt in range(64):
            new = change(current)
            if new is None:
                return current
            data = new.model_dump_json().encode()
            try:
                # A write retried after a lost answer may find its own first try stored: the
                # conflict that follows re-reads it, and ``change`` (idempotent) then changes nothing.
                revision = await bus.retry_transient(functools.partial(self._write, kv, key, data, revision),
                                                     what=f"write {key}")  # fmt: skip
                self._store(cache, key, new, revision)
                return new
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                current, revision = await self._fresh(kv, model, key)
            except nats.errors.Error as exc:
                raise bus.BusError(f"could not write {key}: {exc!r}") from exc
        raise bus.BusError(f"could not update {key} after 64 conflicting writes")

    @staticmethod
    async def _write(kv: KeyValue, key: str, data: bytes, revision: int) -> int:
        return await kv.update(key, data, last=revision) if revision else await kv.create(key, data)

    async def _fresh(
        self, kv: KeyValue, model: type[pydantic.BaseModel], key: str
    ) -> tuple[pydantic.BaseModel | None, int]:
        try:
            entry = await bus.retry_transient(lambda: kv.get(key), what=f"read {key}")
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        except nats.js.errors.KeyDeletedError as exc:
            # A deleted key is re-created on top of its delete marker.
            return None, (exc.entry.revision or 0) if exc.entry is not None else 0
        except nats.errors.Error as exc:
            raise bus.BusError(f"could not read {key}: {exc!r}") from exc
        if entry.value is None:
            return None, entry.revision or 0
        return model.model_validate_json(entry.value), entry.revision or 0

    async def session_record(self, sid: str) -> tuple[SessionRecord | None, int]:
        assert self._kv_sessions is not None
        value, revision = await self._fresh(self._kv_sessions, SessionRecord, sid)
        assert value is None or isinstance(value, SessionRecord)
        if value is not None:
            self._store(self.sessions, sid, value, revision)
        return value, revision

    async def _cas_session(
        self, sid: str, change: Callable[[SessionRecord | None], SessionRecord | None]
    ) -> SessionRecord | None:
        assert self._kv_sessions is not None
        out = await self._cas(self._kv_sessions, self.sessions, SessionRecord, sid, change)  # type: ignore[arg-type]
        assert out is None or isinstance(out, SessionRecord)
        return out

    async def _cas_worker(
        self, wid: str, change: Callable[[WorkerRecord | None], WorkerRecord | None]
    ) -> WorkerRecord | None:
        assert self._kv_workers is not None
        out = await self._cas(self._kv_workers, self.workers, WorkerRecord, wid, change)  # type: ignore[arg-type]
        assert out is None or isinstance(out, WorkerRecord)
        return out

    def worker(self, wid: str) -> WorkerRecord | None:
        cached = self.workers.get(wid)
        return cached.value if cached is not None else None  # type: ignore[return-value]

    def session(self, sid: str) -> SessionRecord | None:
        cached = self.sessions.get(sid)
        return cached.value if cached is not None else None  # type: ignore[return-value]

    # ------------------------------------------------------------ workers' signs of life

    async def _follow_workers(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        b = self.bus
        sub = await b.js.subscribe(
            b.subjects.domain_wildcard("worker"), stream=b.topology.stream_name("worker"), ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, pending_msgs_limit=1_000_000,
        )  # fmt: skip
        try:
            info = await sub.consumer_info()
            backlog = info.num_pending
            if not backlog:
                task_status.started()
            async for msg in sub.messages:
                meta = msg.metadata
                try:
                    event = bus.decode(msg.data, msg.headers, WORKER_EVENTS)
                except bus.ValidationError as exc:
                    with contextlib.suppress(bus.CadenzaError):
                        await b.dead_letter(consumer="broker-workers", subject=msg.subject, data=msg.data,
                                            headers=msg.headers, reason=exc.message, error_type=exc.kind,
                                            stream=meta.stream, stream_seq=meta.sequence.stream)  # fmt: skip
                else:
                    # The server's time of storing, so a broker that was down sees how old a beat is.
                    age = max(0.0, (utcnow() - meta.timestamp).total_seconds()) if meta.timestamp else 0.0
                    await self._saw(event, time.monotonic() - age)
                if backlog and meta.num_pending == 0:
                    backlog = 0
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(b.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _saw(self, event: Event, at: float) -> None:
        assert isinstance(event, WORKER_EVENTS)
        wid = event.worker_id
        seen = self.seen.get(wid)
        if seen is not None and seen.stopped:
            return  # a worker id is one process start: once stopped it stays stopped
        if isinstance(event, WorkerStopped):
            self.seen[wid] = _Seen(at, event.interval, event.reason or "stopped")
            self._spawn(self._worker_stopped, wid, event.reason or "stopped")
            return
        if seen is None or seen.gone or at > seen.at:
            self.seen[wid] = _Seen(at, event.interval)
        if (
            event.sessions_enabled and event.max_sessions > 0 and wid not in self.workers
            and self._placeable(wid)
        ):  # fmt: skip
            record = WorkerRecord(
                worker_id=wid, host_name=event.host_name, pid=event.pid, tasklist=event.tasklist,
                max_sessions=event.max_sessions, interval=event.interval, started_at=event.time,
            )  # fmt: skip
            with contextlib.suppress(bus.CadenzaError, nats.errors.Error):
                await self._cas_worker(wid, lambda cur: record if cur is None else None)
        self._notify()

    def silence(self, wid: str) -> float:
        seen = self.seen.get(wid)
        return float("inf") if seen is None else time.monotonic() - seen.at

    def _placeable(self, wid: str) -> bool:
        seen = self.seen.get(wid)
        if seen is None or seen.stopped:
            return False
        return time.monotonic() - seen.at <= self.config.placeable_factor * seen.interval + 0.5

    async def _worker_stopped(self, wid: str, reason: str) -> None:
        record = self.worker(wid)
        if record is not None:
            await self._fail_all(record, SessionFailure.WORKER_SHUTDOWN,
                                 f"worker {wid} on {record.host_name or '?'} shut down ({reason})")  # fmt: skip
        await self._forget_worker(wid)

    async def _forget_worker(self, wid: str) -> None:
        record = self.worker(wid)
        cached = self.workers.get(wid)
        if record is None or cached is None or record.sessions:
            return
        assert self._kv_workers is not None
        kv = self._kv_workers
        with contextlib.suppress(nats.errors.Error, bus.CadenzaError):
            await bus.retry_transient(lambda: kv.delete(wid, last=cached.revision), what=f"forget {wid}", budget=5.0)
            self.workers.pop(wid, None)

    # ------------------------------------------------------------ creating

    async def _on_request(self, req: SessionRequested, delivery: Delivery) -> None:
        # Steps, each idempotent: reserve a slot on a worker (CAS on its record), create the session
        # record as open (CAS create: fails if the caller withdrew meanwhile, then the slot is given
        # back), tell the worker, announce. A redelivery after a crash finds the reservation or the
        # record and carries on from there.
        sid = req.session_id
        redelivered = delivery.deliveries > 1
        record = (await self.session_record(sid))[0] if redelivered else self.session(sid)
        if record is not None and record.state is SessionState.OPEN:
            await self._announce_open(record)
            return
        if record is not None and record.ended:
            await self._announce_end(record)
            return
        deadline = req.time + timedelta(seconds=req.creation_timeout)
        fresh = SessionRecord(
            session_id=sid, tasklist=req.tasklist, heartbeat_timeout=req.heartbeat_timeout,
            execution_timeout=req.execution_timeout, requested_at=req.time, creation_deadline=deadline,
            requested_by=req.source,
        )  # fmt: skip
        claim: WorkerClaim | None = None
        if req.recreate_token is not None:
            assert self._signer is not None
            try:
                claim = self._signer.verify(req.recreate_token)
            except TokenError as exc:
                await self._reject(fresh, SessionRejectReason.BAD_TOKEN, str(exc))
                return
            age = time.time() - claim.issued_at
            if age > self.config.token_max_age:
                await self._reject(fresh, SessionRejectReason.BAD_TOKEN,
                                   f"the recreate token expired: issued {age / 86_400:.1f} days ago, tokens last "
                                   f"{self.config.token_max_age / 86_400:g} days")  # fmt: skip
                return
            fresh = fresh.model_copy(update={"recreated_from": claim.session_id})
        placed = (self._holder(sid) if redelivered else None) or await self._place(req, deadline, claim)
        if isinstance(placed, tuple):
            await self._reject(fresh, *placed)
            return
        worker = placed
        now = utcnow()
        opened = fresh.model_copy(update={
            "state": SessionState.OPEN, "worker_id": worker.worker_id, "host_name": worker.host_name,
            "opened_at": now, "expires_at": now + timedelta(seconds=req.execution_timeout),
        })  # fmt: skip
        stored = await self._cas_session(sid, lambda cur: opened if cur is None else None)
        if stored is opened:
            await self._announce_open(opened)
            return
        if stored is not None and stored.state is SessionState.OPEN and stored.worker_id == worker.worker_id:
            await self._announce_open(stored)  # opened by an earlier delivery of this request
            return
        # Withdrawn (or rejected) while we placed it: give the slot back.
        await self._release(worker.worker_id, sid)
        if stored is not None and stored.ended:
            await self._announce_end(stored)

    def _holder(self, sid: str) -> WorkerRecord | None:
        """The worker already holding a slot for ``sid`` (a redelivered request after a crash)."""
        for cached in self.workers.values():
            record = cached.value
            assert isinstance(record, WorkerRecord)
            if sid in record.sessions:
                return record
        return None

    def _lock(self, key: str) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    async def _place(
        self, req: SessionRequested, deadline: datetime, claim: WorkerClaim | None
    ) -> WorkerRecord | tuple[SessionRejectReason, str]:
        """Reserve a slot for the session, waiting for one until ``deadline``; else why not."""
        waited_from = time.monotonic()
        self.waiting[req.session_id] = req.tasklist
        try:
            return await self._place_loop(req, deadline, claim, waited_from)
        finally:
            self.waiting.pop(req.session_id, None)

    async def _place_loop(
        self, req: SessionRequested, deadline: datetime, claim: WorkerClaim | None, waited_from: float
    ) -> WorkerRecord | tuple[SessionRejectReason, str]:
        while True:
            changed = self._changed
            async with self._lock(claim.worker_id if claim else req.tasklist):
                for record in self._candidates(req, claim):
                    if await self._reserve(record.worker_id, req.session_id):
                        got = self.worker(record.worker_id)
                        assert got is not None
                        return got
            remaining = (deadline - utcnow()).total_seconds()
            if remaining <= 0:
                return self._why_not(req, claim, time.monotonic() - waited_from)
            with anyio.move_on_after(min(remaining, 1.0)):
                await changed.wait()

    def _candidates(self, req: SessionRequested, claim: WorkerClaim | None) -> list[WorkerRecord]:
        out: list[WorkerRecord] = []
        for cached in self.workers.values():
            w = cached.value
            assert isinstance(w, WorkerRecord)
            if claim is not None and w.worker_id != claim.worker_id:
                continue
            if claim is None and w.tasklist != req.tasklist:
                continue
            if len(w.sessions) >= w.max_sessions or not self._placeable(w.worker_id):
                continue
            if w.interval * 2 > req.heartbeat_timeout:
                continue  # it would look lost between two of its own heartbeats
            out.append(w)
        out.sort(key=lambda w: (len(w.sessions) / max(w.max_sessions, 1), len(w.sessions)))
        return out

    def _why_not(
        self, req: SessionRequested, claim: WorkerClaim | None, waited: float
    ) -> tuple[SessionRejectReason, str]:
        waited_text = f"waited {waited:.1f}s (creation_timeout {req.creation_timeout:g}s)"
        if claim is not None:
            w = self.worker(claim.worker_id)
            state = "at capacity" if w is not None and self._placeable(w.worker_id) else "gone"
            return (SessionRejectReason.WORKER_UNAVAILABLE,
                    f"worker {claim.worker_id} on {claim.host_name or '?'} from the recreate token is not "
                    f"available ({state}); {waited_text}")  # fmt: skip
        mine = [c.value for c in self.workers.values()
                if isinstance(c.value, WorkerRecord) and c.value.tasklist == req.tasklist
                and self._placeable(c.value.worker_id)]  # fmt: skip
        if not mine:
            why = f"no live worker with sessions enabled serves tasklist {req.tasklist!r}; {waited_text}"
            return SessionRejectReason.NO_WORKER, why
        slow = [w for w in mine if w.interval * 2 > req.heartbeat_timeout]
        if len(slow) == len(mine):
            return (SessionRejectReason.NO_WORKER,
                    f"the workers of tasklist {req.tasklist!r} heartbeat every {min(w.interval for w in slow):g}s, "
                    f"too slowly for heartbeat_timeout {req.heartbeat_timeout:g}s (needs an interval of at most "
                    f"half of it); {waited_text}")  # fmt: skip
        used = sum(len(w.sessions) for w in mine)
        slots = sum(w.max_sessions for w in mine)
        return (SessionRejectReason.CAPACITY,
                f"all {len(mine)} workers of tasklist {req.tasklist!r} are at capacity ({used}/{slots} sessions); "
                f"{waited_text}")  # fmt: skip

    async def _reserve(self, wid: str, sid: str) -> bool:
        def add(cur: WorkerRecord | None) -> WorkerRecord | None:
            if cur is None or sid in cur.sessions or len(cur.sessions) >= cur.max_sessions:
                return None
            return cur.model_copy(update={"sessions": [*cur.sessions, sid]})

        after = await self._cas_worker(wid, add)
        return after is not None and sid in after.sessions

    async def _release(self, wid: str, sid: str) -> None:
        # Releases of one worker's slots are batched, one writer at a time: a hundred sessions
        # ending at once made a hundred compare-and-sets race on one key (quadratic retries; the
        # callers' completions waited seconds for the announcement that follows the release).
        pending = self._releasing.setdefault(wid, set())
        pending.add(sid)
        async with self._lock(f"release:{wid}"):
            if sid not in pending:
                return  # released by the batch of the writer before us
            batch = set(pending)

            def remove(cur: WorkerRecord | None) -> WorkerRecord | None:
                if cur is None or not batch.intersection(cur.sessions):
                    return None
                return cur.model_copy(update={"sessions": [s for s in cur.sessions if s not in batch]})

            await self._cas_worker(wid, remove)
            pending.difference_update(batch)

    async def _reject(self, fresh: SessionRecord, reason: SessionRejectReason, message: str) -> None:
        """Record the session as rejected (unless it opened or ended meanwhile) and announce the outcome."""
        rejected = fresh.model_copy(update={"state": SessionState.REJECTED, "cause": reason.value,
                                            "message": message, "ended_at": utcnow()})  # fmt: skip

        def reject(cur: SessionRecord | None) -> SessionRecord | None:
            if cur is None:
                return rejected
            if cur.state is not SessionState.PENDING:
                return None
            return cur.model_copy(update={"state": SessionState.REJECTED, "cause": reason.value, "message": message,
                                          "ended_at": utcnow()})  # fmt: skip

        record = await self._cas_session(fresh.session_id, reject)
        if record is not None and record.ended:
            await self._announce_end(record)
        elif record is not None and record.state is SessionState.OPEN:
            await self._announce_open(record)

    async def _announce_open(self, record: SessionRecord) -> None:
        worker = self.worker(record.worker_id)
        assert self._signer is not None
        b = self.bus
        token = self._signer.sign(WorkerClaim(record.worker_id, record.host_name, record.tasklist,
                                              record.session_id, time.time()))  # fmt: skip
        opened = SessionOpened(event_id=f"opened-{record.session_id}", worker_id=record.worker_id,
                               session_id=record.session_id, expires_at=record.expires_at)  # fmt: skip
        # The worker's notice is stored in the task stream before the caller hears of the session:
        # any task the caller sends afterwards follows it in that stream, whatever the topology
        # (on a cluster the session and task streams have different leaders, so sending both at
        # once let a caller's task overtake the notice). A worker handed a task before the notice
        # (the notice's delivery lost and redelivered later) reads the session's record instead.
        await b.publish(opened)
        await b.publish(SessionAssigned(
            event_id=f"assigned-{record.session_id}", session_id=record.session_id, tasklist=record.tasklist,
            worker_id=record.worker_id, host_name=record.host_name or (worker.host_name if worker else ""),
            heartbeat_timeout=record.heartbeat_timeout, expires_at=record.expires_at or utcnow(),
            recreate_token=token,
        ))  # fmt: skip

    # ------------------------------------------------------------ ending

    async def _on_complete(self, req: SessionCompleteRequested, delivery: Delivery) -> None:
        record = self.session(req.session_id) or (await self.session_record(req.session_id))[0]
        if record is None or record.state is SessionState.PENDING:
            # Withdrawn before it opened (the caller gave up waiting): recorded, so a placement
            # still under way cannot open it.
            fresh = record or SessionRecord(session_id=req.session_id, requested_by=req.source)
            await self._reject(fresh, SessionRejectReason.ABANDONED,
                               f"withdrawn by the caller: {req.reason or 'no reason given'}")  # fmt: skip
            return
        await self.end(record.session_id, SessionState.COMPLETED, "", req.reason or "completed by the caller")

    async def end(self, sid: str, state: SessionState, cause: str, message: str) -> bool:
        """End an open session (completed or failed); False if it was not open. Idempotent."""
        record = self.session(sid) or (await self.session_record(sid))[0]
        if record is None:
            return False
        if record.state is not SessionState.OPEN:
            if record.ended and not record.announced:
                await self._announce_end(record)
            return False
        kind = CancelKind.SESSION_COMPLETED if state is SessionState.COMPLETED else CancelKind.SESSION_FAILED
        why = CancelCause(kind=kind, who="broker", reason=f"{cause}: {message}" if cause else message)
        # The worker hears first: its own count drops before the slot is free for another session.
        await self.bus.publish(SessionClosed(event_id=f"closed-{sid}", worker_id=record.worker_id, session_id=sid,
                                             state=state, cause=why))  # fmt: skip

        written: list[SessionRecord] = []

        def close(cur: SessionRecord | None) -> SessionRecord | None:
            if cur is None or cur.state is not SessionState.OPEN:
                return None
            written.append(cur.model_copy(update={"state": state, "cause": cause, "message": message,
                                                  "ended_at": utcnow()}))  # fmt: skip
            return written[-1]

        after = await self._cas_session(sid, close)
        # Only the replica whose write ended the session announces it: the stream would drop a
        # second announcement, but core subscribers (every caller) would hear it twice.
        if after is None or not written or after is not written[-1]:
            return False
        # The slot is free before the caller hears the end (the spec: free as soon as completion is
        # acknowledged); a crash in between is announced by the sweep.
        await self._release(after.worker_id, sid)
        await self._announce_end(after)
        return True

    async def _announce_end(self, record: SessionRecord) -> None:
        sid = record.session_id
        event: Event
        if record.state is SessionState.COMPLETED:
            event = SessionCompleted(event_id=f"end-{sid}", session_id=sid, worker_id=record.worker_id)
        elif record.state is SessionState.FAILED:
            event = SessionFailed(event_id=f"end-{sid}", session_id=sid, worker_id=record.worker_id,
                                  cause=SessionFailure(record.cause), message=record.message)  # fmt: skip
        elif record.state is SessionState.REJECTED:
            reason = SessionRejectReason(record.cause or "capacity")
            event = SessionRejected(event_id=f"end-{sid}", session_id=sid, reason=reason, message=record.message)
        else:
            return
        # One id for every outcome of a session: the stream stores the first announcement only.
        await self.bus.publish(event)
        if not record.announced:
            await self._cas_session(sid, lambda cur: cur.model_copy(update={"announced": True})
                                    if cur is not None and cur.ended and not cur.announced else None)  # fmt: skip

    async def _fail_all(self, worker: WorkerRecord, cause: SessionFailure, message: str) -> None:
        async with anyio.create_task_group() as tg:
            for sid in list(worker.sessions):
                tg.start_soon(self._fail_one, sid, cause, message)

    async def _fail_one(self, sid: str, cause: SessionFailure, message: str) -> None:
        if sid in self._ending:
            return
        self._ending.add(sid)
        try:
            await self.end(sid, SessionState.FAILED, cause.value, message)
        except (bus.CadenzaError, nats.errors.Error) as exc:
            _log.warning("could not fail session %s (%s); the next sweep retries: %s", sid, cause.value, exc)
        finally:
            self._ending.discard(sid)

    # ------------------------------------------------------------ the sweep

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        # A step of the sweep that fails is taken again by a later sweep (every step is idempotent):
        # an engine error (a node restart, an election) must never end the broker's task group.
        try:
            await fn(*args)
        except (bus.CadenzaError, nats.errors.Error, TimeoutError) as exc:
            _log.warning("%s failed; the next sweep retries: %r", fn.__name__, exc)
        except Exception:
            _log.exception("%s failed unexpectedly; the next sweep retries", fn.__name__)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except (bus.CadenzaError, nats.errors.Error, TimeoutError) as exc:
                _log.warning("sweep failed: %r", exc)
            except Exception:
                _log.exception("sweep failed unexpectedly")
            await anyio.sleep(self.config.sweep_interval)

    async def sweep(self) -> None:
        """One pass: fail sessions of silent or stopped workers and expired sessions, free slots of
        ended sessions, announce cut-off outcomes, forget long-silent workers."""
        now = utcnow()
        for cached in list(self.sessions.values()):
            rec = cached.value
            assert isinstance(rec, SessionRecord)
            sid = rec.session_id
            if rec.state is SessionState.OPEN and sid not in self._ending:
                seen = self.seen.get(rec.worker_id)
                silence = self.silence(rec.worker_id)
                if seen is not None and seen.stopped:
                    why = f"worker {rec.worker_id} on {rec.host_name or '?'} shut down ({seen.stopped})"
                    self._spawn(self._fail_one, sid, SessionFailure.WORKER_SHUTDOWN, why)
                elif silence > rec.heartbeat_timeout or (seen is not None and seen.gone):
                    self._ending.add(sid)
                    self._spawn(self._end_lost, sid, rec, silence)
                elif seen is not None and silence > 1.5 * seen.interval:
                    self._maybe_probe(rec.worker_id, seen)
                elif rec.expires_at is not None and rec.expires_at <= now:
                    self._spawn(self._fail_one, sid, SessionFailure.EXECUTION_TIMEOUT,
                                f"open longer than its execution_timeout of {rec.execution_timeout:g}s")  # fmt: skip
            elif rec.ended and rec.announced and rec.ended_at is not None and \
                    (now - rec.ended_at).total_seconds() > self.config.retention:  # fmt: skip
                self._spawn(self._prune, sid)
            elif rec.ended and not rec.announced and rec.ended_at is not None and \
                    (now - rec.ended_at).total_seconds() > 2.0 and sid not in self._ending:  # fmt: skip
                self._spawn(self._announce_end, rec)
        for cached in list(self.workers.values()):
            w = cached.value
            assert isinstance(w, WorkerRecord)
            for sid in w.sessions:
                held = self.session(sid)
                if held is None:
                    # Reserved, but the record never came (the broker died between the two steps
                    # and the request was not redelivered in time): freed after a grace period.
                    first = self._orphans.setdefault(sid, time.monotonic())
                    if time.monotonic() - first > self.config.orphan_grace:
                        self._orphans.pop(sid, None)
                        self._spawn(self._release, w.worker_id, sid)
                    continue
                self._orphans.pop(sid, None)
                if held.ended and (now - (held.ended_at or now)).total_seconds() > 2.0:
                    self._spawn(self._release, w.worker_id, sid)
            seen = self.seen.get(w.worker_id)
            interval = seen.interval if seen is not None else w.interval
            if not w.sessions and self.silence(w.worker_id) > self.config.forget_factor * interval:
                self._spawn(self._forget_worker, w.worker_id)

    async def _prune(self, sid: str) -> None:
        assert self._kv_sessions is not None
        kv = self._kv_sessions
        with contextlib.suppress(nats.errors.Error, bus.CadenzaError):
            await bus.retry_transient(lambda: kv.purge(sid), what=f"prune {sid}", budget=5.0)
            self.sessions.pop(sid, None)

    def _maybe_probe(self, wid: str, seen: _Seen) -> None:
        mono = time.monotonic()
        if mono - seen.probed_at < max(seen.interval, 1.0):
            return
        seen.probed_at = mono
        self._spawn(self._probe, wid, seen)

    async def _probe(self, wid: str, seen: _Seen) -> None:
        """Ask a worker whose heartbeat is late whether its process is still connected.

        "No responders" twice in a row (a second apart at least, while this broker is connected)
        means the process's connection is closed: its sessions fail now rather than at the
        heartbeat timeout. An answer or silence changes nothing else.
        """
        b = self.bus
        try:
            pong = await b.request(b.rpc_subject(wid, "ping"), WorkerPing(), WorkerPong,
                                   timeout=min(seen.interval, 2.0))  # fmt: skip
        except bus.RequestError as exc:
            if isinstance(exc.__cause__, nats.errors.NoRespondersError) and self._settled_connection():
                seen.suspect += 1
                if seen.suspect >= 2:
                    seen.gone = "its connection is closed (nobody answers on its ping subject)"
            return
        if pong.worker_id == wid:
            # Connected: not gone. The heartbeat timeout still decides, as the spec says (an
            # answer is not a heartbeat: a worker that cannot store heartbeats is lost all the same).
            seen.suspect = 0

    def _settled_connection(self) -> bool:
        """Connected, and not reconnected in the last 10 s (after an outage, workers reconnect a
        little later than the broker: their empty ping subject then proves nothing)."""
        nc = self.bus.nc
        count = int(nc.stats.get("reconnects", 0))
        mono = time.monotonic()
        if count != self._reconnects[0]:
            self._reconnects = (count, mono)
        return nc.is_connected and mono - self._reconnects[1] > 10.0

    async def _stored_silence(self, wid: str) -> float | None:
        """Seconds since the newest heartbeat (or start) of ``wid`` the server stores, by the server's
        timestamps; None if it cannot tell. Checked before declaring a worker lost, so a broker that
        fell behind on the heartbeat stream (busy, or just restarted) does not fail a live worker."""
        async with self._lock(f"stored-{wid}"):
            hit = self._stored.get(wid)
            if hit is not None and time.monotonic() - hit[0] < 0.2:
                return hit[1]
            b = self.bus
            newest = None
            for event in ("heartbeat", "started"):
                try:
                    with anyio.fail_after(b.timeouts.request):
                        msg = await b.js.get_last_msg(b.topology.stream_name("worker"),
                                                      b.subjects.build("worker", wid, event))  # fmt: skip
                except nats.js.errors.NotFoundError:
                    continue
                except (TimeoutError, nats.errors.Error):
                    return None
                if msg.time is not None and (newest is None or msg.time > newest):
                    newest = msg.time
            silence = float("inf") if newest is None else max(0.0, (utcnow() - newest).total_seconds())
            self._stored[wid] = (time.monotonic(), silence)
            return silence

    async def _end_lost(self, sid: str, rec: SessionRecord, silence: float) -> None:
        try:
            seen = self.seen.get(rec.worker_id)
            if seen is None or not seen.gone:
                stored = await self._stored_silence(rec.worker_id)
                if stored is not None and stored <= rec.heartbeat_timeout:
                    # Alive after all: this broker was behind on the heartbeat stream.
                    if seen is not None:
                        seen.at = max(seen.at, time.monotonic() - stored)
                    return
                if stored is not None:
                    silence = max(silence, stored) if silence != float("inf") else stored
            if seen is not None and seen.gone:
                text = f"is gone: {seen.gone}, {silence:.1f}s after its last heartbeat"
            elif silence == float("inf"):
                text = "was never heard from"
            else:
                text = f"sent no heartbeat for {silence:.1f}s"
            await self.end(sid, SessionState.FAILED, SessionFailure.WORKER_LOST.value,
                           f"worker {rec.worker_id} on {rec.host_name or '?'} {text} "
                           f"(heartbeat_timeout {rec.heartbeat_timeout:g}s)")  # fmt: skip
        except (bus.CadenzaError, nats.errors.Error) as exc:
            _log.warning("could not fail session %s (worker_lost); the next sweep retries: %s", sid, exc)
        finally:
            self._ending.discard(sid)
