"""SPEC-activities.md, "Reading (the recorder)": one test (or case) per line, with an in-process
recorder on a real nats-server (the process and fault tests are in test_recorder_faults.py)."""

from __future__ import annotations

from datetime import timedelta

import anyio
import pydantic
import pytest

import bus
from bus.testing import eventually
from schemas import (
    ActivityCompleted,
    ActivityMessage,
    ActivityStart,
    ActivityStarted,
    ActivityStatus,
    GetActivityRequest,
    ListActivitiesReply,
    MessageEntry,
    WorkerHeartbeat,
    WorkerStopped,
    utcnow,
)
from services.recorder import RecorderConfig
from tests._helpers import running_recorder, terminal, wait_record


async def _seed(b: bus.Bus) -> dict[str, str]:
    """Activities in two environments with various types, statuses and texts."""
    now = utcnow()
    rows = [
        # id, env, type, resource type, resource name, minutes ago, status
        ("a-old-ok", "", "image_pull", "image", "nginx", 50, ActivityStatus.SUCCESS),
        ("a-run-1", "", "deploy", "project", "shop", 40, None),
        ("a-failed", "", "image_pull", "image", "redis", 30, ActivityStatus.FAILED),
        ("a-run-2", "", "image_pull", "image", "postgres", 20, None),
        ("a-new-ok", "", "deploy", "project", "blog", 10, ActivityStatus.SUCCESS),
        ("b-env", "prod", "deploy", "project", "shop", 5, None),
    ]
    for aid, env, typ, rtype, rname, ago, status in rows:
        t = now - timedelta(minutes=ago)
        await b.publish(
            ActivityStarted(
                activity_id=aid, time=t, environment_id=env, activity_type=typ, resource_type=rtype,
                resource_name=rname, message=f"working on {rname}", step="stage-" + rname,
            )
        )  # fmt: skip
        if status is not None:
            await b.publish(
                ActivityCompleted(
                    activity_id=aid, time=t + timedelta(seconds=5), status=status,
                    error="disk quota exceeded" if status is ActivityStatus.FAILED else None,
                )
            )  # fmt: skip
    for aid, _, _, _, _, _, status in rows:  # the fold is asynchronous: list once every event is in
        await wait_record(b, aid, (lambda r: r.terminal) if status is not None else (lambda r: True))
    return {r[0]: r[1] for r in rows}


async def _listed(client: bus.ActivityClient, expect: int, **filters: object) -> list[str]:
    replies: list[ListActivitiesReply] = []

    async def counted() -> bool:
        replies[:] = [await client.list(**filters)]
        return replies[0].total == expect

    await eventually(counted, interval=0.02, what=lambda: f"{expect} listed for {filters}: {replies}")
    return [a.id for a in replies[0].items]


