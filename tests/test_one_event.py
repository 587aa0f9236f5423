"""Issue #10's flow: one stored event for a quick activity, `started` for a long one, the first
completion kept by the stream itself, and a result the caller saw is a record that survives kills."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats.js.errors
import pytest

import bus
from bus.testing import ServiceProcess, eventually, unique_prefix
from schemas import ActivityCompleted, ActivityStart, ActivityStatus, utcnow
from services.broker import Broker, BrokerConfig
from tests._helpers import running_recorder, terminal, wait_record

KEY = b"k" * 32


async def _stored(b: bus.Bus, activity_id: str, event: str) -> dict[str, Any] | None:
    """The activity's stored ``event`` (its JSON body), or None."""
    import json

    try:
        stream, subject = b.topology.stream_name("activity"), b.subjects.build("activity", activity_id, event)
        msg = await b.js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None
    body: dict[str, Any] = json.loads(msg.data or b"{}")
    return body


@contextlib.asynccontextmanager
async def _worker(b: bus.Bus, gate: anyio.Event, **kw: Any) -> AsyncIterator[bus.Worker]:
    w = bus.Worker(b, heartbeat_interval=0.5, **kw)

    @w.activity()
    async def quick(x: int) -> int:
        return x * 2

    @w.activity()
    async def slow() -> str:
        bus.activity_context()  # inside a worker
        await gate.wait()
        return "done"

    async with anyio.create_task_group() as tg:
        await tg.start(w.run)
        yield w
        tg.cancel_scope.cancel()


def _opts() -> bus.SessionOptions:
    return bus.SessionOptions(creation_timeout=10, execution_timeout=120, heartbeat_timeout=10)


async def test_a_quick_activity_is_one_stored_event_and_a_whole_record(cadenza_bus: bus.Bus) -> None:
    b, gate = cadenza_bus, anyio.Event()
    async with running_recorder(b) as rec, _worker(b, gate) as w:
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(b, BrokerConfig(token_key=KEY)).run)
            sctx = await bus.create_session(b.context(), _opts())
            assert await bus.execute_activity(sctx, "quick", 21, activity_id="q-1") == 42
            # Stored before the caller heard the result: the completion is there at once, and alone.
            done = await _stored(b, "q-1", "completed")
            assert done is not None and done["schema_version"] == 2 and done["status"] == "success"
            assert done["start"]["activity_type"] == "quick" and done["start"]["worker_id"] == w.worker_id
            assert await _stored(b, "q-1", "started") is None
            record, _ = await wait_record(b, "q-1", terminal)
            assert record.status is ActivityStatus.SUCCESS and record.type == "quick" and record.result == 42
            assert sctx.session is not None
            assert record.worker_id == w.worker_id and record.session_id == sctx.session.session_id
            assert record.started_at is not None and record.ended_at is not None and record.duration_ms is not None
            assert rec.cache["q-1"].fold.announced
            tg.cancel_scope.cancel()


async def test_a_long_activity_shows_running_while_it_runs(cadenza_bus: bus.Bus) -> None:
    b, gate = cadenza_bus, anyio.Event()
    async with running_recorder(b), _worker(b, gate, announce_after=0.2):
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(b, BrokerConfig(token_key=KEY)).run)
            sctx = await bus.create_session(b.context(), _opts())
            result: list[str] = []

            async def call() -> None:
                result.append(await bus.execute_activity(sctx, "slow", activity_id="s-1"))

            tg.start_soon(call)
            # Announced after announce_after while it still runs: the recorder shows it running.
            record, _ = await wait_record(b, "s-1", lambda r: r.status is ActivityStatus.RUNNING, timeout=20)
            assert record.type == "slow" and record.ended_at is None
            started = await _stored(b, "s-1", "started")
            assert started is not None and started["activity_type"] == "slow"
            gate.set()
            await eventually(lambda: result == ["done"], timeout=20, what="the result")
            done = await _stored(b, "s-1", "completed")
            assert done is not None and done["start"] is None  # announced already: not again
            record, _ = await wait_record(b, "s-1", terminal)
            assert record.status is ActivityStatus.SUCCESS and record.result == "done"
            tg.cancel_scope.cancel()


async def test_a_finished_activity_leaves_no_reference_cycle(cadenza_bus: bus.Bus) -> None:
    """What a worker held for a finished activity is freed when its last reference goes, not left as
    a cycle for the garbage collector to find: one per activity (its track held by its token's
    callback, which the track held) made a loaded worker spend a sixth of its CPU in the collector."""
    b, gate = cadenza_bus, anyio.Event()

    async def fails() -> None:
        with pytest.raises(bus.ActivityError):
            await bus.execute_activity(sctx, "quick", None)  # None * 2: the activity raises

    # announce_after short: the deferred-announcement queue lets go of each activity soon after.
    async with _worker(b, gate, announce_after=0.05) as w, anyio.create_task_group() as tg:
        await tg.start(Broker(b, BrokerConfig(token_key=KEY)).run)
        sctx = await bus.create_session(b.context(), _opts())
        # Warm: what is made once on first use (pydantic completes a model on its first build, taking
        # the caller's frame's locals, then holding an exception) is not per activity.
        assert await bus.execute_activity(sctx, "quick", 1) == 2
        await fails()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, to look at
        try:
            for i in range(20):
                assert await bus.execute_activity(sctx, "quick", i) == 2 * i
            for _ in range(3):
                await fails()
            await eventually(lambda: not w.service._due, what="the deferred announcements let go")
            gc.collect()
            ours = sorted({type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage
                           if type(o).__module__.startswith(("bus.", "schemas.", "services."))})  # fmt: skip
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert ours == [], f"cycles of cadenza's objects left to the garbage collector: {ours}"
        tg.cancel_scope.cancel()


