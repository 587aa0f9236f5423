"""The activity writer: a file-like text stream whose lines become activity messages.

Writes go first to an optional underlying stream (a failing one never stops the capture), then are
split into lines; each complete non-empty line becomes one message. JSON lines are understood:
``{"error": ...}`` is an ``error`` message, ``{"log": ...}`` an ``info`` message, any other object
is kept as the message payload with a readable text. A trailing partial line waits for its newline,
or for :func:`flush_writer` / :meth:`ActivityWriter.aclose`.

Unlike the reference (a queue of 128 that drops lines when full and stops on cancel) nothing is
dropped silently: lines queue in memory (bounded by ``max_buffer_bytes``; beyond it ``write``
raises), a pump sends everything queued since its last send as one batch (so a busy writer sends
few, large events), and the pump is owned by the activity service, not by the work: lines written
before a cancellation are still recorded. :func:`flush_writer` returns once every earlier line is
durably stored on the bus.

``write`` is synchronous (file-like) and must be called from the event loop's thread.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

from schemas import ActivityLevel, MessageEntry, cut_text

from .._context import Context
from .._exceptions import ActivityError, CadenzaError
from ._api import AppendMessageRequest, MessageAppender

__all__ = ("ActivityWriter", "TextSink", "flush_writer", "new_writer", "parse_line", "write_started_line")

_log = logging.getLogger("cadenza.activity.writer")

#: Budget of one batch event (the bus refuses events over 256 KiB).
BATCH_BYTES = 192 * 1024
#: Most lines in one batch event.
BATCH_LINES = 4096
_ENTRY_OVERHEAD = 160


class TextSink(Protocol):
    """Anything with a text ``write`` (a file, ``sys.stdout``, an HTTP response stream)."""

    def write(self, s: str, /) -> int | None: ...


#: Sends a batch of entries; returns nothing, raises CadenzaError when not stored.
BatchSender = Callable[[str, list[MessageEntry]], Awaitable[Any]]


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return str(value["message"])
    return json.dumps(value, separators=(",", ":"), default=str)


def _readable(obj: dict[str, Any]) -> str:
    head = next((obj[k] for k in ("message", "msg", "status") if isinstance(obj.get(k), str) and obj[k]), None)
    if head is None:
        return json.dumps(obj, separators=(",", ":"), default=str)
    parts = []
    if isinstance(obj.get("id"), str) and obj["id"]:
        parts.append(f"{obj['id']}:")
    parts.append(head)
    if isinstance(obj.get("progress"), str) and obj["progress"]:
        parts.append(obj["progress"])
    return " ".join(parts)


def _entry(level: ActivityLevel, message: str, payload: dict[str, Any] | None = None) -> MessageEntry:
    return MessageEntry(level=level, message=message, payload=payload)


def parse_line(line: str) -> MessageEntry | None:
    """The message one output line becomes, or None for a blank line."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("{") and text.endswith("}"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            if "error" in obj:
                return _entry(ActivityLevel.ERROR, cut_text(_text_of(obj["error"])) or cut_text(text))
            if "log" in obj:
                return _entry(ActivityLevel.INFO, cut_text(_text_of(obj["log"])) or cut_text(text))
            return _entry(ActivityLevel.INFO, cut_text(_readable(obj)), obj)
    return _entry(ActivityLevel.INFO, cut_text(text))


def _entry_size(entry: MessageEntry) -> int:
    size = len(entry.message.encode()) + _ENTRY_OVERHEAD
    if entry.payload is not None:
        size += len(json.dumps(entry.payload, separators=(",", ":"), default=str).encode())
    return size


def _fit(entry: MessageEntry) -> tuple[MessageEntry, int]:
    size = _entry_size(entry)
    if size <= BATCH_BYTES:
        return entry, size
    # A payload too large for one event is left out, and the message says so (never silently).
    note = f" (payload of {size} bytes left out: too large for one event)"
    slim = entry.model_copy(update={"payload": None, "message": cut_text(entry.message + note)})
    _log.warning("activity line payload of %d bytes left out (too large)", size)
    return slim, _entry_size(slim)


