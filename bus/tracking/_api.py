"""Tracked activities: the handler helpers of the reference activity package, in Python's idiom.

A service announces a piece of background work, streams its output as messages, and ends it; anyone
can list, read, tail or cancel it through the recorder. The helpers here work with any
:class:`Service`; :class:`bus.BusActivityService` is the one backed by the bus::

    async with bus.BusActivityService(b) as svc:
        activity_id, err = await bus.run_handler_activity(
            bus.background(), svc, bus.HandlerOptions(type="image_pull"), pull_image
        )

Cancellation: a user's cancel cancels the work context with :data:`CANCELLED_BY_USER`-kind cause
(``CancelKind.USER``) and the activity ends ``cancelled``; every other cause (shutdown, deadline,
a session ending) ends it ``failed`` with the cause's text as the error.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import anyio
from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas import (
    ActivityLevel,
    ActivityRecord,
    ActivityStatus,
    ActivityUser,
    CancelCause,
    CancelKind,
    MessageRecord,
)

from .._context import Context
from .._exceptions import ActivityError, CadenzaError

if TYPE_CHECKING:
    from schemas import ActivityCompleted

    from ..transport._bus import Bus

__all__ = (
    "CANCELLED_BY_USER",
    "FIRST_COMPLETION",
    "ActivityAlreadyStartedError",
    "ActivityCancelledError",
    "ActivityFinishedError",
    "ActivityNotCancellableError",
    "ActivityNotFoundError",
    "AppendMessageRequest",
    "HandlerOptions",
    "MessageAppender",
    "Service",
    "StartRequest",
    "Tracker",
    "UpdateRequest",
    "cancelled_by_context",
    "clamp_progress",
    "complete_handler_activity",
    "completed_already",
    "run_handler_activity",
    "start_handler_activity_for_user",
    "status_for_cause",
    "store_first_completion",
)

_log = logging.getLogger("cadenza.activity")

#: The cause set on an activity's work context when a user cancels it (the seed's ``ErrCanceled``).
#: Cancels from the recorder carry the user's name in ``who``; compare ``cause.kind``, not equality.
CANCELLED_BY_USER = CancelCause(kind=CancelKind.USER, who="", reason="activity cancelled by user")

#: Headers of an activity's completion: the stream stores it only if no completion of the activity is
#: stored yet (first terminal wins in the store itself, not only in the folds that read it).
FIRST_COMPLETION: Final = MappingProxyType({"Nats-Expected-Last-Subject-Sequence": "0"})
#: JetStream's error code for "wrong last sequence" (the expectation above failed).
_WRONG_LAST_SEQUENCE: Final = 10071


def completed_already(exc: BaseException) -> bool:
    """True when ``exc`` (a publish error) says the activity's completion was stored before."""
    cause: BaseException | None = exc
    while cause is not None:
        if getattr(cause, "err_code", None) == _WRONG_LAST_SEQUENCE:
            return True
        cause = cause.__cause__
    return False


async def store_first_completion(bus: Bus, event: ActivityCompleted, *, timeout: float | None = None) -> bool:
    """Store an activity's completion if none is stored yet: True if this one was stored, False if
    another was first (it stays: the first completion wins).

    Raises:
        PublishError: not stored, and no other completion is known to be (the caller retries).
    """
    try:
        await bus.publish(event, headers=FIRST_COMPLETION, timeout=timeout)
    except CadenzaError as exc:
        if not completed_already(exc):
            raise
        return False
    return True


#: Latest message of an activity a user cancelled.
CANCELLED_MESSAGE = "Cancelled by user"


class ActivityCancelledError(ActivityError):
    """The work of an activity was cancelled; ``cause`` says by whom and why.

    ``str(err)`` is "activity cancelled by user" for a user's cancel (the seed's ``ErrCanceled``).
    """

    code = "cancelled"

    def __init__(self, cause: CancelCause) -> None:
        text = "activity cancelled by user" if cause.kind is CancelKind.USER else cause.text()
        super().__init__(text, non_retryable=True)
        self.cause = cause


class ActivityAlreadyStartedError(ActivityError):
    """An activity id was started a second time in the same service (a redelivered task, say)."""

    code = "already_started"
    default_non_retryable = True


class ActivityFinishedError(ActivityError):
    """An activity was completed a second time: the first terminal status stays."""

    code = "already_finished"
    default_non_retryable = True


class ActivityNotFoundError(ActivityError):
    """The recorder does not know this activity."""

    code = "not_found"
    default_non_retryable = True


class ActivityNotCancellableError(ActivityError):
    """The activity has ended already (the reference's HTTP 409)."""

    code = "not_cancellable"
    default_non_retryable = True


def clamp_progress(value: float | None) -> float:
    """Progress clamped to 0-100 (NaN and None are 0)."""
    if value is None or value != value:
        return 0.0
    return max(0.0, min(100.0, float(value)))


