"""Sessions, the caller's side: create, recreate, complete, inspect, and execute activities.

A session pins activities to one worker. The caller publishes ``session.<id>.requested``; the broker
(``services/broker``) reserves a slot on a live worker by compare-and-set and announces
``assigned`` (or ``rejected`` after ``creation_timeout``). Activities executed with the session's
context go to that worker's inbox; outside a session (or once it completed) to the tasklist's shared
queue. When the session ends (completed, or failed because its worker was lost, shut down, or the
execution timeout passed), its context is cancelled with that cause and every caller waiting on an
activity in it gets an error at once.

One :class:`SessionClient` per process and bus follows the session announcements and the replies of
workers (started on first use in the bus's task group).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import anyio
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_TASKLIST,
    ActivityCompleted,
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    CancelCause,
    CancelKind,
    CancelRequested,
    Event,
    SessionAssigned,
    SessionCompleted,
    SessionCompleteRequested,
    SessionFailed,
    SessionFailure,
    SessionRecord,
    SessionRejected,
    SessionRequested,
    SessionState,
    TaskError,
    new_event_id,
    utcnow,
)

from .._config import DEFAULT_INBOX_PREFIX
from .._context import BUS_KEY, CancelToken, Context
from .._exceptions import ActivityError, CadenzaError, SessionError, UsageError, ValidationError
from ..tracking._api import ActivityCancelledError, completed_already
from ..transport._bucket import Bucket, last_event
from ..transport._bus import Bus
from ..transport._codec import HDR_DONE, HDR_STORE_ACK_TO, HDR_TASK_ACK, decode
from ..transport._direct import in_background
from ..transport._publish import answer_error
from ..transport._streams import Received
from ..transport._subscriptions import flush, new_inbox, subscribe_callback, subscribe_now

__all__ = (
    "ActivityFailedError",
    "ActivityTimeoutError",
    "SessionClient",
    "SessionCreationError",
    "SessionFailedError",
    "SessionInfo",
    "SessionOptions",
    "complete_session",
    "create_session",
    "execute_activity",
    "get_session_info",
    "recreate_session",
    "session",
)

_log = logging.getLogger("cadenza.session")
#: Seconds between a long call's looks at whether its connection was lost meanwhile (then the stored
#: outcome is read: the answer may have been lost with the connection).
_LOST_LOOK = 2.0

_TOKEN = r"^[A-Za-z0-9_\-:=+@~]{1,200}$"


# ------------------------------------------------------------------ errors


class SessionFailedError(SessionError):
    """An activity was executed in (or was running in) a session that has failed.

    The seed's ``ErrSessionFailed``: the message always contains "session has failed".

    Attributes:
        session_id: the session.
        cause: ``worker_lost``, ``worker_shutdown`` or ``execution_timeout`` (or "" when unknown).
    """

    code = "session_failed"
    default_non_retryable = True

    def __init__(self, session_id: str, cause: str = "", detail: str = "") -> None:
        text = f"session has failed ({cause})" if cause else "session has failed"
        super().__init__(f"{text}: session {session_id}" + (f": {detail}" if detail else ""))
        self.session_id = session_id
        self.cause = cause


class SessionCreationError(SessionError):
    """A session could not be created or recreated; ``reason`` is a ``SessionRejectReason`` value
    (``no_worker``, ``capacity``, ``worker_unavailable``, ``bad_token``) or ``no_broker``."""

    code = "session_rejected"
    default_non_retryable = True

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ActivityFailedError(ActivityError):
    """The activity raised on the worker; ``type`` is the exception's class name there."""

    code = "activity_failed"

    def __init__(self, message: str, *, type: str, non_retryable: bool = False) -> None:
        super().__init__(f"{type}: {message}" if message else type, non_retryable=non_retryable)
        self.type = type


class ActivityTimeoutError(ActivityError):
    """No result came within the activity's ``start_to_close_timeout`` (the activity was cancelled)."""

    code = "activity_timeout"


# ------------------------------------------------------------------ options and info


