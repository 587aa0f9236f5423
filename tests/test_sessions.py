"""SPEC-sessions.md: one test (or case) per line, against a real nats-server, an in-process broker,
in-process workers and, where a real death is needed, a worker process killed with SIGKILL.

The two "Survival" lines (broker restart keeps every session and slot; several broker replicas never
oversubscribe and announce a failure once) are covered in tests/test_session_faults.py.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydantic
import pytest
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

import bus
from bus.testing import ServiceProcess, eventually
from schemas import (
    ActivityStatus,
    CancelCause,
    CancelKind,
    SessionRecord,
    SessionState,
    WorkerHeartbeat,
    WorkerRecord,
    WorkerStarted,
)
from services.broker._tokens import TokenSigner, WorkerClaim
from tests._helpers import (
    HB,
    HT,
    running_broker,
    running_recorder,
    session_of,
    session_opts,
    terminal,
    wait_record,
)


@dataclass
class Log:
    """What the activities of a test saw, by key: where they ran, that they started, why they ended."""

    ran: list[str] = field(default_factory=list)
    started: set[str] = field(default_factory=set)
    causes: dict[str, CancelCause | None] = field(default_factory=dict)


def make_worker(b: bus.Bus, log: Log, **kw: Any) -> bus.Worker:
    w = bus.Worker(b, heartbeat_interval=kw.pop("heartbeat_interval", HB), **kw)

    @w.activity()
    async def where() -> str:
        log.ran.append(w.worker_id)
        return w.worker_id

    @w.activity()
    async def boom(text: str) -> None:
        raise RuntimeError(text)

    @w.activity()
    async def hold(key: str, seconds: float = 30.0) -> str:
        log.started.add(key)
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            log.causes[key] = bus.activity_context().cause
            raise
        return "held"

    return w


class Fleet(list[bus.Worker]):
    """Running workers, each in its own task, so any one can be stopped gracefully in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: dict[str, anyio.CancelScope] = {}

    async def stop(self, w: bus.Worker) -> None:
        """Graceful stop (``Worker.run`` cancelled: it announces the stop, then closes)."""
        self.scopes[w.worker_id].cancel()
        await eventually(lambda: w.state is bus.WorkerState.STOPPED, timeout=10, what="the worker stopped")


@contextlib.asynccontextmanager
async def running_workers(b: bus.Bus, log: Log, *specs: dict[str, Any]) -> AsyncIterator[Fleet]:
    fleet = Fleet()

    async def serve(w: bus.Worker, scope: anyio.CancelScope, *, task_status: TaskStatus[None]) -> None:
        with scope:
            await w.run(task_status=task_status)

    async with anyio.create_task_group() as tg:
        for spec in specs:
            w = make_worker(b, log, **spec)
            fleet.scopes[w.worker_id] = anyio.CancelScope()
            await tg.start(serve, w, fleet.scopes[w.worker_id])
            fleet.append(w)
        yield fleet
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def recording(b: bus.Bus, pattern: str) -> AsyncIterator[list[Msg]]:
    """Every message published on ``pattern`` (core subscription) while the block runs."""
    got: list[Msg] = []
    sub = await b.nc.subscribe(pattern)

    async def pump() -> None:
        async for msg in sub.messages:
            got.append(msg)  # noqa: PERF401 - the test reads the list while messages arrive

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        await b.nc.flush()
        try:
            yield got
            await b.nc.flush()
        finally:
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()


async def worker_record(b: bus.Bus, wid: str) -> WorkerRecord:
    kv = await b.kv("workers")
    entry = await kv.get(wid)
    assert entry.value is not None
    return WorkerRecord.model_validate_json(entry.value)


async def session_record(b: bus.Bus, sid: str) -> SessionRecord:
    kv = await b.kv("sessions")
    entry = await kv.get(sid)
    assert entry.value is not None
    return SessionRecord.model_validate_json(entry.value)


def state_is(ctx: bus.Context, state: SessionState) -> Any:
    return lambda: session_of(ctx).state is state


# ---------------------------------------------------------------- names and defaults


