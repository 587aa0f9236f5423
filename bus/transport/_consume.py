"""Consume: durable pull consumers, their handlers, and how each message is settled.

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
import contextlib
import contextvars
import enum
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import Event

from .._context import cancel_scope
from .._exceptions import CadenzaError, ValidationError
from ._codec import decode
from ._direct import ack_fields, subscribe_direct
from ._retry import backoff_delay, retry_transient
from ._topology import ConsumerSpec
from ._tracing import NO_SPAN, SYSTEM, extract_context, instruments, traced_receive, tracer

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from opentelemetry.trace import Span

    from ._bus import Bus

__all__ = ("Delivery", "Settle", "consume")

_log = logging.getLogger("cadenza.bus")

E = TypeVar("E", bound=Event)


@dataclass(slots=True)
class Delivery:
    """Facts about the message a handler is processing."""

    subject: str
    headers: Mapping[str, str]
    stream_seq: int
    deliveries: int
    consumer: str
    #: The message's ack subject (``$JS.ACK.…``).
    ack_subject: str = ""
    #: Set by a handler that handed the message's ack to another process (a caller that acks the
    #: task once it holds the stored result): the consumer then neither acks it nor remembers it as
    #: handled, so a redelivery (that process gave it back, or died) reaches the handler again.
    handed_off: bool = False


class Settle(enum.Enum):
    """How a consumer answers the server for a message."""

    #: Acknowledged and awaited: the server has it when the consumer moves on.
    ACK = "ack"
    #: Acknowledged in one publish, no round trip (a consumer with ``ack_sync=False``).
    ACK_ASYNC = "ack-async"
    #: Handed back for redelivery (after a delay).
    NAK = "nak"
    #: Terminated: never delivered again (its dead-letter copy is stored first).
    TERM = "term"


# The members the hot path names, as module globals: a member looked up on its class goes through a
# descriptor (hundreds of ns on Python 3.11, per message), a global is one dict lookup.
_ACK, _ACK_ASYNC, _NAK = Settle.ACK, Settle.ACK_ASYNC, Settle.NAK


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
        #: Each running handler's scope, and its task (kept: the loop holds tasks only weakly).
        self._running: dict[anyio.CancelScope, asyncio.Task[None]] = {}
        self._errors: list[BaseException] = []
        self._idle: anyio.Event | None = None

    def spawn(self, coro: Coroutine[Any, Any, None], context: contextvars.Context | None = None) -> None:
        scope = cancel_scope()
        self._running[scope] = asyncio.get_running_loop().create_task(self._run(scope, coro), context=context)

    async def _run(self, scope: anyio.CancelScope, coro: Coroutine[Any, Any, None]) -> None:
        """One handler in its scope; what escapes it goes to :attr:`group`. The bookkeeping is done
        here, in the task's last step, not in a done callback (one more turn of the loop per message)."""
        try:
            with scope:
                await coro
        except asyncio.CancelledError:
            raise  # not through its scope: the loop itself is going away
        except BaseException as exc:
            self._failed(exc)
        finally:
            self._running.pop(scope, None)
            if not self._running and self._idle is not None:
                self._idle.set()

    def _failed(self, exc: BaseException) -> None:
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
        for scope in list(self._running):
            scope.cancel()
        while self._running:
            self._idle = anyio.Event()
            await self._idle.wait()
        if self._errors:
            errors, self._errors = self._errors, []
            raise BaseExceptionGroup("unhandled errors in the handlers of a consumer", errors)


async def _reraise(exc: BaseException) -> None:
    raise exc


