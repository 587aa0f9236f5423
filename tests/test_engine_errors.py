"""nats-py's errors become cadenza's at the transport's boundary (``bus.transport.engine_errors``)."""

from __future__ import annotations

import nats.errors
import pytest

import bus
from bus.transport import engine_errors


async def test_a_missing_key_is_not_found_and_a_lost_compare_and_set_a_conflict(cadenza_bus: bus.Bus) -> None:
    kv = await cadenza_bus.kv("sessions")
    with pytest.raises(bus.NotFoundError, match="reading the session: not found"):
        with engine_errors("reading the session"):
            await kv.get("no-such-session")
    revision = await kv.create("s-engine-errors", b"{}")
    await kv.update("s-engine-errors", b"{}", last=revision)
    with pytest.raises(bus.ConflictError, match="the revision moved on") as info:
        with engine_errors("writing the session"):
            await kv.update("s-engine-errors", b"{}", last=revision)
    assert not bus.is_transient(info.value)
    await kv.delete("s-engine-errors")
    with pytest.raises(bus.NotFoundError):
        with engine_errors("reading a deleted session"):
            await kv.get("s-engine-errors")


def test_any_other_engine_error_is_a_bus_error_that_keeps_its_transience() -> None:
    with pytest.raises(bus.BusError, match="asking: nats: timeout") as info:
        with engine_errors("asking"):
            raise nats.errors.TimeoutError
    assert type(info.value) is bus.BusError and bus.is_transient(info.value)
    with pytest.raises(bus.BusError) as other:
        with engine_errors("asking"):
            raise nats.errors.BadSubjectError
    assert not bus.is_transient(other.value)


def test_cadenza_errors_and_other_exceptions_pass_unchanged() -> None:
    with pytest.raises(bus.ValidationError):
        with engine_errors("decoding"):
            raise bus.ValidationError("bad")
    with pytest.raises(KeyError):
        with engine_errors("looking up"):
            raise KeyError("x")