@pytest.mark.parametrize(
    ("given", "field_name"),
    [
        ({"creation_timeout": 1.0}, "execution_timeout"),
        ({"execution_timeout": 1.0}, "creation_timeout"),
        ({"execution_timeout": 0, "creation_timeout": 1.0}, "execution_timeout"),
        ({"execution_timeout": 1.0, "creation_timeout": -1}, "creation_timeout"),
        ({"execution_timeout": 1.0, "creation_timeout": 1.0, "heartbeat_timeout": 0}, "heartbeat_timeout"),
    ],
)
async def test_options_missing_or_non_positive_rejected_naming_the_field_nothing_published(
    cadenza_bus: bus.Bus, given: dict[str, Any], field_name: str
) -> None:
    b = cadenza_bus
    async with recording(b, f"{b.subjects.prefix}.>") as published:
        with pytest.raises(pydantic.ValidationError) as err:
            await bus.create_session(b.context(), bus.SessionOptions(**given))
    assert field_name in str(err.value)
    assert published == []


def test_options_heartbeat_timeout_defaults_to_20s() -> None:
    o = bus.SessionOptions(execution_timeout=1, creation_timeout=2)
    assert o.heartbeat_timeout == 20.0 and o.execution_timeout == 1.0 and o.creation_timeout == 2.0


def test_worker_options_enable_sessions_and_max_concurrent_sessions_default_1000(cadenza_bus: bus.Bus) -> None:
    w = bus.Worker(cadenza_bus)
    assert w.enable_sessions is True and w.max_concurrent_sessions == 1000
    assert bus.Worker(cadenza_bus, enable_sessions=False).enable_sessions is False


async def test_session_info_has_id_host_worker_tasklist_state_and_cause(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {"tasklist": "gpu"}) as (w,):
        one = await bus.create_session(b.context(), session_opts(tasklist="gpu"))
        two = await bus.create_session(b.context(), session_opts(tasklist="gpu", execution_timeout=0.5))
        i1, i2 = session_of(one), session_of(two)
        assert uuid.UUID(i1.session_id) and uuid.UUID(i2.session_id) and i1.session_id != i2.session_id
        assert i1.host_name == socket.gethostname()
        assert i1.worker_id == i1.resource_id == w.worker_id
        assert i1.tasklist == "gpu"
        assert i1.state is SessionState.OPEN and i1.cause == ""
        assert isinstance(i1.recreate_token, bytes) and i1.recreate_token
        await eventually(state_is(two, SessionState.FAILED), timeout=5, what="execution timeout")
        assert session_of(two).cause == "execution_timeout"
        await bus.complete_session(one)
        assert session_of(one).state is SessionState.COMPLETED and session_of(one).cause == ""


# ---------------------------------------------------------------- creating


async def test_create_in_context_with_open_session_fails_at_once(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}):
        sctx = await bus.create_session(b.context(), session_opts())
        async with recording(b, f"{b.subjects.prefix}.session.>") as published:
            with anyio.fail_after(1), pytest.raises(bus.SessionError, match="found existing open session"):
                await bus.create_session(sctx, session_opts())
        assert published == []


@pytest.mark.parametrize("ending", ["completed", "failed"])
async def test_context_with_completed_or_failed_session_may_create_again(cadenza_bus: bus.Bus, ending: str) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}):
        if ending == "completed":
            sctx = await bus.create_session(b.context(), session_opts())
            await bus.complete_session(sctx)
        else:
            sctx = await bus.create_session(b.context(), session_opts(execution_timeout=0.3))
            await eventually(state_is(sctx, SessionState.FAILED), timeout=5)
        again = await bus.create_session(sctx, session_opts())
        assert session_of(again).state is SessionState.OPEN
        assert session_of(again).session_id != session_of(sctx).session_id
        assert await bus.execute_activity(again, "where") == session_of(again).worker_id


