"""The worker runtime: runs activities from a tasklist's shared queue and, for sessions, its own inbox.

A :class:`Worker` announces itself and sends **one** heartbeat per interval for the whole process
(whatever the number of sessions it holds), consumes ``<prefix>.task.<tasklist>.queued`` and, with
sessions enabled, ``<prefix>.task.<worker_id>.inbox``, and runs each activity in its own cancel
scope, tracked through the activity API (so session activities show up in the recorder).

Session bookkeeping is the broker's (slots by compare-and-set); the worker keeps its own count from
the ``session_opened`` / ``session_closed`` notices in its inbox, reports it in its heartbeats
(``open_sessions``, ``peak_sessions``) and cancels the work of a session that ends.

Inside an activity, :func:`activity_context` gives the context (activity id, session, cancellation),
and :func:`activity_writer` a writer whose lines become the activity's messages.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar, overload

import anyio
from anyio.abc import TaskGroup, TaskStatus

from schemas import (
    DEFAULT_TASKLIST,
    ActivityCompleted,
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    CancelCause,
    CancelKind,
    SessionClosed,
    SessionOpened,
    SessionRecord,
    SessionState,
    TaskError,
    WorkerPing,
    WorkerPong,
    WorkerStopped,
    check_token,
    utcnow,
)

from .._cancel import CancelRouter
from .._context import BUS_KEY, CancelToken, Context
from .._exceptions import CadenzaError, UsageError, ValidationError
from .._heartbeat import Heartbeater, ProcessLoad, describe_activities, new_worker_id
from ..tracking._api import ActivityAlreadyStartedError, StartRequest, status_for_cause, store_first_completion
from ..tracking._service import BusActivityService
from ..tracking._writer import flush_writer
from ..transport._bucket import Bucket
from ..transport._bus import Bus, Delivery
from ..transport._codec import HDR_DONE, HDR_STORE_ACK_TO, HDR_TASK_ACK, encode
from ..transport._errors import engine_errors
from ..transport._publish import answer_error, settle_now
from ..transport._streams import Received, delete_consumer
from ..transport._subscriptions import new_inbox, subscribe_now
from ..transport._topology import ConsumerSpec
from ._activity import _current, _Running
from ._client import SessionInfo, stored_result

__all__ = ("ActivityRegistry", "Worker", "WorkerState")

_log = logging.getLogger("cadenza.worker")

F = TypeVar("F", bound=Callable[..., Any])

_SESSION_ENDS = frozenset({CancelKind.SESSION_COMPLETED, CancelKind.SESSION_FAILED})
#: Seconds per attempt of storing a completion before its caller is answered (x the publish retries).
_COMPLETION_TIMEOUT = 0.75
#: Completions handed off to their callers (the caller acks the task once the store is acknowledged)
#: that this worker keeps for a redelivery of their task: the caller gave it back (the store failed)
#: or died before its ack.
_HANDED_KEPT = 4096
#: Session tasks whose ids this worker keeps, to take a second copy of one without running it again.
_ARRIVED_KEPT = 100_000
#: Seconds a full worker keeps trying to read the record of a session it holds, when the broker gives
#: it one more (a node restart's elections took up to about 15 s on a loaded machine).
_RECONCILE_READ_BUDGET = 25.0


class WorkerState(enum.Enum):
    """Where a :class:`Worker` is in its life (it starts once and stops once)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ActivityRegistry(dict[str, Callable[..., Any]]):
    """Activities by name; ``@registry.activity()`` (or ``("name")``) registers a function.

    A module can declare one and ``cadenza worker module:registry`` serves it.
    """

    @overload
    def activity(self, name: F) -> F: ...
    @overload
    def activity(self, name: str | None = None) -> Callable[[F], F]: ...
    def activity(self, name: str | F | None = None) -> F | Callable[[F], F]:
        """Register the decorated function (async or plain) under ``name`` (default: its ``__name__``).

        Use as ``@registry.activity``, ``@registry.activity()`` or ``@registry.activity("name")``.

        Raises:
            ValueError: another function is registered under that name.
        """
        if callable(name):
            return self.activity(None)(name)

        def register(fn: F) -> F:
            key = name or fn.__name__
            if key in self and self[key] is not fn:
                raise ValueError(f"an activity named {key!r} is registered already")
            self[key] = fn
            return fn

        return register


