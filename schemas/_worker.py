"""Worker (process) lifecycle: started, heartbeat, stopped.

Every cadenza process that runs work (a session worker, or any service tracking activities)
announces itself under a ``worker_id`` (one per process start) and sends **one** heartbeat per
interval for the whole process, whatever the number of sessions or activities it holds.
Subjects ``<prefix>.worker.<worker_id>.{started,heartbeat,stopped}``; the stream keeps the last of
each per worker, so a restarted broker or recorder reads every worker's last sign of life.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ._envelope import Event

__all__ = ["WorkerHeartbeat", "WorkerPing", "WorkerPong", "WorkerStarted", "WorkerStopped"]

_TOKEN = r"^[A-Za-z0-9_\-:=+@~]{1,200}$"


class _WorkerEvent(Event):
    worker_id: str = Field(pattern=_TOKEN, description="identity of this process start")
    host_name: str = Field(default="", max_length=256)
    pid: int = Field(default=0, ge=0)
    tasklist: str = Field(default="", max_length=200, description="tasklist served ('' for a plain service)")
    sessions_enabled: bool = False
    max_sessions: int = Field(default=0, ge=0)
    open_sessions: int = Field(default=0, ge=0, description="sessions this worker holds, by its own count")
    peak_sessions: int = Field(default=0, ge=0, description="most sessions held at once since start, own count")
    running_activities: int = Field(default=0, ge=0)
    interval: float = Field(default=5.0, gt=0, description="seconds between heartbeats")
    seq: int = Field(default=0, ge=0, description="heartbeat counter of this process start")

    def subject_id(self) -> str:
        return self.worker_id


class WorkerStarted(_WorkerEvent):
    """A worker process came up."""

    DOMAIN = "worker"
    EVENT = "started"


class WorkerHeartbeat(_WorkerEvent):
    """The worker is alive (one per interval per process)."""

    DOMAIN = "worker"
    EVENT = "heartbeat"


class WorkerStopped(_WorkerEvent):
    """The worker stopped on purpose (graceful shutdown); its work is failed at once."""

    DOMAIN = "worker"
    EVENT = "stopped"

    reason: str = Field(default="shutdown", max_length=1024)


class WorkerPing(BaseModel):
    """Request on ``<prefix>.rpc.<worker_id>.ping``: is this worker's process still connected?

    The broker asks when a heartbeat is late. NATS answers "no responders" at once when the
    process's connection is gone, which tells a dead process from a slow one well before the
    heartbeat timeout.
    """

    model_config = ConfigDict(extra="forbid")


class WorkerPong(BaseModel):
    """The worker's answer to :class:`WorkerPing`."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str
    open_sessions: int = 0