async def test_placed_only_on_live_worker_of_tasklist_with_sessions_and_free_slot(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b) as broker:
        # A worker that announced itself and went silent (no process behind it); idle, it would
        # be the least loaded.
        ghost = "ghost-" + uuid.uuid4().hex[:8]
        await b.publish(WorkerStarted(worker_id=ghost, tasklist="t", sessions_enabled=True, max_sessions=100,
                                      interval=0.3))  # fmt: skip
        # Silent longer than a placeable worker may be (2.5 intervals + 0.5 s), not yet forgotten (6).
        await eventually(lambda: ghost in broker.workers and broker.silence(ghost) > 1.4, timeout=5,
                         what="the ghost was seen, then silent")  # fmt: skip
        specs: list[dict[str, Any]] = [
            {"tasklist": "other", "max_concurrent_sessions": 100},
            {"tasklist": "t", "enable_sessions": False},
            {"tasklist": "t", "max_concurrent_sessions": 1},
            {"tasklist": "t", "max_concurrent_sessions": 100},
        ]
        async with running_workers(b, log, *specs) as (other, no_sessions, small, good):
            first = await bus.create_session(b.context(), session_opts(tasklist="t"))
            assert session_of(first).worker_id in (small.worker_id, good.worker_id)
            full = small if session_of(first).worker_id == small.worker_id else good
            placed = [
                session_of(await bus.create_session(b.context(), session_opts(tasklist="t"))).worker_id
                for _ in range(6)
            ]
            expected = good.worker_id if full is small else None
            if expected is None:
                # The first went to the big worker; the small one may take one more, never two.
                assert placed.count(small.worker_id) <= 1
                assert set(placed) <= {small.worker_id, good.worker_id}
            else:
                assert placed == [good.worker_id] * 6
            assert ghost not in placed and other.worker_id not in placed and no_sessions.worker_id not in placed
            assert small.open_sessions <= 1 and other.open_sessions == 0 and no_sessions.open_sessions == 0


async def test_placement_least_loaded_first(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    specs: list[dict[str, Any]] = [{"max_concurrent_sessions": 10}, {"max_concurrent_sessions": 10}]
    async with running_broker(b), running_workers(b, log, *specs) as (w1, w2):
        first = await bus.create_session(b.context(), session_opts())
        placed = [session_of(await bus.create_session(b.context(), session_opts())).worker_id for _ in range(7)]
        # After the first, the other worker is the less loaded: then they alternate.
        other = w2.worker_id if session_of(first).worker_id == w1.worker_id else w1.worker_id
        assert placed[0] == other
        assert placed.count(w1.worker_id) in (3, 4) and placed.count(w2.worker_id) in (3, 4)
        await eventually(lambda: w1.open_sessions == w2.open_sessions == 4, timeout=5)


async def test_waits_for_a_free_slot_until_one_frees_up(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b) as broker, running_workers(b, log, {"max_concurrent_sessions": 1}) as (w,):
        held = await bus.create_session(b.context(), session_opts())
        got: list[bus.Context] = []

        async def second() -> None:
            got.append(await bus.create_session(b.context(), session_opts(creation_timeout=10)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)

            await eventually(lambda: bool(broker.waiting), timeout=5, what="the second request waits at the broker")
            assert not got
            await bus.complete_session(held)
        assert session_of(got[0]).worker_id == w.worker_id and session_of(got[0]).state is SessionState.OPEN
        await eventually(lambda: w.open_sessions == 1, timeout=5)


@pytest.mark.parametrize("case", ["capacity", "no_worker"])
async def test_creation_fails_after_creation_timeout_saying_why_nothing_left_behind(
    cadenza_bus: bus.Bus, case: str
) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b) as broker, running_workers(b, log, {"max_concurrent_sessions": 1}) as (w,):
        held = await bus.create_session(b.context(), session_opts())
        tasklist = "default" if case == "capacity" else "nobody-serves-this"
        t0 = time.monotonic()
        with anyio.fail_after(10), pytest.raises(bus.SessionCreationError) as err:
            await bus.create_session(b.context(), session_opts(creation_timeout=1.0, tasklist=tasklist))
        assert time.monotonic() - t0 >= 0.9  # it waited for a slot
        assert err.value.reason == case
        assert ("capacity" if case == "capacity" else "no live worker") in str(err.value)
        # Nothing left behind: the slot table and the worker's own count hold only the first session.
        record = await worker_record(b, w.worker_id)
        assert record.sessions == [session_of(held).session_id]
        assert w.open_sessions == 1
        rejected = [c.value for c in broker.sessions.values() if isinstance(c.value, SessionRecord)
                    and c.value.state is SessionState.REJECTED]  # fmt: skip
        assert len(rejected) == 1 and rejected[0].worker_id == ""
        # The slot is still usable by the next session once the first completes.
        await bus.complete_session(held)
        again = await bus.create_session(b.context(), session_opts(creation_timeout=2))
        assert session_of(again).worker_id == w.worker_id


async def test_no_oversubscription_under_a_burst_of_concurrent_creations(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    b, log = cadenza_bus, Log()
    specs: list[dict[str, Any]] = [{"max_concurrent_sessions": 10}, {"max_concurrent_sessions": 10}]
    async with (
        running_broker(b),
        running_workers(b, log, *specs) as workers,
        bus.connect(nats_server.url, prefix=b.subjects.prefix, name="caller2") as b2,
        bus.connect(nats_server.url, prefix=b.subjects.prefix, name="caller3") as b3,
    ):
        ok: list[bus.Context] = []
        errors: list[bus.SessionCreationError] = []

        async def one(caller: bus.Bus) -> None:
            try:
                # The 40 beyond capacity wait this long for a slot, then are refused for capacity; the
                # bound is generous so that the 20 placements finish within it on a loaded machine
                # (with 1.5 s, one of them was refused under a load of 8 on 2 cores).
                ok.append(await bus.create_session(caller.context(), session_opts(creation_timeout=8)))
            except bus.SessionCreationError as exc:
                errors.append(exc)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(one, (b, b2, b3)[i % 3])
        assert {e.reason for e in errors} == {"capacity"}, [str(e) for e in errors if e.reason != "capacity"][:3]
        assert len(ok) == 20 and len(errors) == 40
        for w in workers:
            assert sum(session_of(c).worker_id == w.worker_id for c in ok) == 10
            assert len((await worker_record(b, w.worker_id)).sessions) == 10
        await eventually(lambda: all(w.open_sessions == 10 for w in workers), timeout=5)
        assert all(w.peak_sessions <= 10 and w.oversubscribed == 0 for w in workers)


# ---------------------------------------------------------------- running activities in a session


async def test_session_activity_runs_on_the_session_worker_only(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}, {}, {}) as workers:
        sctx = await bus.create_session(b.context(), session_opts())
        mine = session_of(sctx).worker_id
        async with recording(b, f"{b.subjects.prefix}.task.>") as published:
            async with anyio.create_task_group() as tg:
                for _ in range(15):
                    tg.start_soon(bus.execute_activity, sctx, "where")
        assert log.ran == [mine] * 15
        assert {m.subject for m in published} == {b.subjects.build("task", mine, "inbox")}
        assert mine in {w.worker_id for w in workers}


async def test_failed_session_activity_raises_session_failed_at_once_nothing_published(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}, {}) as workers:
        sctx = await bus.create_session(b.context(), session_opts(execution_timeout=0.3))
        await eventually(state_is(sctx, SessionState.FAILED), timeout=5)
        async with recording(b, f"{b.subjects.prefix}.task.>") as published:
            with anyio.fail_after(0.5), pytest.raises(bus.SessionFailedError) as err:
                await bus.execute_activity(sctx, "where")
        assert published == [] and log.ran == []
        assert "session has failed" in str(err.value) and err.value.cause == "execution_timeout"
        assert isinstance(err.value, bus.SessionError) and isinstance(err.value, bus.CadenzaError)
        assert err.value.session_id == session_of(sctx).session_id
        assert len(workers) == 2