def _trim_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


class StartRequest(BaseModel):
    """What to announce when an activity starts.

    Attributes:
        id: the activity id (default: a fresh UUID); the session worker passes its own.
        environment_id: namespace ("" is the local one).
        type: kind of work (``image_pull``, the activity name of a worker, ...).
        status: ``running`` (default) or ``queued``.
        resource_type / resource_id / resource_name: what it works on (trimmed; blank left out).
        started_by: the user (None: "System").
        step / message / progress: first values shown.
        metadata: any JSON object.
        batch_id: groups the activities of one bulk action.
        worker_id / session_id: set by the service / the session worker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    environment_id: str = ""
    type: str = Field(min_length=1, max_length=200)
    status: ActivityStatus = ActivityStatus.RUNNING
    resource_type: str | None = None
    resource_id: str | None = None
    resource_name: str | None = None
    started_by: ActivityUser | None = None
    step: str = ""
    message: str = ""
    progress: float = 0.0
    metadata: dict[str, Any] = Field(default_factory=dict)
    batch_id: str | None = None
    worker_id: str | None = None
    session_id: str | None = None

    @field_validator("resource_type", "resource_id", "resource_name", "batch_id")
    @classmethod
    def _trim(cls, value: str | None) -> str | None:
        return _trim_or_none(value)

    @field_validator("status")
    @classmethod
    def _not_terminal(cls, value: ActivityStatus) -> ActivityStatus:
        if value.terminal:
            raise ValueError("an activity starts queued or running")
        return value


class UpdateRequest(BaseModel):
    """Change step, progress or latest message; None leaves a field alone."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    step: str | None = None
    progress: float | None = None
    message: str | None = None
    running: bool = Field(default=False, description="move a queued activity to running")


class AppendMessageRequest(BaseModel):
    """One message for an activity's log."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    message: str
    level: ActivityLevel = ActivityLevel.INFO
    payload: dict[str, Any] | None = None
    step: str | None = None
    progress: float | None = None


class HandlerOptions(BaseModel):
    """What :func:`run_handler_activity` announces, and the message it ends with on success."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    type: str = Field(min_length=1, max_length=200)
    environment_id: str = ""
    resource_type: str = ""
    resource_id: str = ""
    resource_name: str = ""
    user: ActivityUser | None = None
    step: str = ""
    message: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    batch_id: str | None = None
    success_message: str = "Completed"


@runtime_checkable
class Service(Protocol):
    """Starts and completes activities (the seed's ``Service``)."""

    async def start_activity(self, req: StartRequest) -> ActivityRecord:
        """Announce an activity; returns what was announced.

        Raises:
            CadenzaError: it could not be announced (the bus is down).
        """
        ...

    async def complete_activity(
        self,
        activity_id: str,
        status: ActivityStatus,
        final_message: str = "",
        error: str | None = None,
        *,
        final_step: str | None = None,
        result: Any = None,
    ) -> ActivityRecord:
        """End an activity with a terminal status.

        Raises:
            ActivityFinishedError: it was completed before (the first status stays).
        """
        ...


@runtime_checkable
class MessageAppender(Protocol):
    """Appends messages to an activity's log (the seed's ``MessageAppender``)."""

    async def append_message(self, activity_id: str, req: AppendMessageRequest) -> MessageRecord | None:
        """Store one message; returns it with its seq, or None when it was blank (not stored)."""
        ...


@runtime_checkable
class Tracker(Protocol):
    """Makes activities cancellable (the seed's ``Tracker``)."""

    async def track(self, ctx: Context, activity_id: str) -> Context:
        """A child of ``ctx`` bound to ``activity_id``: a cancel for the activity cancels it.

        The registration is released when the activity is completed through the service.
        """
        ...


def cancelled_by_context(ctx: Context) -> bool:
    """True only when ``ctx`` was cancelled by a user's request (not shutdown, deadline or a session end)."""
    cause = ctx.cause
    return cause is not None and cause.kind is CancelKind.USER


#: Causes that end work as ``cancelled``: a user's cancel, and the end of the work's session
#: (SPEC-sessions; the session's end stays in the error text). Shutdown and deadlines end it ``failed``.
_CANCELLING = frozenset({CancelKind.USER, CancelKind.SESSION_COMPLETED, CancelKind.SESSION_FAILED})


def status_for_cause(cause: CancelCause | None) -> ActivityStatus:
    """The terminal status of work that ended because of ``cause``: ``cancelled`` for a user's cancel
    or its session's end, ``failed`` for everything else (shutdown, deadline, no cause)."""
    return ActivityStatus.CANCELLED if cause is not None and cause.kind in _CANCELLING else ActivityStatus.FAILED