async def test_a_finished_activity_is_freed_before_its_announcement_falls_due(cadenza_bus: bus.Bus) -> None:
    """The deferred-announcement queue holds activity ids, not what the worker knew of them: a quick
    activity's track is freed when it ends, not announce_after later. (Held by the queue, tracks
    were freed in bursts, and a loaded worker ran the garbage collector every 80 activities.)"""
    from bus.tracking._service import _Track

    b, gate = cadenza_bus, anyio.Event()
    async with _worker(b, gate, announce_after=60) as w, anyio.create_task_group() as tg:
        await tg.start(Broker(b, BrokerConfig(token_key=KEY)).run)
        sctx = await bus.create_session(b.context(), _opts())
        for i in range(20):
            assert await bus.execute_activity(sctx, "quick", i) == 2 * i
        assert len(w.service._due) == 20  # none due yet: all 20 still queued
        info = bus.get_session_info(sctx)
        assert info is not None
        session_id = info.session_id

        def none_left() -> bool:
            # (A look-up for an early cancel still running in the background holds its activity's
            # token a moment longer, and with it the track: hence a bounded wait, not a snapshot.)
            gc.collect()
            return not [o for o in gc.get_objects()
                        if isinstance(o, _Track) and o.req is not None and o.req.session_id == session_id]  # fmt: skip

        await eventually(none_left, timeout=10, what="the finished activities' tracks freed")
        assert len(w.service._due) == 20  # and still none due
        tg.cancel_scope.cancel()