async def test_completed_session_activity_goes_to_the_shared_queue(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}, {}) as workers:
        w1, w2 = workers
        sctx = await bus.create_session(b.context(), session_opts())
        await bus.complete_session(sctx)
        # Stop the session's worker: the activity must still run, on the other one.
        holder, other = (w1, w2) if session_of(sctx).worker_id == w1.worker_id else (w2, w1)
        await workers.stop(holder)
        async with recording(b, f"{b.subjects.prefix}.task.>") as published:
            with anyio.fail_after(10):
                assert await bus.execute_activity(sctx, "where") == other.worker_id
        assert {m.subject for m in published} == {b.subjects.build("task", "default", "queued")}


async def test_activity_error_does_not_change_session_state(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}) as (w,):
        sctx = await bus.create_session(b.context(), session_opts())
        with anyio.fail_after(10), pytest.raises(bus.ActivityFailedError) as err:
            await bus.execute_activity(sctx, "boom", "no luck")
        assert err.value.type == "RuntimeError" and "no luck" in str(err.value)
        assert session_of(sctx).state is SessionState.OPEN
        assert (await session_record(b, session_of(sctx).session_id)).state is SessionState.OPEN
        assert w.open_sessions == 1
        with anyio.fail_after(10):
            assert await bus.execute_activity(sctx, "where") == w.worker_id


