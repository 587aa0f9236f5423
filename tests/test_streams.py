"""Reading the streams through the transport's typed functions (bus/transport/_streams.py and
_subscriptions.py), against a real server: cadenza types out, cadenza errors out, nothing of nats-py.
(``last_event`` has its tests with the buckets, tests/test_bucket.py.)"""

from __future__ import annotations

import contextlib

import anyio
import pytest

import bus
from bus.transport import (
    Received,
    account_usage,
    core_messages,
    delete_consumer,
    flush,
    last_event,
    new_inbox,
    open_reader,
    purge_subject,
    stream_status,
    subscribe_callback,
)
from schemas import ActivityMessage, MessageEntry


def _message(aid: str, seq: int) -> ActivityMessage:
    return ActivityMessage(activity_id=aid, seq=seq, entries=[MessageEntry(message=f"line {seq}")])


async def test_a_stream_status_and_the_account_usage(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    await b.publish(_message("a-status", 1))
    status = await stream_status(b, b.topology.stream_name("activity"))
    assert status.messages == 1 and status.last_seq >= status.first_seq >= 1 and status.replicas == 1
    assert status.followers == () and status.consumers >= 0
    with pytest.raises(bus.NotFoundError):
        await stream_status(b, "NO_SUCH_STREAM_ANYWHERE")
    usage = await account_usage(b)
    assert usage.streams >= 1 and usage.storage >= 0


async def test_a_reader_counts_fetches_and_gives_an_empty_batch_when_nothing_is_new(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    for seq in (1, 2, 3):
        await b.publish(_message("a-reader", seq))
    stream = b.topology.stream_name("activity")
    reader = await open_reader(b, stream, b.subjects.filter("activity", "a-reader"))
    try:
        assert await reader.pending() == 3
        got = await reader.fetch(10, timeout=5.0)
        assert [m.seq for m in got] == sorted(m.seq for m in got) and len(got) == 3
        assert got[-1].pending == 0 and all(m.time is not None for m in got)
        assert await reader.fetch(10, timeout=0.2) == []
    finally:
        await reader.close()
    assert (await stream_status(b, stream)).consumers == 0  # closed and forgotten
    later = await open_reader(b, stream, b.subjects.filter("activity", "a-reader"), start_seq=got[-1].seq)
    try:
        assert [m.seq for m in await later.fetch(10, timeout=5.0)] == [got[-1].seq]
    finally:
        await later.close()
    with pytest.raises(bus.NotFoundError):
        await open_reader(b, "NO_SUCH_STREAM_ANYWHERE", "x.>")


async def test_purging_a_subject_and_deleting_a_consumer(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    await b.publish(_message("a-purge", 1))
    await b.publish(_message("a-kept", 1))
    await purge_subject(b, "activity", b.subjects.filter("activity", "a-purge"))
    purged, kept = (b.subjects.build("activity", aid, "message") for aid in ("a-purge", "a-kept"))
    assert await last_event(b, "activity", purged, [ActivityMessage]) is None
    assert await last_event(b, "activity", kept, [ActivityMessage]) is not None
    with pytest.raises(bus.NotFoundError):
        await delete_consumer(b, "task", "no-such-consumer")


async def test_core_subscriptions_deliver_received_messages(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    inbox = new_inbox(b)
    got: list[Received] = []
    arrived = anyio.Event()

    async def on_msg(msg: Received) -> None:
        got.append(msg)
        arrived.set()

    await subscribe_callback(b, f"{inbox}.*", on_msg)
    await flush(b)
    await b.publish_core(_message("a-core", 1), subject=f"{inbox}.one")
    with anyio.fail_after(10):
        await arrived.wait()
    assert got[0].subject == f"{inbox}.one" and got[0].seq == 0 and b"line 1" in got[0].data

    subject = b.subjects.build("activity", "a-core", "message")
    async with contextlib.AsyncExitStack() as stack:
        messages = await stack.enter_async_context(contextlib.aclosing(core_messages(b, subject)))
        async with anyio.create_task_group() as tg:

            async def publish_until_heard() -> None:
                while True:  # a core message is lost if sent before the subscription: send until one is read
                    await b.publish_core(_message("a-core", 2))
                    await anyio.sleep(0.05)

            tg.start_soon(publish_until_heard)
            with anyio.fail_after(10):
                first = await messages.__anext__()
            tg.cancel_scope.cancel()
    assert first.subject == subject and first.time is None
