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
