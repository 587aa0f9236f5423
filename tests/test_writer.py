"""SPEC-activities.md, "The writer": one test (or case) per line, against a real nats-server.

Durability is checked by reading the stream itself (``bus.read_activity_messages``), not the
recorder, so "flush_writer returned" really means "stored on the bus"."""

from __future__ import annotations

import io
import json

import anyio
import anyio.lowlevel
import pytest

import bus
from bus.testing import eventually
from schemas import ActivityLevel, ActivityStatus, MessageRecord
from tests._helpers import running_recorder, wait_record


async def _stored(b: bus.Bus, activity_id: str) -> list[MessageRecord]:
    return (await bus.read_activity_messages(b, activity_id)).messages


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError("client went away")


async def test_writes_go_to_the_underlying_stream_first_and_a_failing_one_never_stops_capture(
    cadenza_bus: bus.Bus,
) -> None:
    b = cadenza_bus
    copy = io.StringIO()
    async with bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id, underlying=copy)
        w.write("one\ntw")
        assert copy.getvalue() == "one\ntw"  # the partial line too: the copy is verbatim
        w.write("o\n")
        broken = bus.new_writer(bus.background(), svc, rec.id, underlying=_Broken())
        broken.write("three\n")
        broken.write("four\n")
        await bus.flush_writer(w)
        await bus.flush_writer(broken)
        assert sorted(m.message for m in await _stored(b, rec.id)) == ["four", "one", "three", "two"]


