"""``bus.transport.Bucket``: typed records in a key-value bucket, a watched cache, compare-and-set with retry.

Against the real server (a fresh prefix per test: its own buckets).
"""

from __future__ import annotations

import anyio
import pydantic
import pytest

import bus
from bus.testing import eventually
from bus.transport import Bucket, RawBucket, last_event
from schemas import WorkerHeartbeat, WorkerStarted


class Counter(pydantic.BaseModel):
    n: int = 0
    who: str = ""


def _inc(cur: Counter | None) -> Counter:
    return Counter(n=cur.n + 1 if cur is not None else 1)


async def test_typed_get_create_update_and_delete(cadenza_bus: bus.Bus) -> None:
    counters = Bucket(cadenza_bus, "sessions", Counter)
    assert await counters.get("c1") == (None, 0)
    revision = await counters.create("c1", Counter(n=1))
    assert await counters.get("c1") == (Counter(n=1), revision)
    assert counters.cached("c1") == Counter(n=1)
    with pytest.raises(bus.ConflictError):
        await counters.create("c1", Counter(n=5))
    assert await counters.update("c1", _inc) == Counter(n=2)
    stored, after = await counters.get("c1")
    assert stored == Counter(n=2) and after > revision
    # "No change" writes nothing and returns what is stored.
    assert await counters.update("c1", lambda cur: None) == Counter(n=2)
    assert (await counters.get("c1"))[1] == after
    await counters.delete("c1", revision=after)
    assert counters.cached("c1") is None and await counters.get("c1") == (None, 0)


async def test_a_lost_compare_and_set_is_read_again_and_retried(cadenza_bus: bus.Bus) -> None:
    mine, theirs = Bucket(cadenza_bus, "sessions", Counter), Bucket(cadenza_bus, "sessions", Counter)
    await mine.create("c2", Counter(n=1))  # mine caches revision 1
    await theirs.update("c2", _inc)  # another replica moves it on behind mine's back
    seen: list[int | None] = []

    def inc(cur: Counter | None) -> Counter:
        seen.append(cur.n if cur is not None else None)
        return _inc(cur)

    assert await mine.update("c2", inc) == Counter(n=3)
    assert seen == [1, 2]  # tried on the stale cached record, then on the one stored
    assert (await theirs.get("c2"))[0] == Counter(n=3)


async def test_concurrent_updates_all_land(cadenza_bus: bus.Bus) -> None:
    replicas = [Bucket(cadenza_bus, "sessions", Counter) for _ in range(4)]
    await replicas[0].create("c3", Counter())
    async with anyio.create_task_group() as tg:
        for replica in replicas:
            for _ in range(5):
                tg.start_soon(replica.update, "c3", _inc)
    assert (await replicas[0].get("c3"))[0] == Counter(n=20)


async def test_an_update_that_keeps_conflicting_gives_up_with_a_conflict_error(cadenza_bus: bus.Bus) -> None:
    mine, theirs = Bucket(cadenza_bus, "sessions", Counter), Bucket(cadenza_bus, "sessions", Counter)
    await mine.create("c4", Counter())
    calls = 0

    def racing(cur: Counter | None) -> Counter:
        nonlocal calls
        calls += 1
        return _inc(cur)

    async def meddle() -> None:  # each attempt of mine is preceded by a write of theirs
        await theirs.update("c4", _inc)

    original = mine.write

    async def write(key: str, data: bytes, revision: int = 0) -> int:
        await meddle()
        return await original(key, data, revision)

    mine.write = write  # type: ignore[method-assign]
    with pytest.raises(bus.ConflictError, match="after 3 conflicting writes"):
        await mine.update("c4", racing, attempts=3)
    assert calls == 3


async def test_a_missing_key_and_a_deleted_one(cadenza_bus: bus.Bus) -> None:
    raw = RawBucket(cadenza_bus, "sessions")
    counters = Bucket(cadenza_bus, "sessions", Counter)
    assert await raw.read("nobody") is None
    assert await counters.update("nobody", lambda cur: None) is None  # no key, no change: nothing written
    assert await raw.read("nobody") is None
    with pytest.raises(bus.ConflictError):
        await raw.write("nobody", b"{}", revision=7)  # an update of a key that never was
    assert await counters.update("c5", _inc) == Counter(n=1)  # created when there is none
    await counters.delete("c5")
    marker = await raw.read("c5")
    assert marker is not None and marker.value is None and marker.operation == "DEL"
    assert await counters.get("c5") == (None, 0)
    assert await counters.update("c5", _inc) == Counter(n=1)  # created again on top of the marker
    await counters.purge("c5")
    purged = await raw.read("c5")
    assert purged is not None and purged.value is None and purged.operation == "PURGE"
    assert "c5" not in await raw.keys()


async def test_a_stored_value_that_is_no_record(cadenza_bus: bus.Bus) -> None:
    raw = RawBucket(cadenza_bus, "sessions")
    await raw.write("bad", b'{"n": "many"}')
    counters = Bucket(cadenza_bus, "sessions", Counter, consumer="test-bucket")
    with pytest.raises(bus.ValidationError, match=r"not a Counter: .* at n"):
        await counters.get("bad")
    with pytest.raises(bus.ValidationError):
        await counters.update("bad", _inc)  # never overwritten blindly
    await counters.create("good", Counter(n=1))
    before = cadenza_bus.stats.dead_letters
    async with anyio.create_task_group() as tg:
        await tg.start(counters.watch)
        assert "bad" not in counters.cache and counters.cached("good") == Counter(n=1)
        assert cadenza_bus.stats.dead_letters == before + 1  # dead-lettered under the consumer's name
        tg.cancel_scope.cancel()


async def test_watch_fills_the_cache_then_follows_every_change(cadenza_bus: bus.Bus) -> None:
    writer = Bucket(cadenza_bus, "sessions", Counter)
    await writer.create("w1", Counter(n=1))
    await RawBucket(cadenza_bus, "sessions").write("_bookkeeping", b"not a record")
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    follower = Bucket(cadenza_bus, "sessions", Counter, on_change=changed)
    async with anyio.create_task_group() as tg:
        await tg.start(follower.watch)
        assert set(follower.cache) == {"w1"}  # ready with what was stored; ``_`` keys skipped
        assert follower.cache["w1"].value == Counter(n=1) and changes == 1
        await writer.update("w1", _inc)
        await writer.create("w2", Counter(n=9, who="x"))
        await eventually(lambda: follower.cached("w1") == Counter(n=2) and "w2" in follower.cache,
                         timeout=10, what="the watch sees the writes")  # fmt: skip
        await writer.delete("w2")
        await eventually(lambda: "w2" not in follower.cache, timeout=10, what="the watch sees the delete")
        assert follower.cache["w1"].revision == (await writer.get("w1"))[1]
        tg.cancel_scope.cancel()
    assert changes >= 4


async def test_the_last_event_of_a_subject(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    subject = b.subjects.build("worker", "w-bucket-1", "heartbeat")
    assert await last_event(b, "worker", subject, [WorkerHeartbeat]) is None
    for seq in (1, 2):
        await b.publish(WorkerHeartbeat(worker_id="w-bucket-1", seq=seq))
    got = await last_event(b, "worker", subject, [WorkerHeartbeat])
    assert got is not None and isinstance(got.event, WorkerHeartbeat) and got.event.seq == 2
    assert got.stored_at is not None and got.seq > 0
    other = await last_event(b, "worker", subject, [WorkerStarted])  # stored, but not an accepted event
    assert other is not None and other.event is None and other.stored_at == got.stored_at