# ---------------------------------------------------------------- ending


async def test_complete_session_cancels_running_activities_with_session_completed(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}) as (w,):
        sctx = await bus.create_session(b.context(), session_opts())
        sid = session_of(sctx).session_id
        errors: list[BaseException] = []

        async def call(key: str) -> None:
            try:
                await bus.execute_activity(sctx, "hold", key)
            except bus.CadenzaError as exc:
                errors.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a")
                tg.start_soon(call, "b")
                await eventually(lambda: log.started == {"a", "b"}, timeout=5)
                await bus.complete_session(sctx)
        assert len(errors) == 2
        assert all(isinstance(e, bus.ActivityCancelledError) and e.cause.kind is CancelKind.SESSION_COMPLETED
                   for e in errors)  # fmt: skip
        await eventually(lambda: set(log.causes) == {"a", "b"}, timeout=5, what="the worker cancelled both")
        assert all(c is not None and c.kind is CancelKind.SESSION_COMPLETED for c in log.causes.values())
        assert session_of(sctx).state is SessionState.COMPLETED
        assert (await session_record(b, sid)).state is SessionState.COMPLETED
        await eventually(lambda: w.open_sessions == 0, timeout=5, what="the worker released the slot")


async def test_complete_session_is_a_no_op_twice_without_session_and_on_failed(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}):
        await bus.complete_session(b.context())  # no session
        sctx = await bus.create_session(b.context(), session_opts())
        await bus.complete_session(sctx)
        async with recording(b, f"{b.subjects.prefix}.session.>") as published:
            await bus.complete_session(sctx)
        assert published == []
        assert session_of(sctx).state is SessionState.COMPLETED
        failed = await bus.create_session(b.context(), session_opts(execution_timeout=0.3))
        await eventually(state_is(failed, SessionState.FAILED), timeout=5)
        async with recording(b, f"{b.subjects.prefix}.session.>") as published:
            await bus.complete_session(failed)
        assert published == []
        assert session_of(failed).state is SessionState.FAILED and session_of(failed).cause == "execution_timeout"
        assert (await session_record(b, session_of(failed).session_id)).state is SessionState.FAILED


async def test_slot_free_as_soon_as_completion_is_acknowledged(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {"max_concurrent_sessions": 1}) as (w,):
        for _ in range(3):
            sctx = await bus.create_session(b.context(), session_opts(creation_timeout=0.5))
            await bus.complete_session(sctx)
            # Acknowledged: the slot table no longer holds it.
            assert session_of(sctx).session_id not in (await worker_record(b, w.worker_id)).sessions


async def test_worker_death_fails_its_sessions_worker_lost_within_heartbeat_timeout(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    b = cadenza_bus
    proc = ServiceProcess("tests.session_worker", "--prefix", b.subjects.prefix, "--tasklist", "gpu",
                          "--interval", "0.3", url=nats_server.url)  # fmt: skip
    async with running_broker(b):
        try:
            await anyio.to_thread.run_sync(proc.start)
            sessions = [await bus.create_session(b.context(), session_opts(tasklist="gpu")) for _ in range(3)]
            wid = session_of(sessions[0]).worker_id
            assert all(session_of(s).worker_id == wid for s in sessions)
            assert await bus.execute_activity(sessions[0], "echo", 7) == 7
            waited: list[tuple[BaseException, float]] = []

            async def wait_on_sleep() -> None:
                try:
                    await bus.execute_activity(sessions[1], "sleep", 60, activity_id=sleeping)
                except bus.CadenzaError as exc:
                    waited.append((exc, time.monotonic()))

            sleeping = "sleep-" + uuid.uuid4().hex[:8]
            started = b.subjects.build("activity", sleeping, "started")
            async with recording(b, started) as seen, anyio.create_task_group() as tg:
                tg.start_soon(wait_on_sleep)
                await eventually(lambda: any("sessions 3" in line for line in proc.output), timeout=5)
                await eventually(lambda: bool(seen), timeout=5, what="the sleep activity runs on the worker")
                killed = time.monotonic()
                await anyio.to_thread.run_sync(proc.kill)
                with anyio.fail_after(HT + 1.0):
                    await eventually(lambda: all(session_of(s).state is SessionState.FAILED for s in sessions),
                                     timeout=HT + 1.0, what="every session failed")  # fmt: skip
                    detected = time.monotonic() - killed
            assert detected <= HT + 1.0
            assert all(session_of(s).cause == "worker_lost" for s in sessions)
            ((exc, at),) = waited
            assert isinstance(exc, bus.SessionFailedError) and exc.cause == "worker_lost"
            assert at - killed <= HT + 1.0
            async with recording(b, f"{b.subjects.prefix}.task.>") as published:
                with anyio.fail_after(0.5), pytest.raises(bus.SessionFailedError, match="session has failed"):
                    await bus.execute_activity(sessions[2], "echo", 1)
            assert published == []
        finally:
            await anyio.to_thread.run_sync(proc.kill)


async def test_execution_timeout_fails_the_session_with_cause_execution_timeout(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}) as (w,):
        sctx = await bus.create_session(b.context(), session_opts(execution_timeout=1.0))
        with anyio.fail_after(10), pytest.raises(bus.SessionFailedError) as err:
            await bus.execute_activity(sctx, "hold", "long")
        assert err.value.cause == "execution_timeout"
        # The worker's reply may come just before the broker's announcement.
        await eventually(state_is(sctx, SessionState.FAILED), timeout=2)
        assert session_of(sctx).cause == "execution_timeout"
        record = await session_record(b, session_of(sctx).session_id)
        assert record.state is SessionState.FAILED and record.cause == "execution_timeout"
        await eventually(lambda: w.open_sessions == 0, timeout=5)


