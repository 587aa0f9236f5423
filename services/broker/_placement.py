"""The broker's placement job: a request -> candidate workers -> a slot reserved -> the session opened, or rejected.

Steps, each idempotent: reserve a slot on a worker (compare-and-set on its record), create the
session record as open (create: fails if the caller withdrew meanwhile, then the slot is given
back), tell the worker and announce (``_announcing``). A redelivery after a crash finds the
reservation or the record and carries on from there. A request waits for a slot until its
``creation_timeout``; a rejection says why (no worker, capacity, a slow heartbeat, a bad token).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio

from bus import Delivery
from schemas import SessionRecord, SessionRejectReason, SessionRequested, SessionState, WorkerRecord, utcnow

from ._tokens import TokenError, WorkerClaim

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ("Placement",)

#: Why a request got no slot: the reason and the message for the caller.
Refusal = tuple[SessionRejectReason, str]


class Placement:
    """Places the sessions requested of the :class:`~services.broker.Broker` ``broker``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        #: Slots waiting to be released, by worker (see :meth:`release`).
        self._releasing: dict[str, set[str]] = {}

    async def on_request(self, req: SessionRequested, delivery: Delivery) -> None:
        b, announcing = self.broker, self.broker.announcing
        sid = req.session_id
        redelivered = delivery.deliveries > 1
        record = (await b.session_record(sid))[0] if redelivered else b.session(sid)
        if record is not None and record.state is SessionState.OPEN:
            await announcing.announce_open(record)
            return
        if record is not None and record.ended:
            await announcing.announce_end(record)
            return
        deadline = req.time + timedelta(seconds=req.creation_timeout)
        fresh = SessionRecord(
            session_id=sid, tasklist=req.tasklist, heartbeat_timeout=req.heartbeat_timeout,
            execution_timeout=req.execution_timeout, requested_at=req.time, creation_deadline=deadline,
            requested_by=req.source,
        )  # fmt: skip
        claim = self._claim(req)
        if isinstance(claim, tuple):
            await self.reject(fresh, *claim)
            return
        if claim is not None:
            fresh = fresh.model_copy(update={"recreated_from": claim.session_id})
        placed = (self._holder(sid) if redelivered else None) or await self._place(req, deadline, claim)
        if isinstance(placed, tuple):
            await self.reject(fresh, *placed)
            return
        await self._open(req, fresh, placed)

    def _claim(self, req: SessionRequested) -> WorkerClaim | Refusal | None:
        """The worker a recreate token names (None: no token), or why the token is refused."""
        if req.recreate_token is None:
            return None
        assert self.broker.signer is not None
        try:
            claim = self.broker.signer.verify(req.recreate_token)
        except TokenError as exc:
            return SessionRejectReason.BAD_TOKEN, str(exc)
        age, max_age = time.time() - claim.issued_at, self.broker.config.token_max_age
        if age > max_age:
            return (SessionRejectReason.BAD_TOKEN, f"the recreate token expired: issued {age / 86_400:.1f} days ago, "
                    f"tokens last {max_age / 86_400:g} days")  # fmt: skip
        return claim

    async def _open(self, req: SessionRequested, fresh: SessionRecord, worker: WorkerRecord) -> None:
        """Record the session as open on ``worker`` (its slot reserved) and announce it; else give the slot back."""
        announcing, sid = self.broker.announcing, req.session_id
        now = utcnow()
        opened = fresh.model_copy(update={
            "state": SessionState.OPEN, "worker_id": worker.worker_id, "host_name": worker.host_name,
            "opened_at": now, "expires_at": now + timedelta(seconds=req.execution_timeout),
        })  # fmt: skip
        stored = await self.broker.session_store.update(sid, lambda cur: opened if cur is None else None)
        if stored is opened:
            await announcing.announce_open(opened)
            return
        if stored is not None and stored.state is SessionState.OPEN and stored.worker_id == worker.worker_id:
            await announcing.announce_open(stored)  # opened by an earlier delivery of this request
            return
        # Withdrawn (or rejected) while we placed it: give the slot back.
        await self.release(worker.worker_id, sid)
        if stored is not None and stored.ended:
            await announcing.announce_end(stored)

    def _holder(self, sid: str) -> WorkerRecord | None:
        """The worker already holding a slot for ``sid`` (a redelivered request after a crash)."""
        for cached in self.broker.workers.values():
            if sid in cached.value.sessions:
                return cached.value
        return None

    async def _place(
        self, req: SessionRequested, deadline: datetime, claim: WorkerClaim | None
    ) -> WorkerRecord | Refusal:
        """Reserve a slot for the session, waiting for one until ``deadline``; else why not."""
        b = self.broker
        waited_from = time.monotonic()
        b.waiting[req.session_id] = req.tasklist
        try:
            while True:
                changed = b.changed
                async with b.lock(claim.worker_id if claim else req.tasklist):
                    for record in self._candidates(req, claim):
                        if await self._reserve(record.worker_id, req.session_id):
                            got = b.worker(record.worker_id)
                            assert got is not None
                            return got
                remaining = (deadline - utcnow()).total_seconds()
                if remaining <= 0:
                    return self._why_not(req, claim, time.monotonic() - waited_from)
                with anyio.move_on_after(min(remaining, 1.0)):
                    await changed.wait()
        finally:
            b.waiting.pop(req.session_id, None)

    def _candidates(self, req: SessionRequested, claim: WorkerClaim | None) -> list[WorkerRecord]:
        out: list[WorkerRecord] = []
        for cached in self.broker.workers.values():
            w = cached.value
            if claim is not None and w.worker_id != claim.worker_id:
                continue
            if claim is None and w.tasklist != req.tasklist:
                continue
            if len(w.sessions) >= w.max_sessions or not self.broker.placeable(w.worker_id):
                continue
            if w.interval * 2 > req.heartbeat_timeout:
                continue  # it would look lost between two of its own heartbeats
            out.append(w)
        out.sort(key=lambda w: (len(w.sessions) / max(w.max_sessions, 1), len(w.sessions)))
        return out

    def _why_not(self, req: SessionRequested, claim: WorkerClaim | None, waited: float) -> Refusal:
        b = self.broker
        waited_text = f"waited {waited:.1f}s (creation_timeout {req.creation_timeout:g}s)"
        if claim is not None:
            w = b.worker(claim.worker_id)
            state = "at capacity" if w is not None and b.placeable(w.worker_id) else "gone"
            return (SessionRejectReason.WORKER_UNAVAILABLE,
                    f"worker {claim.worker_id} on {claim.host_name or '?'} from the recreate token is not "
                    f"available ({state}); {waited_text}")  # fmt: skip
        mine = [w for c in b.workers.values() if (w := c.value).tasklist == req.tasklist and b.placeable(w.worker_id)]
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

        after = await self.broker.worker_store.update(wid, add)
        return after is not None and sid in after.sessions

    async def release(self, wid: str, sid: str) -> None:
        """Give the slot of ``sid`` on worker ``wid`` back."""
        # Releases of one worker's slots are batched, one writer at a time: a hundred sessions
        # ending at once made a hundred compare-and-sets race on one key (quadratic retries; the
        # callers' completions waited seconds for the announcement that follows the release).
        pending = self._releasing.setdefault(wid, set())
        pending.add(sid)
        async with self.broker.lock(f"release:{wid}"):
            if sid not in pending:
                return  # released by the batch of the writer before us
            batch = set(pending)

            def remove(cur: WorkerRecord | None) -> WorkerRecord | None:
                if cur is None or not batch.intersection(cur.sessions):
                    return None
                return cur.model_copy(update={"sessions": [s for s in cur.sessions if s not in batch]})

            await self.broker.worker_store.update(wid, remove)
            pending.difference_update(batch)

    async def reject(self, fresh: SessionRecord, reason: SessionRejectReason, message: str) -> None:
        """Record the session as rejected (unless it opened or ended meanwhile) and announce the outcome."""
        announcing = self.broker.announcing
        rejected = fresh.model_copy(update={"state": SessionState.REJECTED, "cause": reason.value,
                                            "message": message, "ended_at": utcnow()})  # fmt: skip

        def reject(cur: SessionRecord | None) -> SessionRecord | None:
            if cur is None:
                return rejected
            if cur.state is not SessionState.PENDING:
                return None
            return cur.model_copy(update={"state": SessionState.REJECTED, "cause": reason.value, "message": message,
                                          "ended_at": utcnow()})  # fmt: skip

        record = await self.broker.session_store.update(fresh.session_id, reject)
        if record is not None and record.ended:
            await announcing.announce_end(record)
        elif record is not None and record.state is SessionState.OPEN:
            await announcing.announce_open(record)
