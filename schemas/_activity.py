"""Tracked activities: the events on the ``activity`` domain and the recorder's request/reply shapes.

Subjects ``<prefix>.activity.<activity_id>.{started,updated,message,completed}``. The process running
an activity publishes its events; the recorder folds them into an :class:`ActivityRecord` per activity
(key-value bucket) and reads the messages back from the stream.

Ordering without a single writer: every event a process publishes for an activity carries ``rev``,
a counter that grows with each event of that activity; "latest" fields (step, progress, latest
message) take the value of the highest ``rev`` seen, so a recorder may fold events in any order.
Messages carry a gap-free per-activity ``seq``: one :class:`ActivityMessage` holds a batch of
consecutive entries ``seq, seq+1, ...`` (a busy writer sends many lines in one event).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._envelope import Event, utcnow
from ._subjects import OPTIONAL_TOKEN_PATTERN, TOKEN_PATTERN

__all__ = [
    "MAX_MESSAGE_BYTES",
    "TERMINAL_STATUSES",
    "ActivityCompleted",
    "ActivityFold",
    "ActivityLevel",
    "ActivityMessage",
    "ActivityRecord",
    "ActivityStart",
    "ActivityStarted",
    "ActivityStatus",
    "ActivityUpdated",
    "ActivityUser",
    "CancelActivityReply",
    "CancelActivityRequest",
    "GetActivityReply",
    "GetActivityRequest",
    "ListActivitiesReply",
    "ListActivitiesRequest",
    "MessageEntry",
    "MessageRecord",
    "StoredActivity",
    "TailActivityReply",
    "TailActivityRequest",
    "cut_text",
]

#: Message text longer than this many UTF-8 bytes is cut to it.
MAX_MESSAGE_BYTES: Final = 8192

_ID = TOKEN_PATTERN
_OPT_ID = OPTIONAL_TOKEN_PATTERN


def cut_text(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` trimmed and cut to at most ``limit`` UTF-8 bytes (never inside a character)."""
    text = text.strip()
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


class ActivityStatus(StrEnum):
    """Lifecycle of an activity; the last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


#: The statuses an activity ends in (the first one recorded wins).
TERMINAL_STATUSES: Final = frozenset({ActivityStatus.SUCCESS, ActivityStatus.FAILED, ActivityStatus.CANCELLED})


class ActivityLevel(StrEnum):
    """Level of one activity message."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    SUCCESS = "success"


class ActivityUser(BaseModel):
    """Who started an activity (no user means "System")."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    user_id: str = Field(default="", max_length=256)
    username: str = Field(default="", max_length=256)
    display_name: str = Field(default="", max_length=256)

    def name(self) -> str:
        """The readable name: display name, else username, else user id, else "System"."""
        return self.display_name or self.username or self.user_id or "System"


class MessageEntry(BaseModel):
    """One message line inside an :class:`ActivityMessage` (its seq is implied by its position)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    level: ActivityLevel = ActivityLevel.INFO
    message: str = Field(description="text; trimmed and cut to 8192 UTF-8 bytes by the recorder")
    payload: dict[str, Any] | None = None
    step: str | None = Field(default=None, max_length=1024)
    progress: float | None = Field(default=None, description="0-100; clamped")
    created_at: datetime = Field(default_factory=utcnow)


class _ActivityEvent(Event):
    TYPE_HEADERS = False  # per activity; the subject and the body say the type (docs/wire.md)

    activity_id: str = Field(pattern=_ID, description="the activity (UUID for activities cadenza starts)")
    rev: int = Field(
        default=0,
        ge=0,
        description="grows with every event of this activity from its publisher; 0 (or left out): "
        "no order, the recorder applies it in arrival order",
    )

    def subject_id(self) -> str:
        return self.activity_id


