"""Sessions: the events on the ``session`` domain and the broker's key-value records.

Subjects ``<prefix>.session.<session_id>.<event>``:

* ``requested`` (a caller asks for a session), ``complete`` (a caller ends it): consumed by the broker.
* ``assigned``, ``rejected``, ``completed``, ``failed``: the broker's announcements, each stored once
  (fixed event ids: the stream's duplicate window drops a second announcement of the same outcome).

The broker keeps one :class:`SessionRecord` per session (bucket ``sessions``) and one
:class:`WorkerRecord` per session worker (bucket ``workers``, holding the ids of its open sessions:
the slots). Both are changed by compare-and-set only.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from ._envelope import Event
from ._subjects import OPTIONAL_TOKEN_PATTERN, TOKEN_PATTERN

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_TASKLIST",
    "SessionAssigned",
    "SessionCompleteRequested",
    "SessionCompleted",
    "SessionFailed",
    "SessionFailure",
    "SessionRecord",
    "SessionRejectReason",
    "SessionRejected",
    "SessionRequested",
    "SessionState",
    "WorkerRecord",
]

_ID = TOKEN_PATTERN
_OPT_ID = OPTIONAL_TOKEN_PATTERN

#: Seconds of worker silence after which a session is failed with ``worker_lost`` (Cadence's default).
DEFAULT_HEARTBEAT_TIMEOUT: Final = 20.0
#: The tasklist of a session or activity that names none.
DEFAULT_TASKLIST: Final = "default"


class SessionState(StrEnum):
    """Where a session is in its life. ``pending``: asked for, no slot yet; ``rejected``: never opened."""

    PENDING = "pending"
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"


class SessionFailure(StrEnum):
    """Why an open session failed."""

    WORKER_LOST = "worker_lost"
    WORKER_SHUTDOWN = "worker_shutdown"
    EXECUTION_TIMEOUT = "execution_timeout"


class SessionRejectReason(StrEnum):
    """Why a session was never opened."""

    NO_WORKER = "no_worker"
    CAPACITY = "capacity"
    WORKER_UNAVAILABLE = "worker_unavailable"
    BAD_TOKEN = "bad_token"
    ABANDONED = "abandoned"


class _SessionEvent(Event):
    session_id: str = Field(pattern=_ID)

    def subject_id(self) -> str:
        return self.session_id


class SessionRequested(_SessionEvent):
    """A caller asks for a session (a new one, or a recreation on the worker of ``recreate_token``)."""

    DOMAIN = "session"
    EVENT = "requested"

    tasklist: str = Field(default=DEFAULT_TASKLIST, pattern=_ID)
    creation_timeout: float = Field(gt=0, le=86_400 * 7, description="seconds to wait for a free slot")
    execution_timeout: float = Field(gt=0, le=86_400 * 365, description="seconds the session may stay open")
    heartbeat_timeout: float = Field(
        default=DEFAULT_HEARTBEAT_TIMEOUT, gt=0, le=86_400, description="worker silence that fails the session"
    )
    recreate_token: str | None = Field(default=None, max_length=4096, description="from SessionInfo.recreate_token")


class SessionCompleteRequested(_SessionEvent):
    """A caller ends its session (a no-op unless the session is open; an abandoned request is dropped)."""

    DOMAIN = "session"
    EVENT = "complete"

    reason: str = Field(default="", max_length=1024)


class SessionAssigned(_SessionEvent):
    """The broker opened the session on a worker."""

    DOMAIN = "session"
    EVENT = "assigned"

    tasklist: str = Field(pattern=_ID)
    worker_id: str = Field(pattern=_ID)
    host_name: str = ""
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    expires_at: datetime
    recreate_token: str = Field(description="signed by the broker; opens a new session on the same worker")


class SessionRejected(_SessionEvent):
    """The session could not be opened; ``message`` says why in words."""

    DOMAIN = "session"
    EVENT = "rejected"

    reason: SessionRejectReason
    message: str = Field(max_length=4096)


class SessionCompleted(_SessionEvent):
    """The session was completed; its slot is free."""

    DOMAIN = "session"
    EVENT = "completed"

    worker_id: str = Field(default="", pattern=_OPT_ID)


class SessionFailed(_SessionEvent):
    """The session failed; ``cause`` says why (announced once, even with several brokers)."""

    DOMAIN = "session"
    EVENT = "failed"

    worker_id: str = Field(default="", pattern=_OPT_ID)
    cause: SessionFailure
    message: str = Field(default="", max_length=4096)


class SessionRecord(BaseModel):
    """The broker's record of one session (bucket ``sessions``, key = session id)."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    session_id: str = Field(pattern=_ID)
    tasklist: str = Field(default=DEFAULT_TASKLIST, pattern=_ID)
    state: SessionState = SessionState.PENDING
    worker_id: str = Field(default="", pattern=_OPT_ID)
    host_name: str = ""
    cause: str = Field(default="", description="SessionFailure when failed, SessionRejectReason when rejected")
    message: str = ""
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    execution_timeout: float = 0.0
    requested_at: datetime | None = None
    creation_deadline: datetime | None = None
    opened_at: datetime | None = None
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    recreated_from: str = Field(default="", pattern=_OPT_ID, description="the session it was recreated from")
    requested_by: str = ""
    #: The outcome event is stored (an ended session whose announcement was cut off is announced again).
    announced: bool = False

    @property
    def ended(self) -> bool:
        return self.state in (SessionState.COMPLETED, SessionState.FAILED, SessionState.REJECTED)


class WorkerRecord(BaseModel):
    """The broker's record of one session worker (bucket ``workers``, key = worker id).

    ``sessions`` are the worker's slots in use: a session id is added (compare-and-set) before the
    session opens and removed when it ends, so ``len(sessions) <= max_sessions`` always holds.
    """

    model_config = ConfigDict(extra="ignore", defer_build=True)

    worker_id: str = Field(pattern=_ID)
    host_name: str = ""
    pid: int = 0
    tasklist: str = Field(default=DEFAULT_TASKLIST, pattern=_ID)
    max_sessions: int = 0
    interval: float = 5.0
    sessions: list[str] = Field(default_factory=list)
    started_at: datetime | None = None
