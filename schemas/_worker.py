"""Worker (process) lifecycle: started, heartbeat, stopped.

Every cadenza process that runs work (a session worker, or any service tracking activities)
announces itself under a ``worker_id`` (one per process start) and sends **one** heartbeat per
interval for the whole process, whatever the number of sessions or activities it holds.
Subjects ``<prefix>.worker.<worker_id>.{started,heartbeat,stopped}``; the stream keeps the last of
each per worker, so a restarted broker or recorder reads every worker's last sign of life.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ._envelope import Event
from ._subjects import OPTIONAL_TOKEN_PATTERN, TOKEN_PATTERN

__all__ = [
    "ActivityParameter",
    "ActivitySignature",
    "WorkerHeartbeat",
    "WorkerPing",
    "WorkerPong",
    "WorkerStarted",
    "WorkerStopped",
]

_ID = TOKEN_PATTERN
_OPT_ID = OPTIONAL_TOKEN_PATTERN


class ActivityParameter(BaseModel):
    """One parameter of an activity a worker serves (from the registered function's signature)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: str = Field(max_length=200)
    kind: Literal["positional", "positional_or_keyword", "keyword", "var_positional", "var_keyword"] = Field(
        description="how to pass it: in ActivityTask.args (positional), .kwargs (keyword), or either"
    )
    annotation: str = Field(default="", max_length=512, description="the Python annotation as written ('' if none)")
    required: bool = Field(description="no default: a task must pass it")
    default: str | None = Field(default=None, max_length=512, description="repr of the default, if any")


class ActivitySignature(BaseModel):
    """An activity a worker serves: ``ActivityTask.name`` and what ``args`` / ``kwargs`` it takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: str = Field(min_length=1, max_length=200)
    parameters: list[ActivityParameter] = Field(default_factory=list, max_length=100)
    returns: str = Field(default="", max_length=512, description="the return annotation as written")
    doc: str = Field(default="", max_length=1024, description="first line of the docstring")


class _WorkerEvent(Event):
    worker_id: str = Field(pattern=_ID, description="identity of this process start")
    host_name: str = Field(default="", max_length=256)
    pid: int = Field(default=0, ge=0)
    tasklist: str = Field(default="", pattern=_OPT_ID, description="tasklist served ('' for a plain service)")
    sessions_enabled: bool = False
    max_sessions: int = Field(default=0, ge=0)
    open_sessions: int = Field(default=0, ge=0, description="sessions this worker holds, by its own count")
    peak_sessions: int = Field(default=0, ge=0, description="most sessions held at once since start, own count")
    running_activities: int = Field(default=0, ge=0)
    interval: float = Field(default=5.0, gt=0, description="seconds between heartbeats")
    seq: int = Field(default=0, ge=0, description="heartbeat counter of this process start")
    activities: list[ActivitySignature] = Field(
        default_factory=list, max_length=1000, description="the activities this worker serves, with their parameters"
    )

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

    model_config = ConfigDict(extra="forbid", defer_build=True)


class WorkerPong(BaseModel):
    """The worker's answer to :class:`WorkerPing`."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    worker_id: str = Field(pattern=_ID)
    open_sessions: int = 0