async def test_complete_non_empty_lines_each_become_one_message(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        w.write("a\n\n   \nb\r\nc\n")
        await bus.flush_writer(w)
        assert [(m.seq, m.message) for m in await _stored(b, rec.id)] == [(1, "a"), (2, "b"), (3, "c")]


async def test_trailing_partial_line_is_kept_until_newline_or_flush(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        w.write("first\nhal")
        w.flush()  # file-like flush: the partial line still waits
        await eventually(lambda: w.durable == 1)
        assert [m.message for m in await _stored(b, rec.id)] == ["first"]
        w.write("f done\nlast without newline")
        await bus.flush_writer(w)  # at the end: the partial line is taken
        assert [m.message for m in await _stored(b, rec.id)] == ["first", "half done", "last without newline"]


@pytest.mark.parametrize(
    ("line", "level", "text", "payload"),
    [
        ('{"error": "pull access denied"}', ActivityLevel.ERROR, "pull access denied", None),
        ('{"error": {"message": "no space"}}', ActivityLevel.ERROR, "no space", None),
        ('{"log": "step 1/3"}', ActivityLevel.INFO, "step 1/3", None),
        (
            '{"status": "Downloading", "id": "a1b2", "progress": "[==> ] 1MB/9MB"}',
            ActivityLevel.INFO,
            "a1b2: Downloading [==> ] 1MB/9MB",
            {"status": "Downloading", "id": "a1b2", "progress": "[==> ] 1MB/9MB"},
        ),
        ('{"n": 1}', ActivityLevel.INFO, '{"n":1}', {"n": 1}),
        ("plain text", ActivityLevel.INFO, "plain text", None),
        ("{not json}", ActivityLevel.INFO, "{not json}", None),
    ],
    ids=["error", "error-object", "log", "object-readable", "object-no-text", "plain", "braces-not-json"],
)
async def test_json_lines_error_log_payload_plain(
    cadenza_bus: bus.Bus, line: str, level: ActivityLevel, text: str, payload: object
) -> None:
    b = cadenza_bus
    async with bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        w.write(line + "\n")
        await bus.flush_writer(w)
        (m,) = await _stored(b, rec.id)
    assert (m.level, m.message, m.payload) == (level, text, payload)


async def test_flush_writer_returns_only_when_earlier_lines_are_durable(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        for round_ in range(5):
            for i in range(200):
                w.write(f"r{round_} l{i}\n")
            await bus.flush_writer(w)
            stored = await _stored(b, rec.id)  # read from the stream right away, no waiting
            assert len(stored) == 200 * (round_ + 1) and w.durable == w.written


async def test_lines_are_batched_under_load_and_never_dropped(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        for i in range(5000):
            w.write(f"line {i}\n")
        await bus.flush_writer(w)
        stored = await _stored(b, rec.id)
    assert [m.message for m in stored] == [f"line {i}" for i in range(5000)]
    assert w.batches < 50 and w.dropped == 0  # a few large events, not 5000 small ones


async def test_writer_refuses_rather_than_drops_when_its_buffer_is_full(cadenza_bus: bus.Bus) -> None:
    async with bus.BusActivityService(cadenza_bus) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = svc.open_writer(rec.id)
        w._max_buffer_bytes = 4000
        with pytest.raises(bus.ActivityError, match="refused rather than dropped"):
            for _ in range(1000):
                w.write("x" * 100 + "\n")
        accepted = w.written
        await bus.flush_writer(w)
        assert len(await _stored(cadenza_bus, rec.id)) == accepted > 0


async def test_lines_written_before_a_cancellation_are_still_recorded(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    written = anyio.Event()

    async def work(ctx: bus.Context) -> None:
        w = bus.new_writer(ctx, svc)
        for i in range(3000):
            w.write(f"out {i}\n")
        written.set()
        await anyio.sleep(60)  # cancelled here, its lines not yet flushed

    async with running_recorder(b), bus.BusActivityService(b) as svc, anyio.create_task_group() as tg:
        ids: list[str] = []

        async def run() -> None:
            activity_id, _ = await bus.run_handler_activity(bus.background(), svc, bus.HandlerOptions(type="t"), work)
            ids.append(activity_id)

        tg.start_soon(run)
        with anyio.fail_after(5):
            await written.wait()
        (running,) = svc.running()
        await bus.request_cancel(b, "activity", running, bus.CANCELLED_BY_USER)
        got, _ = await wait_record(b, running, lambda r: r.terminal)
        messages = (await bus.read_activity_messages(b, running)).messages
    assert got.status is ActivityStatus.CANCELLED
    texts = [m.message for m in messages]
    # every line, in order; the cancel warning may land between them (it is sent when the cancel arrives)
    assert [t for t in texts if t.startswith("out ")] == [f"out {i}" for i in range(3000)]
    assert "Cancellation requested by user" in texts
    assert texts[-1] == "Cancelled by user" and [m.seq for m in messages] == list(range(1, len(messages) + 1))


async def test_write_started_line_writes_one_json_line_and_nothing_for_blank_id() -> None:
    out = io.StringIO()
    bus.write_started_line(out, "abc-123")
    bus.write_started_line(out, "  ")
    bus.write_started_line(out, "")
    assert out.getvalue().count("\n") == 1
    assert json.loads(out.getvalue()) == {"type": "activity", "activityId": "abc-123"}


async def test_writer_with_any_message_appender_sends_lines_at_flush() -> None:
    got: list[tuple[str, str, ActivityLevel]] = []

    class Appender:
        async def append_message(self, activity_id: str, req: bus.AppendMessageRequest) -> None:
            got.append((activity_id, req.message, req.level))

    w = bus.new_writer(bus.background().derive(activity_id="a1"), Appender())
    w.write('x\n{"error": "bad"}\ntail')
    await bus.flush_writer(w)
    assert got == [
        ("a1", "x", ActivityLevel.INFO),
        ("a1", "bad", ActivityLevel.ERROR),
        ("a1", "tail", ActivityLevel.INFO),
    ]


async def test_100k_lines_through_one_writer_recorded_in_order_none_dropped(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    n = 100_000
    async with running_recorder(b), bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        for i in range(n):
            w.write(f"line {i}\n")
            if i % 1000 == 999:
                await anyio.lowlevel.checkpoint()  # a producer that yields now and then, like real output
        await bus.flush_writer(w, timeout=90)
        await svc.complete_activity(rec.id, ActivityStatus.SUCCESS, "done")
        got, tail = await wait_record(b, rec.id, lambda r: r.terminal and r.message_count == n + 1, timeout=60)
        messages = (await bus.read_activity_messages(b, rec.id)).messages
    assert got.last_seq == n + 1 and w.dropped == 0
    assert [m.seq for m in messages] == list(range(1, n + 2))
    assert all(m.message == f"line {i}" for i, m in enumerate(messages[:n]))
    assert len(tail) == 500 and tail[-1].message == "done"
