"""Cancellation: an event on the ``cancel`` domain that carries its cause."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ._envelope import Event
from ._subjects import TOKEN_PATTERN

__all__ = ["CancelCause", "CancelKind", "CancelRequested"]


class CancelKind(StrEnum):
    """Why work was cancelled. Only ``user`` ends an activity as ``cancelled``; every other kind
    ends it as ``failed`` (SPEC-activities.md)."""

    USER = "user"
    SHUTDOWN = "shutdown"
    DEADLINE = "deadline"
    SESSION_COMPLETED = "session_completed"
    SESSION_FAILED = "session_failed"


class CancelCause(BaseModel):
    """Who asked, why, and what kind of cancellation it is."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    kind: CancelKind
    who: str = Field(default="", max_length=256, description="user id or name, or the service that asked")
    reason: str = Field(default="", max_length=4096)

    def text(self) -> str:
        """Readable one-liner: 'cancelled by alice: too slow'."""
        base = {
            CancelKind.USER: "cancelled by user",
            CancelKind.SHUTDOWN: "cancelled by shutdown",
            CancelKind.DEADLINE: "deadline exceeded",
            CancelKind.SESSION_COMPLETED: "session completed",
            CancelKind.SESSION_FAILED: "session failed",
        }[self.kind]
        if self.who and self.kind is CancelKind.USER:
            base = f"cancelled by {self.who}"
        return f"{base}: {self.reason}" if self.reason else base


class CancelRequested(Event):
    """Cancel an activity or every activity of a session.

    Subject ``<prefix>.cancel.<target_id>.requested``. The stream keeps the last one per target,
    so work that registers a moment after the cancel still sees it.
    """

    DOMAIN = "cancel"
    EVENT = "requested"

    target: Literal["activity", "session"]
    target_id: str = Field(pattern=TOKEN_PATTERN, description="the activity or session id")
    cause: CancelCause

    def subject_id(self) -> str:
        return self.target_id
