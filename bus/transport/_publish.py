"""Publish: stored events (acknowledged, or sent without waiting), core broadcasts, and the one
wildcard inbox on which every stored publish of the connection gets its acknowledgement."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry.trace import SpanKind

from schemas import Event

from .._exceptions import PublishError, ValidationError
from ._codec import HDR_MSG_ID, encode
from ._direct import in_background, send, send_now, start_now, write_now
from ._retry import backoff_delay, is_transient
from ._tracing import NO_SPAN, SYSTEM, inject_headers, instruments, traced_send, tracer

if TYPE_CHECKING:
    from ._bus import Bus

__all__ = (
    "PublishResult",
    "answer_error",
    "publish",
    "publish_core",
    "publish_raw",
    "send_stored_to",
    "settle_handed",
    "subject_of",
)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the server said about a stored event."""

    stream: str
    seq: int
    duplicate: bool


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

    @property
    def ready(self) -> bool:
        """The answer inbox is open: a publish's first wait is for its answer."""
        return bool(self._prefix)

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

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> nats.js.api.PubAck:
        token, waiter = await self._send(subject, body, headers, timeout)
        try:
            msg = await waiter
        finally:
            self._waiting.pop(token, None)
        problem = answer_error(msg.headers, msg.data)
        if problem is not None:
            raise problem
        return nats.js.api.PubAck.from_response(json.loads(msg.data))

    async def _send(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> tuple[str, asyncio.Future[Msg]]:
        """Publish with a reply subject of this connection's answer inbox: its token and the future
        of the answer (forgotten at once if the publish fails)."""
        if not self._prefix:
            await self._open()
        token = str(next(self._ids))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = (waiter, loop.time() + timeout)
        if self._sweeping is None:
            self._sweeping = loop.call_later(_SWEEP, self._sweep, loop)
        try:
            await send(self.nc, subject, body, self._prefix + token, headers)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return token, waiter


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


def answer_error(headers: Mapping[str, str] | None, data: bytes) -> BaseException | None:
    """What the server's answer to a stored publish says went wrong (nats-py's error for it: an
    ``APIError`` with the JetStream error code, ``NoStreamResponseError`` when no stream took it), or
    None: stored. Also for an answer routed to another process (:func:`send_stored_to`)."""
    status = headers.get("Status") if headers else None
    if status == "503":
        return nats.js.errors.NoStreamResponseError()
    if status:
        return nats.errors.Error(f"the server answered the publish with status {status}")
    if b'"error"' not in data:
        return None
    try:
        resp = json.loads(data)
        if "error" not in resp:
            return None
        nats.js.errors.APIError.from_error(resp["error"])  # raises the error's class, never returns
    except nats.js.errors.APIError as exc:
        return exc
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return nats.errors.Error(data.decode(errors="replace")[:300])


def subject_of(bus: Bus, event: Event) -> str:
    """The subject an event is published on."""
    return bus.subjects.build(event.DOMAIN, event.subject_id(), event.subject_event())


def _outgoing(
    bus: Bus, event: Event, subject: str | None, headers: Mapping[str, str] | None
) -> tuple[Event, str, bytes, dict[str, str]]:
    """``event`` with this bus as its source (if it names none), its subject, body and headers.

    Raises:
        ValidationError: the event is too large or its subject id is not a valid token.
    """
    if not event.source:
        event = event.model_copy(update={"source": bus.source})
    try:
        subject = subject or subject_of(bus, event)
    except ValueError as exc:
        raise ValidationError(str(exc), kind="bad_subject") from exc
    body, hdrs = encode(event)
    if headers:
        hdrs.update(headers)
    return event, subject, body, hdrs


async def publish(
    bus: Bus,
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
    bus._check_open()
    event, subject, body, hdrs = _outgoing(bus, event, subject, headers)
    timeout = bus.timeouts.publish if timeout is None else timeout
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
        result = await publish_raw(bus, subject, body, hdrs, timeout)
        span.set_attribute("messaging.nats.stream_sequence", result.seq)
        bus.stats.published += 1
        instruments.on_published(event)
        return result


def start_publish(bus: Bus, event: Event) -> asyncio.Future[PublishResult] | None:
    """:func:`publish` ``event`` from plain code (a token's callback): its message is written to
    the connection's socket when this returns, not on the loop's next turn; the future is the
    acknowledgement's, with :func:`publish`'s retries. None when that would wait before sending
    (this connection has not opened its answer inbox yet): :func:`publish` it then.

    Raises:
        ValidationError: the event is too large or its subject id is not a valid token.
    """
    js = bus.js
    if not isinstance(js, _JetStream) or not js.acks.ready or not bus.nc.is_connected:
        return None
    started = start_now(publish(bus, event))
    write_now(bus.nc)
    if started.done() and not started.cancelled() and isinstance(problem := started.exception(), ValidationError):
        raise problem
    started.add_done_callback(_retrieved)
    return started


def _retrieved(done: asyncio.Future[Any]) -> None:
    """Whoever started a publish may not wait for its end (the result came first): its error is
    not left for asyncio to report as never retrieved."""
    if not done.cancelled():
        done.exception()


async def send_stored_to(
    bus: Bus, event: Event, reply: str, headers: Mapping[str, str] | None = None, *, dedupe: bool = True
) -> None:
    """Store ``event`` with the server's acknowledgement routed to ``reply`` (another process's
    inbox, which judges it), without waiting: one publish, no answer here. With ``reply`` empty no
    acknowledgement is asked for at all: whoever sends so learns otherwise that it was stored (the
    session client's task: a worker answers it only once it is stored) and :func:`publish`-es the
    same event when in doubt (its ``Nats-Msg-Id`` stores it once). ``dedupe=False``: without
    ``Nats-Msg-Id`` (a second copy is stored as one more message: for a receiver that tells copies
    apart itself, a session's worker).

    Raises:
        ValidationError: the event is too large or its subject id is not a valid token.
        PublishError: the connection would not take the message.
    """
    bus._check_open()
    event, subject, body, hdrs = _outgoing(bus, event, None, headers)
    if not dedupe:
        hdrs.pop(HDR_MSG_ID, None)
    traced = traced_send()
    span = tracer.start_as_current_span(
        f"send {subject}", kind=SpanKind.PRODUCER,
        attributes={"messaging.system": SYSTEM, "messaging.operation.type": "send",
                    "messaging.operation.name": "send", "messaging.destination.name": subject,
                    "messaging.message.id": event.event_id, "messaging.message.body.size": len(body)},
    ) if traced else NO_SPAN  # fmt: skip
    with span:
        if traced:
            inject_headers(hdrs)
        try:
            await send(bus.nc, subject, body, reply, hdrs)
        except nats.errors.Error as exc:
            raise PublishError(f"publish to {subject} failed: {exc}") from exc
    bus.stats.published += 1
    instruments.on_published(event)


async def settle_handed(bus: Bus, ack_subject: str, stored: bool) -> None:
    """Ack a task another process received and handed the ack of to this one (``stored``), or
    give it back for redelivery; best effort (an ack lost is a redelivery after the ack wait)."""
    with contextlib.suppress(nats.errors.Error):
        await send(bus.nc, ack_subject, b"+ACK" if stored else b"-NAK")


def settle_now(bus: Bus, ack_subject: str, stored: bool) -> None:
    """:func:`settle_handed` from a callback that cannot wait: buffered at once where it can be,
    else sent from a task of its own."""
    if not send_now(bus.nc, ack_subject, b"+ACK" if stored else b"-NAK"):
        in_background(settle_handed(bus, ack_subject, stored))


async def publish_raw(bus: Bus, subject: str, body: bytes, headers: dict[str, str], timeout: float) -> PublishResult:
    """Store ``body`` on ``subject``, retrying a transient failure (the same ``Nats-Msg-Id`` stores it once)."""
    last: BaseException | None = None
    # Bounded by time as well as attempts: "no response from stream" comes back at once while a
    # cluster elects a leader (seconds), so quick failures are retried until the budget is spent.
    budget = timeout * (bus.timeouts.publish_retries + 1)
    started = time.monotonic()
    attempt = 0
    while attempt <= bus.timeouts.publish_retries or time.monotonic() - started < budget:
        attempt += 1
        try:
            ack = await bus.js.publish(subject, body, timeout=timeout, headers=headers)
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
        f"is the server at {bus.url} up and does a stream take this subject?"
    ) from last


async def publish_core(
    bus: Bus, event: Event, *, subject: str | None = None, headers: Mapping[str, str] | None = None
) -> None:
    """Send ``event`` without storing it (core NATS, fire-and-forget broadcast).

    Without ``Nats-Msg-Id``: no stream dedupes a core message (the body has the event id).
    """
    bus._check_open()
    subject = subject or subject_of(bus, event)
    body, hdrs = encode(event)
    hdrs.pop(HDR_MSG_ID, None)
    if headers:
        hdrs.update(headers)
    if not traced_send():
        await send(bus.nc, subject, body, "", hdrs)
        return
    with tracer.start_as_current_span(
        f"send {subject}", kind=SpanKind.PRODUCER,
        attributes={"messaging.system": SYSTEM, "messaging.destination.name": subject,
                    "messaging.operation.type": "send"},
    ):  # fmt: skip
        inject_headers(hdrs)
        await send(bus.nc, subject, body, "", hdrs)