class ActivityWriter:
    """A text stream that records each line as an activity message. Create with :func:`new_writer`.

    Attributes:
        activity_id: the activity the lines belong to.
        written: lines accepted so far.
        durable: lines stored on the bus so far.
        dropped: lines that could not be stored (each one logged as an error).
    """

    def __init__(
        self,
        activity_id: str,
        send: BatchSender,
        *,
        underlying: TextSink | None = None,
        max_buffer_bytes: int = 64 * 1024 * 1024,
        flush_timeout: float = 30.0,
    ) -> None:
        self.activity_id = activity_id
        self._send = send
        self._underlying = underlying
        self._underlying_failed = False
        self._partial = ""
        self._queue: deque[tuple[MessageEntry, int]] = deque()
        self._queued_bytes = 0
        self._max_buffer_bytes = max_buffer_bytes
        self.flush_timeout = flush_timeout
        self.written = 0
        self.durable = 0
        self.dropped = 0
        self.batches = 0
        self.closed = False
        self._wake = anyio.Event()
        self._progress = anyio.Event()
        self._pumping = False
        self._pump_owned = False

    def __repr__(self) -> str:
        return f"<ActivityWriter {self.activity_id} written={self.written} durable={self.durable}>"

    # ------------------------------------------------------------ file-like

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        """Write text: to the underlying stream first, then complete lines become messages.

        Raises:
            ActivityError: the writer is closed, or more than ``max_buffer_bytes`` wait to be sent
                (the bus is down or far too slow); the text is not taken.
        """
        if self.closed:
            raise ActivityError(f"the writer of activity {self.activity_id} is closed")
        if self._underlying is not None and not self._underlying_failed:
            try:
                self._underlying.write(s)
            except Exception as exc:
                # The capture goes on without the copy; said once, not per write.
                self._underlying_failed = True
                _log.warning("activity %s: underlying stream failed (%r); capture continues", self.activity_id, exc)
        if self._queued_bytes + len(s) > self._max_buffer_bytes:
            raise ActivityError(
                f"activity {self.activity_id}: {self._queued_bytes} bytes of output wait to be stored; "
                "the bus is not keeping up (output refused rather than dropped)"
            )
        data = self._partial + s
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._add(line)
        if lines:
            self._wake.set()
        return len(s)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Wake the pump (file-like; :func:`flush_writer` waits for durability)."""
        self._wake.set()

    def close(self) -> None:
        """Take the trailing partial line and refuse further writes; the pump sends what is queued."""
        if self.closed:
            return
        self._take_partial()
        self.closed = True
        self._wake.set()

    async def aclose(self) -> None:
        """Close and wait until every line is stored."""
        self.close()
        await flush_writer(self)

    async def __aenter__(self) -> ActivityWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    # ------------------------------------------------------------ internals

    def _add(self, line: str) -> None:
        entry = parse_line(line.rstrip("\r"))
        if entry is None:
            return
        entry, size = _fit(entry)
        self._queue.append((entry, size))
        self._queued_bytes += size
        self.written += 1

    def _take_partial(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, ""
            self._add(partial)

    def _take_batch(self) -> list[MessageEntry]:
        batch: list[MessageEntry] = []
        budget = BATCH_BYTES
        while self._queue and len(batch) < BATCH_LINES:
            entry, size = self._queue[0]
            if batch and size > budget:
                break
            self._queue.popleft()
            self._queued_bytes -= size
            budget -= size
            batch.append(entry)
        return batch

    def _notify(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def _send_batch(self, batch: list[MessageEntry]) -> None:
        delay = 0.05
        while True:
            try:
                await self._send(self.activity_id, batch)
                self.durable += len(batch)
                self.batches += 1
                self._notify()
                return
            except CadenzaError as exc:
                if exc.non_retryable:
                    # Refused for good (the activity ended, the input is invalid): lost, so say so.
                    self.dropped += len(batch)
                    self.durable += len(batch)
                    _log.error("activity %s: %d output lines not recorded: %s", self.activity_id, len(batch), exc)
                    self._notify()
                    return
                # Not stored yet (the bus is down): the same batch is sent again, never re-numbered.
                _log.warning("activity %s: output not stored yet (%s); retrying", self.activity_id, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def drain(self) -> None:
        """Send everything queued now (used by flush when no pump runs)."""
        while self._queue:
            await self._send_batch(self._take_batch())

    async def pump(self) -> None:
        """Send queued lines until closed and empty; run in a task group owned by the service
        (which sets ``_pumping`` before starting it, so a flush never races the pump)."""
        self._pumping = True
        try:
            while True:
                if not self._queue:
                    if self.closed:
                        return
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                await self._send_batch(self._take_batch())
        finally:
            self._pumping = False
            self._notify()


def new_writer(
    ctx: Context,
    appender: MessageAppender,
    activity_id: str = "",
    underlying: TextSink | None = None,
) -> ActivityWriter:
    """A file-like writer whose lines become messages of ``activity_id`` (default: ``ctx.activity_id``).

    With a :class:`bus.BusActivityService` the lines are batched and sent by a pump the service owns;
    with any other :class:`MessageAppender` they are sent one by one when :func:`flush_writer` runs.
    """
    activity_id = activity_id or ctx.activity_id
    opener = getattr(appender, "open_writer", None)
    if callable(opener):
        writer = opener(activity_id, underlying=underlying)
        assert isinstance(writer, ActivityWriter)
        return writer

    async def send(aid: str, batch: list[MessageEntry]) -> None:
        for entry in batch:
            await appender.append_message(
                aid,
                AppendMessageRequest(
                    message=entry.message,
                    level=entry.level,
                    payload=entry.payload,
                    step=entry.step,
                    progress=entry.progress,
                ),
            )

    return ActivityWriter(activity_id, send, underlying=underlying)


async def flush_writer(writer: object, *, timeout: float | None = None) -> None:
    """Return once every line written before the call (and the trailing partial line) is stored.

    Anything that is not an :class:`ActivityWriter` is flushed with its own ``flush()``.

    Raises:
        TimeoutError: the lines are not stored within ``timeout`` (default: the writer's
            ``flush_timeout``); they stay queued.
    """
    if not isinstance(writer, ActivityWriter):
        flush = getattr(writer, "flush", None)
        if callable(flush):
            flush()
        return
    writer._take_partial()
    target = writer.written
    with anyio.fail_after(writer.flush_timeout if timeout is None else timeout):
        if not writer._pumping:
            await writer.drain()
            return
        writer._wake.set()
        while writer.durable < target:
            if not writer._pumping:
                await writer.drain()
                return
            await writer._progress.wait()


def write_started_line(writer: TextSink, activity_id: str) -> None:
    """Write one JSON line ``{"type": "activity", "activityId": id}``; nothing for a blank id."""
    if not activity_id.strip():
        return
    writer.write(json.dumps({"type": "activity", "activityId": activity_id}) + "\n")
