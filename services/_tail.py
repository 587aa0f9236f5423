"""``cadenza tail``: follow events on a subject, readably, live or from the streams' history.

Live (the default) is a core subscription: every message on the subject as it is published, stored
or not. ``--since 10m`` or ``--all`` read the streams that hold the subject instead (one ephemeral
pull consumer per stream, no acks, from that time or from the start) and then go on live from them:
dead letters (``dlq.>``) included. The task stream is a work queue (a task is gone once a worker has
it), so history leaves it out.

A line is the time (the server's store time for history), the subject, the event type and its
fields, each value cut with an ellipsis at 60 characters and the line cut at the terminal's width;
``--json`` prints one object per line: ``{"subject": ..., "time": ..., "event": {...}}`` (``"data"``
instead of ``"event"`` when the payload is not JSON).

A server restart is ridden out (services/_runtime.py's ``watch_connection`` says when the connection
drops and when it is back): the live subscription is renewed by nats-py on reconnect; a history
consumer that the server no longer has is created again after the last message printed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    import bus

__all__ = ("Line", "duration_arg", "follow", "format_line")

_SKIP = frozenset({"event_id", "type", "schema_version", "time", "source"})
_VALUE_WIDTH = 60
_SUBJECT_WIDTH = 44
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_arg(value: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds (an argparse ``type``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration: use e.g. 90, 30s, 10m, 2h or 1d")
    return float(m[1]) * _UNITS[m[2] or "s"]


@dataclass(frozen=True)
class Line:
    """One message as ``tail`` shows it."""

    subject: str
    data: bytes
    time: datetime


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_line(line: Line) -> str:
    """``HH:MM:SS.mmm  subject  type  k=v ...`` with long values cut with an ellipsis."""
    stamp = line.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    subject = _cut(line.subject, _SUBJECT_WIDTH).ljust(_SUBJECT_WIDTH)
    try:
        body: Any = json.loads(line.data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{stamp}  {subject}  {'(not JSON)':<20}  {len(line.data)} bytes"
    if not isinstance(body, dict):
        return f"{stamp}  {subject}  {'(JSON)':<20}  {_cut(json.dumps(body), _VALUE_WIDTH)}"
    fields = []
    for key, value in body.items():
        if key in _SKIP or value in (None, "", [], {}):
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        fields.append(f"{key}={_cut(text.replace(chr(10), ' '), _VALUE_WIDTH)}")
    return f"{stamp}  {subject}  {_cut(str(body.get('type', '?')), 20):<20}  {' '.join(fields)}"


def as_json(line: Line) -> str:
    out: dict[str, Any] = {"subject": line.subject, "time": line.time.isoformat()}
    try:
        out["event"] = json.loads(line.data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        out["data"] = line.data.decode("utf-8", errors="replace")
    return json.dumps(out, ensure_ascii=False)


def _history_filters(b: bus.Bus, subject: str) -> list[tuple[str, str]]:
    """(stream, filter) pairs of the streams holding ``subject`` (a filter under the prefix)."""
    from bus.transport import STREAMS

    prefix = b.subjects.prefix
    tokens = subject.split(".")
    if tokens[: len(prefix.split("."))] != prefix.split(".") or len(tokens) <= len(prefix.split(".")):
        return []
    rest = tokens[len(prefix.split(".")) :]
    out = []
    for spec in STREAMS:
        if spec.domain == "task":  # a work queue: nothing to replay
            continue
        if rest[0] == ">":
            filt = f"{prefix}.{spec.domain}.>"
        elif rest[0] in ("*", spec.domain):
            filt = ".".join([prefix, spec.domain, *rest[1:]])
        else:
            continue
        out.append((b.topology.stream_name(spec.domain), filt))
    return out


async def follow(
    b: bus.Bus, subject: str, emit: Callable[[Line], Awaitable[bool]], *, since: float | None, everything: bool
) -> None:
    """Call ``emit`` for each message (history first when asked) until it returns False."""
    import contextlib

    import anyio

    from bus.transport import core_messages

    if since is None and not everything:
        async with contextlib.aclosing(core_messages(b, subject)) as messages:
            async for msg in messages:
                if not await emit(Line(msg.subject, msg.data, _event_time(msg.data))):
                    break
        return
    start = None if everything else datetime.now(UTC) - timedelta(seconds=since or 0)
    async with anyio.create_task_group() as tg:
        done = anyio.Event()

        async def one(stream: str, filt: str) -> None:
            await _read_stream(b, stream, filt, start, emit, done)
            if done.is_set():
                tg.cancel_scope.cancel()

        for stream, filt in _history_filters(b, subject):
            tg.start_soon(one, stream, filt)


async def _read_stream(
    b: bus.Bus, stream: str, filt: str, start: datetime | None, emit: Callable[[Line], Awaitable[bool]],
    done: Any,
) -> None:  # fmt: skip
    """Emit what ``stream`` holds under ``filt`` from ``start`` (None: everything), then live, until
    ``done``. After a reconnect the consumer is made again, from the message after the last one
    emitted (a restarted server has forgotten the ephemeral one)."""
    import anyio

    from bus import BusError, NotFoundError
    from bus.transport import StreamReader, open_reader

    from ._runtime import connected, reconnects

    last_seq = 0  # the stream seq of the last message emitted
    reader: StreamReader | None = None
    try:
        while not done.is_set():
            if reader is None:
                if not connected(b):
                    await anyio.sleep(_RETRY_EVERY)  # the connection watcher bounds the wait
                    continue
                generation = reconnects(b)
                try:
                    reader = await open_reader(b, stream, filt, start_seq=last_seq + 1 if last_seq else 0,
                                               start_time=start)  # fmt: skip
                except NotFoundError:
                    return  # the stream is not declared (yet): nothing stored
                except BusError as exc:
                    if reconnects(b) == generation and connected(b):
                        raise BusError(f"cannot read {stream}: {exc.__cause__ or exc}") from exc
                    continue  # the connection went away meanwhile: again once it is back
            try:
                msgs = await reader.fetch(256, timeout=b.timeouts.fetch)  # [] when nothing is new
            except BusError:  # the connection dropped, or the server forgot the consumer
                await reader.close(forget=False)
                reader = None
                await anyio.sleep(_RETRY_EVERY)
                continue  # a new consumer from the last message emitted
            for msg in msgs:
                if msg.seq <= last_seq:
                    continue  # delivered again around a reconnect
                last_seq = msg.seq
                if not await emit(Line(msg.subject, msg.data, msg.time or datetime.now(UTC))):
                    done.set()
                    return
            if reconnects(b) != generation:
                await reader.close(forget=False)
                reader = None
    finally:
        if reader is not None:
            await reader.close(forget=False)


#: Seconds between tries while the connection is down (history reads).
_RETRY_EVERY = 0.2


def _event_time(data: bytes) -> datetime:
    try:
        value = json.loads(data).get("time")
        return datetime.fromisoformat(value) if isinstance(value, str) else datetime.now(UTC)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return datetime.now(UTC)


def printer(args: argparse.Namespace, console: Console | None = None) -> Callable[[Line], Awaitable[bool]]:
    """The ``emit`` of :func:`follow` for ``args`` (``--json``, ``--count``); the console (rich's, made
    at the first line unless given) cuts lines at a terminal's width."""
    seen = [0]
    consoles = [console] if console is not None else []

    async def emit(line: Line) -> bool:
        if not consoles and not args.json:
            from rich.console import Console

            consoles.append(Console(highlight=False))
        if args.json:
            print(as_json(line), flush=True)
        elif (console := consoles[0]).is_terminal:
            console.print(format_line(line), overflow="ellipsis", no_wrap=True, crop=True, markup=False,
                          highlight=False)  # fmt: skip
        else:
            print(format_line(line), flush=True)
        seen[0] += 1
        return not (args.count and seen[0] >= args.count)

    return emit
