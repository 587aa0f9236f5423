"""Follow what the services keep: a key-value bucket, or every worker's last sign of life.

* :func:`follow_bucket`: every key as stored, then each change, live (a read-only cache).
* :func:`follow_worker_events`: the ``worker`` stream from each worker's last started / heartbeat /
  stopped on, with the server's time of storing (so a late reader sees how old a beat is).

The broker and the recorder keep their own loops (written before these); new readers use these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.js.api import DeliverPolicy

from schemas import WorkerHeartbeat, WorkerStarted, WorkerStopped, utcnow

from ._bus import Bus
from ._codec import decode
from ._exceptions import BusError, CadenzaError, ValidationError

__all__ = ("WORKER_EVENTS", "follow_bucket", "follow_worker_events")

WORKER_EVENTS = (WorkerStarted, WorkerHeartbeat, WorkerStopped)
WorkerEvent = WorkerStarted | WorkerHeartbeat | WorkerStopped


async def follow_bucket(
    bus: Bus,
    key: str,
    on_put: Callable[[str, bytes, int], None],
    on_delete: Callable[[str], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_put(key, value, revision)`` for every stored key, then for each change, until cancelled.

    Ready (``task_status.started()``) once the stored keys were delivered. Keys starting with ``_``
    (the services' own bookkeeping) are skipped.

    Raises:
        BusError: the bucket is not available.
    """
    kv = await bus.kv(key)
    try:
        watcher = await kv.watchall()
    except nats.errors.Error as exc:
        raise BusError(f"cannot watch the {key} bucket: {exc}") from exc
    ready = False
    try:
        async for entry in watcher:
            if entry is not None and not entry.key.startswith("_"):
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    on_delete(entry.key)
                else:
                    on_put(entry.key, entry.value, entry.revision or 0)
            if not ready and (entry is None or entry.delta == 0):
                ready = True
                task_status.started()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated


async def follow_worker_events(
    bus: Bus,
    on_event: Callable[[WorkerEvent, datetime], None],
    *,
    consumer: str | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_event(event, stored_at)`` for each worker's last events, then for each new one.

    Ready once the stored backlog was delivered. Bad input is dead-lettered under ``consumer``
    (skipped silently when None: a reader that only shows what it sees leaves that to the services).
    """
    sub = await bus.js.subscribe(
        bus.subjects.domain_wildcard("worker"), stream=bus.topology.stream_name("worker"), ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, pending_msgs_limit=1_000_000,
    )  # fmt: skip
    try:
        backlog = (await sub.consumer_info()).num_pending
        if not backlog:
            task_status.started()
        async for msg in sub.messages:
            meta = msg.metadata
            try:
                event = decode(msg.data, msg.headers, WORKER_EVENTS)
            except ValidationError as exc:
                if consumer is not None:
                    with contextlib.suppress(CadenzaError):
                        await bus.dead_letter(consumer=consumer, subject=msg.subject, data=msg.data,
                                              headers=msg.headers, reason=exc.message, error_type=exc.kind,
                                              stream=meta.stream, stream_seq=meta.sequence.stream)  # fmt: skip
            else:
                assert isinstance(event, WORKER_EVENTS)
                on_event(event, meta.timestamp or utcnow())
            if backlog and meta.num_pending == 0:
                backlog = 0
                task_status.started()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
