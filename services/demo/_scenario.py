"""``cadenza demo``: a scripted tour of sessions and tracked activities against ``cadenza dev``.

Steps (each prints a few lines saying what happens):

1. A second worker starts (this demo kills it in step 4); two sessions are created and the broker
   places each on the least loaded worker; ``where()`` proves a session's activities run there.
2. ``download()`` in a session writes progress lines; the demo reads them back as they are stored.
3. ``transcode()`` runs; a user cancels it through the recorder; the caller gets
   ``ActivityCancelledError`` and the recorder shows the activity ``cancelled``.
4. The second worker is killed (SIGKILL) while it runs ``transcode()``; the broker notices the
   missing heartbeats and the caller gets ``SessionFailedError`` with cause ``worker_lost``; the next
   activity in that session fails at once.
5. The surviving session is completed (its slot is free again).
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import bus
from bus.transport import ChildProcess as Child
from bus.transport import RawBucket

__all__ = ("DemoConfig", "DemoFailed", "run_demo")


class DemoFailed(Exception):
    """A step did not go as the script says (the message says which and why)."""


@dataclass(frozen=True)
class DemoConfig:
    """How the demo runs.

    Attributes:
        tasklist: the tasklist the demo worker of ``cadenza dev`` serves.
        pace: seconds to pause between steps, so a person can read along (0 in tests).
        heartbeat_timeout: the sessions' heartbeat timeout: how long a silent worker keeps its sessions.
        server: URL handed to the extra worker process.
        wait: seconds to wait for the broker to register the demo's own worker.
    """

    tasklist: str = "demo"
    pace: float = 1.5
    heartbeat_timeout: float = 3.0
    server: str = ""
    wait: float = 15.0


@dataclass
class _Call:
    """One ``execute_activity`` running in the background."""

    activity_id: str
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None
    ended_at: float = 0.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _short(worker_id: str) -> str:
    return worker_id if len(worker_id) <= 48 else worker_id[:45] + "..."


async def _run_call(ctx: bus.Context, call: _Call, name: str, *args: Any, timeout: float = 60.0) -> None:
    try:
        call.result = await bus.execute_activity(ctx, name, *args, activity_id=call.activity_id,
                                                 start_to_close_timeout=timeout)  # fmt: skip
    except bus.CadenzaError as exc:
        call.error = exc
    finally:
        call.ended_at = time.monotonic()
        call.done.set()


async def _stream(
    b: bus.Bus, activity_id: str, *, seen: Callable[[int], None] | None = None, indent: str = "      | "
) -> None:
    """Print the activity's messages as they are stored, until it ends (read from the stream)."""
    after = 0
    cursor = 0
    count = 0
    while True:
        batch = await bus.read_activity_messages(b, activity_id, after_seq=after, cursor=cursor, wait=1.0)
        for m in batch.messages:
            _say(f"{indent}{m.message}")
            after = max(after, m.seq)
            count += 1
            if seen is not None:
                seen(count)
        cursor = batch.cursor or cursor
        if batch.completed is not None:
            return


async def _lines(b: bus.Bus, activity_id: str, n: int, got: anyio.Event, finished: anyio.Event) -> None:
    """Stream the activity's lines; ``got`` is set after ``n`` of them, ``finished`` when it ended."""

    def seen(count: int) -> None:
        if count >= n:
            got.set()

    await _stream(b, activity_id, seen=seen)
    finished.set()


async def _recorder_status(b: bus.Bus, activity_id: str, timeout: float = 20.0) -> str:
    """The activity's status once the recorder shows it ended ("" if it does not answer in time)."""
    client = bus.ActivityClient(b, timeout=5.0)
    status = ""
    with anyio.move_on_after(timeout):
        while True:
            with contextlib.suppress(bus.RequestError):
                status = (await client.get(activity_id, limit=1)).activity.status.value
                if status not in ("running", "queued"):
                    return status
            await anyio.sleep(0.1)
    return ""


async def _wait_registered(b: bus.Bus, worker_id: str, timeout: float = 15.0) -> None:
    """Until the broker lists ``worker_id`` among the session workers (its first heartbeat was seen)."""
    workers = RawBucket(b, "workers")
    with anyio.fail_after(timeout):
        while True:
            with contextlib.suppress(bus.BusError):
                stored = await workers.read(worker_id)
                if stored is not None and stored.value:
                    return
            await anyio.sleep(0.1)


