"""The bus: one connection to NATS, typed publish / consume / broadcast / request-reply.

Delivery rules of a durable consumer (:meth:`Bus.consume`):

* the handler returns            -> ``ack`` (awaited: the server has it when we move on);
* it raises an error             -> ``nak`` with the error's ``retry_delay`` or the consumer's backoff;
* the error is ``non_retryable``,
  or this was the last delivery  -> ``term`` and a copy to the dead-letter subject with the reason;
* the input is bad (not JSON, wrong shape, unknown type or version, oversize)
                                 -> ``term`` and dead letter at once, the handler never sees it;
* the handler was cancelled      -> never acked: ``nak`` so another process gets it.

A message is terminated only after its dead-letter copy is stored, so rejected input is never lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import anyio
import anyio.abc
import nats
import nats.errors
import nats.js.api
import nats.js.errors
import pydantic
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import DEFAULT_PREFIX, DeadLetter, Event, ReplyError, RpcReply, Subjects, check_token, new_event_id

from .._config import ConnectOptions, Timeouts
from .._context import BUS_KEY, Context
from .._exceptions import (
    BusError,
    CadenzaError,
    ConnectError,
    PublishError,
    RemoteError,
    RequestError,
    ValidationError,
)
from ._codec import HDR_MSG_ID, MAX_EVENT_BYTES, decode, encode
from ._retry import backoff_delay, is_transient, retry_transient
from ._server import EmbeddedServer
from ._topology import ConsumerSpec, Topology
from ._tracing import NO_SPAN, SYSTEM, extract_context, inject_headers, instruments, traced_receive, traced_send, tracer

__all__ = ("Bus", "BusState", "Delivery", "PublishResult", "connect")

_log = logging.getLogger("cadenza.bus")

E = TypeVar("E", bound=Event)
M = TypeVar("M", bound=pydantic.BaseModel)
R = TypeVar("R", bound=pydantic.BaseModel)


class BusState(enum.Enum):
    """Lifecycle of a :class:`Bus`."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the server said about a stored event."""

    stream: str
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    """Facts about the message a handler is processing."""

    subject: str
    headers: Mapping[str, str]
    stream_seq: int
    deliveries: int
    consumer: str


class _Acked:
    """Stream sequences whose handler finished in this process (bounded).

    An ack can be lost when the server dies (before the ack arrives, or before it persisted the
    ack floor); the server then redelivers. The handler must not see an event twice in that case,
    so the consumer acks the redelivery without calling the handler. Across processes delivery
    stays at-least-once: handlers that can run elsewhere are idempotent by event id.
    """

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._seen: OrderedDict[int, None] = OrderedDict()

    def add(self, seq: int) -> None:
        self._seen[seq] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def __contains__(self, seq: int) -> bool:
        return seq in self._seen


class _InFlight:
    """The messages a consumer's handlers hold now, with when each started (by object id: nats-py
    messages are not hashable)."""

    def __init__(self) -> None:
        self._since: dict[int, tuple[Msg, float]] = {}
        #: Set when a message leaves; made only while the consume loop waits for room.
        self._changed: anyio.Event | None = None

    @property
    def count(self) -> int:
        return len(self._since)

    def add(self, msg: Msg) -> None:
        self._since[id(msg)] = (msg, time.monotonic())

    def remove(self, msg: Msg) -> None:
        self._since.pop(id(msg), None)
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    async def below(self, limit: int) -> None:
        while len(self._since) >= limit:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def older_than(self, seconds: float) -> list[Msg]:
        cut = time.monotonic() - seconds
        return [m for m, t in self._since.values() if t <= cut]


class _Handlers:
    """The running handlers of one consumer: a plain asyncio task per message, each inside an anyio
    cancel scope of its own, in place of a task group's child (anyio's ``start_soon`` costs about four
    times as much CPU as the task it makes, and a consumer starts one per message).

    What a task group child had, these have: each task copies the context of the consume loop; it
    is cancelled (level-triggered, shields honoured) only through its scope, by :meth:`close`,
    which waits for every one to end as a task group's exit does; an exception that escapes a
    handler task is re-raised in ``group`` (crashing the consumer as a failed child would), or by
    :meth:`close` once that group has ended.
    """

    def __init__(self) -> None:
        self.group: anyio.abc.TaskGroup | None = None
        self._running: dict[asyncio.Task[None], anyio.CancelScope] = {}
        self._errors: list[BaseException] = []
        self._idle: anyio.Event | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        scope = anyio.CancelScope()
        task = asyncio.get_running_loop().create_task(_in_scope(scope, coro))
        self._running[task] = scope
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        if not self._running and self._idle is not None:
            self._idle.set()
        if task.cancelled():  # not through its scope: the loop itself is going away
            return
        exc = task.exception()
        if exc is None:
            return
        group = self.group
        if group is not None:
            try:
                group.start_soon(_reraise, exc)
                return
            except RuntimeError:  # the group has just ended
                pass
        self._errors.append(exc)

    async def close(self) -> None:
        """Cancel every running handler and wait until all have ended; raise what escaped them."""
        self.group = None
        for scope in self._running.values():
            scope.cancel()
        while self._running:
            self._idle = anyio.Event()
            await self._idle.wait()
        if self._errors:
            errors, self._errors = self._errors, []
            raise BaseExceptionGroup("unhandled errors in the handlers of a consumer", errors)


async def _in_scope(scope: anyio.CancelScope, coro: Coroutine[Any, Any, None]) -> None:
    with scope:
        await coro


async def _reraise(exc: BaseException) -> None:
    raise exc


