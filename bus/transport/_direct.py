"""Subscriptions whose messages are taken as the connection reads them, without a task in between;
work started now rather than on the loop's next turn.

nats-py runs a subscription's callback in a task of the subscription's, which its read loop wakes
through a queue: one more trip through the event loop for every message. On the hot paths (a
worker's pull consumer, a caller's results) the message is taken by a plain function instead, in the
read loop itself, in order: it must not block (it starts a task, or sets a future).

:func:`start_now` runs a coroutine up to where it first waits in the caller's frame, as Python
3.12's eager tasks do (cadenza supports 3.11): a publish from plain code (a token's callback) is
on the connection's buffer before the loop turns, not one task wake later.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ("in_background", "start_now", "subscribe_direct", "take_directly", "write_now")

T = TypeVar("T")

_log = logging.getLogger("cadenza.bus")


class _Direct(asyncio.Queue):  # type: ignore[type-arg]
    """A subscription's message queue that queues nothing: each message nats-py puts is handed to
    ``take`` at once. Empty for whatever nats-py asks of it (``qsize``, ``join`` on drain)."""

    def __init__(self, take: Callable[[Msg], None]) -> None:
        super().__init__()
        self._take = take

    def put_nowait(self, item: Msg) -> None:
        try:
            self._take(item)
        except Exception:  # never into nats-py's read loop, which would drop the connection
            _log.exception("a message could not be taken by its subscriber; it is dropped")


#: The tasks :func:`in_background` started and that have not ended (asyncio keeps weak references only).
_BACKGROUND: set[asyncio.Task[None]] = set()


def in_background(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` in a task of its own: what a taker must not wait for (a dead letter, an ack).
    ``work`` handles its own errors."""
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def take_directly(sub: Subscription, take: Callable[[Msg], None]) -> None:
    """Make ``sub`` (made without a callback) hand each message to ``take`` as it is read."""
    sub._pending_queue = _Direct(take)


async def subscribe_direct(nc: NatsClient, subject: str, take: Callable[[Msg], None]) -> Subscription:
    """Subscribe to ``subject`` with ``take`` called for each message as it is read (see above).

    Without a callback nats-py starts no task for the subscription and puts each message in its
    queue, which is replaced here; no byte limit, since nothing waits there to be counted.
    """
    sub = await nc.subscribe(subject, pending_bytes_limit=0)
    take_directly(sub, take)
    return sub


def start_now(work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``work`` now, in the caller's frame, up to where it first waits; the rest in a task.

    The future of its result is done already if ``work`` never waited. Every step runs in one copy of
    the caller's context (a span entered before the first wait is left after it in the same one).
    An exception raised before the first wait is the future's, as it would be a task's.
    """
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    try:
        first = ctx.run(work.send, None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except asyncio.CancelledError:
        cancelled: asyncio.Future[T] = loop.create_future()
        cancelled.cancel()
        return cancelled
    except Exception as exc:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    rest = _resume(work, first)
    rest.send(None)  # to its first stop, inside _Resumed: a cancel before the task's first step goes into ``work``
    return loop.create_task(rest, context=ctx)


async def _resume(work: Coroutine[Any, Any, T], first: Any) -> T:
    return await _Resumed(work, first)


class _Resumed(Generic[T]):
    """Awaiting it goes on with a coroutine stepped elsewhere up to its first wait: what that step
    waits on (``first``, a future or a bare yield) is handed to the task that awaits this, and so on."""

    __slots__ = ("_first", "_work")

    def __init__(self, work: Coroutine[Any, Any, T], first: Any) -> None:
        self._work, self._first = work, first

    def __await__(self) -> Generator[Any, Any, T]:
        work, waiting, primed = self._work, None, False
        while True:
            # The first yield (None) is where start_now stepped the task's coroutine to; the task's
            # first step resumes it, or throws a cancel that came before that step.
            thrown: BaseException | None = None
            try:
                sent = yield waiting
            except BaseException as exc:  # a cancel of the task (or an error thrown in): into ``work``
                thrown = exc
            else:
                if not primed:
                    waiting, primed = self._first, True
                    continue
            primed = True
            try:
                waiting = work.send(sent) if thrown is None else work.throw(thrown)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


def write_now(nc: NatsClient) -> None:
    """Hand what the connection has buffered to its socket now, as its flusher task would on the
    loop's next turn (it then finds nothing to write; its wait for the socket's drain stays the
    back-pressure). Nothing while not connected: the flusher writes after the reconnect."""
    transport = nc._transport
    if nc._pending_data_size and transport is not None and nc.is_connected:
        transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0