async def test_graceful_worker_stop_fails_sessions_at_once_with_worker_shutdown(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}) as workers:
        (w,) = workers
        # The default heartbeat timeout (20 s): only the stop announcement can end it sooner.
        sessions = [await bus.create_session(b.context(), session_opts(heartbeat_timeout=20)) for _ in range(2)]
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await bus.execute_activity(sessions[0], "hold", "x")
            except bus.CadenzaError as exc:
                errors.append(exc)

        with anyio.fail_after(5):  # well under the 20 s heartbeat timeout
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await eventually(lambda: "x" in log.started, timeout=3)
                await workers.stop(w)
            await eventually(lambda: all(session_of(s).state is SessionState.FAILED for s in sessions), timeout=4)
        assert all(session_of(s).cause == "worker_shutdown" for s in sessions)
        (exc,) = errors
        assert isinstance(exc, bus.SessionFailedError) and exc.cause == "worker_shutdown"


async def test_graceful_worker_process_stop_sigterm_fails_sessions_with_worker_shutdown(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    b = cadenza_bus
    proc = ServiceProcess("tests.session_worker", "--prefix", b.subjects.prefix, "--interval", "0.3",
                          url=nats_server.url)  # fmt: skip
    async with running_broker(b):
        try:
            await anyio.to_thread.run_sync(proc.start)
            sctx = await bus.create_session(b.context(), session_opts(heartbeat_timeout=20))
            assert await bus.execute_activity(sctx, "echo", "up") == "up"
            with anyio.fail_after(8):  # well under the 20 s heartbeat timeout
                code = await anyio.to_thread.run_sync(proc.stop)
                await eventually(state_is(sctx, SessionState.FAILED), timeout=5)
            assert code == 0, "".join(proc.output[-20:])
            assert session_of(sctx).cause == "worker_shutdown"
        finally:
            await anyio.to_thread.run_sync(proc.kill)


@pytest.mark.parametrize("ending", ["completed", "failed"])
async def test_session_end_cancels_its_activities_not_lost(cadenza_bus: bus.Bus, ending: str) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_recorder(b), running_workers(b, log, {}):
        sctx = await bus.create_session(
            b.context(), session_opts(execution_timeout=60 if ending == "completed" else 1.0)
        )
        errors: list[BaseException] = []

        async def call(key: str) -> None:
            try:
                await bus.execute_activity(sctx, "hold", key, activity_id=f"act-{ending}-{key}")
            except bus.CadenzaError as exc:
                errors.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a")
                tg.start_soon(call, "b")
                await eventually(lambda: log.started == {"a", "b"}, timeout=5)
                if ending == "completed":
                    await bus.complete_session(sctx)
        kind = CancelKind.SESSION_COMPLETED if ending == "completed" else CancelKind.SESSION_FAILED
        await eventually(lambda: set(log.causes) == {"a", "b"}, timeout=5, what="the worker cancelled both")
        assert all(c is not None and c.kind is kind for c in log.causes.values())
        expected = bus.ActivityCancelledError if ending == "completed" else bus.SessionFailedError
        assert len(errors) == 2 and all(isinstance(e, expected) for e in errors)
        for key in ("a", "b"):
            record, _ = await wait_record(b, f"act-{ending}-{key}", terminal)
            # Ended by the session, not lost: cancelled, with the session's end as the cause.
            assert record.status is ActivityStatus.CANCELLED
            assert record.error is not None and "session" in record.error and "host lost" not in record.error


# ---------------------------------------------------------------- recreating


@pytest.mark.parametrize("ending", ["completed", "failed"])
async def test_recreate_opens_a_new_session_on_the_same_worker_token_from_completed_or_failed(
    cadenza_bus: bus.Bus, ending: str
) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}, {}, {}):
        first = await bus.create_session(
            b.context(), session_opts(execution_timeout=60 if ending == "completed" else 0.3)
        )
        wid = session_of(first).worker_id
        # Load that worker, so least-loaded placement alone would never choose it.
        for _ in range(2):
            loaded = await bus.recreate_session(b.context(), session_of(first).recreate_token, session_opts())
            assert session_of(loaded).worker_id == wid
        if ending == "completed":
            await bus.complete_session(first)
        else:
            await eventually(state_is(first, SessionState.FAILED), timeout=5)
        token = session_of(first).recreate_token
        again = await bus.recreate_session(b.context(), token, session_opts())
        assert session_of(again).worker_id == wid and session_of(again).state is SessionState.OPEN
        assert session_of(again).session_id != session_of(first).session_id
        assert await bus.execute_activity(again, "where") == wid


