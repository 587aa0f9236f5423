"""Follow what the services keep: a key-value bucket, every worker's last sign of life, the activities.

* :func:`follow_bucket`: every key as stored, then each change, live (a read-only cache).
* :func:`follow_worker_events`: the ``worker`` stream from each worker's last started / heartbeat /
  stopped on, with the server's time of storing (so a late reader sees how old a beat is).
* :func:`follow_activity_events`: the ``activity`` stream in stream order, from a position on (the
  stream is the activities' store: the recorder and every other reader fold it, see ``bus.tracking._fold``).

The broker's caches are :class:`~bus.transport.Bucket` watches; :func:`follow_bucket` is the same
watch for a reader that keeps the raw values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from schemas import Event, WorkerHeartbeat, WorkerStarted, WorkerStopped, utcnow

from .._exceptions import CadenzaError, NotFoundError, ValidationError
from ._bucket import IDLE_HEARTBEAT, RawBucket, Stored, ended
from ._bus import Bus
from ._codec import decode
from ._direct import ack_fields, in_background, take_directly
from ._errors import engine_errors

__all__ = ("WORKER_EVENTS", "follow_bucket", "follow_stream", "follow_worker_events", "last_stored_seq")

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
    (the services' own bookkeeping) are skipped. A read-only user of :meth:`RawBucket.follow`
    (a :class:`~bus.transport.Bucket` keeps a typed cache the same way).

    Raises:
        BusError: the bucket is not available.
    """

    async def on_change(stored: Stored) -> None:
        if stored.value is None:
            on_delete(stored.key)
        else:
            on_put(stored.key, stored.value, stored.revision)

    await RawBucket(bus, key).follow(on_change, task_status=task_status)


async def last_stored_seq(bus: Bus, domain: str) -> int:
    """The stream sequence of the last message stored on ``domain``'s stream (0: none).

    Raises:
        BusError: the server did not answer (transient) or refused.
    """
    try:
        with engine_errors(f"reading the end of the {domain} stream"):
            last = await bus.js.get_last_msg(bus.topology.stream_name(domain), bus.subjects.domain_wildcard(domain))
    except NotFoundError:
        return 0
    return last.seq or 0


async def follow_stream(
    bus: Bus,
    domain: str,
    accept: Sequence[type[Event]],
    on_msg: Callable[[Msg, Event | None], None],
    consumer: str | None,
    task_status: TaskStatus[None],
    **policy: Any,
) -> None:
    """One ordered consumer on ``domain``'s stream: ``on_msg(msg, event)`` for each message (``None``
    for input that does not validate, dead-lettered first under ``consumer`` when given), ready once
    every message stored before the start was handled. Returns when the subscription ends (then
    :func:`run_restarting` starts it again).

    Messages are taken as the connection reads them (:mod:`._direct`: nats-py's message iterator
    costs a task and an ``asyncio.wait`` per message, its callback a trip through the event loop).
    """
    stream, everything = bus.topology.stream_name(domain), bus.subjects.domain_wildcard(domain)
    last = await last_stored_seq(bus, domain)
    caught_up = anyio.Event()
    if last < policy.get("opt_start_seq", 1):
        caught_up.set()  # nothing stored from where it starts (the last stored message is always delivered)

    async def dead_letter(msg: Msg, exc: ValidationError, meta: Msg.Metadata) -> None:
        with contextlib.suppress(CadenzaError):
            await bus.dead_letter(consumer=consumer or "", subject=msg.subject, data=msg.data,
                                  headers=msg.headers, reason=exc.message, error_type=exc.kind,
                                  stream=meta.stream, stream_seq=meta.sequence.stream)  # fmt: skip

    def handle(msg: Msg) -> None:
        try:
            event: Event | None = decode(msg.data, msg.headers, accept)
        except ValidationError as exc:
            event = None
            if consumer is not None:  # in a task of its own: this runs in the connection's read loop
                in_background(dead_letter(msg, exc, msg.metadata))
        on_msg(msg, event)
        if not caught_up.is_set():  # the delivery's position is read only until then
            fields = ack_fields(msg.reply)
            if fields is None:
                meta = msg.metadata
                fields = (meta.sequence.stream, 0, meta.num_pending, 0)
            if fields[0] >= last or fields[2] == 0:
                caught_up.set()

    # No callback (nats-py would run it in a task of the subscription's): the subscription's queue
    # hands each message to ``handle`` as it is read; no byte limit, since nothing waits there.
    sub = await bus.js.subscribe(
        everything, stream=stream, ordered_consumer=True, idle_heartbeat=IDLE_HEARTBEAT,
        pending_bytes_limit=0, **policy,
    )  # fmt: skip
    take_directly(sub._sub, handle)
    try:
        await caught_up.wait()
        task_status.started()
        while not ended(bus, sub):  # noqa: ASYNC110 - nats-py gives no event for it
            await anyio.sleep(1.0)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


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

    def on_msg(msg: Msg, event: Event | None) -> None:
        if event is not None:
            assert isinstance(event, WORKER_EVENTS)
            on_event(event, msg.metadata.timestamp or utcnow())

    await follow_stream(bus, "worker", WORKER_EVENTS, on_msg, consumer, task_status,
                  deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)  # fmt: skip
