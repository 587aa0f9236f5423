"""One heartbeat per process per interval: the liveness signal brokers and recorders watch."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from schemas import ActivityParameter, ActivitySignature, WorkerHeartbeat, WorkerStarted, WorkerStopped

from ._exceptions import CadenzaError
from .transport._bus import Bus

__all__ = ("Heartbeater", "ProcessLoad", "describe_activities", "new_worker_id")

_log = logging.getLogger("cadenza.heartbeat")


def new_worker_id(stem: str = "w") -> str:
    """A fresh worker id: ``<stem>-<host>-<pid>-<8 hex>``, valid as a subject token."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40] or "host"
    return f"{stem}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


def _written(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):  # postponed annotations: already as written
        return annotation[:512]
    return (getattr(annotation, "__name__", None) or repr(annotation))[:512]


def _signature(name: str, fn: Callable[..., Any]) -> ActivitySignature:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or a callable without a signature: say only its name
        return ActivitySignature(name=name)
    params = [
        ActivityParameter(
            name=p.name,
            kind=_KINDS[p.kind],
            annotation=_written(p.annotation),
            required=p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD),
            default=None if p.default is inspect.Parameter.empty else repr(p.default)[:512],
        )
        for p in list(sig.parameters.values())[:100]
    ]
    doc = (inspect.getdoc(fn) or "").strip().split("\n", 1)[0][:1024]
    return ActivitySignature(name=name, parameters=params, returns=_written(sig.return_annotation), doc=doc)


def describe_activities(activities: Mapping[str, Callable[..., Any]]) -> list[ActivitySignature]:
    """What a worker advertises in its started and heartbeat events: each activity's name and parameters."""
    return [_signature(name, fn) for name, fn in sorted(activities.items())[:1000]]


@dataclass(frozen=True, slots=True)
class ProcessLoad:
    """What a heartbeat reports about the process right now."""

    open_sessions: int = 0
    running_activities: int = 0
    peak_sessions: int = 0


@dataclass
class Heartbeater:
    """Announces a process, heartbeats every ``interval`` seconds, and says goodbye on a graceful stop.

    Run with ``await tg.start(hb.run)``: ``started`` is published before ``task_status.started()``.
    Cancelling the task publishes ``stopped`` (shielded, bounded by the bus shutdown timeout)
    unless :meth:`mark_crashed` was called.

    Args:
        bus: the bus to publish on.
        worker_id: identity of this process start (:func:`new_worker_id`).
        interval: seconds between heartbeats.
        load: returns the current load for each heartbeat.
        tasklist, sessions_enabled, max_sessions: what a session worker serves.
        activities: returns the activities it serves (:func:`describe_activities`), for each beat.
    """

    bus: Bus
    worker_id: str = field(default_factory=new_worker_id)
    interval: float = 5.0
    load: Callable[[], ProcessLoad] = ProcessLoad
    tasklist: str = ""
    sessions_enabled: bool = False
    max_sessions: int = 0
    activities: Callable[[], list[ActivitySignature]] = list
    stop_reason: str = "shutdown"
    _seq: int = 0
    _graceful: bool = True

    def _fields(self) -> dict[str, object]:
        load = self.load()
        self._seq += 1
        return {
            "worker_id": self.worker_id,
            "host_name": socket.gethostname(),
            "pid": os.getpid(),
            "tasklist": self.tasklist,
            "sessions_enabled": self.sessions_enabled,
            "max_sessions": self.max_sessions,
            "open_sessions": load.open_sessions,
            "peak_sessions": load.peak_sessions,
            "running_activities": load.running_activities,
            "interval": self.interval,
            "seq": self._seq,
            "activities": self.activities(),
        }

    async def beat(self) -> None:
        """Publish one heartbeat now."""
        await self.bus.publish(WorkerHeartbeat.model_validate(self._fields()))

    def mark_crashed(self) -> None:
        """Do not publish ``stopped`` on exit (used to simulate or report a crash)."""
        self._graceful = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.bus.publish(WorkerStarted.model_validate(self._fields()))
        task_status.started()
        try:
            while True:
                await anyio.sleep(self.interval)
                try:
                    await self.beat()
                except CadenzaError as exc:
                    # A missed beat is not fatal: the next one may get through; watchers allow
                    # a whole heartbeat timeout.
                    _log.warning("heartbeat of %s not stored: %s", self.worker_id, exc)
        finally:
            if self._graceful:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
                    with contextlib.suppress(CadenzaError):
                        fields = self._fields()
                        await self.bus.publish(WorkerStopped.model_validate({**fields, "reason": self.stop_reason}))
