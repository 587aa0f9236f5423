"""The broker's sweeping job: every ``sweep_interval``, a pass over the caches.

It fails the sessions of stopped, silent or gone workers (a silent one only after the server's own
timestamps agree, see ``_liveness``), fails sessions open past their ``execution_timeout``, announces
outcomes a crash cut off, frees slots of ended sessions (and, after ``orphan_grace``, slots
reserved for a session that never got a record), prunes ended records after ``retention`` and
forgets long-silent workers without sessions. Each step runs as its own task and is idempotent: a
step that fails is taken again by a later sweep.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING

import anyio

from schemas import SessionFailure, SessionRecord, SessionState, WorkerRecord, utcnow

from ._announcing import SETTLE, unannounced_past_settle
from ._errors import STEP_ERRORS

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ("Sweeping",)

_log = logging.getLogger("cadenza.broker")


class Sweeping:
    """Sweeps for the :class:`~services.broker.Broker` ``broker``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        #: Slots reserved for a session without a record, since when (see :meth:`_sweep_worker`).
        self._orphans: dict[str, float] = {}

    async def loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except STEP_ERRORS as exc:
                _log.warning("sweep failed: %r", exc)
            except Exception:
                _log.exception("sweep failed unexpectedly")
            await anyio.sleep(self.broker.config.sweep_interval)

    async def sweep(self) -> None:
        """One pass: fail sessions of silent or stopped workers and expired sessions, free slots of
        ended sessions, announce cut-off outcomes, forget long-silent workers."""
        now = utcnow()
        for cached in list(self.broker.sessions.values()):
            self._sweep_session(cached.value, now)
        for entry in list(self.broker.workers.values()):
            self._sweep_worker(entry.value, now)

    def _sweep_session(self, rec: SessionRecord, now: datetime) -> None:
        b = self.broker
        sid = rec.session_id
        if rec.state is SessionState.OPEN and sid not in b.ending:
            seen = b.seen.get(rec.worker_id)
            silence = b.silence(rec.worker_id)
            if seen is not None and seen.stopped:
                why = f"worker {rec.worker_id} on {rec.host_name or '?'} shut down ({seen.stopped})"
                b.spawn(b.announcing.fail_one, sid, SessionFailure.WORKER_SHUTDOWN, why)
            elif silence > rec.heartbeat_timeout or (seen is not None and seen.gone):
                b.ending.add(sid)
                b.spawn(self._end_lost, sid, rec, silence)
            elif seen is not None and silence > 1.5 * seen.interval:
                b.liveness.maybe_probe(rec.worker_id, seen)
            elif rec.expires_at is not None and rec.expires_at <= now:
                b.spawn(b.announcing.fail_one, sid, SessionFailure.EXECUTION_TIMEOUT,
                        f"open longer than its execution_timeout of {rec.execution_timeout:g}s")  # fmt: skip
        elif rec.ended and rec.announced and rec.ended_at is not None and \
                (now - rec.ended_at).total_seconds() > b.config.retention:  # fmt: skip
            b.spawn(self._prune, sid)
        elif unannounced_past_settle(rec, now) and sid not in b.ending:
            b.spawn(b.announcing.announce_end, rec)

    def _sweep_worker(self, w: WorkerRecord, now: datetime) -> None:
        b = self.broker
        for sid in w.sessions:
            held = b.session(sid)
            if held is None:
                # Reserved, but the record never came (the broker died between the two steps
                # and the request was not redelivered in time): freed after a grace period.
                first = self._orphans.setdefault(sid, time.monotonic())
                if time.monotonic() - first > b.config.orphan_grace:
                    self._orphans.pop(sid, None)
                    b.spawn(b.placement.release, w.worker_id, sid)
                continue
            self._orphans.pop(sid, None)
            if held.ended and (now - (held.ended_at or now)).total_seconds() > SETTLE:
                b.spawn(b.placement.release, w.worker_id, sid)
        seen = b.seen.get(w.worker_id)
        interval = seen.interval if seen is not None else w.interval
        if not w.sessions and b.silence(w.worker_id) > b.config.forget_factor * interval:
            b.spawn(b.liveness.forget_worker, w.worker_id)

    async def _prune(self, sid: str) -> None:
        with contextlib.suppress(*STEP_ERRORS):
            await self.broker.session_store.purge(sid, budget=5.0)

    async def _end_lost(self, sid: str, rec: SessionRecord, silence: float) -> None:
        b = self.broker
        try:
            seen = b.seen.get(rec.worker_id)
            if seen is None or not seen.gone:
                stored = await b.liveness.stored_silence(rec.worker_id)
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
            await b.end(sid, SessionState.FAILED, SessionFailure.WORKER_LOST.value,
                        f"worker {rec.worker_id} on {rec.host_name or '?'} {text} "
                        f"(heartbeat_timeout {rec.heartbeat_timeout:g}s)")  # fmt: skip
        except STEP_ERRORS as exc:
            _log.warning("could not fail session %s (worker_lost); the next sweep retries: %s", sid, exc)
        finally:
            b.ending.discard(sid)