class _Pull:
    """A continuous pull on one durable consumer: pull requests stay outstanding and messages are
    taken as they arrive (nats-py's ``fetch`` ends each long poll before asking again, and a message
    that lands in that gap waits; this is the protocol nats.go's ``Consume`` speaks).

    ``pending`` counts messages asked for and not yet delivered. A request that expires or ends early
    says how many it leaves undelivered (``Nats-Pending-Messages``); a request lost with a server
    restart or a reconnect is written off after its expiry (or at once on reconnect).

    Messages are taken by a subscription callback into a queue of our own: nats-py's ``next_msg``
    costs two tasks, a uuid and a ``wait_for`` per message; waiting here is one future, and none
    when a message is already queued.
    """

    def __init__(self, bus: Bus, stream: str, spec: ConsumerSpec, batch: int) -> None:
        self.bus = bus
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{spec.durable}"
        self.spec = spec
        self.batch = max(batch, 1)
        self.expires = bus.timeouts.pull_expires
        self.pending = 0
        self.asked_at = 0.0
        self.reconnects = -1
        self.inbox = ""
        self.sub: Any = None
        self.errors_in_row = 0
        self._arrived: deque[Msg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        #: Wakes a waiting :meth:`next` within half a second; one timer at a time, not one per wait.
        self._timer: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        nc = self.bus.nc
        self.inbox = nc.new_inbox()
        self.sub = await nc.subscribe(self.inbox, cb=self._arrive, pending_msgs_limit=1_000_000)
        self.reconnects = int(nc.stats.get("reconnects", 0))

    async def _arrive(self, msg: Msg) -> None:
        self._arrived.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _tick(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()

    async def top_up(self, room: int) -> None:
        nc = self.bus.nc
        reconnects = int(nc.stats.get("reconnects", 0))
        mono = time.monotonic()
        if reconnects != self.reconnects or (self.pending and mono - self.asked_at > self.expires + 1.0):
            # The server forgot our requests (restart, reconnect) or never answered them.
            self.reconnects = reconnects
            self.pending = 0
        want = min(self.batch, room) - self.pending
        if want < max(1, min(self.batch, room) // 2) or room <= 0:
            return
        body = json.dumps({"batch": want, "expires": int(self.expires * 1e9)}).encode()
        try:
            await nc.publish(self.subject, body, reply=self.inbox)
        except nats.errors.Error as exc:
            self.errors_in_row += 1
            _log.info("consumer %s: pull request failed (%r); retrying", self.spec.durable, exc)
            await anyio.sleep(min(0.05 * 2**self.errors_in_row, 2.0))
            return
        self.errors_in_row = 0
        self.pending += want
        self.asked_at = mono

    async def next(self) -> Msg | None:
        """The next message, or None (a status, or nothing within half a second: time to top up)."""
        if not self._arrived:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            if self._timer is None:
                self._timer = loop.call_later(0.5, self._tick)
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._arrived:
                return None
        msg = self._arrived.popleft()
        headers = msg.headers or {}
        status = headers.get("Status") if not msg.data else None
        if status:
            # 408 expired / 409 limits / 404 none: that request is over.
            left = headers.get("Nats-Pending-Messages")
            self.pending = max(0, self.pending - int(left)) if left and left.isdigit() else 0
            if status not in ("408", "404", "100"):
                _log.info("consumer %s: pull ended with %s %s", self.spec.durable, status,
                          headers.get("Description", ""))  # fmt: skip
            return None
        self.pending = max(0, self.pending - 1)
        return msg


class _PubAcks:
    """Stored publishes and their acknowledgements, on one wildcard inbox of the connection.

    What nats-py's ``js.publish`` does through ``nc.request``, without the NUID, the random token
    (a getrandom call), the done-callback and the ``asyncio.wait_for`` it makes per request, which
    are about a third of a stored publish's CPU. The answers are nats-py's: a PubAck, its
    ``APIError`` for an error reply, ``NoStreamResponseError`` when no stream takes the subject,
    ``nats.errors.TimeoutError`` when nothing came in time.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._prefix = ""
        self._opening = anyio.Lock()
        #: The publishes waiting for their acknowledgement, with the loop time they give up at.
        self._waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._ids = itertools.count(1)
        #: One timer for every wait (a timer per publish costs more than the sweep): it times out the
        #: waits past their deadline, :data:`_SWEEP` seconds late at most.
        self._sweeping: asyncio.TimerHandle | None = None

    async def _open(self) -> None:
        async with self._opening:
            if not self._prefix:
                prefix = self.nc.new_inbox() + "."
                await self.nc.subscribe(prefix + "*", cb=self._answer)
                self._prefix = prefix

    async def _answer(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(msg)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for token, (waiter, deadline) in list(self._waiting.items()):
            if deadline <= now:
                del self._waiting[token]
                if not waiter.done():
                    waiter.set_exception(nats.errors.TimeoutError())
        self._sweeping = loop.call_later(_SWEEP, self._sweep, loop) if self._waiting else None

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> asyncio.Future[Msg]:
        """Send a stored publish without waiting: the future of the server's answer (a message for
        :func:`pub_ack_error`, or ``nats.errors.TimeoutError`` after ``timeout``)."""
        if not self._prefix:
            await self._open()
        token = str(next(self._ids))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = (waiter, loop.time() + timeout)
        if self._sweeping is None:
            self._sweeping = loop.call_later(_SWEEP, self._sweep, loop)
        try:
            await self.nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return waiter

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> nats.js.api.PubAck:
        if not self._prefix:
            await self._open()
        token = str(next(self._ids))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = (waiter, loop.time() + timeout)
        if self._sweeping is None:
            self._sweeping = loop.call_later(_SWEEP, self._sweep, loop)
        try:
            await self.nc.publish(subject, body, reply=self._prefix + token, headers=headers)
            msg = await waiter
        finally:
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == "503":
            raise nats.js.errors.NoStreamResponseError
        resp = json.loads(msg.data)
        if "error" in resp:
            raise nats.js.errors.APIError.from_error(resp["error"])
        return nats.js.api.PubAck.from_response(resp)


class _JetStream(JetStreamContext):
    """The bus's JetStream context: a plain stored publish (the key-value writes of nats-py's
    ``KeyValue`` among them) goes through :class:`_PubAcks`; the rest is nats-py's."""

    def __init__(self, nc: NatsClient, *, timeout: float) -> None:
        super().__init__(nc, timeout=timeout)
        self.acks = _PubAcks(nc)

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> nats.js.api.PubAck:
        if stream is not None or msg_ttl is not None:
            return await super().publish(subject, payload, timeout=timeout, stream=stream, headers=headers,
                                         msg_ttl=msg_ttl)  # fmt: skip
        return await self.acks.publish(subject, payload, headers, self._timeout if timeout is None else timeout)


#: Seconds between two looks for stored publishes past their acknowledgement's deadline.
_SWEEP = 0.05


def pub_ack_error(answer: asyncio.Future[Msg]) -> BaseException | None:
    """Why the stored publish whose answer this is (:meth:`_PubAcks.send`) is not known to be stored,
    or None: it is."""
    if answer.cancelled():
        return nats.errors.TimeoutError()
    exc = answer.exception()
    if exc is not None:
        return exc
    msg = answer.result()
    if msg.headers and msg.headers.get("Status") == "503":
        return nats.js.errors.NoStreamResponseError()
    if b'"error"' in msg.data:
        return nats.js.errors.Error(msg.data.decode(errors="replace")[:300])
    return None


@dataclass
class BusStats:
    """Counters a service can expose (and tests can read)."""

    published: int = 0
    handled: int = 0
    retried: int = 0
    dead_letters: int = 0
    redeliveries_skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _hostname() -> str:
    return socket.gethostname()


class Bus:
    """A connection to NATS JetStream that speaks cadenza events.

    Create one with :func:`connect`. Every public method is safe to call from many tasks.

    Args:
        nc: a connected nats-py client (the bus closes it on :meth:`close`).
        topology: the installation's streams and buckets.
        timeouts: bounds of every wait.
        source: this process's name in the ``source`` field of the events it publishes.
        server: an embedded server the bus owns and stops on close.
    """

    def __init__(
        self,
        nc: NatsClient,
        *,
        topology: Topology,
        timeouts: Timeouts,
        source: str,
        server: EmbeddedServer | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = _JetStream(nc, timeout=timeouts.publish)
        self.topology = topology
        self.subjects: Subjects = topology.subjects
        self.timeouts = timeouts
        self.source = source
        self.server = server
        self.state = BusState.OPEN
        self.stats = BusStats()
        self._kv: dict[str, KeyValue] = {}
        #: Per-process helpers started on demand (the session client), by name.
        self.helpers: dict[str, object] = {}
        self._helper_ready: dict[str, anyio.Event] = {}

    def __repr__(self) -> str:
        return f"<Bus {self.url} prefix={self.subjects.prefix!r} {self.state.value}>"

    @property
    def url(self) -> str:
        """The URL of the server this bus is connected to."""
        cur = self.nc.connected_url
        return cur.geturl() if cur is not None else "(not connected)"

    def context(self) -> Context:
        """A fresh root :class:`Context` that carries this bus (start session and activity calls from it)."""
        return Context(values=MappingProxyType({BUS_KEY: self}))

    async def start_helper(self, name: str, helper: Any) -> Any:
        """Start ``helper`` (``await helper.start()``) once per bus; returns the helper registered
        under ``name`` (the first one started). Helpers subscribe through this bus's connection and
        end with it (:meth:`close` drains their subscriptions)."""
        self._check_open()
        existing = self.helpers.get(name)
        if existing is not None:
            with anyio.fail_after(self.timeouts.request):
                await self._helper_ready[name].wait()
            return existing
        self.helpers[name] = helper
        ready = self._helper_ready[name] = anyio.Event()
        try:
            await helper.start()
        except BaseException:
            self.helpers.pop(name, None)
            raise
        ready.set()
        return helper

    def _check_open(self) -> None:
        if self.state is not BusState.OPEN:
            raise BusError("the bus is closed")

    # ---------------------------------------------------------------- publish

    def subject_of(self, event: Event) -> str:
        """The subject an event is published on."""
        return self.subjects.build(event.DOMAIN, event.subject_id(), event.subject_event())

    async def publish(
        self,
        event: Event,
        *,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> PublishResult:
        """Store ``event`` on JetStream and wait for the server's acknowledgement.

        The event id is the ``Nats-Msg-Id``, so a retry after a lost acknowledgement (done here,
        ``Timeouts.publish_retries`` times) or a second publish of the same event stores it once.

        Raises:
            ValidationError: the event is too large or its subject id is not a valid token.
            PublishError: no acknowledgement after the retries; the event may not be stored.
        """
        self._check_open()
        if not event.source:
            event = event.model_copy(update={"source": self.source})
        try:
            subject = subject or self.subject_of(event)
        except ValueError as exc:
            raise ValidationError(str(exc), kind="bad_subject") from exc
        body, hdrs = encode(event)
        if headers:
            hdrs.update(headers)
        timeout = self.timeouts.publish if timeout is None else timeout
        traced = traced_send()
        with (
            tracer.start_as_current_span(
                f"send {subject}",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": subject,
                    "messaging.message.id": event.event_id,
                    "messaging.message.body.size": len(body),
                },
            )
            if traced
            else NO_SPAN
        ) as span:
            if traced:
                inject_headers(hdrs)
            result = await self._publish_raw(subject, body, hdrs, timeout)
            span.set_attribute("messaging.nats.stream_sequence", result.seq)
            self.stats.published += 1
            instruments.on_published(event)
            return result

    async def send_stored(self, event: Event) -> asyncio.Future[Msg] | None:
        """Store ``event`` without waiting for the server's acknowledgement: the future of its answer
        (see :func:`pub_ack_error`), or None when traced (then use :meth:`publish`). If the answer
        says it was not stored, :meth:`publish` the same event: its ``Nats-Msg-Id`` stores it once.
        (The session client's task: a caller waits for the answer to its task, which can only come
        once the task is stored, and for the acknowledgement only when it says something went wrong.)

        Raises:
            ValidationError: the event is too large or its subject id is not a valid token.
            PublishError: the connection would not take the message.
        """
        self._check_open()
        if traced_send():
            return None
        if not event.source:
            event = event.model_copy(update={"source": self.source})
        try:
            subject = self.subject_of(event)
        except ValueError as exc:
            raise ValidationError(str(exc), kind="bad_subject") from exc
        body, hdrs = encode(event)
        js = self.js
        assert isinstance(js, _JetStream)
        try:
            answer = await js.acks.send(subject, body, hdrs, self.timeouts.publish)
        except nats.errors.Error as exc:
            raise PublishError(f"publish to {subject} failed: {exc}") from exc
        self.stats.published += 1
        instruments.on_published(event)
        return answer

    async def _publish_raw(self, subject: str, body: bytes, headers: dict[str, str], timeout: float) -> PublishResult:
        last: BaseException | None = None
        # Bounded by time as well as attempts: "no response from stream" comes back at once while a
        # cluster elects a leader (seconds), so quick failures are retried until the budget is spent.
        budget = timeout * (self.timeouts.publish_retries + 1)
        started = time.monotonic()
        attempt = 0
        while attempt <= self.timeouts.publish_retries or time.monotonic() - started < budget:
            attempt += 1
            try:
                ack = await self.js.publish(subject, body, timeout=timeout, headers=headers)
                return PublishResult(ack.stream, ack.seq, bool(ack.duplicate))
            except nats.errors.Error as exc:
                if not is_transient(exc):
                    if isinstance(exc, nats.js.errors.APIError):
                        raise PublishError(f"the server refused the publish to {subject}: {exc}",
                                           non_retryable=True) from exc  # fmt: skip
                    raise PublishError(f"publish to {subject} failed: {exc}") from exc
                # Safe to retry: the same Nats-Msg-Id makes a second store a no-op. A stream with
                # no leader for a moment (an election on a cluster) answers "no response from stream".
                last = exc
                await anyio.sleep(0.05 + backoff_delay(attempt, base=0.05, cap=1.0))
        raise PublishError(
            f"no acknowledgement for {subject} after {attempt} attempts in {time.monotonic() - started:.1f}s "
            f"({last!r}); "
            f"is the server at {self.url} up and does a stream take this subject?"
        ) from last

    async def publish_core(self, event: Event, *, subject: str | None = None) -> None:
        """Send ``event`` without storing it (core NATS, fire-and-forget broadcast).

        Without ``Nats-Msg-Id``: no stream dedupes a core message (the body has the event id).
        """
        self._check_open()
        subject = subject or self.subject_of(event)
        body, hdrs = encode(event)
        del hdrs[HDR_MSG_ID]
        if not traced_send():
            await self.nc.publish(subject, body, headers=hdrs)
            return
        with tracer.start_as_current_span(
            f"send {subject}", kind=SpanKind.PRODUCER,
            attributes={"messaging.system": SYSTEM, "messaging.destination.name": subject,
                        "messaging.operation.type": "send"},
        ):  # fmt: skip
            inject_headers(hdrs)
            await self.nc.publish(subject, body, headers=hdrs)

    # ---------------------------------------------------------------- dead letters

    async def dead_letter(
        self,
        *,
        consumer: str,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        reason: str,
        error_type: str,
        stream: str = "",
        stream_seq: int = 0,
        deliveries: int = 1,
    ) -> None:
        """Store a copy of rejected input on ``<prefix>.dlq.<consumer>.rejected``.

        A stored message rejected by one consumer has one entry, whatever the redeliveries (its event
        id is ``dlq-<consumer>-<stream>-<seq>``, deduped by the stream); two consumers rejecting the
        same message store two entries. Input that came from no stream (a core subscription, a
        request) gets a fresh id: every rejection is one entry.

        Raises:
            PublishError: the copy could not be stored (the caller must not drop the input then).
        """
        try:
            text = data.decode("utf-8")
            encoding = "utf-8"
            copy = text[: DeadLetter.MAX_COPY]
        except UnicodeDecodeError:
            encoding = "base64"
            copy = base64.b64encode(data[: DeadLetter.MAX_COPY]).decode()
        consumer = _token(consumer)
        letter = DeadLetter(
            event_id=_dead_letter_id(consumer, stream, stream_seq),
            consumer=consumer, stream=stream, stream_seq=stream_seq, subject=subject, reason=reason[:4000],
            error_type=error_type, deliveries=deliveries,
            headers={k: str(v)[:1024] for k, v in list((headers or {}).items())[:64]},
            payload=copy, payload_encoding=encoding, payload_size=len(data),
            payload_sha256=hashlib.sha256(data).hexdigest(), truncated=len(data) > DeadLetter.MAX_COPY,
            source=self.source,
        )  # fmt: skip
        dlq_subject = self.subjects.build("dlq", consumer, "rejected")
        body = letter.model_dump_json().encode()
        hdrs = {"Nats-Msg-Id": letter.event_id, "Content-Type": "application/json",
                "Cadenza-Event-Type": letter.type, "Cadenza-Schema-Version": "1"}  # fmt: skip
        await self._publish_raw(dlq_subject, body, hdrs, self.timeouts.publish)
        self.stats.dead_letters += 1
        instruments.dead_letters.add(1, {"consumer": consumer, "error.type": error_type})
        self.stats.reasons[error_type] = self.stats.reasons.get(error_type, 0) + 1
        _log.warning("dead-lettered %s from %s (%s): %s", subject, consumer, error_type, reason[:300])

    # ---------------------------------------------------------------- consume

    async def consume(
        self,
        spec: ConsumerSpec,
        accept: Sequence[type[E]],
        handler: Callable[[E, Delivery], Awaitable[None]],
        *,
        domain: str | None = None,
        concurrency: int = 16,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a durable pull consumer until cancelled; use with ``await tg.start(bus.consume, ...)``.

        Args:
            spec: the consumer (durable name, filter, redelivery policy).
            accept: the event classes this consumer takes; other types are dead-lettered.
            handler: called with each validated event; see the module doc for ack rules.
            domain: the stream's domain (default: the domain of ``accept[0]``).
            concurrency: handlers running at once in this process.

        Raises:
            TopologyError: the consumer could not be declared.
        """
        self._check_open()
        if not accept:
            raise ValueError("accept must name at least one event class")
        domain = domain or accept[0].DOMAIN
        stream = self.topology.stream_name(domain)
        await retry_transient(lambda: self.topology.ensure_consumer(self.js, domain, spec),
                              what=f"declare consumer {spec.durable}")  # fmt: skip
        pull = _Pull(self, stream, spec, min(concurrency, 256))
        await pull.open()
        acked = _Acked()
        flight = _InFlight()
        handlers = _Handlers()
        try:
            async with anyio.create_task_group() as tg:
                handlers.group = tg
                tg.start_soon(self._keep_alive, flight, spec.ack_wait)
                task_status.started()
                while True:
                    # Ask for no more than the handlers that can start now: the rest of the
                    # consumer's messages stay with the server for other processes.
                    await pull.top_up(concurrency - flight.count)
                    msg = await pull.next()
                    if msg is None:
                        continue
                    flight.add(msg)
                    handlers.spawn(self._handle(msg, spec, accept, handler, acked, flight))
                    if flight.count >= concurrency:
                        await flight.below(concurrency)
        finally:
            try:
                # Unbounded, as a task group's exit: a cancelled handler hands its message back first.
                with anyio.CancelScope(shield=True):
                    await handlers.close()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeouts.shutdown):
                    await pull.close()

    async def _handle(
        self,
        msg: Msg,
        spec: ConsumerSpec,
        accept: Sequence[type[E]],
        handler: Callable[[E, Delivery], Awaitable[None]],
        acked: _Acked,
        flight: _InFlight,
    ) -> None:
        try:
            meta = msg.metadata
            seq, deliveries = meta.sequence.stream, meta.num_delivered
            instruments.pending[spec.durable] = meta.num_pending
            instruments.in_flight[spec.durable] = flight.count
            headers = dict(msg.headers or {})
            if seq in acked:
                self.stats.redeliveries_skipped += 1
                await self._settle(msg, "ack")
                return
            try:
                event = decode(msg.data, headers, accept)
            except ValidationError as exc:
                await self._reject(msg, spec.durable, exc.message, exc.kind, seq, deliveries)
                return
            delivery = Delivery(msg.subject, headers, seq, deliveries, spec.durable)
            with (
                tracer.start_as_current_span(
                    f"process {msg.subject}",
                    context=extract_context(headers),
                    kind=SpanKind.CONSUMER,
                    attributes={
                        "messaging.system": SYSTEM,
                        "messaging.operation.type": "process",
                        "messaging.operation.name": "process",
                        "messaging.destination.name": msg.subject,
                        "messaging.consumer.group.name": spec.durable,
                        "messaging.message.id": event.event_id,
                        "messaging.nats.stream_sequence": seq,
                        "messaging.nats.delivery_count": deliveries,
                    },
                )
                if traced_receive(headers)
                else NO_SPAN
            ) as span:
                failure: Exception | None = None
                try:
                    try:
                        await handler(event, delivery)
                    except Exception as exc:
                        failure = exc
                except anyio.get_cancelled_exc_class():
                    # Never ack a cancelled handler: hand the message back. The delay outlives this
                    # process's outstanding pull requests, which the server would otherwise hand it to.
                    with anyio.CancelScope(shield=True):
                        await self._settle(msg, "nak", self.timeouts.pull_expires + 0.5)
                    raise
                if failure is not None:
                    span.record_exception(failure)
                    span.set_status(Status(StatusCode.ERROR, str(failure)[:200]))
                    await self._failed(msg, spec, failure, seq, deliveries)
                    return
                # Remembered even if the ack is lost (server down): a redelivery to this process
                # is then acked without running the handler again.
                acked.add(seq)
                self.stats.handled += 1
                instruments.handled.add(1, {"consumer": spec.durable})
                await self._settle(msg, "ack" if spec.ack_sync else "ack-async")
        finally:
            flight.remove(msg)
            instruments.in_flight[spec.durable] = flight.count

    async def _keep_alive(self, flight: _InFlight, ack_wait: float) -> None:
        # Handlers that run long tell the server they are still working, so it does not redeliver:
        # one loop per consumer, for the messages in flight longer than a third of the ack wait.
        period = max(ack_wait / 3, 0.5)
        while True:
            await anyio.sleep(period)
            for msg in flight.older_than(period):
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

    async def _failed(self, msg: Msg, spec: ConsumerSpec, exc: Exception, seq: int, deliveries: int) -> None:
        non_retryable = bool(getattr(exc, "non_retryable", False))
        if non_retryable or deliveries >= spec.max_deliver:
            why = "non-retryable error" if non_retryable else f"failed {deliveries} deliveries (max_deliver)"
            kind = getattr(exc, "kind", None) or ("handler_rejected" if non_retryable else "max_deliver")
            await self._reject(msg, spec.durable, f"{why}: {type(exc).__name__}: {exc}", kind, seq, deliveries)
            return
        delay = getattr(exc, "retry_delay", None)
        delay = spec.delay_for(deliveries) if delay is None else float(delay)
        self.stats.retried += 1
        instruments.retried.add(1, {"consumer": spec.durable})
        _log.info("handler of %s failed (delivery %d, retry in %.2fs): %r", spec.durable, deliveries, delay, exc)
        await self._settle(msg, "nak", delay)

    async def _reject(self, msg: Msg, consumer: str, reason: str, kind: str, seq: int, deliveries: int) -> None:
        try:
            await self.dead_letter(
                consumer=consumer, subject=msg.subject, data=msg.data, headers=msg.headers, reason=reason,
                error_type=kind, stream=msg.metadata.stream, stream_seq=seq, deliveries=deliveries,
            )  # fmt: skip
        except CadenzaError as exc:
            # The copy is not stored: keep the original for a later try rather than lose it.
            _log.error("cannot dead-letter %s (%s); will retry", msg.subject, exc)
            await self._settle(msg, "nak", 1.0)
            return
        await self._settle(msg, "term")

    async def _settle(self, msg: Msg, how: str, delay: float | None = None) -> bool:
        try:
            if how == "ack-async":
                # One publish, no round trip: it waits only for a forced flush of a full outgoing
                # buffer, which the connection bounds (flush_timeout), so no timer of our own here.
                await msg.ack()
                return True
            with anyio.fail_after(self.timeouts.ack):
                if how == "ack":
                    await msg.ack_sync(timeout=self.timeouts.ack)
                elif how == "nak":
                    await msg.nak(delay=delay)
                else:
                    await msg.term()
            return True
        except (TimeoutError, nats.errors.Error) as exc:
            # The server will redeliver after ack_wait; the handler is idempotent per event id.
            _log.info("could not %s %s: %r", how, msg.subject, exc)
            return False

    # ---------------------------------------------------------------- broadcast

    async def listen(
        self,
        filter_subject: str,
        accept: Sequence[type[E]],
        handler: Callable[[E, str], Awaitable[None]],
        *,
        name: str,
        queue: str = "",
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow a core (broadcast) subscription until cancelled.

        Every process listening gets every message (unless ``queue`` groups them). Bad input is
        dead-lettered under ``name``; a handler error is logged and the listener goes on.

        Args:
            filter_subject: subject or wildcard, from :class:`schemas.Subjects`.
            accept: event classes taken.
            handler: called with the event and the concrete subject.
            name: the listener's name in dead-letter entries.
        """
        self._check_open()
        sub = await self.nc.subscribe(filter_subject, queue=queue, pending_msgs_limit=1_000_000)
        try:
            task_status.started()
            async for msg in sub.messages:
                headers = dict(msg.headers or {})
                try:
                    event = decode(msg.data, headers, accept)
                except ValidationError as exc:
                    await self._reject_core(name, msg, headers, exc.message, exc.kind)
                    continue
                with tracer.start_as_current_span(
                    f"process {msg.subject}", context=extract_context(headers), kind=SpanKind.CONSUMER,
                    attributes={"messaging.system": SYSTEM, "messaging.destination.name": msg.subject,
                                "messaging.operation.type": "process"},
                ) if traced_receive(headers) else NO_SPAN:  # fmt: skip
                    try:
                        await handler(event, msg.subject)
                    except Exception as exc:
                        # Not applied: a core message is not redelivered, so its copy is all that is left.
                        _log.exception("listener %s failed on %s", name, msg.subject)
                        await self._reject_core(name, msg, headers, f"{type(exc).__name__}: {exc}", "handler_failed")
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _reject_core(self, name: str, msg: Msg, headers: Mapping[str, str], reason: str, kind: str) -> None:
        """Dead-letter a core (not stored, not redelivered) message a listener did not apply."""
        try:
            await self.dead_letter(consumer=name, subject=msg.subject, data=msg.data, headers=headers,
                                   reason=reason, error_type=kind)  # fmt: skip
        except CadenzaError as exc:
            _log.error("listener %s: %s on %s rejected (%s) and its dead letter not stored: %s",
                       name, kind, msg.subject, reason[:300], exc)  # fmt: skip

    # ---------------------------------------------------------------- request / reply

    def rpc_subject(self, service: str, method: str) -> str:
        """``<prefix>.rpc.<service>.<method>``."""
        return self.subjects.build("rpc", service, method)

    async def request(
        self, subject: str, payload: pydantic.BaseModel, reply: type[R], *, timeout: float | None = None
    ) -> R:
        """Send a request and wait for its typed reply.

        Raises:
            RemoteError: the service answered with an error (``remote_code`` says which).
            RequestError: nobody answers on ``subject`` or no reply came in time.
        """
        self._check_open()
        timeout = self.timeouts.request if timeout is None else timeout
        hdrs = {"Content-Type": "application/json"}
        if traced_send():
            inject_headers(hdrs)
        try:
            msg = await self.nc.request(subject, payload.model_dump_json().encode(), timeout=timeout, headers=hdrs)
        except nats.errors.NoRespondersError as exc:
            raise RequestError(f"no service answers on {subject}; is it running?") from exc
        except nats.errors.TimeoutError as exc:
            raise RequestError(f"no reply on {subject} within {timeout:g}s") from exc
        except nats.errors.Error as exc:
            raise RequestError(f"request on {subject} failed: {exc}") from exc
        try:
            envelope = RpcReply.model_validate_json(msg.data)
        except pydantic.ValidationError as exc:
            raise RequestError(f"the reply on {subject} is not a cadenza reply: {exc.errors()[0]['msg']}") from exc
        if not envelope.ok:
            err = envelope.error or ReplyError(code="error", message="(no message)")
            raise RemoteError(err.message, code=err.code)
        try:
            return reply.model_validate(envelope.result)
        except pydantic.ValidationError as exc:
            raise RequestError(f"the reply on {subject} is not a {reply.__name__}: {exc}") from exc

    async def serve(
        self,
        subject: str,
        request: type[M],
        handler: Callable[[M], Awaitable[pydantic.BaseModel]],
        *,
        name: str,
        queue: str | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer requests on ``subject`` until cancelled (replicas share them through ``queue``).

        A request that does not validate gets an error reply with code ``validation`` and a
        dead-letter entry; a :class:`CadenzaError` from the handler becomes an error reply with its
        code; any other exception becomes code ``internal`` (and is logged).
        """
        self._check_open()
        sub = await self.nc.subscribe(subject, queue=queue or name, pending_msgs_limit=100_000)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                async for msg in sub.messages:
                    tg.start_soon(self._answer, msg, request, handler, name)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _answer(
        self, msg: Msg, request: type[M], handler: Callable[[M], Awaitable[pydantic.BaseModel]], name: str
    ) -> None:
        headers = dict(msg.headers or {})
        reply: RpcReply
        with tracer.start_as_current_span(
            f"process {msg.subject}", context=extract_context(headers), kind=SpanKind.SERVER,
            attributes={"messaging.system": SYSTEM, "messaging.destination.name": msg.subject,
                        "messaging.operation.type": "process"},
        ) if traced_receive(headers) else NO_SPAN:  # fmt: skip
            try:
                if len(msg.data) > MAX_EVENT_BYTES:
                    raise ValidationError(f"request is {len(msg.data)} bytes, over {MAX_EVENT_BYTES}", kind="oversize")
                try:
                    req = request.model_validate_json(msg.data)
                except pydantic.ValidationError as exc:
                    errs = "; ".join(
                        f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:5]
                    )
                    raise ValidationError(f"not a valid {request.__name__}: {errs}", kind="bad_request") from None
                result = await handler(req)
                reply = RpcReply(ok=True, result=result.model_dump(mode="json"))
            except ValidationError as exc:
                reply = RpcReply(ok=False, error=ReplyError(code="validation", message=exc.message))
                with contextlib.suppress(CadenzaError):
                    await self.dead_letter(consumer=name, subject=msg.subject, data=msg.data, headers=headers,
                                           reason=exc.message, error_type=exc.kind)  # fmt: skip
            except RemoteError as exc:
                reply = RpcReply(ok=False, error=ReplyError(code=exc.remote_code, message=exc.message))
            except CadenzaError as exc:
                reply = RpcReply(ok=False, error=ReplyError(code=exc.code, message=exc.message))
            except Exception as exc:
                _log.exception("%s failed on %s", name, msg.subject)
                reply = RpcReply(ok=False, error=ReplyError(code="internal", message=f"{type(exc).__name__}: {exc}"))
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(reply.model_dump_json(exclude_none=True).encode())

    # ---------------------------------------------------------------- key-value

    async def kv(self, key: str) -> KeyValue:
        """The key-value bucket ``key`` of the topology (``sessions``, ``workers``, ``activities``)."""
        self._check_open()
        bucket = self._kv.get(key)
        if bucket is None:
            name = self.topology.bucket_name(key)
            try:
                bucket = await retry_transient(lambda: self.js.key_value(name), what=f"open bucket {name}")
            except nats.errors.Error as exc:
                raise BusError(f"key-value bucket {name} is not available: {exc}") from exc
            self._kv[key] = bucket
        return bucket

    # ---------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Drain the connection and stop an owned embedded server. Safe to call twice."""
        if self.state is BusState.CLOSED:
            return
        self.state = BusState.CLOSED
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await self.nc.drain()
        with contextlib.suppress(Exception):
            await self.nc.close()
        if self.server is not None:
            self.server.stop()


def _split(urls: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in urls.split(",") if u.strip())


def _dead_letter_id(consumer: str, stream: str, stream_seq: int) -> str:
    """The dead-letter entry's event id (its ``Nats-Msg-Id``): one per consumer and stored message."""
    if not stream_seq:
        return new_event_id()
    letter_id = f"dlq-{consumer}-{stream}-{stream_seq}"
    if len(letter_id) <= 128:
        return letter_id
    # Event ids are at most 128 characters: a long consumer or stream name stands as its digest.
    digest = hashlib.sha256(f"{consumer}\0{stream}".encode()).hexdigest()[:32]
    return f"dlq-{digest}-{stream_seq}"


def _token(value: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in value)[:200] or "unknown"
    return check_token(cleaned)


def _check_urls(servers: Sequence[str]) -> None:
    for url in servers:
        if "://" in url and not url.startswith(_SCHEMES):
            raise ConnectError(f"{url!r}: NATS URLs start with nats:// or tls:// (or ws://, wss://)")


_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


async def _open_nats(opts: ConnectOptions, timeouts: Timeouts) -> NatsClient:
    try:
        # Every inbox of the client (replies, JetStream API answers, watcher deliveries) starts with
        # it, so permissions can give each user its own replies (deploy/nats/accounts.conf).
        inbox_prefix = opts.resolved_inbox_prefix()
    except ValueError as exc:
        raise ConnectError(f"cannot connect: {exc} (CADENZA_INBOX_PREFIX)") from None
    errors: list[str] = []
    client: list[NatsClient] = []

    async def on_error(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if len(errors) > 5:
            del errors[0]
        # Before the first connect the error is in the ConnectError raised below. After it nobody
        # awaits these: a permissions violation (a denied publish or subscription) is only ever
        # reported here, so say it loudly.
        if client:
            _log.warning("NATS reported an error: %s", errors[-1])

    async def on_disconnect() -> None:
        # Our own close disconnects too: only a connection lost while open is news.
        if client and not (client[0].is_closed or client[0].is_draining):
            _log.info("disconnected from NATS")
        else:
            _log.debug("disconnected from NATS")

    async def on_reconnect() -> None:
        _log.info("reconnected to NATS")

    kwargs: dict[str, Any] = {
        "servers": list(opts.servers),
        "name": opts.name,
        "connect_timeout": min(2.0, timeouts.connect),
        "max_reconnect_attempts": opts.max_reconnect_attempts,
        "reconnect_time_wait": opts.reconnect_time_wait,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "inbox_prefix": inbox_prefix,
        # A publish waits for the socket only when the outgoing buffer is full (a forced flush);
        # nats-py waits for ever there unless told.
        "flush_timeout": timeouts.publish,
    }
    if opts.user:
        kwargs["user"], kwargs["password"] = opts.user, opts.password
    if opts.token:
        kwargs["token"] = opts.token
    if opts.creds:
        kwargs["user_credentials"] = opts.creds
    tls = opts.tls_context()
    if tls is not None:
        kwargs["tls"] = tls
    urls = ", ".join(opts.servers)
    try:
        with anyio.fail_after(timeouts.connect):
            # max_reconnect_attempts=-1 makes nats-py retry the first connection too; the
            # deadline above bounds it.
            nc = await nats.connect(**kwargs)
    except TimeoutError:
        detail = f" (last error: {errors[-1]})" if errors else ""
        raise ConnectError(f"no NATS server answered at {urls} within {timeouts.connect:g}s{detail}") from None
    except nats.errors.NoServersError:
        detail = f": {errors[-1]}" if errors else ""
        raise ConnectError(f"cannot connect to NATS at {urls}{detail}") from None
    except (nats.errors.Error, OSError) as exc:
        raise ConnectError(f"cannot connect to NATS at {urls}: {exc}") from exc
    client.append(nc)
    return nc


@contextlib.asynccontextmanager
async def connect(
    server: str | None = None,
    *,
    prefix: str | None = None,
    options: ConnectOptions | None = None,
    timeouts: Timeouts | None = None,
    name: str = "cadenza",
    ensure_topology: bool = True,
    store_dir: str | os.PathLike[str] | None = None,
    replicas: int | None = None,
) -> AsyncIterator[Bus]:
    """Connect to NATS (or start the embedded server) and yield a :class:`Bus`.

    The server is ``server``, else ``NATS_URL``, else an embedded nats-server on a free loopback
    port (stopped when the block exits; ``store_dir`` keeps its data).

    Args:
        server: URL(s), comma-separated.
        prefix: subject prefix of this installation (default: ``CADENZA_PREFIX`` or ``cadenza``).
        options: credentials and TLS (default: from the environment).
        timeouts: bounds of every wait.
        name: this process's name (client name, ``source`` of its events).
        ensure_topology: declare the streams and buckets (idempotent).
        replicas: stream and bucket replicas, 3 on a cluster (default: ``CADENZA_REPLICAS``, else 1).

    Raises:
        ConnectError: no server answered; ServerStartError: the embedded server would not start;
        TopologyError: the streams could not be declared.
    """
    timeouts = timeouts or Timeouts()
    if options is None:
        opts = ConnectOptions.from_env(servers=server, name=name)
    else:
        opts = dataclasses.replace(options, servers=_split(server)) if server else options
    _check_urls(opts.servers)
    prefix = prefix or os.environ.get("CADENZA_PREFIX") or DEFAULT_PREFIX
    # Built first: a bad CADENZA_REPLICAS / CADENZA_STORAGE fails before anything is opened.
    topology = Topology(prefix) if replicas is None else Topology(prefix, replicas=replicas)
    embedded: EmbeddedServer | None = None
    if not opts.servers:
        embedded = EmbeddedServer(store_dir, start_timeout=timeouts.server_start)
        # Started from this thread on purpose: the server is bound to the life of the thread that
        # forks it (PR_SET_PDEATHSIG), and worker threads come and go.
        embedded.start()
        opts = ConnectOptions.from_env(env={}, servers=embedded.url, name=name)
    try:
        nc = await _open_nats(opts, timeouts)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    bus = Bus(nc, topology=topology, timeouts=timeouts, source=f"{name}@{_hostname()}", server=embedded)
    try:
        if ensure_topology:
            await retry_transient(lambda: bus.topology.ensure(bus.js), what="declare the streams and buckets")
        yield bus
    finally:
        await bus.close()