class ActivityStarted(_ActivityEvent):
    """An activity was announced (``running``, or ``queued`` until it starts).

    Published with event id ``<activity_id>.started`` so a retried announce is stored once.
    """

    DOMAIN = "activity"
    EVENT = "started"

    environment_id: str = Field(default="", max_length=200, description="namespace; blank is the local one")
    activity_type: str = Field(min_length=1, max_length=200, description="what kind of work (image_pull, ...)")
    status: Literal[ActivityStatus.QUEUED, ActivityStatus.RUNNING] = ActivityStatus.RUNNING
    resource_type: str | None = Field(default=None, max_length=200)
    resource_id: str | None = Field(default=None, max_length=512)
    resource_name: str | None = Field(default=None, max_length=1024)
    step: str = Field(default="", max_length=1024)
    message: str = Field(default="", description="first latest message")
    progress: float = 0.0
    started_by: ActivityUser | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    batch_id: str | None = Field(default=None, max_length=200)
    worker_id: str | None = Field(default=None, pattern=_ID, description="process whose heartbeats show it lives")
    session_id: str | None = Field(default=None, pattern=_ID)


class ActivityUpdated(_ActivityEvent):
    """Step, progress or latest message changed (fields left out do not change)."""

    DOMAIN = "activity"
    EVENT = "updated"

    status: Literal[ActivityStatus.RUNNING] | None = Field(default=None, description="queued -> running")
    step: str | None = Field(default=None, max_length=1024)
    progress: float | None = None
    message: str | None = Field(default=None, description="new latest message")


class ActivityMessage(_ActivityEvent):
    """Consecutive messages ``seq, seq+1, ...`` of one activity.

    Published with event id ``<activity_id>.msg.<seq>``, so a retry stores it once.
    """

    DOMAIN = "activity"
    EVENT = "message"

    seq: int = Field(ge=1, description="seq of the first entry; gap-free per activity")
    entries: list[MessageEntry] = Field(min_length=1, max_length=10_000)

    @property
    def last_seq(self) -> int:
        return self.seq + len(self.entries) - 1


class ActivityStart(BaseModel):
    """What ``started`` would have said, carried by the completion of an activity that ended before
    it was announced (schema version 2): one event for a quick activity instead of two."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    started_at: datetime = Field(description="when the activity started (the started event's time)")
    environment_id: str = Field(default="", max_length=200)
    activity_type: str = Field(min_length=1, max_length=200)
    resource_type: str | None = Field(default=None, max_length=200)
    resource_id: str | None = Field(default=None, max_length=512)
    resource_name: str | None = Field(default=None, max_length=1024)
    step: str = Field(default="", max_length=1024)
    message: str = ""
    progress: float = 0.0
    started_by: ActivityUser | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    batch_id: str | None = Field(default=None, max_length=200)
    worker_id: str | None = Field(default=None, pattern=_ID)
    session_id: str | None = Field(default=None, pattern=_ID)


class ActivityCompleted(_ActivityEvent):
    """The activity ended. The first completion of an activity wins; later ones change nothing.

    Published with event id ``<activity_id>.completed`` and ``Nats-Expected-Last-Subject-Sequence: 0``
    (the stream refuses a second completion of the activity). ``final`` is the closing message,
    with seq ``final_seq`` (0 when there is none).

    Schema version 2 adds ``start``: an activity that ends within a moment of starting is never
    announced by a ``started`` event; its completion carries the announcement instead. Version-1
    completions (no ``start``) are still accepted.
    """

    DOMAIN = "activity"
    EVENT = "completed"
    SCHEMA_VERSION = 2
    #: Stored without ``Nats-Msg-Id``: a publish of it again (a retry whose first try was stored)
    #: is refused as a second completion (10071), which every sender takes as "stored first".
    DEDUPE = False

    schema_version: int = Field(default=2, ge=1, strict=True)
    start: ActivityStart | None = Field(
        default=None,
        description="the announcement of an activity that was not announced by a started event (version 2)",
    )

    status: Literal[ActivityStatus.SUCCESS, ActivityStatus.FAILED, ActivityStatus.CANCELLED]
    error: str | None = Field(default=None, description="error text (failed only)")
    final: MessageEntry | None = None
    final_seq: int = Field(default=0, ge=0)
    step: str | None = Field(default=None, max_length=1024)
    result: Any = Field(default=None, description="JSON return value of a worker-executed activity")
    host_lost: bool = Field(default=False, description="finalised by the recorder: the host was gone")


# ---------------------------------------------------------------- the recorder's view


class ActivityRecord(BaseModel):
    """One activity as the recorder knows it."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    id: str = Field(pattern=_ID)
    environment_id: str = ""
    type: str = ""
    status: ActivityStatus = ActivityStatus.RUNNING
    resource_type: str | None = None
    resource_id: str | None = None
    resource_name: str | None = None
    progress: float = 0.0
    step: str = ""
    latest_message: str = ""
    started_by: ActivityUser | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: int | None = None
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    batch_id: str | None = None
    worker_id: str | None = Field(default=None, pattern=_ID)
    session_id: str | None = Field(default=None, pattern=_ID)
    result: Any = None
    message_count: int = 0
    last_seq: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class ActivityFold(BaseModel):
    """What the recorder needs to fold events in any order (beside the record in the bucket)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    announced: bool = Field(default=False, description="the started event was folded")
    rev: int = Field(default=0, ge=0, description="highest rev folded into the latest fields")
    ranges: list[tuple[int, int]] = Field(default_factory=list, description="message seqs folded, as [lo, hi]")
    completed_event: str | None = Field(default=None, description="event id of the completion that won")
    host_lost: bool = False


class StoredActivity(BaseModel):
    """A value of the ``activities`` bucket (key ``a.<activity_id>``): the record and its fold state."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    record: ActivityRecord
    fold: ActivityFold = Field(default_factory=ActivityFold)


