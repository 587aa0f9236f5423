"""Activity tasks and session control on the ``task`` domain (a work-queue stream).

* ``<prefix>.task.<tasklist>.queued``: a tasklist's shared queue; any worker of the tasklist takes a task.
* ``<prefix>.task.<worker_id>.inbox``: one worker's inbox: tasks of the sessions it holds, and the
  broker's :class:`SessionOpened` / :class:`SessionClosed` notices (stored in order, so a worker's own
  count of open sessions follows the broker's slots).

A worker answers an :class:`ActivityTask` with an :class:`ActivityResult` on the task's ``reply_to``
(core NATS, the caller's inbox), and records the activity through the activity events as well
(``ActivityCompleted.result``), which is where a caller that missed the reply reads it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ._cancel import CancelCause
from ._envelope import Event
from ._session import DEFAULT_TASKLIST, SessionState
from ._subjects import OPTIONAL_TOKEN_PATTERN, TOKEN_PATTERN

__all__ = ["ActivityResult", "ActivityTask", "SessionClosed", "SessionOpened", "TaskError"]

_ID = TOKEN_PATTERN
_OPT_ID = OPTIONAL_TOKEN_PATTERN


class ActivityTask(Event):
    """Run activity ``name`` with ``args`` / ``kwargs`` (JSON values) and answer on ``reply_to``."""

    DOMAIN = "task"
    EVENT = "activity"
    TYPE_HEADERS = False

    activity_id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    tasklist: str = Field(default=DEFAULT_TASKLIST, pattern=_ID)
    worker_id: str = Field(default="", pattern=_OPT_ID, description="the session's worker; '' for the shared queue")
    session_id: str = Field(default="", pattern=_OPT_ID, description="'' outside a session")
    reply_to: str = Field(default="", max_length=512, description="core subject for the ActivityResult")
    deadline: datetime | None = Field(default=None, description="the caller stops waiting then")

    def subject_id(self) -> str:
        return self.worker_id or self.tasklist

    def subject_event(self) -> str:
        return "inbox" if self.worker_id else "queued"

    @classmethod
    def subject_pattern(cls) -> str:
        return "<prefix>.task.<tasklist>.queued | <prefix>.task.<worker_id>.inbox"


class _InboxNotice(Event):
    """A notice the broker stores in one worker's inbox (``<prefix>.task.<worker_id>.inbox``)."""

    DOMAIN = "task"

    worker_id: str = Field(pattern=_ID)

    def subject_id(self) -> str:
        return self.worker_id

    def subject_event(self) -> str:
        return "inbox"

    @classmethod
    def subject_pattern(cls) -> str:
        return "<prefix>.task.<worker_id>.inbox"


class SessionOpened(_InboxNotice):
    """The broker gave the worker a session (published to its inbox before the caller hears of it)."""

    EVENT = "session_opened"

    session_id: str = Field(pattern=_ID)
    expires_at: datetime | None = None


class SessionClosed(_InboxNotice):
    """The session ended: the worker cancels what still runs in it and frees the slot in its count."""

    EVENT = "session_closed"

    session_id: str = Field(pattern=_ID)
    state: SessionState
    cause: CancelCause


class TaskError(BaseModel):
    """What went wrong in an activity, as the caller sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    type: str = Field(description="exception class name")
    message: str = Field(default="", max_length=8192)
    non_retryable: bool = False
    cause: CancelCause | None = Field(default=None, description="set when the activity was cancelled")
    session_failed: bool = Field(default=False, description="the activity's session is not open on the worker")


class ActivityResult(Event):
    """A worker's answer to an :class:`ActivityTask` (core NATS, on the task's ``reply_to``)."""

    DOMAIN = "task"
    EVENT = "result"
    TYPE_HEADERS = False

    activity_id: str = Field(pattern=_ID)
    worker_id: str = Field(default="", pattern=_OPT_ID)
    ok: bool
    result: Any = None
    error: TaskError | None = None

    def subject_id(self) -> str:
        return self.activity_id

    @classmethod
    def subject_pattern(cls) -> str:
        return "<reply_to of the task> (core NATS, not stored)"
