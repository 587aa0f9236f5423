"""Who is there: the workers' last signs of life, whether a request found anybody subscribed, and
whether this connection is settled.

:func:`follow_worker_signs` follows the ``worker`` stream from each worker's last event on, like
:func:`~bus.transport.follow_worker_events`, but tells when it caught up from its consumer's pending
count rather than by reading the stream's last message: the broker's user may create consumers on
the worker stream but not read its messages directly (deploy/nats/accounts.conf).

The broker asks a worker whose heartbeat is late on the worker's ping subject. NATS answers "no
responders" at once when nobody is subscribed there, which tells a process whose connection is
closed from a slow one; it proves something only while this side's own connection is up and has
been for a while (after an outage the others reconnect a little later).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.js.api import DeliverPolicy

from schemas import WorkerHeartbeat, WorkerStarted, WorkerStopped, utcnow

from .._exceptions import CadenzaError, ValidationError
from ._bus import Bus
from ._codec import decode
from ._errors import engine_errors

__all__ = ("LinkStatus", "follow_worker_signs", "link_status", "nobody_subscribed")

_WORKER_EVENTS = (WorkerStarted, WorkerHeartbeat, WorkerStopped)


async def follow_worker_signs(
    bus: Bus,
    on_event: Callable[[WorkerStarted | WorkerHeartbeat | WorkerStopped, datetime], None],
    *,
    consumer: str,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_event(event, stored_at)`` for each worker's last event, then for each new one.

    Ready once the backlog the consumer started with was delivered; bad input is dead-lettered under
    ``consumer``. Returns when the subscription ends (run it under :func:`~bus.run_restarting`).

    Raises:
        BusError: the stream is not available or the subscription failed.
    """
    with engine_errors("follow the workers' events"):
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
                    event = decode(msg.data, msg.headers, _WORKER_EVENTS)
                except ValidationError as exc:
                    with contextlib.suppress(CadenzaError):
                        await bus.dead_letter(consumer=consumer, subject=msg.subject, data=msg.data,
                                              headers=msg.headers, reason=exc.message, error_type=exc.kind,
                                              stream=meta.stream, stream_seq=meta.sequence.stream)  # fmt: skip
                else:
                    assert isinstance(event, _WORKER_EVENTS)
                    on_event(event, meta.timestamp or utcnow())
                if backlog and meta.num_pending == 0:
                    backlog = 0
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def nobody_subscribed(exc: BaseException) -> bool:
    """True if ``exc`` (a :class:`~bus.RequestError`) came from a request that nobody was subscribed to."""
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            return False
        if isinstance(cur, nats.errors.NoRespondersError):
            return True
        cur = cur.__cause__
    return False


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """This process's connection to NATS: up or not, and how many times it was re-established."""

    connected: bool
    reconnects: int


def link_status(bus: Bus) -> LinkStatus:
    """The connection's status now."""
    nc = bus.nc
    return LinkStatus(nc.is_connected, int(nc.stats.get("reconnects", 0)))