async def test_the_stream_keeps_the_first_completion(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    start = ActivityStart(started_at=utcnow(), activity_type="t")
    first = ActivityCompleted(event_id="f-1.completed", activity_id="f-1", status=ActivityStatus.SUCCESS, start=start)
    await b.publish(first, headers=bus.FIRST_COMPLETION)
    # Another completion of the same activity, or the same one again (a retry after a lost ack: the
    # server checks the expectation before its duplicate window): refused, and recognised as "ended".
    other = ActivityCompleted(event_id="f-1.completed-again", activity_id="f-1", status=ActivityStatus.FAILED)
    for event in (other, first):
        with pytest.raises(bus.PublishError) as err:
            await b.publish(event, headers=bus.FIRST_COMPLETION)
        assert bus.completed_already(err.value)
    stored = await _stored(b, "f-1", "completed")
    assert stored is not None and stored["status"] == "success"


def test_a_result_the_caller_saw_is_recorded_after_killing_the_worker_and_the_recorder(nats_server: Any) -> None:
    """SIGKILL of the worker right after the caller saw the result, then of the recorder: a recorder
    started again (reading the stream) still has the record, with the result."""
    prefix, url = unique_prefix(), nats_server.url
    worker = ServiceProcess("tests.session_worker", "--prefix", prefix, url=url)
    recorder = ServiceProcess("services.recorder", "--prefix", prefix, url=url)

    async def run() -> None:
        async with bus.connect(url, prefix=prefix, name="kill-test") as b, anyio.create_task_group() as tg:
            await tg.start(Broker(b, BrokerConfig(token_key=KEY)).run)
            sctx = await bus.create_session(b.context(), _opts())
            assert await bus.execute_activity(sctx, "echo", {"v": 7}, activity_id="k-1") == {"v": 7}
            await anyio.to_thread.run_sync(worker.kill)
            await anyio.to_thread.run_sync(recorder.kill)
            tg.cancel_scope.cancel()

    try:
        recorder.start(timeout=30)
        worker.start(timeout=30)
        anyio.run(run)
        again = ServiceProcess("services.recorder", "--prefix", prefix, url=url)
        try:
            again.start(timeout=30)

            async def check() -> None:
                async with bus.connect(url, prefix=prefix, name="kill-check") as b:
                    record, _ = await wait_record(b, "k-1", terminal, timeout=30)
                    assert record.status is ActivityStatus.SUCCESS and record.result == {"v": 7}

            anyio.run(check)
        finally:
            again.kill()
    finally:
        worker.kill()
        recorder.kill()


@pytest.mark.parametrize("recorder_from", ["before", "after"])
def test_a_killed_workers_unannounced_activity_still_ends_failed_host_lost(
    nats_server: Any, recorder_from: str
) -> None:
    """An activity a worker was SIGKILLed running before it announced it (no event on the activity
    stream) is found in the worker's inbox by the recorder and ends failed, host lost, with its type,
    worker and session from the task: every activity sent to a session worker has a record. Also when
    no recorder ran at the kill ("after"): the recorder started later learns of the dead worker from
    the worker stream (its last heartbeat) and reads its inbox then."""
    prefix, url = unique_prefix(), nats_server.url
    worker = ServiceProcess("tests.session_worker", "--prefix", prefix, "--interval", "0.3",
                            "--announce-after", "600", url=url)  # fmt: skip
    aid = f"orphan-{recorder_from}"

    async def run() -> None:
        async with (
            bus.connect(url, prefix=prefix, name="orphan-test") as b,
            anyio.create_task_group() as tg,
            contextlib.AsyncExitStack() as stack,
        ):
            await tg.start(Broker(b, BrokerConfig(token_key=KEY)).run)
            if recorder_from == "before":
                await stack.enter_async_context(running_recorder(b))
            opts = bus.SessionOptions(creation_timeout=10, execution_timeout=120, heartbeat_timeout=2)
            sctx = await bus.create_session(b.context(), opts)
            failed = anyio.Event()

            async def call() -> None:
                with pytest.raises(bus.SessionFailedError):
                    await bus.execute_activity(sctx, "sleep", 600, activity_id=aid)
                failed.set()

            tg.start_soon(call)
            await eventually(lambda: f"running {aid}" in "".join(worker.output), timeout=30)
            assert await _stored(b, aid, "started") is None  # not announced: no event at all
            await anyio.to_thread.run_sync(worker.kill)
            if recorder_from == "after":
                with anyio.fail_after(30):
                    await failed.wait()  # the broker saw the worker lost; no recorder has run yet
                assert await _stored(b, aid, "completed") is None
                await stack.enter_async_context(running_recorder(b))
            record, _ = await wait_record(b, aid, terminal, timeout=30)
            assert record.status is ActivityStatus.FAILED and record.error is not None
            assert "host lost" in record.error
            assert record.type == "sleep" and record.worker_id == sctx.session.worker_id
            assert record.session_id == sctx.session.session_id
            with anyio.fail_after(30):
                await failed.wait()
            await stack.aclose()
            tg.cancel_scope.cancel()

    try:
        worker.start(timeout=30)
        anyio.run(run)
    finally:
        worker.kill()


async def test_an_id_started_twice_in_one_service_is_a_typed_error(cadenza_bus: bus.Bus) -> None:
    async with bus.BusActivityService(cadenza_bus, heartbeat=False) as svc:
        req = bus.StartRequest(id="twice-1", type="t")
        await svc.start_activity(req, announce_after=5.0)
        with pytest.raises(bus.ActivityAlreadyStartedError) as err:
            await svc.start_activity(req)
        assert err.value.code == "already_started" and err.value.non_retryable
        await svc.complete_activity("twice-1", ActivityStatus.SUCCESS)
        with pytest.raises(bus.ActivityAlreadyStartedError):
            await svc.start_activity(req)  # finished here: still the same id


def test_the_consoles_fold_keeps_a_bounded_number_of_finished_activities() -> None:
    """The console folds the stream itself and cannot see the recorder's pruning: it drops the
    oldest finished activities beyond its bound (running ones are never dropped)."""
    from services.console._state import ConsoleConfig, ConsoleState

    state = ConsoleState(bus=None, config=ConsoleConfig(finished_activities=3))  # type: ignore[arg-type]
    start = ActivityStart(started_at=utcnow(), activity_type="t", session_id="s1")
    for i in range(5):
        done = ActivityCompleted(event_id=f"c{i}.completed", activity_id=f"c{i}", status=ActivityStatus.SUCCESS,
                                 start=start)  # fmt: skip
        state._on_activity_event(done, i + 1)
    from schemas import ActivityStarted

    state._on_activity_event(ActivityStarted(activity_id="r1", activity_type="t", session_id="s1"), 6)
    assert set(state.activities) == {"c2", "c3", "c4", "r1"}
    assert state.by_session["s1"] == {"c2", "c3", "c4", "r1"} and state.open_activities == {"r1"}


@pytest.mark.parametrize("session_id", [None, "s-1"])
async def test_a_plain_start_is_announced_as_the_full_build_would_announce_it(
    cadenza_bus: bus.Bus, session_id: str | None
) -> None:
    # The quick build passes only what differs from the defaults; it must be the same announcement.
    from bus.tracking._service import _Track

    async with bus.BusActivityService(cadenza_bus, heartbeat=False) as svc:
        plain = bus.StartRequest(id="p-1", type="quick", worker_id="w-1", session_id=session_id)
        given = bus.StartRequest(id="p-2", type="quick", worker_id="w-1", session_id=session_id, step="")
        track = _Track(id="p-1", started_at=utcnow())
        quick, full = svc._start_fields(track, plain), svc._start_fields(track, given)
        assert quick == full and quick.model_dump_json() == full.model_dump_json()
        assert full == ActivityStart(started_at=track.started_at, environment_id="", activity_type="quick",
                                     resource_type=None, resource_id=None, resource_name=None, step="", message="",
                                     progress=0.0, started_by=None, metadata={}, batch_id=None, worker_id="w-1",
                                     session_id=session_id)  # fmt: skip
