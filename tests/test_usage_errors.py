"""Misuse of the API raises ``bus.UsageError`` (a bug in the calling code, never retried), not a
``SessionError`` or an ``ActivityError``; and the recorder's lifecycle (``RecorderState``)."""

from __future__ import annotations

import anyio
import pytest

import bus
from bus.testing import eventually
from services.recorder import Recorder, RecorderState


def _is_usage(exc: BaseException) -> None:
    assert isinstance(exc, bus.UsageError) and exc.non_retryable
    assert not isinstance(exc, bus.SessionError | bus.ActivityError)


async def test_a_worker_starts_once(cadenza_bus: bus.Bus) -> None:
    w = bus.Worker(cadenza_bus, heartbeat_interval=0.5)
    async with w:
        with pytest.raises(bus.UsageError, match="started once") as err:
            await w.__aenter__()
        _is_usage(err.value)
    assert w.state is bus.WorkerState.STOPPED
    with pytest.raises(bus.UsageError):
        await w.__aenter__()


def test_the_activity_functions_outside_an_activity() -> None:
    with pytest.raises(bus.UsageError, match="only available inside an activity") as err:
        bus.activity_context()
    _is_usage(err.value)
    with pytest.raises(bus.UsageError, match="only available inside an activity"):
        bus.activity_writer()


async def test_a_context_without_a_bus() -> None:
    with anyio.fail_after(5), pytest.raises(bus.UsageError, match="carries no bus") as err:
        await bus.execute_activity(bus.background(), "anything")
    _is_usage(err.value)


async def test_an_activity_service_opens_once_and_is_used_open(cadenza_bus: bus.Bus) -> None:
    svc = bus.BusActivityService(cadenza_bus)
    with pytest.raises(bus.UsageError, match="not open"):
        await svc.start_activity(bus.StartRequest(id="u-1", type="t"))
    async with svc:
        with pytest.raises(bus.UsageError, match="opened once") as err:
            await svc.__aenter__()
        _is_usage(err.value)
        await svc.start_activity(bus.StartRequest(id="u-2", type="t"))
        with pytest.raises(bus.UsageError, match="not a terminal status"):
            await svc.complete_activity("u-2", bus.ActivityStatus.RUNNING)
        await svc.complete_activity("u-2", bus.ActivityStatus.SUCCESS)


async def test_a_recorder_goes_new_running_stopping_stopped_and_runs_once(cadenza_bus: bus.Bus) -> None:
    seen: list[RecorderState] = []

    class Watched(Recorder):
        async def _prune_loop(self) -> None:
            try:
                await super()._prune_loop()
            finally:
                # Cancelled with the recorder: its state while its tasks end is "stopping".
                with anyio.CancelScope(shield=True), anyio.fail_after(10):
                    await eventually(lambda: self.state is not RecorderState.RUNNING, what="the recorder stopping")
                seen.append(self.state)

    rec = Watched(cadenza_bus)
    assert rec.state is RecorderState.NEW
    async with anyio.create_task_group() as tg:
        await tg.start(rec.run)
        assert rec.state is RecorderState.RUNNING
        with pytest.raises(bus.UsageError, match="runs once"):
            await rec.run()
        tg.cancel_scope.cancel()
    assert seen == [RecorderState.STOPPING] and rec.state is RecorderState.STOPPED
    with pytest.raises(bus.UsageError, match="runs once"):
        await rec.run()


class _Probe:
    def __init__(self, fail: bool = False) -> None:
        self.started = 0
        self.fail = fail
        self.go = anyio.Event()

    async def start(self) -> None:
        self.started += 1
        await self.go.wait()
        if self.fail:
            raise RuntimeError("this helper fails to start")


class _OtherProbe(_Probe):
    pass


async def test_a_helper_starts_once_per_bus_and_is_typed(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    first, second = _Probe(), _Probe()
    got: list[_Probe] = []

    async def start(helper: _Probe) -> None:
        got.append(await b.start_helper("probe", helper))

    async with anyio.create_task_group() as tg:
        tg.start_soon(start, first)
        await eventually(lambda: first.started == 1, what="the first helper's start")
        tg.start_soon(start, second)  # waits for the first one's start
        first.go.set()
    assert got == [first, first] and first.started == 1 and second.started == 0
    assert b.get_helper("probe", _Probe) is first
    assert b.get_helper("probe", _OtherProbe) is None and b.get_helper("nothing", _Probe) is None
    with pytest.raises(bus.UsageError, match="helper 'probe' is a _Probe, not a str"):
        await b.start_helper("probe", "not a helper")  # type: ignore[type-var]


async def test_a_helper_whose_start_failed_is_started_again(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    broken, good = _Probe(fail=True), _Probe()
    good.go.set()
    outcome: list[object] = []

    async def start_broken() -> None:
        try:
            await b.start_helper("flaky", broken)
        except RuntimeError as exc:
            outcome.append(exc)

    async def start_good() -> None:
        outcome.append(await b.start_helper("flaky", good))

    async with anyio.create_task_group() as tg:
        tg.start_soon(start_broken)
        await eventually(lambda: broken.started == 1, what="the broken helper's start")
        tg.start_soon(start_good)
        await anyio.wait_all_tasks_blocked()
        broken.go.set()
    assert isinstance(outcome[0], RuntimeError) and outcome[1] is good and good.started == 1
    assert b.get_helper("flaky", _Probe) is good