async def run_demo(b: bus.Bus, config: DemoConfig) -> None:
    """Run the scenario on ``b`` (a ``cadenza dev`` installation: broker, recorder, demo worker).

    Raises:
        DemoFailed: a step did not behave as described (for instance no broker or no demo worker).
    """
    started = time.monotonic()
    _say(f"cadenza demo on {b.url} (prefix {b.subjects.prefix}, tasklist {config.tasklist})")
    _say()
    _say("[1/5] Sessions pin activities to one worker.")
    _say("      Starting a second demo worker; step 4 kills it.")
    extra = Child(
        "services.demo.worker", "--server", config.server or b.url, "--prefix", b.subjects.prefix,
        "--tasklist", config.tasklist, "--heartbeat-interval", "0.5",
    )  # fmt: skip
    try:
        await anyio.to_thread.run_sync(extra.start)
    except RuntimeError as exc:
        raise DemoFailed(f"the second worker did not start: {exc}") from exc
    try:
        tour = await _pinned_sessions(b, config, extra)
        await tour.pause()
        await tour.streamed_output()
        await tour.pause()
        await tour.user_cancel()
        await tour.pause()
        await tour.worker_dies()
        await tour.pause()
        await tour.complete()
        _say()
        opt = "" if b.subjects.prefix == "cadenza" else f" --prefix {b.subjects.prefix}"
        _say(f"done in {time.monotonic() - started:.1f} s. Next: cadenza sessions ls{opt}, cadenza activities ls{opt}")
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(extra.kill)


async def _pinned_sessions(b: bus.Bus, config: DemoConfig, extra: Child) -> _Tour:
    """Step 1: two sessions, one of them on the second worker; ``where()`` runs on each one's worker."""
    doomed = extra.ready_line.split(" worker ", 1)[1].split()[0]
    _say(f"      second worker {_short(doomed)} (pid {extra.pid}) is up")
    try:
        await _wait_registered(b, doomed, config.wait)
    except TimeoutError:
        why = f"the broker did not register the second worker within {config.wait:g} s"
        raise DemoFailed(f"{why}: is `cadenza dev` (or `cadenza broker`) running on this prefix?") from None
    opts = bus.SessionOptions(execution_timeout=600, creation_timeout=10, heartbeat_timeout=config.heartbeat_timeout,
                              tasklist=config.tasklist)  # fmt: skip
    try:
        s1 = await bus.create_session(b.context(), opts)
        s2 = await bus.create_session(b.context(), opts)
    except bus.SessionCreationError as exc:
        raise DemoFailed(f"no session ({exc.reason}): {exc}") from exc
    sessions = [s1, s2]
    for i, s in enumerate(sessions, 1):
        info = _info(s)
        mark = " (the one step 4 kills)" if info.worker_id == doomed else ""
        _say(f"      session {i} {info.session_id[:8]} placed on worker {_short(info.worker_id)} "
             f"on host {info.host_name}{mark}")  # fmt: skip
    for i, s in enumerate(sessions, 1):
        ran = await bus.execute_activity(s, "where", start_to_close_timeout=10)
        same = "the same worker: pinned" if ran["worker_id"] == _info(s).worker_id else "ANOTHER worker"
        _say(f"      where() in session {i} ran on {_short(ran['worker_id'])} (pid {ran['pid']}), {same}")
    on_doomed = [s for s in sessions if _info(s).worker_id == doomed]
    if not on_doomed:
        raise DemoFailed("no session landed on the second worker (is another worker of this tasklist "
                         "running with free slots?)")  # fmt: skip
    victim = on_doomed[-1]
    return _Tour(b, config, extra, doomed, keep=s1 if victim is s2 else s2, victim=victim)


def _info(ctx: bus.Context) -> bus.SessionInfo:
    info = bus.get_session_info(ctx)
    assert info is not None
    return info