class SessionOptions(BaseModel):
    """How to create a session.

    Attributes:
        execution_timeout: how long the session may stay open (seconds or ``timedelta``; required, > 0).
        creation_timeout: how long to wait for a worker with a free slot (required, > 0).
        heartbeat_timeout: worker silence after which the session fails with ``worker_lost`` (default 20 s).
        tasklist: the workers that may hold it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    execution_timeout: float = Field(gt=0)
    creation_timeout: float = Field(gt=0)
    heartbeat_timeout: float = Field(default=DEFAULT_HEARTBEAT_TIMEOUT, gt=0)
    tasklist: str = Field(default=DEFAULT_TASKLIST, pattern=_TOKEN)

    @field_validator("execution_timeout", "creation_timeout", "heartbeat_timeout", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        return value.total_seconds() if isinstance(value, timedelta) else value


class SessionInfo(BaseModel):
    """A session as the caller sees it (a snapshot; :func:`get_session_info` gives the current one).

    Attributes:
        session_id: fresh per create and recreate.
        host_name / worker_id: the worker holding it (``resource_id`` is the same as ``worker_id``).
        tasklist: the workers it was placed among.
        state: ``open``, ``completed`` or ``failed``.
        cause: why it failed (``worker_lost``, ``worker_shutdown``, ``execution_timeout``), else "".
        recreate_token: opaque, signed; :func:`recreate_session` opens a new session on the same worker.
    """

    model_config = ConfigDict(frozen=True, defer_build=True)

    session_id: str
    host_name: str = ""
    worker_id: str = ""
    tasklist: str = DEFAULT_TASKLIST
    state: SessionState = SessionState.OPEN
    cause: str = ""
    message: str = ""
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    expires_at: datetime | None = None
    recreate_token: bytes = b""

    @property
    def resource_id(self) -> str:
        return self.worker_id


# ------------------------------------------------------------------ the per-process client


@dataclass(eq=False)
class _Live:
    """What this process knows of one session it created."""

    info: SessionInfo
    token: CancelToken
    ended: anyio.Event = field(default_factory=anyio.Event)
    #: The broker's announcement of the end arrived.
    announced: anyio.Event = field(default_factory=anyio.Event)
    calls: set[str] = field(default_factory=set)

    def end(self, state: SessionState, cause: str, message: str) -> bool:
        if self.info.state is not SessionState.OPEN:
            return False
        self.info = self.info.model_copy(update={"state": state, "cause": cause, "message": message})
        if state is SessionState.COMPLETED:
            why = CancelCause(kind=CancelKind.SESSION_COMPLETED, reason="the session was completed")
        else:
            why = CancelCause(kind=CancelKind.SESSION_FAILED, reason=f"{cause}: {message}" if message else cause)
        self.token.cancel(why)
        self.ended.set()
        return True


class _Done:
    """Whether a call is over, and the wake-up of its waiting task, if one waits (what an asyncio
    event would be, without its list of waiters: one task waits for a call, through its token's
    :meth:`~bus.CancelToken.sleep`)."""

    __slots__ = ("_set", "waiter")

    def __init__(self) -> None:
        self._set = False
        self.waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(eq=False)
class _Call:
    session_id: str
    done: _Done = field(default_factory=_Done)
    result: ActivityResult | None = None
    session_failed: SessionFailedError | None = None
    #: The task's ack subject, when the worker handed the task's ack to this caller (with its result,
    #: once the server's answer to the completion's store, which this caller judges, says stored).
    ack_to: str = ""
    #: That answer: stored (True), not stored or not in time (False), not yet (None).
    stored: bool | None = None
    overdue: asyncio.TimerHandle | None = None
    #: The cancel of the remote activity, sent the moment the caller's token was cancelled (the
    #: future of its acknowledgement), or None.
    cancel_sent: asyncio.Future[Any] | None = None


class _DoneView(BaseModel):
    """The fields of a republished ``activity.completed`` a call needs (the rest is not read)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["activity.completed"] = "activity.completed"
    schema_version: int = Field(default=1, ge=1)
    activity_id: str
    status: str
    result: Any = None


@dataclass(eq=False)
class _Route:
    """Where one activity call goes, and the token that cancels it."""

    tasklist: str
    token: CancelToken
    worker_id: str = ""
    session_id: str = ""


_SESSION_EVENTS = (SessionRequested, SessionCompleteRequested, SessionAssigned, SessionRejected, SessionCompleted,
                   SessionFailed)  # fmt: skip