class _Pull:
    """A continuous pull on one durable consumer: pull requests stay outstanding and messages are
    taken as they arrive (nats-py's ``fetch`` ends each long poll before asking again, and a message
    that lands in that gap waits; this is the protocol nats.go's ``Consume`` speaks).

    ``pending`` counts messages asked for and not yet delivered. A request that expires or ends early
    says how many it leaves undelivered (``Nats-Pending-Messages``); a request lost with a server
    restart or a reconnect is written off after its expiry (or at once on reconnect).

    Messages are taken as the connection reads them (:mod:`._direct`), started at once when a
    handler may start, else put in a queue of our own: nats-py's ``next_msg`` costs two tasks, a
    uuid and a ``wait_for`` per message; waiting here is one future, and none when a message is
    already queued.
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
        #: Pulls refused in a row (503 while a stream elects a leader) and when to ask again.
        self.refused, self.resume_at = 0, 0.0
        self._arrived: deque[Msg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        #: Wakes a waiting :meth:`next` within half a second; one timer at a time, not one per wait.
        self._timer: asyncio.TimerHandle | None = None
        #: Hands a message to a handler as it is read, when one may start now (the
        #: consume loop's own wake-up is one more trip through the event loop, on every message's
        #: critical path): ``room()`` says how many may; None while the loop is not running.
        self.dispatch: Callable[[Msg], None] | None = None
        self.room: Callable[[], int] = lambda: 0

    async def open(self) -> None:
        nc = self.bus.nc
        self.inbox = nc.new_inbox()
        # Taken as the connection reads them (no task of nats-py's in between: one trip through
        # the event loop less per message).
        self.sub = await subscribe_direct(nc, self.inbox, self._arrive)
        self.reconnects = int(nc.stats.get("reconnects", 0))

    def _arrive(self, msg: Msg) -> None:
        dispatch = self.dispatch
        if dispatch is not None and msg.data and not self._arrived and self.room() > 0:
            # Started here, in arrival order (nothing is queued before it); the loop only tops up.
            self.pending, self.refused = max(0, self.pending - 1), 0
            dispatch(msg)
            if self.pending >= self.batch // 2:
                return
        else:
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
        if want < max(1, min(self.batch, room) // 2) or room <= 0 or mono < self.resume_at:
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
                # Asked again at once, a refusal came back at once: thousands of pulls a second.
                self.refused += 1
                self.resume_at = time.monotonic() + 0.05 + backoff_delay(self.refused, cap=2.0)
            return None
        self.pending, self.refused = max(0, self.pending - 1), 0
        return msg


async def consume(
    bus: Bus,
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
    bus._check_open()
    if not accept:
        raise ValueError("accept must name at least one event class")
    domain = domain or accept[0].DOMAIN
    stream = bus.topology.stream_name(domain)
    await retry_transient(lambda: bus.topology.ensure_consumer(bus.js, domain, spec),
                          what=f"declare consumer {spec.durable}")  # fmt: skip
    pull = _Pull(bus, stream, spec, min(concurrency, 256))
    await pull.open()
    acked = _Acked()
    flight = _InFlight()
    handlers = _Handlers()
    try:
        async with anyio.create_task_group() as tg:
            handlers.group = tg
            tg.start_soon(_keep_alive, flight, spec.ack_wait)

            # Started from the subscription's callback, a handler still gets a copy of this loop's
            # context (not the callback's), as one the loop starts does.
            here = contextvars.copy_context()

            def dispatch(msg: Msg) -> None:
                flight.add(msg)
                handlers.spawn(_handle(bus, msg, spec, accept, handler, acked, flight), here.copy())

            pull.room = lambda: concurrency - flight.count
            pull.dispatch = dispatch
            task_status.started()
            while True:
                # Ask for no more than the handlers that can start now: the rest of the
                # consumer's messages stay with the server for other processes.
                await pull.top_up(concurrency - flight.count)
                msg = await pull.next()
                if msg is None:
                    continue
                flight.add(msg)
                handlers.spawn(_handle(bus, msg, spec, accept, handler, acked, flight))
                if flight.count >= concurrency:
                    await flight.below(concurrency)
    finally:
        pull.dispatch = None
        try:
            # Unbounded, as a task group's exit: a cancelled handler hands its message back first.
            with anyio.CancelScope(shield=True):
                await handlers.close()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
                await pull.close()


async def _handle(
    bus: Bus,
    msg: Msg,
    spec: ConsumerSpec,
    accept: Sequence[type[E]],
    handler: Callable[[E, Delivery], Awaitable[None]],
    acked: _Acked,
    flight: _InFlight,
) -> None:
    try:
        seq, deliveries, pending = _ack_fields(msg)
        instruments.pending[spec.durable] = pending
        instruments.in_flight[spec.durable] = flight.count
        headers = dict(msg.headers or {})
        if seq in acked:
            bus.stats.redeliveries_skipped += 1
            await _settle(bus, msg, Settle.ACK)
            return
        try:
            event = decode(msg.data, headers, accept)
        except ValidationError as exc:
            await _reject(bus, msg, spec.durable, exc.message, exc.kind, seq, deliveries)
            return
        delivery = Delivery(msg.subject, headers, seq, deliveries, spec.durable, msg.reply)
        with _process_span(msg, delivery, event) if traced_receive(headers) else NO_SPAN as span:
            try:
                await handler(event, delivery)
            except anyio.get_cancelled_exc_class():
                # Never ack a cancelled handler: hand the message back. The delay outlives this
                # process's outstanding pull requests, which the server would otherwise hand it to.
                with anyio.CancelScope(shield=True):
                    await _settle(bus, msg, Settle.NAK, bus.timeouts.pull_expires + 0.5)
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                await _failed(bus, msg, spec, exc, seq, deliveries)
                return
            bus.stats.handled += 1
            instruments.handled.add(1, {"consumer": spec.durable})
            if delivery.handed_off:
                return
            # Remembered even if the ack is lost (server down): a redelivery to this process
            # is then acked without running the handler again.
            acked.add(seq)
            await _settle(bus, msg, _ACK if spec.ack_sync else _ACK_ASYNC)
    finally:
        flight.remove(msg)
        instruments.in_flight[spec.durable] = flight.count


def _ack_fields(msg: Msg) -> tuple[int, int, int]:
    """The stream sequence, delivery count and pending count of a delivery (:func:`ack_fields`;
    nats-py's ``msg.metadata`` for a reply subject that is not an ack subject, and its
    ``NotJSMessageError``)."""
    fields = ack_fields(msg.reply)
    if fields is not None:
        return fields[0], fields[1], fields[2]
    meta = msg.metadata
    return meta.sequence.stream, meta.num_delivered, meta.num_pending


def _process_span(msg: Msg, delivery: Delivery, event: Event) -> AbstractContextManager[Span]:
    """The consumer span of one handled message (only made when traced: :func:`traced_receive`)."""
    return tracer.start_as_current_span(
        f"process {msg.subject}",
        context=extract_context(delivery.headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": msg.subject,
            "messaging.consumer.group.name": delivery.consumer,
            "messaging.message.id": event.event_id,
            "messaging.nats.stream_sequence": delivery.stream_seq,
            "messaging.nats.delivery_count": delivery.deliveries,
        },
    )


async def _keep_alive(flight: _InFlight, ack_wait: float) -> None:
    # Handlers that run long tell the server they are still working, so it does not redeliver:
    # one loop per consumer, for the messages in flight longer than a third of the ack wait.
    period = max(ack_wait / 3, 0.5)
    while True:
        await anyio.sleep(period)
        for msg in flight.older_than(period):
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()


async def _failed(bus: Bus, msg: Msg, spec: ConsumerSpec, exc: Exception, seq: int, deliveries: int) -> None:
    # The retry decision is on the error (bus._exceptions): any other exception is retried.
    cadenza = exc if isinstance(exc, CadenzaError) else None
    non_retryable = cadenza is not None and cadenza.non_retryable
    if non_retryable or deliveries >= spec.max_deliver:
        why = "non-retryable error" if non_retryable else f"failed {deliveries} deliveries (max_deliver)"
        kind = (exc.kind if isinstance(exc, ValidationError) else None) or (
            "handler_rejected" if non_retryable else "max_deliver"
        )
        await _reject(bus, msg, spec.durable, f"{why}: {type(exc).__name__}: {exc}", kind, seq, deliveries)
        return
    delay = cadenza.retry_delay if cadenza is not None else None
    delay = spec.delay_for(deliveries) if delay is None else float(delay)
    bus.stats.retried += 1
    instruments.retried.add(1, {"consumer": spec.durable})
    _log.info("handler of %s failed (delivery %d, retry in %.2fs): %r", spec.durable, deliveries, delay, exc)
    await _settle(bus, msg, Settle.NAK, delay)


async def _reject(bus: Bus, msg: Msg, consumer: str, reason: str, kind: str, seq: int, deliveries: int) -> None:
    try:
        await bus.dead_letter(
            consumer=consumer, subject=msg.subject, data=msg.data, headers=msg.headers, reason=reason,
            error_type=kind, stream=msg.metadata.stream, stream_seq=seq, deliveries=deliveries,
        )  # fmt: skip
    except CadenzaError as exc:
        # The copy is not stored: keep the original for a later try rather than lose it.
        _log.error("cannot dead-letter %s (%s); will retry", msg.subject, exc)
        await _settle(bus, msg, Settle.NAK, 1.0)
        return
    await _settle(bus, msg, Settle.TERM)


async def _settle(bus: Bus, msg: Msg, how: Settle, delay: float | None = None) -> bool:
    """Answer the server for ``msg`` (``delay``: of a :attr:`Settle.NAK`); False if that failed."""
    try:
        if how is _ACK_ASYNC:
            # One publish, no round trip: it waits only for a forced flush of a full outgoing
            # buffer, which the connection bounds (flush_timeout), so no timer of our own here.
            await msg.ack()
            return True
        with anyio.fail_after(bus.timeouts.ack):
            if how is _ACK:
                await msg.ack_sync(timeout=bus.timeouts.ack)
            elif how is _NAK:
                await msg.nak(delay=delay)
            else:
                await msg.term()
        return True
    except (TimeoutError, nats.errors.Error) as exc:
        # The server will redeliver after ack_wait; the handler is idempotent per event id.
        _log.info("could not %s %s: %r", how.value, msg.subject, exc)
        return False