@dataclass
class _Tour:
    """Steps 2 to 5, on the sessions step 1 opened: ``keep`` survives, ``victim`` is on ``doomed``."""

    b: bus.Bus
    config: DemoConfig
    extra: Child
    doomed: str
    keep: bus.Context
    victim: bus.Context

    async def pause(self) -> None:
        if self.config.pace:
            await anyio.sleep(self.config.pace)

    async def streamed_output(self) -> None:
        _say()
        _say("[2/5] Streamed output: download() writes progress lines to bus.activity_writer(); each line")
        _say("      is stored as a message of the activity, and anyone can read them live (as here).")
        call = _Call(f"demo-download-{uuid.uuid4().hex[:8]}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_call, self.keep, call, "download", "https://example.com/big.iso")
            with anyio.fail_after(30):
                await _stream(self.b, call.activity_id)
                await call.done.wait()
        if call.error is not None:
            raise DemoFailed(f"download failed: {call.error!r}")
        _say(f"      result: {call.result['bytes']:,} bytes from {call.result['url']}")

    async def user_cancel(self) -> None:
        b = self.b
        _say()
        _say("[3/5] A user cancels a running activity: the recorder publishes cancel.requested (cause user),")
        _say("      the worker cancels the activity's scope, and it ends `cancelled` (only a user's cancel does).")
        call = _Call(f"demo-transcode-{uuid.uuid4().hex[:8]}")
        _say(f"      transcode('movie', 30 s) started as activity {call.activity_id}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_call, self.keep, call, "transcode", "movie", 30)
            got, finished = anyio.Event(), anyio.Event()
            tg.start_soon(_lines, b, call.activity_id, 3, got, finished)
            with anyio.fail_after(30):
                await got.wait()
            how = await _cancel_as_user(b, call.activity_id)
            _say(f"      cancel requested by user 'demo' ({how})")
            with anyio.fail_after(30):
                await call.done.wait()
            with anyio.move_on_after(5):
                await finished.wait()  # the last lines (where it stopped) are stored just after the reply
            tg.cancel_scope.cancel()
        if not isinstance(call.error, bus.ActivityCancelledError):
            raise DemoFailed(f"expected ActivityCancelledError, got {call.error or call.result!r}")
        _say(f"      the caller got ActivityCancelledError: {call.error}")
        status = await _recorder_status(b, call.activity_id)
        _say(f"      the recorder shows activity {call.activity_id} ended {status or '(no recorder answered)'}")

    async def worker_dies(self) -> None:
        _say()
        _say("[4/5] A worker dies (SIGKILL, no goodbye). Its heartbeats stop; the broker pings it, nobody answers")
        _say("      (or heartbeat_timeout passes), and its sessions fail with cause worker_lost: callers waiting get")
        _say("      SessionFailedError at once.")
        call = _Call(f"demo-transcode-{uuid.uuid4().hex[:8]}")
        _say(f"      transcode('show', 60 s) in session {_info(self.victim).session_id[:8]} on worker "
             f"{_short(self.doomed)}")  # fmt: skip
        killed = await self._kill_while_running(call)
        if not isinstance(call.error, bus.SessionFailedError):
            raise DemoFailed(f"expected SessionFailedError, got {call.error or call.result!r}")
        timeout = self.config.heartbeat_timeout
        _say(f"      the caller got SessionFailedError after {call.ended_at - killed:.1f} s "
             f"(heartbeat_timeout {timeout:g} s): cause {call.error.cause}")  # fmt: skip
        info = _info(self.victim)
        _say(f"      session {info.session_id[:8]} is {info.state.value} ({info.cause})")
        t0 = time.monotonic()
        try:
            await bus.execute_activity(self.victim, "where", start_to_close_timeout=10)
        except bus.SessionFailedError as exc:
            took = (time.monotonic() - t0) * 1000
            _say(f"      where() in it fails at once ({took:.1f} ms, nothing sent): SessionFailedError ({exc.cause})")
        else:
            raise DemoFailed("an activity in a failed session ran")

    async def _kill_while_running(self, call: _Call) -> float:
        """Run ``transcode`` in the victim's session, kill its worker after two lines, wait for the
        caller's answer; returns when the kill was sent (``time.monotonic()``)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_call, self.victim, call, "transcode", "show", 60)
            got, finished = anyio.Event(), anyio.Event()
            tg.start_soon(_lines, self.b, call.activity_id, 2, got, finished)
            with anyio.fail_after(30):
                await got.wait()
            _say(f"      kill -9 {self.extra.pid}")
            killed = time.monotonic()
            await anyio.to_thread.run_sync(self.extra.kill)
            with anyio.fail_after(self.config.heartbeat_timeout + 20):
                await call.done.wait()
            tg.cancel_scope.cancel()  # the killed worker never ends its activity (the recorder will, later)
        return killed

    async def complete(self) -> None:
        _say()
        _say("[5/5] Completing the other session frees its slot.")
        await bus.complete_session(self.keep)
        info = _info(self.keep)
        _say(f"      session {info.session_id[:8]} is {info.state.value}")


async def _cancel_as_user(b: bus.Bus, activity_id: str) -> str:
    """Cancel through the recorder (as a person would); without a recorder, publish the cancel event."""
    client = bus.ActivityClient(b, timeout=5.0)
    with anyio.move_on_after(10):
        while True:
            try:
                reply = await client.cancel(activity_id, who="demo", reason="changed my mind")
                return f"recorder: {reply.outcome}"
            except bus.RemoteError as exc:
                if exc.remote_code != "not_found":
                    raise
                await anyio.sleep(0.1)  # the recorder has not folded the start yet
            except bus.RequestError:
                break
    cause = bus.CancelCause(kind=bus.CancelKind.USER, who="demo", reason="changed my mind")
    await bus.request_cancel(b, "activity", activity_id, cause)
    return "published cancel.requested directly: no recorder answered"


def print_error(message: str) -> None:
    print(f"cadenza demo: {message}", file=sys.stderr, flush=True)