@dataclass(eq=False)
class _Session:
    info: SessionInfo
    token: CancelToken
    registration: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class Worker:
    """Runs registered activities for ``tasklist``; holds sessions when ``enable_sessions``.

    Use ``async with Worker(b, tasklist="gpu") as w:`` (or ``await w.run()``), register activities with
    ``@w.activity()`` before starting.

    Args:
        bus: the bus.
        tasklist: which shared queue it serves and which sessions it may hold.
        enable_sessions: take sessions (an inbox of its own).
        max_concurrent_sessions: the most sessions it holds at once (the broker never gives more).
        max_concurrent_activities: activities running at once in this process.
        heartbeat_interval: seconds between heartbeats; sessions asking for a ``heartbeat_timeout``
            under twice this are not placed here.
        worker_id: identity of this process start (default: a fresh one).
        activities: activities to serve besides those registered with :meth:`activity`.
        track_activities: publish activity events for the recorder (a completion; a started event
            too for an activity still running after ``announce_after`` seconds, or one that reports).
        announce_after: seconds an activity runs before its start is published on its own.
        task_ack_wait: seconds the server waits for a task's ack before it delivers the task again
            (a running activity keeps its task alive; a task handed to its caller to ack, whose
            caller died, comes back after this and its completion is stored again).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        tasklist: str = DEFAULT_TASKLIST,
        enable_sessions: bool = True,
        max_concurrent_sessions: int = 1000,
        max_concurrent_activities: int = 1000,
        heartbeat_interval: float = 5.0,
        worker_id: str | None = None,
        activities: Mapping[str, Callable[..., Any]] | None = None,
        track_activities: bool = True,
        announce_after: float = 0.5,
        task_ack_wait: float = 30.0,
    ) -> None:
        check_token(tasklist, "tasklist")
        if announce_after < 0:
            raise ValueError("announce_after must be >= 0")
        if max_concurrent_sessions < 1 or max_concurrent_activities < 1:
            raise ValueError("max_concurrent_sessions and max_concurrent_activities must be at least 1")
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        if task_ack_wait < 1:
            raise ValueError("task_ack_wait must be at least 1 second")
        self.bus = bus
        self.tasklist = tasklist
        self.enable_sessions = enable_sessions
        self.max_concurrent_sessions = max_concurrent_sessions
        self.max_concurrent_activities = max_concurrent_activities
        self.heartbeat_interval = heartbeat_interval
        self.worker_id = worker_id or new_worker_id("worker")
        check_token(self.worker_id, "worker_id")
        self.track_activities = track_activities
        self.announce_after = announce_after
        self.task_ack_wait = task_ack_wait
        self.activities = ActivityRegistry(activities or {})
        self.state = WorkerState.NEW
        self.peak_sessions = 0
        self.oversubscribed = 0
        self._sessions: dict[str, _Session] = {}
        #: Sessions that ended here lately, to answer a late task with how they ended.
        self._ended: OrderedDict[str, SessionClosed] = OrderedDict()
        self._running = 0
        #: Completions handed off to their callers, by activity id (see :meth:`_answer_again`).
        self._handed: OrderedDict[str, tuple[ActivityCompleted, Any, TaskError | None]] = OrderedDict()
        #: Where the server acknowledges the stores of completions whose callers hear them
        #: republished (``Cadenza-Done``), and the tasks to ack on each, by activity id.
        self._stored_inbox = ""
        self._settle: OrderedDict[str, str] = OrderedDict()
        #: The ids of the session tasks that came here (first deliveries), to take a second copy of one
        #: without running or answering it.
        self._arrived: OrderedDict[str, None] = OrderedDict()
        self._root = CancelToken()
        self.router = CancelRouter(bus)
        self.service = BusActivityService(bus, self.worker_id, heartbeat=False, router=self.router)
        self.heartbeater = Heartbeater(
            bus, worker_id=self.worker_id, interval=heartbeat_interval, load=self._load, tasklist=tasklist,
            sessions_enabled=enable_sessions, max_sessions=max_concurrent_sessions if enable_sessions else 0,
            activities=lambda: describe_activities(self.activities),
        )  # fmt: skip
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._consumers: list[anyio.CancelScope] = []
        self._idle = anyio.Event()
        self._values = MappingProxyType({BUS_KEY: bus})

    def __repr__(self) -> str:
        return f"<Worker {self.worker_id} {self.tasklist} {self.state.value} sessions={len(self._sessions)}>"

    # ------------------------------------------------------------ registration

    @overload
    def activity(self, name: F) -> F: ...
    @overload
    def activity(self, name: str | None = None) -> Callable[[F], F]: ...
    def activity(self, name: str | F | None = None) -> F | Callable[[F], F]:
        """Decorator: serve the function as activity ``name`` (default: its ``__name__``)."""
        return self.activities.activity(name)

    @property
    def open_sessions(self) -> int:
        """Sessions this worker holds now, by its own count."""
        return len(self._sessions)

    def _load(self) -> ProcessLoad:
        return ProcessLoad(open_sessions=len(self._sessions), running_activities=self._running,
                           peak_sessions=self.peak_sessions)  # fmt: skip

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Worker:
        if self.state is not WorkerState.NEW:
            raise UsageError("a Worker can be started once")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._tg.start(self.router.run)
            await self._tg.start(functools.partial(
                self.bus.serve, self.bus.rpc_subject(self.worker_id, "ping"), WorkerPing, self._pong,
                name=f"ping-{self.worker_id}"))  # fmt: skip
            await stack.enter_async_context(self.service)
            self._stored_inbox = new_inbox(self.bus)
            await subscribe_now(self.bus, f"{self._stored_inbox}.>", self._on_completion_stored)
            subjects = self.bus.subjects
            shared = ConsumerSpec(
                durable=f"tasks-{self.tasklist}", filter_subject=subjects.build("task", self.tasklist, "queued"),
                ack_wait=self.task_ack_wait, max_ack_pending=100_000, ack_sync=False,
            )  # fmt: skip
            specs: list[tuple[ConsumerSpec, list[Any]]] = [(shared, [ActivityTask])]
            if self.enable_sessions:
                inbox = ConsumerSpec(
                    durable=f"inbox-{self.worker_id}", filter_subject=subjects.build("task", self.worker_id, "inbox"),
                    ack_wait=self.task_ack_wait, max_ack_pending=100_000, inactive_threshold=3600.0,
                    ack_sync=False,
                )  # fmt: skip
                specs.append((inbox, [ActivityTask, SessionOpened, SessionClosed]))
            for spec, accept in specs:
                scope = anyio.CancelScope()
                self._consumers.append(scope)
                await self._tg.start(self._consume, scope, spec, accept)
            # Announced last: the broker places sessions only once the inbox is being read.
            await self._tg.start(self.heartbeater.run)
        except BaseException as exc:
            _log.error("worker %s did not start: %r", self.worker_id, exc)
            with anyio.CancelScope(shield=True):
                await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self.state = WorkerState.RUNNING
        return self

    async def _consume(
        self, scope: anyio.CancelScope, spec: ConsumerSpec, accept: list[Any],
        *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        with scope:
            await self.bus.consume(spec, accept, self._on_task, domain="task",
                                   concurrency=self.max_concurrent_activities, task_status=task_status)  # fmt: skip

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, then shut down gracefully."""
        async with self:
            task_status.started()
            await anyio.sleep_forever()

    async def aclose(self, reason: str = "shutdown") -> None:
        """Stop gracefully: announce the stop (the broker fails this worker's sessions at once with
        ``worker_shutdown``), cancel running activities, stop consuming. Safe to call twice."""
        if self.state is not WorkerState.RUNNING:
            self.state = WorkerState.STOPPED
            return
        self.state = WorkerState.STOPPING
        assert self._stack is not None
        timeouts = self.bus.timeouts
        with anyio.CancelScope(shield=True):
            # The announcement first, so callers hear "worker_shutdown" rather than a bare cancel.
            self.heartbeater.mark_crashed()  # the stop is announced here, not by the heartbeater
            with anyio.move_on_after(timeouts.shutdown), contextlib.suppress(CadenzaError):
                fields = self.heartbeater._fields()
                await self.bus.publish(WorkerStopped.model_validate({**fields, "reason": reason}))
            for sess in list(self._sessions.values()):
                sess.token.cancel(CancelCause(kind=CancelKind.SESSION_FAILED, who=self.worker_id,
                                              reason="worker_shutdown: the worker is shutting down"))  # fmt: skip
            self._root.cancel(CancelCause(kind=CancelKind.SHUTDOWN, who=self.worker_id,
                                          reason="the worker is shutting down"))  # fmt: skip
            with anyio.move_on_after(timeouts.shutdown):
                while self._running:  # noqa: ASYNC110 - a counter, not an event; bounded by the timeout
                    await anyio.sleep(0.01)
            for scope in self._consumers:
                scope.cancel()
            if self.enable_sessions:
                with anyio.move_on_after(timeouts.shutdown), contextlib.suppress(Exception):
                    await delete_consumer(self.bus, "task", f"inbox-{self.worker_id}")
            for sess in list(self._sessions.values()):
                sess.registration.close()
            self._sessions.clear()
            assert self._tg is not None
            self._tg.cancel_scope.cancel()
        # Outside the shield: the task group must be left in the scope it was entered in.
        await self._stack.__aexit__(None, None, None)
        self.state = WorkerState.STOPPED

    async def _pong(self, _ping: WorkerPing) -> WorkerPong:
        return WorkerPong(worker_id=self.worker_id, open_sessions=len(self._sessions))

    # ------------------------------------------------------------ inbox

    async def _on_task(self, event: Any, delivery: Delivery) -> None:
        if isinstance(event, (SessionOpened, SessionClosed)) and event.worker_id != self.worker_id:
            # In this worker's inbox but addressed to another: not applied, so dead-lettered.
            reason = f"a {event.type} notice for worker {event.worker_id} in the inbox of {self.worker_id}"
            await self._dead_letter(event, delivery, reason, "wrong_worker")
            return
        if isinstance(event, SessionOpened):
            await self._opened(event)
        elif isinstance(event, SessionClosed):
            self._closed(event)
        else:
            await self._run(event, delivery)

    async def _opened(self, event: SessionOpened) -> None:
        await self._admit(event.session_id, event.expires_at)

    async def _admit(self, sid: str, expires_at: datetime | None) -> None:
        """Open ``sid`` here (from its notice, or from its record when a task came first)."""
        if len(self._sessions) >= self.max_concurrent_sessions and sid not in self._sessions and sid not in self._ended:
            # The broker's slots say there is room, so a close notice is late (its delivery was lost
            # in a node restart and comes again after the ack wait): the records tell which ended.
            await self._reconcile()
        self._open(sid, expires_at)

    async def _reconcile(self) -> None:
        """Close here the sessions whose record says they ended (or moved): their notice is late."""
        # Read for as long as a cluster may take to elect leaders: a session kept because its record
        # could not be read is one slot too many here.
        deadline = anyio.current_time() + _RECONCILE_READ_BUDGET
        for sid in list(self._sessions):
            record = await self._stored_session(sid, budget=max(1.0, deadline - anyio.current_time()))
            if record is None or (record.state is SessionState.OPEN and record.worker_id == self.worker_id):
                continue  # open here (or unknown: kept, the broker's notice will come)
            state = record.state if record.ended else SessionState.FAILED
            kind = CancelKind.SESSION_COMPLETED if state is SessionState.COMPLETED else CancelKind.SESSION_FAILED
            why = record.message or f"the session is {record.state.value} on {record.worker_id or 'no worker'}"
            _log.warning("worker %s: session %s ended without its notice reaching us yet (%s)", self.worker_id, sid,
                         why)  # fmt: skip
            cause = CancelCause(kind=kind, who="broker", reason=why)
            self._closed(SessionClosed(event_id=f"closed-{sid}", worker_id=self.worker_id, session_id=sid,
                                       state=state, cause=cause))  # fmt: skip

    def _open(self, sid: str, expires_at: datetime | None) -> None:
        if sid in self._sessions or sid in self._ended:
            return  # known already (from its record, or a redelivered notice), or over
        if len(self._sessions) >= self.max_concurrent_sessions:
            # The broker's slots make this impossible; counted so a test (and an operator) sees it.
            self.oversubscribed += 1
            _log.error("worker %s got session %s beyond its %d slots", self.worker_id, sid,
                       self.max_concurrent_sessions)  # fmt: skip
        info = SessionInfo(session_id=sid, worker_id=self.worker_id, tasklist=self.tasklist, expires_at=expires_at)
        sess = _Session(info=info, token=self._root.child())
        sess.registration.enter_context(self.router.register(sid, sess.token))
        self._sessions[sid] = sess
        self.peak_sessions = max(self.peak_sessions, len(self._sessions))

    async def _session_of(self, sid: str) -> _Session | None:
        """The open session ``sid`` of a task, or None.

        The broker stores its notice in the task stream before the caller hears of the session, so
        the notice comes first, unless its delivery was lost (a node restart) and comes again
        later: then the session's record, written before the notice was sent, decides.
        """
        sess = self._sessions.get(sid)
        if sess is not None or sid in self._ended:
            return sess
        record = await self._stored_session(sid)
        if record is not None and record.state is SessionState.OPEN and record.worker_id == self.worker_id:
            _log.info("worker %s: a task of session %s came before the broker's notice; opened from its record",
                      self.worker_id, sid)  # fmt: skip
            # Through the same check as a notice: the notices held up with this one may include a
            # close that frees the slot the broker gave this session.
            await self._admit(sid, record.expires_at)
        return self._sessions.get(sid)

    async def _stored_session(self, sid: str, budget: float = 10.0) -> SessionRecord | None:
        try:
            with anyio.fail_after(budget):  # transient errors are retried for as long
                record, _ = await Bucket(self.bus, "sessions", SessionRecord).get(sid)
        except ValidationError:
            return None  # not a session record
        except (CadenzaError, TimeoutError) as exc:
            _log.warning("worker %s: cannot read session %s: %r", self.worker_id, sid, exc)
            return None
        return record

    def _closed(self, event: SessionClosed) -> None:
        self._ended[event.session_id] = event
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)
        sess = self._sessions.pop(event.session_id, None)
        if sess is None:
            return
        sess.token.cancel(event.cause)
        sess.registration.close()

    # ------------------------------------------------------------ activities

    async def _run(self, task: ActivityTask, delivery: Delivery) -> None:
        aid = task.activity_id
        # A redelivery of a task whose activity ended here is answered again; one of an activity
        # still running here goes on below, where the first run answers.
        if delivery.deliveries > 1 and (aid in self._handed or self.service.ended(aid) is not None):
            await self._answer_again(task)
            return
        if task.session_id and delivery.deliveries == 1:
            # A session's task is sent without Nats-Msg-Id: a copy its caller sent again (no answer
            # within task_store_check) is stored twice. The first copy answers, or answered: the
            # second neither runs nor answers (an answer from the session's state by then, "not
            # open" after it ended, could reach the caller before the activity's own).
            if aid in self._arrived:
                return
            self._arrived[aid] = None
            while len(self._arrived) > _ARRIVED_KEPT:
                self._arrived.popitem(last=False)
        if task.deadline is not None and task.deadline <= utcnow():
            await self._refuse(task, delivery, TaskError(type="ActivityTimeoutError", non_retryable=True,
                                                         message="the task arrived after its deadline"))  # fmt: skip
            return
        fn = self.activities.get(task.name)
        if fn is None:
            known = ", ".join(sorted(self.activities)) or "(none)"
            await self._refuse(task, delivery, TaskError(
                type="ActivityNotRegisteredError", non_retryable=True,
                message=f"worker {self.worker_id} has no activity {task.name!r}; it serves: {known}"))  # fmt: skip
            return
        sess: _Session | None = None
        if task.session_id:
            sess = await self._session_of(task.session_id)
            if sess is None or sess.token.cancelled:
                ended = self._ended.get(task.session_id)
                if ended is not None and ended.state is SessionState.COMPLETED:
                    # Sent just before the caller heard of the completion: cancelled with that cause.
                    await self._refuse(task, delivery, TaskError(
                        type="ActivityCancelledError", cause=ended.cause, non_retryable=True,
                        message=f"session {task.session_id} was completed before the activity started"))  # fmt: skip
                    return
                await self._refuse(task, delivery, TaskError(
                    type="SessionFailedError", session_failed=True, non_retryable=True,
                    message=f"session {task.session_id} is not open on worker {self.worker_id}"
                    + (f" ({ended.cause.reason})" if ended is not None else "")))  # fmt: skip
                return
        parent = sess.token if sess is not None else self._root
        ctx = Context(token=parent, session=sess.info if sess is not None else None, values=self._values)
        # A cancel for this activity is published after the task; if the router was listening
        # before the task was sent, it heard (and keeps) any such cancel: no stream look-up needed.
        ask_stream = delivery.deliveries > 1 or not self.router.seen_since(task.time)
        self._running += 1
        try:
            await self._execute(task, fn, ctx, ask_stream, delivery)
        finally:
            self._running -= 1

    async def _execute(
        self, task: ActivityTask, fn: Callable[..., Any], ctx: Context, ask_stream: bool, delivery: Delivery
    ) -> None:
        aid = task.activity_id
        svc = self.service
        if self.track_activities:
            try:
                # Announced only if it is still running after announce_after (or publishes an event
                # first); a quick activity is announced by its completion alone. An early cancel is
                # looked for in the background: the task's round trip waits for neither.
                req = StartRequest(id=aid, type=task.name, worker_id=self.worker_id, session_id=task.session_id or None)
                svc._start_deferred(req, self.announce_after)
            except ActivityAlreadyStartedError:
                # A redelivery of a task this process runs or ran: the first run answers.
                return
            work = await svc.track(ctx, aid, check_now=False, check_stored=ask_stream)
            await self._body(task, fn, work, delivery)
            return
        work = ctx.child(activity_id=aid)
        with svc.router.register(aid, work.token):
            if ask_stream:
                await svc.router.check_stored(aid, work.token)
            await self._body(task, fn, work, delivery)

    async def _body(self, task: ActivityTask, fn: Callable[..., Any], work: Context, delivery: Delivery) -> None:
        svc = self.service
        run = _Running(ctx=work, task=task, service=svc)
        reset = _current.set(run)
        result: Any = None
        error: TaskError | None = None
        try:
            with work.token.scope():
                result = await _call(fn, task)
            if work.cause is not None:
                error = TaskError(type="ActivityCancelledError", message=work.cause.text(), cause=work.cause)
        except Exception as exc:  # the activity's own error goes back to the caller
            if work.cause is not None:
                error = TaskError(type="ActivityCancelledError", message=work.cause.text(), cause=work.cause)
            else:
                error = TaskError(type=type(exc).__name__, message=str(exc)[:8000],
                                  non_retryable=isinstance(exc, CadenzaError) and exc.non_retryable)  # fmt: skip
        finally:
            _current.reset(reset)
        result = _jsonable(result)
        if run.writer is not None:
            with anyio.move_on_after(self.bus.timeouts.shutdown), contextlib.suppress(Exception):
                await flush_writer(run.writer)
        if not self.track_activities:
            await self._reply(task, result=result, error=error)
            return
        # The caller returns the result only once the completion is stored: either stored here before
        # the answer, or sent with its acknowledgement routed to the caller (which asked for it),
        # who then acks the task (docs/DESIGN.md, "The tracked round trip").
        # A cancelled activity's caller has most often stopped waiting (its own cancel, its deadline):
        # its completion is stored here before the answer, so no task waits for an ack that would not
        # come (until the ack wait's redelivery).
        # A caller that hears its stored completions republished (Cadenza-Done) is sent no result when
        # the activity succeeds: the server acknowledges the store to this worker, which acks the
        # task on it (or gives it back, to be stored and answered again, see _answer_again).
        aid = task.activity_id
        done = error is None and HDR_DONE in delivery.headers and bool(delivery.ack_subject)
        if done:
            store_ack_to = f"{self._stored_inbox}.{aid}"
            self._settle[aid] = delivery.ack_subject  # before the send: the answer may come at once
            while len(self._settle) > _HANDED_KEPT:  # never answered: the task's ack wait redelivers it
                self._settle.popitem(last=False)
        else:
            store_ack_to = "" if error is not None and error.cause is not None else _store_ack_to(task, delivery)
        completion = await self._complete(task, result, error, store_ack_to)
        if completion is None:
            if done:
                self._settle.pop(aid, None)
            await self._reply(task, result=result, error=error)
            return
        self._handed[aid] = (completion, result, error)
        while len(self._handed) > _HANDED_KEPT:
            self._handed.popitem(last=False)
        delivery.handed_off = True
        if not done:
            await self._reply(task, result=result, error=error, ack=delivery.ack_subject)

    def _on_completion_stored(self, msg: Received) -> None:
        """The server's answer to the store of a completion its caller hears republished: the task
        acked if stored, else given back at once (its redelivery stores the completion with retries
        and answers the caller, :meth:`_answer_again`)."""
        ack = self._settle.pop(msg.subject[len(self._stored_inbox) + 1 :], None)
        if ack is None:
            return
        problem = answer_error(msg.headers, msg.data)
        if problem is not None:
            _log.info("worker %s: a completion was not stored (%s); its task is redelivered to store it again",
                      self.worker_id, problem)  # fmt: skip
        settle_now(self.bus, ack, problem is None)

    async def _answer_again(self, task: ActivityTask) -> None:
        """A redelivery of a task whose activity ended here: its caller gave it back (the store of
        the completion it was sent failed) or died before acking it. The completion is stored, then
        answered again, without a task ack to hand off (this one acks it).

        Stored before the answer, but not at any price (as when the worker stores it itself): after
        about 3 s of a stream electing a leader the caller is answered and the completion is stored
        in the background, so callers do not hold their sessions through the whole election."""
        aid = task.activity_id
        kept = self._handed.pop(aid, None)
        if kept is not None:
            completion, result, error = kept
            try:
                await store_first_completion(self.bus, completion, timeout=_COMPLETION_TIMEOUT)
            except CadenzaError:
                self.service.store_later(completion)
            await self._reply(task, result=result, error=error)
            return
        # Ended here long ago (no longer kept): the stored completion answers.
        stored = await stored_result(self.bus, aid)
        if stored is not None:
            await self._reply(task, result=stored.result, error=stored.error)
            return
        _log.error("worker %s: activity %s ended here but its completion is neither stored nor kept",
                   self.worker_id, aid)  # fmt: skip
        await self._reply(task, error=TaskError(
            type="ActivityError", non_retryable=True,
            message=f"activity {aid} ended on worker {self.worker_id}, but its completion was not stored "
                    "and is no longer kept: its result is lost"))  # fmt: skip

    async def _complete(
        self, task: ActivityTask, result: Any, error: TaskError | None, store_ack_to: str
    ) -> ActivityCompleted | None:
        """Store the activity's completion, or hand it off to the caller (``store_ack_to``): the
        completion handed off, or None."""
        if error is None:
            status = ActivityStatus.SUCCESS
        elif error.cause is not None and error.cause.kind in _SESSION_ENDS:
            # SPEC-sessions: work cut off by its session's end ends as cancelled (with that cause),
            # not as lost; the cause stays in the record's error text. (For handler helpers,
            # cancelled_by_context stays true for a user's cancel only.)
            status = ActivityStatus.CANCELLED
        elif error.cause is not None:
            status = status_for_cause(error.cause)
        else:
            status = ActivityStatus.FAILED
        # Stored before the caller is answered, but not at any price: a stream electing a leader (a
        # node restart on a cluster) would hold every caller for the whole publish budget. After
        # about 3 s the completion stays with the outbox, which stores it when the stream is back.
        try:
            _, completion, _, handed = await self.service._end_activity(
                task.activity_id, status, result=result, _publish_timeout=_COMPLETION_TIMEOUT,
                error=None if error is None else error.message, _store_ack_to=store_ack_to,
            )  # fmt: skip
        except CadenzaError:
            return None
        return completion if handed else None

    async def _refuse(self, task: ActivityTask, delivery: Delivery, error: TaskError) -> None:
        """A task this worker does not run: answered on its ``reply_to``, else dead-lettered with the
        reason (nothing is dropped in silence)."""
        if task.reply_to:
            await self._reply(task, error=error)
            return
        reason = f"{error.type}: {error.message} (and the task has no reply_to to say so)"
        await self._dead_letter(task, delivery, reason, "task_refused")

    async def _dead_letter(self, event: Any, delivery: Delivery, reason: str, error_type: str) -> None:
        """Copy a valid event of the inbox or queue this worker does not apply to the dead letters.
        (Not stored: the error goes to the consumer, which hands the message back for a later try.)"""
        body, _ = encode(event)
        await self.bus.dead_letter(
            consumer=delivery.consumer, subject=delivery.subject, data=body, headers=delivery.headers,
            reason=reason, error_type=error_type, stream=self.bus.topology.stream_name("task"),
            stream_seq=delivery.stream_seq, deliveries=delivery.deliveries,
        )  # fmt: skip

    async def _reply(
        self, task: ActivityTask, *, result: Any = None, error: TaskError | None = None, ack: str = ""
    ) -> None:
        if not task.reply_to:
            return
        reply = ActivityResult(
            activity_id=task.activity_id,
            worker_id=self.worker_id, ok=error is None, result=result if error is None else None, error=error,
        )  # fmt: skip
        headers = {HDR_TASK_ACK: ack} if ack else None
        # A core reply with a producer span and the trace context in its headers, like every send.
        with contextlib.suppress(CadenzaError), engine_errors(f"replying to {task.reply_to}"):
            try:
                await self.bus.publish_core(reply, subject=task.reply_to, headers=headers)
            except ValidationError as exc:  # the result is too large to send
                await self.bus.publish_core(ActivityResult(
                    activity_id=task.activity_id, worker_id=self.worker_id, ok=False,
                    error=TaskError(type="ResultTooLargeError", message=str(exc), non_retryable=True),
                ), subject=task.reply_to, headers=headers)  # fmt: skip