async def test_recreate_obeys_the_worker_capacity(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    specs: list[dict[str, Any]] = [{"max_concurrent_sessions": 1}, {"max_concurrent_sessions": 1}]
    async with running_broker(b), running_workers(b, log, *specs):
        first = await bus.create_session(b.context(), session_opts())
        with anyio.fail_after(10), pytest.raises(bus.SessionCreationError) as err:
            await bus.recreate_session(
                b.context(), session_of(first).recreate_token, session_opts(creation_timeout=0.8)
            )
        assert err.value.reason == "worker_unavailable" and "capacity" in str(err.value)


def _altered(token: bytes) -> bytes:
    payload, sig = token.split(b".", 1)
    flipped = payload[:-2] + (b"A" if payload[-2:-1] != b"A" else b"B") + payload[-1:]
    return flipped + b"." + sig


async def test_recreate_rejects_an_expired_token(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b, token_max_age=0.5), running_workers(b, log, {}):
        sctx = await bus.create_session(b.context(), session_opts())
        token = session_of(sctx).recreate_token
        await bus.complete_session(sctx)
        await anyio.sleep(0.6)  # the scenario: the token outlives its validity
        with pytest.raises(bus.SessionCreationError) as err:
            await bus.recreate_session(b.context(), token, session_opts())
        assert err.value.reason == "bad_token" and "expired" in str(err.value)


@pytest.mark.parametrize("kind", ["forged", "altered", "malformed", "empty", "signature-swapped"])
async def test_recreate_rejects_forged_altered_or_malformed_token(cadenza_bus: bus.Bus, kind: str) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}, {}) as (w1, w2):
        first = await bus.create_session(b.context(), session_opts())
        real = session_of(first).recreate_token
        target = w2 if session_of(first).worker_id == w1.worker_id else w1
        token = {
            "forged": TokenSigner(b"z" * 32)
            .sign(WorkerClaim(target.worker_id, "h", "default", "s", time.time()))
            .encode(),
            "altered": _altered(real),
            "malformed": b"not a token at all",
            "empty": b"",
            "signature-swapped": real.split(b".")[0] + b"." + b"A" * 43,
        }[kind]
        with anyio.fail_after(5), pytest.raises(bus.SessionCreationError) as err:
            await bus.recreate_session(b.context(), token, session_opts(creation_timeout=2))
        assert err.value.reason == "bad_token" and "token" in str(err.value)
        # Nothing was opened anywhere for it.
        assert target.open_sessions == 0 and (await worker_record(b, target.worker_id)).sessions == []


