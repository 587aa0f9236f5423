"""The broker's announcing job: a session opened or ended, told to its worker and announced.

A session opens with two events: the worker's notice (``SessionOpened``, stored in the task stream)
first, then the caller's (``SessionAssigned``, with a recreate token). It ends (completed by its
caller, failed by the broker) with ``SessionClosed`` to the worker first, its record ended by
compare-and-set, its slot given back, then one announcement (completed / failed / rejected) under
one event id per session, so the stream stores the first only. An outcome a crash cut off is
announced by the sweep (the record's ``announced`` flag says whether it was).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING

import anyio

from bus import Delivery
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
    SessionState,
    WorkerRecord,
    utcnow,
)

from ._errors import STEP_ERRORS
from ._tokens import WorkerClaim

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ("SETTLE", "Announcing", "unannounced_past_settle")

_log = logging.getLogger("cadenza.broker")

#: Seconds an ended session waits for its own writer's release and announcement before another
#: replica (or the sweep) announces it.
SETTLE = 2.0


def unannounced_past_settle(record: SessionRecord, now: datetime) -> bool:
    """Whether ``record`` ended more than :data:`SETTLE` seconds before ``now`` and is still not
    announced (its writer was cut off: another replica or the sweep announces it)."""
    return record.ended and not record.announced and record.ended_at is not None and \
        (now - record.ended_at).total_seconds() > SETTLE  # fmt: skip


class Announcing:
    """Opens and ends the sessions of the :class:`~services.broker.Broker` ``broker`` in the open."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def announce_open(self, record: SessionRecord) -> None:
        b = self.broker
        worker = b.worker(record.worker_id)
        assert b.signer is not None
        token = b.signer.sign(WorkerClaim(record.worker_id, record.host_name, record.tasklist,
                                          record.session_id, time.time()))  # fmt: skip
        opened = SessionOpened(event_id=f"opened-{record.session_id}", worker_id=record.worker_id,
                               session_id=record.session_id, expires_at=record.expires_at)  # fmt: skip
        # The worker's notice is stored in the task stream before the caller hears of the session:
        # any task the caller sends afterwards follows it in that stream, whatever the topology
        # (on a cluster the session and task streams have different leaders, so sending both at
        # once let a caller's task overtake the notice). A worker handed a task before the notice
        # (the notice's delivery lost and redelivered later) reads the session's record instead.
        await b.bus.publish(opened)
        await b.bus.publish(SessionAssigned(
            event_id=f"assigned-{record.session_id}", session_id=record.session_id, tasklist=record.tasklist,
            worker_id=record.worker_id, host_name=record.host_name or (worker.host_name if worker else ""),
            heartbeat_timeout=record.heartbeat_timeout, expires_at=record.expires_at or utcnow(),
            recreate_token=token,
        ))  # fmt: skip

    async def on_complete(self, req: SessionCompleteRequested, delivery: Delivery) -> None:
        b = self.broker
        record = b.session(req.session_id) or (await b.session_record(req.session_id))[0]
        if record is None or record.state is SessionState.PENDING:
            # Withdrawn before it opened (the caller gave up waiting): recorded, so a placement
            # still under way cannot open it.
            fresh = record or SessionRecord(session_id=req.session_id, requested_by=req.source)
            await b.placement.reject(fresh, SessionRejectReason.ABANDONED,
                                     f"withdrawn by the caller: {req.reason or 'no reason given'}")  # fmt: skip
            return
        await self.end(record.session_id, SessionState.COMPLETED, "", req.reason or "completed by the caller")

    async def end(self, sid: str, state: SessionState, cause: str, message: str) -> bool:
        """End an open session (completed or failed); False if it was not open. Idempotent."""
        b = self.broker
        record = b.session(sid) or (await b.session_record(sid))[0]
        if record is None:
            return False
        if record.state is not SessionState.OPEN:
            # Ended already: by another replica (two replicas fail a lost worker's sessions at once),
            # which announces it, or before a crash cut its announcement off. Only the second is
            # announced here, once the end has had time to settle: announcing at once made both
            # replicas announce a failure (the stream stores one, but every caller hears both).
            if unannounced_past_settle(record, utcnow()):
                await self.announce_end(record)
            return False
        kind = CancelKind.SESSION_COMPLETED if state is SessionState.COMPLETED else CancelKind.SESSION_FAILED
        why = CancelCause(kind=kind, who="broker", reason=f"{cause}: {message}" if cause else message)
        # The worker hears first: its own count drops before the slot is free for another session.
        await b.bus.publish(SessionClosed(event_id=f"closed-{sid}", worker_id=record.worker_id, session_id=sid,
                                          state=state, cause=why))  # fmt: skip

        written: list[SessionRecord] = []

        def close(cur: SessionRecord | None) -> SessionRecord | None:
            if cur is None or cur.state is not SessionState.OPEN:
                return None
            written.append(cur.model_copy(update={"state": state, "cause": cause, "message": message,
                                                  "ended_at": utcnow()}))  # fmt: skip
            return written[-1]

        after = await b.session_store.update(sid, close)
        # Only the replica whose write ended the session announces it: the stream would drop a
        # second announcement, but core subscribers (every caller) would hear it twice.
        if after is None or not written or after is not written[-1]:
            return False
        # The slot is free before the caller hears the end (the spec: free as soon as completion is
        # acknowledged); a crash in between is announced by the sweep.
        await b.placement.release(after.worker_id, sid)
        await self.announce_end(after)
        return True

    async def announce_end(self, record: SessionRecord) -> None:
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
        await self.broker.bus.publish(event)
        if not record.announced:
            await self.broker.session_store.update(sid, _mark_announced)

    async def fail_all(self, worker: WorkerRecord, cause: SessionFailure, message: str) -> None:
        async with anyio.create_task_group() as tg:
            for sid in list(worker.sessions):
                tg.start_soon(self.fail_one, sid, cause, message)

    async def fail_one(self, sid: str, cause: SessionFailure, message: str) -> None:
        ending = self.broker.ending
        if sid in ending:
            return
        ending.add(sid)
        try:
            await self.end(sid, SessionState.FAILED, cause.value, message)
        except STEP_ERRORS as exc:
            _log.warning("could not fail session %s (%s); the next sweep retries: %s", sid, cause.value, exc)
        finally:
            ending.discard(sid)


def _mark_announced(cur: SessionRecord | None) -> SessionRecord | None:
    return cur.model_copy(update={"announced": True}) if cur is not None and cur.ended and not cur.announced else None