class MessageRecord(BaseModel):
    """One stored message of an activity."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    activity_id: str = Field(pattern=_ID)
    seq: int
    level: ActivityLevel
    message: str
    payload: dict[str, Any] | None = None
    step: str | None = None
    progress: float | None = None
    created_at: datetime


class ListActivitiesRequest(BaseModel):
    """``<prefix>.rpc.recorder.list``: activities of an environment, active first, then newest first."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    environment_id: str = ""
    status: list[ActivityStatus] = Field(default_factory=list, description="any of these (empty: all)")
    type: str = ""
    resource_type: str = ""
    batch_id: str = ""
    search: str = Field(
        default="",
        max_length=1024,
        description="case-insensitive: a prefix of the activity, session, worker, batch or resource id, or "
        "text in the type, resource name, latest message, step or error",
    )
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=50, ge=1, le=500)


class ListActivitiesReply(BaseModel):
    """A page of activities (``<prefix>.rpc.recorder.list``); ``next_offset`` is None on the last page."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    items: list[ActivityRecord]
    total: int
    offset: int
    limit: int
    next_offset: int | None = None


class GetActivityRequest(BaseModel):
    """``<prefix>.rpc.recorder.get``: one activity with its last ``limit`` messages, oldest first."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    activity_id: str = Field(pattern=_ID)
    limit: int = Field(default=500, ge=0, le=500)


class GetActivityReply(BaseModel):
    """One activity and its last messages, oldest first (``<prefix>.rpc.recorder.get``)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    activity: ActivityRecord
    messages: list[MessageRecord]


class TailActivityRequest(BaseModel):
    """``<prefix>.rpc.recorder.tail``: messages after ``after_seq``, waiting up to ``wait`` s for some.

    Pass the reply's ``cursor`` back to continue cheaply; ``after_seq`` alone also resumes exactly.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    activity_id: str = Field(pattern=_ID)
    after_seq: int = Field(default=0, ge=0)
    cursor: int = Field(default=0, ge=0, description="stream position from the previous reply")
    limit: int = Field(default=500, ge=1, le=5000)
    wait: float = Field(default=0.0, ge=0, le=30)


class TailActivityReply(BaseModel):
    """Messages after a seq, with a cursor to resume from (``<prefix>.rpc.recorder.tail``)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    messages: list[MessageRecord]
    last_seq: int
    cursor: int
    status: ActivityStatus
    done: bool = Field(description="the activity ended and every message up to its end was returned")


class CancelActivityRequest(BaseModel):
    """``<prefix>.rpc.recorder.cancel``: ask for an activity to be cancelled by a user."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    activity_id: str = Field(pattern=_ID)
    who: str = Field(default="", max_length=256, description="the user's name, for the warning message")
    reason: str = Field(default="", max_length=4096)


class CancelActivityReply(BaseModel):
    """What a cancel request did (``<prefix>.rpc.recorder.cancel``): accepted, or finalised at once."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    outcome: Literal["accepted", "finalised"] = Field(
        description="accepted: the host was told; finalised: nobody runs it, the recorder ended it"
    )
    activity: ActivityRecord
