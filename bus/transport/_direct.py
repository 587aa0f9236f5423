"""Subscriptions whose messages are taken as the connection reads them, without a task in between;
work started now rather than on the loop's next turn.

nats-py runs a subscription's callback in a task of the subscription's, which its read loop wakes
through a queue: one more trip through the event loop for every message. On the hot paths (a
worker's pull consumer, a caller's results) the message is taken by a plain function instead, in the
read loop itself, in order: it must not block (it starts a task, or sets a future).

:func:`start_now` runs a coroutine up to where it first waits in the caller's frame, as Python
3.12's eager tasks do (cadenza supports 3.11): a publish from plain code (a token's callback) is
on the connection's buffer before the loop turns, not one task wake later.

:func:`send` buffers a message as ``nc.publish`` does, the same bytes, without the work nats-py does
again for every call (two regular expressions on the subjects, one per header name, a strip and a
translate per value, a future made by way of ``asyncio.Future()`` and four coroutines): 3.2 µs a
message where ``nc.publish`` takes 6.7 (each with its share of the flusher's writes), on the messages
every activity sends (a task, its ack, a result, a completion).
Whatever it cannot send so (not connected, draining, a header nats-py would change or refuse, a full
buffer) goes through ``nc.publish``. :func:`parse_header_lines` reads a message's headers as nats-py
does, without its per-character generator (a sixth of a worker's Python calls per task);
:func:`speed_up` makes a connection use it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any, Final, Generic, TypeVar

from nats.aio.client import _HEADER_KEY_RE
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = (
    "ack_fields",
    "in_background",
    "parse_header_lines",
    "publish_command",
    "send",
    "speed_up",
    "start_now",
    "subscribe_direct",
    "take_directly",
    "write_now",
)

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


#: The header names that passed nats-py's own rule for one (a token, ``_HEADER_KEY_RE``): a few.
_NAMES_SEEN: set[str] = set()
_HEADER_LINE = b"NATS/1.0\r\n"


def _unchanged(value: str) -> bool:
    """nats-py sends a header value as it is: printable (no line break, which it turns into a space)
    and no space at either end (which it strips)."""
    return value.isprintable() and (not value or (value[0] != " " and value[-1] != " "))


def _plain_subject(subject: str) -> bool:
    """No whitespace (which nats-py refuses) and nothing else unprintable (left to ``nc.publish``)."""
    return subject.isprintable() and " " not in subject


def publish_command(
    subject: str, body: bytes, reply: str = "", headers: Mapping[str, str] | None = None
) -> bytes | None:
    """The bytes ``nc.publish(subject, body, reply=reply, headers=headers)`` puts on the connection's
    buffer, or None where nats-py would do otherwise than copy them there (refuse a subject, drop or
    change a header): ``nc.publish`` is the one to call then."""
    if not subject or not _plain_subject(subject) or (reply and not _plain_subject(reply)):
        return None
    if headers is None:
        return b"PUB %b %b %d\r\n%b\r\n" % (subject.encode(), reply.encode(), len(body), body)
    lines: list[str] = []
    for name, value in headers.items():
        if name not in _NAMES_SEEN:
            if not _HEADER_KEY_RE.fullmatch(name):
                return None
            if len(_NAMES_SEEN) < 256:
                _NAMES_SEEN.add(name)
        if not _unchanged(value):
            return None
        lines += (name, ": ", value, "\r\n")  # joined as text (a str enum's format would be its name)
    block = _HEADER_LINE + "".join(lines).encode() + b"\r\n"
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
        subject.encode(), reply.encode(), len(block), len(block) + len(body), block, body,
    )  # fmt: skip


#: The connection states in which nats-py's ``publish`` buffers a message: connected, or draining
#: subscriptions (not yet publications).
_SENDING: Final = frozenset({NatsClient.CONNECTED, NatsClient.DRAINING_SUBS})


async def send(
    nc: NatsClient, subject: str, body: bytes, reply: str = "", headers: dict[str, str] | None = None
) -> None:
    """``await nc.publish(subject, body, reply=reply, headers=headers)``: the same message, buffered
    here when nats-py would only buffer it (connected, its flusher running, the buffer not full),
    and the flusher woken as nats-py wakes it; else nats-py's own publish (its errors, its waits).

    Raises:
        nats.errors.Error: what ``nc.publish`` raises.
    """
    if not send_now(nc, subject, body, reply, headers):
        await nc.publish(subject, body, reply=reply, headers=headers)


def send_now(
    nc: NatsClient, subject: str, body: bytes, reply: str = "", headers: dict[str, str] | None = None
) -> bool:
    """:func:`send` without waiting: the message buffered as nats-py would buffer it (True), or
    nothing done where nats-py would do otherwise (False: :func:`send` is the one to call then)."""
    flusher = nc._flusher_task
    queue = nc._flush_queue
    if (
        nc._status in _SENDING  # nc.is_connected and not nc.is_draining_pubs, without two property calls
        and queue is not None
        and flusher is not None
        and not flusher.done()
        and len(body) <= nc._max_payload
        and (command := publish_command(subject, body, reply, headers)) is not None
        and (nc._max_pending_size <= 0 or nc._pending_data_size + len(command) <= nc._max_pending_size)
    ):
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(body)
        if queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return True
    return False


#: What ``bytes.strip()`` strips (``str.strip()`` strips more: ``\x1c``-``\x1f`` too).
_ASCII_SPACE: Final = " \t\n\r\x0b\x0c"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """What nats-py's ``Client._parse_header_lines`` makes of a header block (``Name: Value`` lines):
    the same dict, a name with whitespace in it left out with one ``split`` instead of a generator
    step per character (tests/test_bus_fastpath.py checks the two agree)."""
    out: dict[str, str] = {}
    if raw.isascii():
        # Decoded once, not per name and value (a republished completion has seven headers).
        for text in raw.decode("ascii").split("\r\n"):
            head, colon, tail = text.partition(":")
            if not colon:
                continue
            head = head.strip(_ASCII_SPACE)
            if head and head.split() != [head]:
                continue
            out[head] = tail.strip(_ASCII_SPACE)
        return out
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def speed_up(nc: NatsClient) -> None:
    """Make ``nc`` read headers with :func:`parse_header_lines` (it calls ``self._parse_header_lines``:
    this connection's attribute, not the class's, so other clients of the process keep nats-py's)."""
    nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]


def ack_fields(reply: str | None) -> tuple[int, int, int, int] | None:
    """The stream sequence, delivery count, pending count and store time (ns) a JetStream
    delivery's ack subject carries, or None for another subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``, or the
    form with domain and account hash before the stream (and a random last token). nats-py's
    ``msg.metadata`` builds two dataclasses and a datetime for it (about 3 µs a message; the same
    figures, tests/test_bus_fastpath.py): every task a worker takes, every event a follower reads."""
    tokens = (reply or "").split(".")
    n = len(tokens)
    at = 2 if n == 9 else 4 if n in (11, 12) else 0
    if at and tokens[0] == "$JS" and tokens[1] == "ACK":
        try:
            return int(tokens[at + 3]), int(tokens[at + 2]), int(tokens[at + 6]), int(tokens[at + 5])
        except ValueError:
            return None
    return None