async def start_handler_activity_for_user(
    ctx: Context,
    service: Service | None,
    *,
    type: str,
    environment_id: str = "",
    resource_type: str = "",
    resource_id: str = "",
    resource_name: str = "",
    user: ActivityUser | None = None,
    step: str = "",
    message: str = "",
    metadata: dict[str, Any] | None = None,
    batch_id: str | None = None,
) -> tuple[str, Context]:
    """Announce a ``running`` activity; returns its id and the work context to run it with.

    The work context is a child of ``ctx`` bound to the activity (when the service is a
    :class:`Tracker`): a cancel for the activity cancels it. Run the work inside
    ``with work.token.scope():``. If announcing fails, returns ``("", ctx)`` and the work should
    still run: tracking never blocks the work.
    """
    if service is None:
        return "", ctx
    req = StartRequest(
        environment_id=environment_id,
        type=type,
        resource_type=resource_type,
        resource_id=resource_id,
        resource_name=resource_name,
        started_by=user,
        step=step,
        message=message,
        metadata=metadata or {},
        batch_id=batch_id,
    )
    try:
        record = await service.start_activity(req)
    except CadenzaError as exc:
        _log.warning("activity %s not announced, running untracked: %s", type, exc)
        return "", ctx
    if isinstance(service, Tracker):
        try:
            return record.id, await service.track(ctx, record.id)
        except CadenzaError as exc:
            _log.warning("activity %s is not cancellable: %s", record.id, exc)
    return record.id, ctx.derive(activity_id=record.id)


async def complete_handler_activity(
    ctx: Context,
    service: Service | None,
    activity_id: str,
    success_message: str = "",
    err: BaseException | None = None,
) -> ActivityRecord | None:
    """End an activity from the outcome of its work.

    No error: ``success`` (progress 100, final message at level success). An error and ``ctx``
    cancelled by a user: ``cancelled`` ("Cancelled by user", level warning, no error text); by its
    session's end: ``cancelled`` with the cause as the error text ("session completed"). Any other
    error, including shutdown and deadline: ``failed`` with the error text. Runs even when ``ctx``
    is cancelled (shielded, bounded). Does nothing for an empty id or no service; a second
    completion is logged and returns None.
    """
    if not activity_id or service is None:
        return None
    if err is None:
        status, final, error = ActivityStatus.SUCCESS, success_message or "Completed", None
    elif cancelled_by_context(ctx):
        status, final, error = ActivityStatus.CANCELLED, CANCELLED_MESSAGE, None
    elif ctx.cause is not None and status_for_cause(ctx.cause) is ActivityStatus.CANCELLED:
        # Cut off by its session's end: cancelled, with the session's end as the error text.
        status, final, error = ActivityStatus.CANCELLED, ctx.cause.text(), ctx.cause.text()
    else:
        text = str(err) or type(err).__name__
        status, final, error = ActivityStatus.FAILED, text, text
    with anyio.CancelScope(shield=True):
        try:
            return await service.complete_activity(activity_id, status, final, error)
        except ActivityFinishedError:
            _log.info("activity %s was already finished", activity_id)
        except CadenzaError as exc:
            _log.warning("activity %s: completion not recorded: %s", activity_id, exc)
    return None


async def run_handler_activity(
    ctx: Context,
    service: Service | None,
    opts: HandlerOptions,
    action: Callable[[Context], Awaitable[Any]],
) -> tuple[str, BaseException | None]:
    """Start an activity, run ``action(work_ctx)`` in the work context's cancel scope, complete it.

    Returns the activity id ("" if it could not be announced) and the action's error (an
    :class:`ActivityCancelledError` when its context was cancelled). If the caller's own scope is
    cancelled, the activity ends ``failed`` ("cancelled by shutdown") and the cancellation propagates.
    """
    activity_id, work = await start_handler_activity_for_user(
        ctx,
        service,
        type=opts.type,
        environment_id=opts.environment_id,
        resource_type=opts.resource_type,
        resource_id=opts.resource_id,
        resource_name=opts.resource_name,
        user=opts.user,
        step=opts.step,
        message=opts.message,
        metadata=opts.metadata,
        batch_id=opts.batch_id,
    )
    err: BaseException | None = None
    returned = False
    try:
        with work.token.scope():
            try:
                await action(work)
                returned = True
            except Exception as exc:
                err = exc
    except anyio.get_cancelled_exc_class():
        # The caller is going away (not this activity's cancel): record it, then let it propagate.
        cause = work.cause or CancelCause(kind=CancelKind.SHUTDOWN, reason="the caller was cancelled")
        await complete_handler_activity(work, service, activity_id, opts.success_message, ActivityCancelledError(cause))
        raise
    if err is None and not returned and work.cause is not None:
        # The token's scope swallowed its own cancellation: the action was interrupted.
        err = ActivityCancelledError(work.cause)
    await complete_handler_activity(work, service, activity_id, opts.success_message, err)
    return activity_id, err