def _store_ack_to(task: ActivityTask, delivery: Delivery) -> str:
    """Where the caller of ``task`` asked the completion's store acknowledgement to go ('' if it did
    not, or the subject is not one a reply can go to: then the worker stores it before answering)."""
    to = delivery.headers.get(HDR_STORE_ACK_TO, "")
    if not to or not task.reply_to or not delivery.ack_subject or len(to) > 512 or not _REPLY_SUBJECT.match(to):
        return ""
    return to


#: A subject a message can be published on: dot-separated tokens without whitespace or wildcards.
_REPLY_SUBJECT = re.compile(r"[^\s*>.]+(?:\.[^\s*>.]+)*\Z")


#: Whether an activity function is a coroutine function (asked once per function, not per task).
_is_async = functools.lru_cache(maxsize=4096)(inspect.iscoroutinefunction)

#: Results that are JSON data as they are (no need to try encoding them).
_PLAIN = frozenset({str, int, float, bool, type(None)})


async def _call(fn: Callable[..., Any], task: ActivityTask) -> Any:
    if _is_async(fn):
        return await fn(*task.args, **task.kwargs)
    result = await anyio.to_thread.run_sync(lambda: fn(*task.args, **task.kwargs), abandon_on_cancel=True)
    if isinstance(result, Awaitable):
        return await result
    return result


def _jsonable(value: Any) -> Any:
    """``value`` if it is plain JSON data, else its ``repr`` (a result must cross the wire)."""
    if type(value) in _PLAIN:
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        dump = getattr(value, "model_dump", None)
        if callable(dump):
            return dump(mode="json")
        return repr(value)
    return value