class SessionClient:
    """The session and activity-call bookkeeping of one process (one per bus, see :func:`client_of`)."""

    NAME = "session-client"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.inbox = ""
        self._creating: dict[str, tuple[anyio.Event, list[SessionAssigned | SessionRejected]]] = {}
        self.sessions: OrderedDict[str, _Live] = OrderedDict()
        self.calls: dict[str, _Call] = {}
        #: ``<user>~<client>~``: the start of the ids of this client's activities whose stored
        #: completions the activity stream republishes to it ('' while it does not listen for them).
        self.route = ""

    async def start(self) -> None:
        """Subscribe to the session announcements and to this process's reply inbox.

        The subscriptions belong to the bus's connection (nats-py runs their callbacks and ends
        them when the bus closes): a client needs no task group of its own, so a bus opened in one
        task and closed in another (a pytest fixture) can still use sessions.
        """
        self.inbox = inbox = new_inbox(self.bus)
        # The broker's announcements only (not every caller's requests).
        for event in ("assigned", "rejected", "completed", "failed"):
            await subscribe_callback(self.bus, self.bus.subjects.filter("session", event=event), self._on_session_msg)
        # Results, and the server's answers to the stores of the completions workers hand off to
        # this caller: one subscription, taken as the connection reads them, in arrival order (no
        # task in between); what must wait (a dead letter, a task given back) gets a task of its own.
        await subscribe_now(self.bus, f"{inbox}.>", self._on_inbox_msg)
        route = await self._done_route()
        done = self.bus.topology.done_filter(route) if route else ""
        if done:
            await subscribe_now(self.bus, done, self._on_done_msg)
        await flush(self.bus)
        if done:
            refused = self.bus.nc.last_error
            if refused is not None and done in str(refused):
                _log.warning("session client: not allowed to subscribe to %s (%s); activity results come as "
                             "replies instead (deploy/README.md, 'Private replies')", done, refused)  # fmt: skip
            else:
                self.route = route

    async def _done_route(self) -> str:
        """``<user>~<client>~`` if the activity stream republishes completions to callers and this
        client's inboxes name a user (``_INBOX_<user>``, or ``_INBOX`` on a server without users: ``_``),
        else '' (its results come as replies, as from a stream set up by an older cadenza)."""
        prefix, _, client = self.inbox.rpartition(".")
        if prefix == DEFAULT_INBOX_PREFIX:
            user = "_"
        elif prefix.startswith(f"{DEFAULT_INBOX_PREFIX}_") and "." not in prefix:
            user = prefix[len(DEFAULT_INBOX_PREFIX) + 1 :]
        else:
            return ""
        if len(user) + len(client) + 2 + 36 > 200:  # the ids would not be subject tokens
            return ""
        try:
            info = await self.bus.js.stream_info(self.bus.topology.stream_name("activity"))
        except Exception as exc:  # any failure: no republish to rely on
            _log.info("session client: cannot read the activity stream's settings (%s); results come as replies", exc)
            return ""
        if info.config.republish != self.bus.topology.done_republish():
            return ""
        return f"{user}~{client}~"

    def _on_inbox_msg(self, msg: Received) -> None:
        rest = msg.subject[len(self.inbox) + 1 :]
        if rest.startswith("s."):  # <inbox>.s.<activity id>: the store's answer
            self._on_stored(rest[2:], msg)
        elif "." not in rest:  # <inbox>.<activity id>: a result
            self._on_result_msg(msg)

    def _on_done_msg(self, msg: Received) -> None:
        """A stored completion of one of this client's activities, republished by the stream: the
        result of a call that succeeded, and the proof that it is stored. (Any other outcome comes
        as a reply with its error; a completion stored by someone else first is then answered too.)"""
        aid = self.route + msg.subject.rpartition(".")[2]
        call = self.calls.get(aid)
        if call is None or call.result is not None or call.done.is_set():
            return
        try:
            # What the call needs, read in one pass (2 µs where the whole event's decode takes 9);
            # anything this does not take is decoded in full, for the dead letter's reason.
            view = _DoneView.__pydantic_validator__.validate_json(msg.data)
        except pydantic.ValidationError:
            view = None
        if view is None or view.schema_version > ActivityCompleted.SCHEMA_VERSION or view.activity_id != aid:
            try:
                event = decode(msg.data, msg.headers, (ActivityCompleted,))
            except ValidationError as exc:
                in_background(self._dead_letter(msg, exc))
                return
            if not isinstance(event, ActivityCompleted) or event.activity_id != aid:
                return
            view = _DoneView(activity_id=aid, status=event.status.value, result=event.result)
        if view.status != ActivityStatus.SUCCESS.value:
            return
        call.result = ActivityResult(activity_id=aid, ok=True, result=view.result)
        call.stored = True
        call.done.set()

    async def _on_session_msg(self, msg: Received) -> None:
        event = await self._decode(msg, _SESSION_EVENTS)
        if event is not None:
            await self._on_session(event, msg.subject)

    def _on_result_msg(self, msg: Received) -> None:
        try:
            event = decode(msg.data, msg.headers, (ActivityResult,))
        except ValidationError as exc:
            in_background(self._dead_letter(msg, exc))
            return
        if isinstance(event, ActivityResult):
            ack = (msg.headers or {}).get(HDR_TASK_ACK, "")
            ack = ack if _ACK_SUBJECT.match(ack) else ""
            if not self._on_result(event, ack) and ack:
                # Nobody waits for it any more (the call ended first: its session failed, or its
                # deadline passed as the activity ended): the task goes back to its worker at once,
                # which stores the completion and acks it (not after its ack wait).
                in_background(self.bus.settle_handed(ack, False))

    def _on_stored(self, aid: str, msg: Received) -> None:
        call = self.calls.get(aid)
        if call is None or call.stored is not None:
            return
        call.stored = _stored(msg)
        if call.result is not None and call.ack_to:
            if call.overdue is not None:
                call.overdue.cancel()
            call.done.set()

    def _store_overdue(self, call: _Call) -> None:
        call.overdue = None
        if call.stored is None:
            call.stored = False
            call.done.set()

    async def _decode(self, msg: Received, accept: tuple[type[Event], ...]) -> Event | None:
        try:
            return decode(msg.data, msg.headers, accept)
        except ValidationError as exc:
            await self._dead_letter(msg, exc)
            return None

    async def _dead_letter(self, msg: Received, exc: ValidationError) -> None:
        with contextlib.suppress(CadenzaError):
            await self.bus.dead_letter(consumer="session-client", subject=msg.subject, data=msg.data,
                                       headers=msg.headers, reason=exc.message, error_type=exc.kind)  # fmt: skip

    # -------------------------------------------------------------- events

    async def _on_session(self, event: Any, subject: str) -> None:
        sid = event.session_id
        if isinstance(event, SessionAssigned | SessionRejected):
            waiting = self._creating.get(sid)
            if waiting is not None and not waiting[1]:
                waiting[1].append(event)
                waiting[0].set()
        elif isinstance(event, SessionCompleted):
            self._ended(sid, SessionState.COMPLETED, "", "")
        elif isinstance(event, SessionFailed):
            self._ended(sid, SessionState.FAILED, event.cause.value, event.message)

    def _ended(self, sid: str, state: SessionState, cause: str, message: str) -> None:
        live = self.sessions.get(sid)
        if live is None:
            return
        if state is SessionState.FAILED:
            # Waiting callers first, so they see the session's failure rather than a bare cancel.
            for aid in list(live.calls):
                call = self.calls.get(aid)
                if call is not None and not call.done.is_set():
                    call.session_failed = SessionFailedError(sid, cause, message)
                    call.done.set()
        live.end(state, cause, message)
        live.announced.set()
        self._forget_ended()

    def _forget_ended(self, keep: int = 100_000) -> None:
        while len(self.sessions) > keep:
            sid, live = next(iter(self.sessions.items()))
            if live.info.state is SessionState.OPEN:
                self.sessions.move_to_end(sid)
                if all(v.info.state is SessionState.OPEN for v in self.sessions.values()):
                    return
                continue
            del self.sessions[sid]

    def _on_result(self, event: ActivityResult, ack: str) -> bool:
        """Give a call its result; False if no call waits for it."""
        call = self.calls.get(event.activity_id)
        if call is None or call.result is not None or call.done.is_set():
            return False
        call.result = event
        if ack:
            call.ack_to = ack
            if call.stored is None:
                # The store's answer comes first as a rule (the worker sent the completion before
                # the result); waited for a bounded time.
                loop = asyncio.get_running_loop()
                call.overdue = loop.call_later(self.bus.timeouts.publish, self._store_overdue, call)
                return True
        call.done.set()
        return True

    # -------------------------------------------------------------- sessions

    def live(self, ctx: Context) -> _Live | None:
        info = ctx.session
        if not isinstance(info, SessionInfo):
            return None
        return self.sessions.get(info.session_id)

    async def open(self, ctx: Context, options: SessionOptions, recreate_token: bytes | None = None) -> Context:
        token_text: str | None = None
        if recreate_token is not None:
            token_text = _token_text(recreate_token)
        sid = str(uuid.uuid4())
        request = SessionRequested(
            session_id=sid, tasklist=options.tasklist, creation_timeout=options.creation_timeout,
            execution_timeout=options.execution_timeout, heartbeat_timeout=options.heartbeat_timeout,
            recreate_token=token_text,
        )  # fmt: skip
        got: list[SessionAssigned | SessionRejected] = []
        ready = anyio.Event()
        self._creating[sid] = (ready, got)
        try:
            await self.bus.publish(request)
            # The broker answers by the creation deadline; the margin covers its work and the trip.
            with anyio.move_on_after(options.creation_timeout + max(2.0, self.bus.timeouts.request)):
                await ready.wait()
            outcome = got[0] if got else await self._outcome_from_store(sid)
        finally:
            del self._creating[sid]
        if outcome is None:
            # Nobody answered: withdraw the request so a broker that comes back does not open it.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
                with contextlib.suppress(CadenzaError):
                    await self.bus.publish(SessionCompleteRequested(session_id=sid, reason="abandoned by the caller"))
            raise SessionCreationError(
                f"no session broker answered within {options.creation_timeout:g}s (+ margin) for tasklist "
                f"{options.tasklist!r}; is `cadenza broker` running on {self.bus.url}?",
                reason="no_broker",
            )
        if isinstance(outcome, SessionRejected):
            raise SessionCreationError(outcome.message, reason=outcome.reason.value)
        info = SessionInfo(
            session_id=sid, host_name=outcome.host_name, worker_id=outcome.worker_id, tasklist=outcome.tasklist,
            state=SessionState.OPEN, heartbeat_timeout=outcome.heartbeat_timeout, expires_at=outcome.expires_at,
            recreate_token=outcome.recreate_token.encode(),
        )  # fmt: skip
        live = _Live(info=info, token=_outside_ended_session(ctx).child())
        self.sessions[sid] = live
        return ctx.derive(token=live.token, session=info)

    async def _outcome_from_store(self, sid: str) -> SessionAssigned | SessionRejected | None:
        """The broker's record, for a caller that missed the announcement (a reconnect, say)."""
        try:
            with anyio.fail_after(self.bus.timeouts.request):
                rec, _ = await Bucket(self.bus, "sessions", SessionRecord).get(sid)
        except (CadenzaError, TimeoutError):
            return None
        if rec is None:
            return None
        if rec.state is SessionState.REJECTED:
            return SessionRejected(session_id=sid, reason=rec.cause or "capacity", message=rec.message)
        if rec.state is SessionState.PENDING or not rec.worker_id:
            return None
        # Opened (and maybe ended since; the watcher or the next call finds out).
        return SessionAssigned(
            session_id=sid, tasklist=rec.tasklist, worker_id=rec.worker_id, host_name=rec.host_name,
            heartbeat_timeout=rec.heartbeat_timeout, expires_at=rec.expires_at or utcnow(), recreate_token="",
        )  # fmt: skip

    async def complete(self, ctx: Context) -> None:
        live = self.live(ctx)
        if live is None:
            if isinstance(ctx.session, SessionInfo) and ctx.session.state is SessionState.OPEN:
                # A session this process did not create (its context was handed over): ask anyway.
                await self.bus.publish(SessionCompleteRequested(session_id=ctx.session.session_id))
            return
        if live.info.state is not SessionState.OPEN:
            return
        sid = live.info.session_id
        # Exact for the caller at once: the session is completed from here on.
        live.end(SessionState.COMPLETED, "", "")
        await self.bus.publish(SessionCompleteRequested(session_id=sid))
        # The slot is free once the broker says so; the request is stored, so a slow broker still
        # frees it later. Wait a bounded time for the announcement.
        with anyio.move_on_after(self.bus.timeouts.request):
            await live.announced.wait()

    # -------------------------------------------------------------- activities

    async def execute(
        self,
        ctx: Context,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        start_to_close_timeout: float,
        tasklist: str | None,
        activity_id: str | None,
    ) -> Any:
        """Send the task where ``ctx`` says, wait for its result, and return it or raise what it means."""
        live = self.live(ctx)
        route = self._route(ctx, live, tasklist)
        # A UUID4 string (without the UUID object), after the route its stored completion comes back by.
        aid = activity_id or self.route + new_event_id()
        task = ActivityTask(
            activity_id=aid, name=name, args=list(args), kwargs=kwargs, tasklist=route.tasklist,
            worker_id=route.worker_id, session_id=route.session_id, reply_to=f"{self.inbox}.{aid}",
            deadline=utcnow() + timedelta(seconds=start_to_close_timeout), source=self.bus.source,
        )  # fmt: skip
        call = _Call(session_id=route.session_id)
        self.calls[aid] = call
        if live is not None and route.session_id:
            live.calls.add(aid)
        try:
            await self._send_and_wait(task, call, route.token, start_to_close_timeout)
            return await self._outcome(task, call, live, route.token, start_to_close_timeout)
        finally:
            self.calls.pop(aid, None)
            if call.overdue is not None:
                call.overdue.cancel()
            if live is not None:
                live.calls.discard(aid)

    def _route(self, ctx: Context, live: _Live | None, tasklist: str | None) -> _Route:
        """Where an activity of ``ctx`` goes: the session's worker while it is open, else the shared
        queue of the tasklist (raises at once in a failed session, or when ``ctx`` is cancelled)."""
        info = ctx.session if isinstance(ctx.session, SessionInfo) else None
        route = _Route(tasklist=tasklist or DEFAULT_TASKLIST, token=ctx.token)
        if info is not None:
            state = live.info.state if live is not None else info.state
            if state is SessionState.FAILED:
                cur = live.info if live is not None else info
                raise SessionFailedError(info.session_id, cur.cause, cur.message)
            # A completed session's activities go to the shared queue of the session's tasklist
            # (as documented), not to "default".
            route.tasklist = tasklist or info.tasklist or DEFAULT_TASKLIST
            if state is SessionState.OPEN:
                route.worker_id, route.session_id = info.worker_id, info.session_id
            elif route.token.parent is not None:
                # Completed: the activity runs like one outside the session (Cadence does the
                # same), so the session's cancellation does not apply to it.
                route.token = route.token.parent
        if route.token.cancelled:
            assert route.token.cause is not None
            raise ActivityCancelledError(route.token.cause)
        return route

    async def _send_and_wait(self, task: ActivityTask, call: _Call, token: CancelToken, timeout: float) -> None:
        """Publish ``task`` and wait until its call is done, ``token`` is cancelled or ``timeout``
        passed; the stored outcome is read after a reconnect meanwhile, and once more at the end, in
        case the answer was lost with the connection."""
        aid = task.activity_id
        # Sent without asking for the server's acknowledgement: the worker's answer can only come
        # once the task is stored, so it says stored. With no answer within ``task_store_check`` the
        # task is published again, awaited (PublishError if that fails; a shared queue's task is
        # stored once by its Nats-Msg-Id, a second copy of a session's is taken by its worker without
        # a second run): a task the server did not take is known then, one message per call saved now.
        handoff = {HDR_STORE_ACK_TO: f"{self.inbox}.s.{aid}"}
        if self.route and aid.startswith(self.route):
            handoff[HDR_DONE] = "1"
        # A session's task without Nats-Msg-Id (the stream's duplicate check costs its server 3-6 µs
        # a task): its worker alone takes it, and runs an activity id once; a task of the shared
        # queue, which any worker may take, keeps it.
        await self.bus.send_stored_to(task, "", handoff, dedupe=not task.session_id)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout
        check = now + self.bus.timeouts.task_store_check
        on_cancel = functools.partial(self._cancel_at_once, call, aid)
        published, reconnects = False, self.bus.nc.stats["reconnects"]
        try:
            while True:
                # One wait for the result, the context's cancel, the deadline and the store check
                # (a future and a timer: no cancel scope per call); a cancel of the context goes
                # out to the worker as it happens, not once this task has woken.
                wake = min(check, deadline)
                if not call.done.is_set():
                    call.done.waiter = loop.create_future()
                    try:
                        await token.sleep(call.done.waiter, wake, on_cancel)
                    finally:
                        call.done.waiter = None
                if call.ack_to and call.result is not None and call.session_failed is None:
                    if await self._settle_task(call):
                        break
                    continue
                if call.done.is_set() or token.cancelled or wake >= deadline or loop.time() >= deadline:
                    break
                if not published:
                    published = True
                    await self.bus.publish(task, headers=handoff)
                elif self.bus.nc.stats["reconnects"] != reconnects:
                    # The connection was lost meanwhile, and the answer (a result, a republished
                    # completion) may have been lost with it: the stream has the outcome if it is stored.
                    reconnects = self.bus.nc.stats["reconnects"]
                    stored = await self._stored_result(aid)
                    if stored is not None:
                        call.result = stored
                        call.done.set()
                        break
                check = loop.time() + _LOST_LOOK
        except anyio.get_cancelled_exc_class():
            # The caller's own task was cancelled (not the context): the work is not wanted any more.
            if not call.done.is_set():
                await self._cancel_remote(aid, CancelCause(kind=CancelKind.SHUTDOWN, who=self.bus.source,
                                                           reason="the caller stopped waiting"))  # fmt: skip
            raise
        if not call.done.is_set() and not token.cancelled:
            stored = await self._stored_result(aid)
            if stored is not None:
                call.result = stored
                call.done.set()

    async def _settle_task(self, call: _Call) -> bool:
        """Ack the task whose result came with its ack handed off, if the completion is stored
        (True); else hand the task back to its worker, which stores the completion and answers
        again, and wait for that answer (False). A wait that ended before the store's answer (a
        cancel, the deadline) hands it back too, and keeps the result."""
        ack, stored = call.ack_to, call.stored
        call.ack_to = ""
        await self.bus.settle_handed(ack, bool(stored))
        if stored or not call.done.is_set():
            return True
        _log.info("activity call: the completion's store was not acknowledged; its worker stores it again")
        call.result, call.stored, call.done = None, None, _Done()
        return False

    async def _outcome(
        self, task: ActivityTask, call: _Call, live: _Live | None, token: CancelToken, timeout: float
    ) -> Any:
        """The result of a finished wait, or the error it means (a cancel or a timeout is sent on)."""
        aid, sid = task.activity_id, task.session_id
        if call.session_failed is not None:
            raise call.session_failed
        if call.result is not None:
            try:
                return _unwrap(call.result, sid)
            except SessionFailedError as exc:
                # The worker heard of the failure before the broker's announcement reached this
                # process: the session is failed here from now on (its state says so, and the
                # next call raises at once and publishes nothing).
                err = call.result.error
                if live is not None and exc.cause in _FAILURES and err is not None and err.cause is not None:
                    live.end(SessionState.FAILED, exc.cause, err.cause.reason.split(":", 1)[-1].strip())
                raise
        if token.cancelled:
            assert token.cause is not None
            await self._cancel_remote(aid, token.cause, call.cancel_sent)
            if token.cause.kind is CancelKind.SESSION_FAILED and live is not None:
                raise SessionFailedError(sid, live.info.cause, live.info.message)
            raise ActivityCancelledError(token.cause)
        await self._cancel_remote(
            aid, CancelCause(kind=CancelKind.DEADLINE, who=self.bus.source, reason=f"no result within {timeout:g}s"),
        )  # fmt: skip
        raise ActivityTimeoutError(
            f"activity {task.name} ({aid}) returned no result within {timeout:g}s; it was cancelled"
        )

    def _cancel_at_once(self, call: _Call, aid: str, cause: CancelCause) -> None:
        """The waiting call's token was cancelled (its scope's hook, run where the cancel happened):
        the cancel of the activity is on the connection before the loop turns. Nothing if the
        result is in already (the waiting task returns it)."""
        if not call.done.is_set() and call.cancel_sent is None:
            # With its source: no copy of the event to add it (on the way to the socket).
            cancel = CancelRequested(target="activity", target_id=aid, cause=cause, source=self.bus.source)
            call.cancel_sent = self.bus.start_publish(cancel)

    async def _cancel_remote(self, aid: str, cause: CancelCause, sent: asyncio.Future[Any] | None = None) -> None:
        """Cancel activity ``aid`` on its worker: wait for the store of the cancel already ``sent``
        (:meth:`_cancel_at_once`), or publish it; best effort, bounded by the shutdown timeout."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
            with contextlib.suppress(CadenzaError):
                if sent is not None and not sent.cancelled():
                    await sent
                    return
                await self.bus.publish(CancelRequested(target="activity", target_id=aid, cause=cause))

    async def _stored_result(self, aid: str) -> ActivityResult | None:
        try:
            return await stored_result(self.bus, aid)
        except CadenzaError:
            return None


async def stored_result(bus: Bus, aid: str) -> ActivityResult | None:
    """The result the stored completion of activity ``aid`` says (None: none is stored).

    Raises:
        CadenzaError: the stream could not be read.
    """
    stored = await last_event(bus, "activity", bus.subjects.build("activity", aid, "completed"), [ActivityCompleted])
    event = stored.event if stored is not None else None
    if not isinstance(event, ActivityCompleted):
        return None
    if event.status.value == "success":
        return ActivityResult(activity_id=aid, ok=True, result=event.result)
    error = TaskError(type="ActivityError", message=event.error or event.status.value)
    return ActivityResult(activity_id=aid, ok=False, error=error)


#: A task's ack subject as JetStream makes it (``$JS.ACK.<stream>.<consumer>.…``, or with a domain).
_ACK_SUBJECT = re.compile(r"^\$JS\.ACK\.[^\s*>]{1,500}$")


def _stored(msg: Received) -> bool:
    """Whether the server's answer to a completion's store says it is stored (or another completion
    of the activity is: the first one stays)."""
    problem = answer_error(msg.headers, msg.data)
    return problem is None or completed_already(problem)


def _outside_ended_session(ctx: Context) -> CancelToken:
    """The token a new session of ``ctx`` derives from: not that of the ended session ``ctx`` holds.

    A completed or failed session's token is cancelled; a session made under it would be born
    cancelled. Its parent is the token the ended session was made under.
    """
    token = ctx.token
    cause = token.cause
    if isinstance(ctx.session, SessionInfo) and cause is not None and token.parent is not None and \
            cause.kind in (CancelKind.SESSION_COMPLETED, CancelKind.SESSION_FAILED):  # fmt: skip
        return token.parent
    return token


_FAILURES = frozenset(f.value for f in SessionFailure)


def _unwrap(result: ActivityResult, sid: str) -> Any:
    if result.ok:
        return result.result
    err = result.error or TaskError(type="ActivityError", message="(no error given)")
    if err.session_failed:
        raise SessionFailedError(sid, "", err.message)
    if err.cause is not None:
        if err.cause.kind is CancelKind.SESSION_FAILED:
            raise SessionFailedError(sid, err.cause.reason.split(":", 1)[0], err.cause.reason)
        raise ActivityCancelledError(err.cause)
    raise ActivityFailedError(err.message, type=err.type, non_retryable=err.non_retryable)


def _token_text(token: bytes | str) -> str:
    text = token.decode("ascii", errors="replace") if isinstance(token, bytes) else token
    if not text or len(text) > 4096 or "." not in text:
        raise SessionCreationError(
            "the recreate token is malformed: pass SessionInfo.recreate_token exactly as it was given",
            reason="bad_token",
        )
    with contextlib.suppress(binascii.Error, ValueError):
        base64.urlsafe_b64decode(text.split(".", 1)[0] + "==")
        return text
    raise SessionCreationError("the recreate token is malformed: it is not a cadenza token", reason="bad_token")


# ------------------------------------------------------------------ module functions


def bus_of(ctx: Context) -> Bus:
    """The bus a context carries (``Bus.context()`` or a worker's activity context).

    Raises:
        UsageError: the context carries no bus (it was not made from one).
    """
    b = ctx.values.get(BUS_KEY)
    if not isinstance(b, Bus):
        raise UsageError(
            "this context carries no bus: start from `b.context()` (b from `bus.connect()`), or use the context "
            "given to an activity"
        )
    return b


async def client_of(ctx: Context | Bus) -> SessionClient:
    """The :class:`SessionClient` of the context's bus (started on first use)."""
    b = ctx if isinstance(ctx, Bus) else bus_of(ctx)
    existing = b.get_helper(SessionClient.NAME, SessionClient)
    if existing is not None and existing.inbox:
        return existing
    return await b.start_helper(SessionClient.NAME, SessionClient(b))


async def create_session(ctx: Context, options: SessionOptions) -> Context:
    """Open a session and return a context bound to it.

    Activities executed with the returned context run on the session's worker only. Its token is a
    child of ``ctx``'s: cancelling ``ctx`` cancels the session's work too.

    Raises:
        SessionError: ``ctx`` already holds an open session ("found existing open session").
        SessionCreationError: no worker of the tasklist had a free slot within ``creation_timeout``
            (``reason`` says which case), or no broker answered.
        pydantic.ValidationError: bad options (raised when building :class:`SessionOptions`).
    """
    client = await client_of(ctx)
    _no_open_session(ctx, client)
    return await client.open(ctx, options)


async def recreate_session(ctx: Context, recreate_token: bytes, options: SessionOptions) -> Context:
    """Open a **new** session on the worker of the session ``recreate_token`` came from.

    Raises:
        SessionCreationError: ``reason`` ``bad_token`` (malformed or forged), ``worker_unavailable``
            (that worker is gone or full until ``creation_timeout``), or as :func:`create_session`.
    """
    client = await client_of(ctx)
    _no_open_session(ctx, client)
    return await client.open(ctx, options, recreate_token=recreate_token)


def _no_open_session(ctx: Context, client: SessionClient) -> None:
    info = ctx.session
    if isinstance(info, SessionInfo):
        live = client.live(ctx)
        state = live.info.state if live is not None else info.state
        if state is SessionState.OPEN:
            raise SessionError(f"found existing open session {info.session_id} in this context; complete it first")


async def complete_session(ctx: Context) -> None:
    """Complete the context's session: cancel its context (cause ``session_completed``), release its slot.

    A no-op when the context has no session or the session is not open (safe to call twice, or on a
    failed session). Returns once the broker announced the end (bounded by ``Timeouts.request``;
    the stored request frees the slot later if the broker is slow).
    """
    if not isinstance(ctx.session, SessionInfo):
        return
    client = await client_of(ctx)
    await client.complete(ctx)


def get_session_info(ctx: Context) -> SessionInfo | None:
    """The context's session as this process knows it now (state included), or None outside a session."""
    info = ctx.session
    if not isinstance(info, SessionInfo):
        return None
    b = ctx.values.get(BUS_KEY)
    client = b.get_helper(SessionClient.NAME, SessionClient) if isinstance(b, Bus) else None
    if client is not None:
        live = client.sessions.get(info.session_id)
        if live is not None:
            return live.info
    return info


async def execute_activity(
    ctx: Context,
    name: str,
    *args: Any,
    start_to_close_timeout: float | timedelta = 60.0,
    tasklist: str | None = None,
    activity_id: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Run activity ``name`` on a worker and return its result.

    In an open session: on the session's worker only. In a failed session: raises at once, nothing
    is sent. Outside a session, or in a completed one: on any worker of ``tasklist`` (default: the
    session's tasklist, else ``"default"``).

    Args:
        args / kwargs: JSON-serialisable arguments.
        start_to_close_timeout: how long to wait for the result; then the activity is cancelled
            (cause ``deadline``) and :class:`ActivityTimeoutError` is raised.
        activity_id: the activity's id (default: a fresh UUID); the recorder lists it under this id.

    Raises:
        SessionFailedError: the session failed before or while the activity ran.
        ActivityCancelledError: the context was cancelled (its ``cause`` says why).
        ActivityFailedError: the activity raised on the worker.
        ActivityTimeoutError: no result in time.
    """
    timeout = start_to_close_timeout.total_seconds() if isinstance(start_to_close_timeout, timedelta) \
        else float(start_to_close_timeout)  # fmt: skip
    if timeout <= 0:
        raise ValidationError("start_to_close_timeout must be > 0", kind="bad_option")
    client = await client_of(ctx)
    return await client.execute(
        ctx, name, args, dict(kwargs or {}), start_to_close_timeout=timeout, tasklist=tasklist,
        activity_id=activity_id,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def session(ctx: Context, options: SessionOptions) -> AsyncIterator[Context]:
    """``async with session(ctx, options) as sctx:``: create a session, complete it on the way out."""
    sctx = await create_session(ctx, options)
    try:
        yield sctx
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus_of(sctx).timeouts.shutdown):
            with contextlib.suppress(CadenzaError):
                await complete_session(sctx)