async def test_list_filters_search_paging_active_first_then_newest(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with running_recorder(b):
        await _seed(b)
        c = bus.ActivityClient(b)
        assert await _listed(c, 5) == ["a-run-2", "a-run-1", "a-new-ok", "a-failed", "a-old-ok"]
        assert await _listed(c, 1, environment_id="prod") == ["b-env"]
        assert await _listed(c, 2, status=["running"]) == ["a-run-2", "a-run-1"]
        assert await _listed(c, 2, status=["success"]) == ["a-new-ok", "a-old-ok"]
        assert await _listed(c, 3, type="image_pull") == ["a-run-2", "a-failed", "a-old-ok"]
        assert await _listed(c, 2, resource_type="project") == ["a-run-1", "a-new-ok"]
        assert await _listed(c, 1, search="QUOTA") == ["a-failed"]  # error text, any case
        assert await _listed(c, 1, search="postgres") == ["a-run-2"]  # resource name
        assert await _listed(c, 1, search="stage-blog") == ["a-new-ok"]  # step
        assert await _listed(c, 1, search="working on nginx") == ["a-old-ok"]  # latest message
        page1 = await c.list(limit=2)
        page2 = await c.list(limit=2, offset=page1.next_offset or 0)
        page3 = await c.list(limit=2, offset=page2.next_offset or 0)
        assert [a.id for a in page1.items + page2.items + page3.items] == await _listed(c, 5)
        assert page3.next_offset is None and page1.total == 5


async def test_get_returns_the_last_n_messages_at_most_500_oldest_first(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with running_recorder(b), bus.BusActivityService(b) as svc:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        w = bus.new_writer(bus.background(), svc, rec.id)
        for i in range(700):
            w.write(f"m{i}\n")
        await bus.flush_writer(w)
        _, default = await wait_record(b, rec.id, lambda r: r.message_count == 700)
        assert [m.seq for m in default] == list(range(201, 701))  # default 500, oldest first
        few = (await bus.ActivityClient(b).get(rec.id, limit=3)).messages
        assert [m.message for m in few] == ["m697", "m698", "m699"]
        with pytest.raises(pydantic.ValidationError):
            GetActivityRequest(activity_id=rec.id, limit=501)
        with pytest.raises(bus.RemoteError) as err:
            await b.request(b.rpc_subject("recorder", "get"), _Raw(activity_id=rec.id, limit=501), bus.ActivityRecord)
        assert err.value.remote_code == "validation" and "limit" in err.value.message


class _Raw(pydantic.BaseModel):
    activity_id: str
    limit: int


async def test_tail_follows_messages_live_and_resumes_from_a_seq(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with running_recorder(b), bus.BusActivityService(b) as svc, anyio.create_task_group() as tg:
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        await wait_record(b, rec.id, lambda r: True)
        client = bus.ActivityClient(b)
        followed: list[int] = []

        async def follow() -> None:
            async for m in client.follow(rec.id, wait=1.0):
                followed.append(m.seq)  # noqa: PERF401 - appended live; the test watches it grow

        tg.start_soon(follow)
        for i in range(30):
            await svc.append_message(rec.id, bus.AppendMessageRequest(message=f"m{i}"))
            if i % 10 == 0:
                await anyio.sleep(0.05)
        await svc.complete_activity(rec.id, ActivityStatus.SUCCESS, "end")
        await eventually(lambda: len(followed) == 31)
        resumed = await client.tail(rec.id, after_seq=25)
        assert [m.seq for m in resumed.messages] == [26, 27, 28, 29, 30, 31] and resumed.done
        assert resumed.status is ActivityStatus.SUCCESS
    assert followed == list(range(1, 32))  # live, ending with the activity, each once


async def test_live_stream_of_all_activity_changes_for_a_dashboard(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    seen: list[tuple[str, ActivityStatus]] = []

    async def watch() -> None:
        async for record in bus.watch_activities(b):
            seen.append((record.id, record.status))  # noqa: PERF401 - live, watched while it grows

    async with running_recorder(b), bus.BusActivityService(b) as svc, anyio.create_task_group() as tg:
        tg.start_soon(watch)
        rec = await svc.start_activity(bus.StartRequest(type="t"))
        await eventually(lambda: (rec.id, ActivityStatus.RUNNING) in seen)
        await svc.complete_activity(rec.id, ActivityStatus.FAILED, "x", "x")
        await eventually(lambda: (rec.id, ActivityStatus.FAILED) in seen)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("days", "count", "pruned"),
    [
        (30, 1000, {"f-40d"}),
        (0, 1, {"f-40d", "f-20d"}),
        (10, 2, {"f-40d", "f-20d"}),
        (0, 0, set()),
    ],
    ids=["after-30-days", "beyond-count", "both", "both-disabled"],
)
async def test_history_pruned_by_age_and_count_running_never(
    cadenza_bus: bus.Bus, days: float, count: int, pruned: set[str]
) -> None:
    b = cadenza_bus
    now = utcnow()
    config = RecorderConfig(retention_days=days, retention_count=count, prune_interval=3600, sweep_interval=3600)
    async with running_recorder(b, config) as rec:
        for aid, ago in (("f-40d", 40), ("f-20d", 20), ("f-1d", 1), ("r-60d", 60)):
            t = now - timedelta(days=ago)
            await b.publish(ActivityStarted(activity_id=aid, time=t, activity_type="t"))
            await b.publish(ActivityMessage(activity_id=aid, seq=1, entries=[MessageEntry(message="hi")]))
            if not aid.startswith("r-"):
                await b.publish(ActivityCompleted(activity_id=aid, time=t, status=ActivityStatus.SUCCESS))
        await eventually(lambda: len(rec.cache) == 4 and sum(s.record.terminal for s in rec.cache.values()) == 3)
        assert await rec.prune() == len(pruned)
        client = bus.ActivityClient(b)
        for aid in ("f-40d", "f-20d", "f-1d", "r-60d"):
            if aid in pruned:
                with pytest.raises(bus.RemoteError, match="not found"):
                    await client.get(aid)
                assert (await bus.read_activity_messages(b, aid)).messages == []  # messages gone too
            else:
                assert len((await client.get(aid)).messages) == 1


async def test_pruning_quick_activities_does_not_fold_them(cadenza_bus: bus.Bus) -> None:
    """A quick activity known by its completion alone is pruned by what that completion says (its
    environment, when it ended), not folded into a record first only to be dropped (which cost the
    recorder 60 us per pruned activity, a full CPU for seconds after a busy minute)."""
    from bus.tracking import FirstEvent

    b = cadenza_bus
    now = utcnow()
    config = RecorderConfig(retention_days=0, retention_count=2, prune_interval=3600, sweep_interval=3600)
    ids = [f"quick-{i}" for i in range(6)]
    async with running_recorder(b, config) as rec:
        for i, aid in enumerate(ids):  # oldest first
            t = now - timedelta(minutes=10 - i)
            start = ActivityStart(started_at=t, activity_type="t")
            await b.publish(ActivityCompleted(activity_id=aid, time=t, status=ActivityStatus.SUCCESS, start=start))
        await eventually(lambda: len(rec.cache) == len(ids), what="the six completions folded")
        entries = dict(rec.cache)
        assert all(isinstance(e, FirstEvent) and not e.folded_yet for e in entries.values())
        assert sorted(rec.prune_candidates()) == ids[:4]
        assert await rec.prune() == 4
        assert all(not entries[aid].folded_yet for aid in ids[:4])  # dropped without ever being folded
        assert set(rec.cache) == set(ids[4:])
        client = bus.ActivityClient(b)
        with pytest.raises(bus.RemoteError, match="not found"):
            await client.get(ids[0])
        assert (await client.get(ids[5])).activity.status is ActivityStatus.SUCCESS


async def test_abandoned_activity_of_a_stopped_host_is_finalised_failed_host_lost(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with running_recorder(b):
        await b.publish(WorkerHeartbeat(worker_id="w-gone", interval=0.2))
        await b.publish(ActivityStarted(activity_id="x-stop", activity_type="t", worker_id="w-gone"))
        await wait_record(b, "x-stop", lambda r: True)
        await b.publish(WorkerStopped(worker_id="w-gone", reason="deploy"))
        got, msgs = await wait_record(b, "x-stop", terminal)
    assert got.status is ActivityStatus.FAILED and got.error and "host lost" in got.error and "stopped" in got.error
    assert msgs[-1].message == got.error


async def test_abandoned_activity_whose_host_stopped_heartbeating_is_finalised_failed(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with running_recorder(b):
        hb = bus.Heartbeater(b, worker_id="w-silent", interval=0.2)
        async with anyio.create_task_group() as tg:
            await tg.start(hb.run)
            await b.publish(ActivityStarted(activity_id="x-silent", activity_type="t", worker_id="w-silent"))
            await anyio.sleep(1.0)  # alive for 5 intervals: must not be finalised meanwhile
            alive, _ = await wait_record(b, "x-silent", lambda r: True)
            assert alive.status is ActivityStatus.RUNNING
            hb.mark_crashed()  # then dies without saying goodbye
            tg.cancel_scope.cancel()
        t0 = anyio.current_time()
        got, _ = await wait_record(b, "x-silent", terminal)
    assert got.status is ActivityStatus.FAILED and got.error and "no heartbeat" in got.error
    assert anyio.current_time() - t0 < 3 * 0.2 + 2.0  # 3 x interval, plus sweep and fold


@pytest.mark.parametrize("long_first", [False, True], ids=["one-purge", "a-long-activity-holds-the-floor"])
async def test_pruning_purges_below_the_oldest_kept_activity_in_one_request(
    cadenza_bus: bus.Bus, long_first: bool
) -> None:
    """Everything stored before the first event of every kept activity is purged by one request; an
    activity still running since before them holds that floor back, and the pruned ones are purged
    one subject each (as before). Kept activities lose nothing either way."""
    b = cadenza_bus
    stream = b.topology.stream_name("activity")
    purges: list[str] = []

    async def seen(msg: object) -> None:
        purges.append(getattr(msg, "subject", ""))

    sub = await b.nc.subscribe(f"$JS.API.STREAM.PURGE.{stream}", cb=seen)
    config = RecorderConfig(retention_days=0, retention_count=5, prune_interval=3600, sweep_interval=3600)
    now = utcnow()
    quick = [f"q-{i:02d}" for i in range(20)]
    async with running_recorder(b, config) as rec:
        if long_first:
            await b.publish(ActivityStarted(activity_id="r-long", time=now - timedelta(hours=1), activity_type="t"))
        for i, aid in enumerate(quick):  # oldest first
            t = now - timedelta(minutes=30 - i)
            await b.publish(ActivityStarted(activity_id=aid, time=t, activity_type="t"))
            await b.publish(ActivityMessage(activity_id=aid, seq=1, entries=[MessageEntry(message="hi")]))
            await b.publish(ActivityCompleted(activity_id=aid, time=t, status=ActivityStatus.SUCCESS))
        await b.publish(ActivityStarted(activity_id="r-new", activity_type="t"))
        await b.publish(ActivityMessage(activity_id="r-new", seq=1, entries=[MessageEntry(message="on")]))
        total = len(quick) + 1 + long_first
        await eventually(lambda: len(rec.cache) == total and sum(s.record.terminal for s in rec.cache.values()) == 20)
        assert await rec.prune() == 15
        await b.nc.flush()
        await eventually(lambda: len(purges) >= (15 if long_first else 1), what="the purge requests")
        await sub.unsubscribe()
        assert len(purges) == (15 if long_first else 1), purges
        client = bus.ActivityClient(b)
        for aid in quick[:15]:
            assert (await bus.read_activity_messages(b, aid)).messages == [], aid  # gone, messages too
            with pytest.raises(bus.RemoteError, match="not found"):
                await client.get(aid)
        for aid in [*quick[15:], "r-new", *(["r-long"] if long_first else [])]:
            got = await client.get(aid)
            assert got.activity.id == aid
            if aid != "r-long":
                assert len(got.messages) == 1, aid
        assert await rec.prune() == 0  # nothing more beyond the limits