async def test_recreate_when_the_worker_is_gone_fails_after_creation_timeout(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}, {}) as workers:
        w1, w2 = workers
        first = await bus.create_session(b.context(), session_opts())
        gone = w1 if session_of(first).worker_id == w1.worker_id else w2
        await bus.complete_session(first)
        await workers.stop(gone)
        t0 = time.monotonic()
        with anyio.fail_after(10), pytest.raises(bus.SessionCreationError) as err:
            await bus.recreate_session(
                b.context(), session_of(first).recreate_token, session_opts(creation_timeout=1.0)
            )
        assert time.monotonic() - t0 >= 0.9
        assert err.value.reason == "worker_unavailable"
        assert gone.worker_id in str(err.value) and "not available" in str(err.value)


# ---------------------------------------------------------------- heartbeats and cost


async def test_heartbeats_per_worker_not_per_session(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {"max_concurrent_sessions": 50, "heartbeat_interval": 0.2}) \
            as (w,):  # fmt: skip
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(bus.create_session, b.context(), session_opts(creation_timeout=10))
        await eventually(lambda: w.open_sessions == 50, timeout=5)
        beats: list[WorkerHeartbeat] = []
        async with recording(b, f"{b.subjects.prefix}.>") as published:
            # Five of the worker's own intervals, by its heartbeat counter (no wall clock).
            def five_beats() -> bool:
                beats[:] = [bus.decode(m.data, m.headers, [WorkerHeartbeat]) for m in published
                            if m.subject == b.subjects.build("worker", w.worker_id, "heartbeat")]  # fmt: skip
                return len(beats) >= 6

            await eventually(five_beats, timeout=10)
        assert beats[-1].open_sessions == 50
        span = beats[5].seq - beats[0].seq
        assert span == 5  # one beat per interval, consecutive
        # Everything published in those intervals (all 50 sessions open and idle) is about one per interval.
        assert len(published) <= 15, [m.subject for m in published]


async def test_state_exact_for_creation_and_completion(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}) as (w,):
        sctx = await bus.create_session(b.context(), session_opts())
        record = await session_record(b, session_of(sctx).session_id)
        assert session_of(sctx).state is SessionState.OPEN and record.state is SessionState.OPEN
        assert record.worker_id == session_of(sctx).worker_id == w.worker_id
        await bus.complete_session(sctx)
        record = await session_record(b, session_of(sctx).session_id)
        assert session_of(sctx).state is SessionState.COMPLETED and record.state is SessionState.COMPLETED


# ---------------------------------------------------------------- user cancel


async def test_user_cancel_of_a_session_reaches_every_activity_in_it(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}) as (w,):
        sctx = await bus.create_session(b.context(), session_opts())
        errors: list[BaseException] = []

        async def call(key: str) -> None:
            try:
                await bus.execute_activity(sctx, "hold", key)
            except bus.CadenzaError as exc:
                errors.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for key in "abc":
                    tg.start_soon(call, key)
                await eventually(lambda: log.started == {"a", "b", "c"}, timeout=5)
                await bus.request_cancel(b, "session", session_of(sctx).session_id,
                                         CancelCause(kind=CancelKind.USER, who="alice", reason="enough"))  # fmt: skip
        assert len(errors) == 3
        for e in errors:
            assert isinstance(e, bus.ActivityCancelledError) and e.cause.kind is CancelKind.USER
            assert e.cause.who == "alice"
        assert {k: c.kind if c else None for k, c in log.causes.items()} == dict.fromkeys("abc", CancelKind.USER)
        assert w.open_sessions == 1


async def test_after_session_failed_error_the_next_activity_is_not_published(cadenza_bus: bus.Bus) -> None:
    b, log = cadenza_bus, Log()
    async with running_broker(b), running_workers(b, log, {}):
        sctx = await bus.create_session(b.context(), session_opts(execution_timeout=1.0))
        with anyio.fail_after(10), pytest.raises(bus.SessionFailedError):
            await bus.execute_activity(sctx, "hold", "long")
        # Whichever came first (the worker's reply or the broker's announcement), the caller knows now.
        assert session_of(sctx).state is SessionState.FAILED and session_of(sctx).cause == "execution_timeout"
        async with recording(b, f"{b.subjects.prefix}.task.>") as published:
            with anyio.fail_after(0.5), pytest.raises(bus.SessionFailedError, match="session has failed"):
                await bus.execute_activity(sctx, "where")
        assert published == [] and log.ran == []
