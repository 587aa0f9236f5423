"""The broker's lifecycle (``broker.state``), against a real server; what it does is in tests/test_sessions.py."""

from __future__ import annotations

import anyio
import pytest

import bus
from services.broker import Broker, BrokerConfig, BrokerState

KEY = b"k" * 32


async def test_a_broker_is_new_then_running_then_stopped_and_runs_once(cadenza_bus: bus.Bus) -> None:
    broker = Broker(cadenza_bus, BrokerConfig(token_key=KEY))
    assert broker.state is BrokerState.NEW
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        assert broker.state is BrokerState.RUNNING
        tg.cancel_scope.cancel()
    assert broker.state is BrokerState.STOPPED
    with anyio.fail_after(10), pytest.raises(bus.UsageError, match="a Broker runs once"):
        await broker.run()
    assert broker.state is BrokerState.STOPPED


async def test_a_broker_running_already_cannot_run_again(cadenza_bus: bus.Bus) -> None:
    broker = Broker(cadenza_bus, BrokerConfig(token_key=KEY))
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        with pytest.raises(bus.UsageError, match="this one is running"):
            await broker.run()
        assert broker.state is BrokerState.RUNNING  # the refusal changed nothing
        tg.cancel_scope.cancel()
