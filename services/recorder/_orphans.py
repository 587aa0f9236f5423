"""Tasks a lost worker left in its inbox: each one's activity ends ``failed`` (host lost).

A session worker announces an activity only when it still runs after ``announce_after`` (issue #10:
one stored event for a quick activity), so an activity whose worker was SIGKILLed before then, or
a task still queued in its inbox, has no event on the ``activity`` stream at all. The worker acks a
task only after its completion is stored, and the ``task`` stream is a work queue (an acked task is
removed), so what a gone worker's inbox still stores is exactly the work it never finished. The
recorder reads those tasks (by subject, without a consumer: the inbox has its own) and ends each
activity not already ended with a version-2 completion that carries its start (from the task),
``host_lost``, published like every finalisation with the first-completion rule: a completion the
worker did store stays.

Each gone worker's inbox is read now and then during ``window`` seconds after it was seen gone (or
after this recorder started, so a restarted recorder still looks once), at most ``per_sweep``
workers per sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

import bus
from bus.tracking import Entry, store_first_completion
from bus.transport import stored_events
from schemas import (
    ActivityCompleted,
    ActivityLevel,
    ActivityStart,
    ActivityStatus,
    ActivityTask,
    MessageEntry,
    SessionClosed,
    SessionOpened,
)

__all__ = ("OrphanSweep",)

_log = logging.getLogger("cadenza.recorder")

_INBOX_EVENTS = (ActivityTask, SessionOpened, SessionClosed)


@dataclass
class OrphanSweep:
    """The recorder's look at the inboxes of gone workers (one per recorder)."""

    window: float = 60.0
    every: float = 5.0
    per_sweep: int = 20
    #: worker id -> (loop time it was first seen gone, loop time its inbox was last read).
    _gone: dict[str, tuple[float, float]] = field(default_factory=dict)

    async def sweep(self, b: bus.Bus, gone: dict[str, str], records: Callable[[str], Entry | None]) -> int:
        """Read the inboxes due among ``gone`` (worker id -> why it is gone) and end what they hold;
        returns how many activities were ended."""
        now = anyio.current_time()
        due = []
        for wid in gone:
            first, last = self._gone.setdefault(wid, (now, -1e9))
            if now - first <= self.window and now - last >= self.every:
                due.append(wid)
        done = 0
        for wid in due[: self.per_sweep]:
            done += await self._read(b, wid, gone[wid], records)
            self._gone[wid] = (self._gone[wid][0], now)
        return done

    async def _read(self, b: bus.Bus, wid: str, why: str, records: Callable[[str], Entry | None]) -> int:
        inbox = b.subjects.build("task", wid, "inbox")
        done = 0
        for _, event in await stored_events(b, "task", inbox, _INBOX_EVENTS):
            if not isinstance(event, ActivityTask):
                continue  # session opened/closed notices, or input the worker dead-letters itself
            stored = records(event.activity_id)
            if stored is not None and (stored.record.terminal or stored.fold.announced):
                continue  # ended already, or announced: the host-lost sweep ends it
            await _end(b, event, why)
            done += 1
        return done


async def _end(b: bus.Bus, task: ActivityTask, why: str) -> None:
    aid = task.activity_id
    start = ActivityStart(
        started_at=task.time, activity_type=task.name, worker_id=task.worker_id or None,
        session_id=task.session_id or None,
    )  # fmt: skip
    event = ActivityCompleted(
        event_id=f"{aid}.completed", activity_id=aid, status=ActivityStatus.FAILED, error=why,
        final=MessageEntry(level=ActivityLevel.ERROR, message=why), final_seq=1, host_lost=True, start=start,
    )  # fmt: skip
    if not await store_first_completion(b, event):
        return  # the worker's own completion was stored first
    _log.warning("activity %s: %s (its task was left in the worker's inbox)", aid, why)
