"""The engine's passing failures (issue 9): what is transient, the server killed under a running
broker, a task that overtakes its session's notice, a completion the server could not store.

The 3-node cluster version of these faults is tests/test_cluster_chaos.py.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import anyio
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import StreamConfig

import bus
from bus.testing import eventually, unique_prefix
from schemas import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    DeadLetter,
    SessionOpened,
    SessionRecord,
    SessionState,
    utcnow,
)
from tests._helpers import (
    broker,
    dead_letter_count,
    dead_letters,
    process_opts,
    records_of,
    running_broker,
    running_recorder,
    session_of,
    started,
    wait_record,
    worker,
)

# ---------------------------------------------------------------- what is transient


@pytest.mark.parametrize(
    "exc",
    [
        nats.js.errors.NoStreamResponseError(),
        nats.errors.TimeoutError(),
        TimeoutError(),
        nats.errors.ConnectionReconnectingError(),
        nats.errors.NoRespondersError(),
        nats.js.errors.APIError(code=503, err_code=10008, description="JetStream system temporarily unavailable"),
        nats.js.errors.APIError(code=500, err_code=10009, description="JetStream cluster can not handle request"),
    ],
)
def test_engine_errors_of_an_election_or_a_restart_are_transient(exc: BaseException) -> None:
    assert bus.is_transient(exc)
    wrapped = bus.BusError("wrapped")
    wrapped.__cause__ = exc
    assert bus.is_transient(wrapped), "a bus error raised from a transient one is transient"


@pytest.mark.parametrize(
    "exc",
    [
        nats.js.errors.KeyWrongLastSequenceError(),
        nats.js.errors.KeyNotFoundError(),
        nats.js.errors.APIError(code=500, err_code=10047, description="insufficient storage resources available"),
        nats.js.errors.APIError(code=400, err_code=10058, description="stream name already in use"),
        ValueError("a bug"),
    ],
)
def test_conflicts_refusals_and_bugs_are_not_transient(exc: BaseException) -> None:
    assert not bus.is_transient(exc)


async def test_retry_transient_retries_with_backoff_then_gives_up_within_its_budget() -> None:
    calls: list[float] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise nats.js.errors.NoStreamResponseError()
        return "stored"

    assert await bus.retry_transient(flaky, what="flaky", budget=30.0) == "stored"
    assert len(calls) == 4

    async def never() -> None:
        raise nats.errors.TimeoutError()

    with pytest.raises(bus.BusError, match=r"did not recover within 0\.3s"):
        await bus.retry_transient(never, what="never", budget=0.3)

    async def wrong() -> None:
        raise nats.js.errors.KeyWrongLastSequenceError()

    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await bus.retry_transient(wrong, what="wrong")


# ---------------------------------------------------------------- the server killed under the broker


async def test_broker_and_worker_outlive_a_server_kill_and_still_end_sessions_on_time(
    own_server: bus.EmbeddedServer,
) -> None:
    prefix, url = unique_prefix(), own_server.url
    with ExitStack() as stack:
        procs = [started(stack, broker(prefix, url)), started(stack, worker(prefix, url))]
        timeouts = bus.Timeouts(publish=2.0, publish_retries=15, request=10.0)
        async with bus.connect(url, prefix=prefix, timeouts=timeouts) as b:
            short = await bus.create_session(b.context(), process_opts(execution_timeout=8.0))
            long = await bus.create_session(b.context(), process_opts())
            sid = session_of(short).session_id
            own_server.kill()
            await anyio.to_thread.run_sync(time.sleep, 1.0)  # the scenario: the server stays down a moment
            own_server.restart()

            async def ended() -> bool:
                rec = (await records_of(b, [sid]))[sid]
                return rec is not None and rec.state is SessionState.FAILED

            await eventually(ended, timeout=60, interval=0.1, what="the short session failed")
            rec = (await records_of(b, [sid]))[sid]
            assert rec is not None and rec.cause == "execution_timeout", rec
            assert all(p.proc is not None and p.proc.poll() is None for p in procs), "a service exited"
            # The broker still places and the worker still runs: the open session and a new one work.
            assert await bus.execute_activity(long, "echo", "after", start_to_close_timeout=30) == "after"
            async with bus.session(b.context(), process_opts(creation_timeout=30)) as again:
                assert await bus.execute_activity(again, "echo", 2, start_to_close_timeout=30) == 2
            await bus.complete_session(long)


# ---------------------------------------------------------------- a follower whose consumer is lost


async def test_a_follower_whose_consumer_vanished_hears_the_workers_again_within_seconds(cadenza_bus: bus.Bus) -> None:
    """An ordered consumer has one replica: its node's death takes it (on a cluster, a node kill). The
    server tells its subscriber nothing, so only the missing idle heartbeats show it; the broker's
    heartbeat follower was deaf for 10-20 s that way (nats-py's default heartbeat) and placed no session."""
    from bus.transport import follow_worker_events

    b = cadenza_bus
    heard: list[float] = []
    w = bus.Worker(b, tasklist="deaf", heartbeat_interval=0.2, enable_sessions=False)
    async with w, anyio.create_task_group() as tg:
        await tg.start(bus.run_restarting, "follower", lambda task_status: follow_worker_events(
            b, lambda event, at: heard.append(time.monotonic()), task_status=task_status))  # fmt: skip
        await eventually(lambda: len(heard) > 3, timeout=30, what="heartbeats heard")
        stream = b.topology.stream_name("worker")
        (ordered,) = [ci for ci in await b.js.consumers_info(stream) if not ci.config.durable_name]
        await b.js.delete_consumer(stream, ordered.name)  # as its node's death would
        lost = time.monotonic()
        await eventually(lambda: heard[-1] > lost + 0.5, timeout=30, what="heartbeats heard again")
        # Two missed idle heartbeats (1 s apart) and the consumer made again; 10-20 s with 5 s ones.
        assert heard[-1] - lost < 7.0, f"deaf for {heard[-1] - lost:.1f}s"
        tg.cancel_scope.cancel()


async def test_a_bucket_watch_whose_consumer_vanished_hears_the_changes_again_within_seconds(
    cadenza_bus: bus.Bus,
) -> None:
    """The same for a bucket's watch (a broker's cache of the workers' slots went stale for as long)."""
    from bus.transport import RawBucket

    b = cadenza_bus
    bucket = RawBucket(b, "workers")
    heard: dict[str, float] = {}

    async def on_change(stored: Any) -> None:
        heard[stored.key] = time.monotonic()

    async def writer() -> None:
        for n in range(10_000):
            await bucket.write(f"k{n}", b"x")
            await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        await tg.start(
            bus.run_restarting, "watch", lambda task_status: bucket.follow(on_change, task_status=task_status)
        )
        tg.start_soon(writer)
        await eventually(lambda: len(heard) > 3, timeout=30, what="changes heard")
        stream = f"KV_{bucket.name}"
        (ordered,) = [ci for ci in await b.js.consumers_info(stream) if not ci.config.durable_name]
        await b.js.delete_consumer(stream, ordered.name)
        lost = time.monotonic()
        await eventually(lambda: max(heard.values()) > lost + 0.5, timeout=30, what="changes heard again")
        assert max(heard.values()) - lost < 7.0, f"deaf for {max(heard.values()) - lost:.1f}s"
        missed = [f"k{n}" for n in range(len(heard)) if f"k{n}" not in heard]
        assert not missed, f"changes never delivered: {missed}"  # made again from where it stopped
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- a task before the session's notice


async def _run_task(b: bus.Bus, wid: str, sid: str) -> ActivityResult:
    """Send one ``echo`` task of session ``sid`` straight to worker ``wid``'s inbox; its answer."""
    got: list[ActivityResult] = []
    inbox = b.nc.new_inbox()

    async def on_reply(msg: Any) -> None:
        got.append(bus.decode(msg.data, msg.headers, [ActivityResult]))

    sub = await b.nc.subscribe(inbox, cb=on_reply)
    try:
        task = ActivityTask(activity_id=f"a{unique_prefix()}", name="echo", args=["hi"], worker_id=wid,
                            session_id=sid, reply_to=inbox)  # fmt: skip
        await b.publish(task)
        await eventually(lambda: bool(got), timeout=30, what="the worker's answer")
    finally:
        await sub.unsubscribe()
    return got[0]


async def test_a_task_that_overtakes_the_session_notice_runs_in_the_session_its_record_opened(
    cadenza_bus: bus.Bus,
) -> None:
    b = cadenza_bus
    w = bus.Worker(b, tasklist="overtake", heartbeat_interval=0.3)

    @w.activity("echo")
    async def echo(x: object) -> object:
        return x

    async with w:
        kv = await b.kv("sessions")
        # The broker wrote the record (open on this worker); its notice to the worker is late.
        now = utcnow()
        record = SessionRecord(session_id="s-overtaken", tasklist="overtake", state=SessionState.OPEN,
                               worker_id=w.worker_id, opened_at=now, requested_at=now)  # fmt: skip
        await kv.create("s-overtaken", record.model_dump_json().encode())
        reply = await _run_task(b, w.worker_id, "s-overtaken")
        assert reply.ok and reply.result == "hi", reply
        assert w.open_sessions == 1
        # A session this worker was never given is refused, as before.
        refused = await _run_task(b, w.worker_id, "s-unknown")
        assert not refused.ok and refused.error is not None
        assert "not open on worker" in refused.error.message
        assert w.open_sessions == 1


# ---------------------------------------------------------------- a completion not stored at once


async def test_a_completion_the_server_could_not_store_is_retried_until_the_recorder_has_it(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    prefix = cadenza_bus.topology.prefix
    stream = cadenza_bus.topology.stream_name("activity")
    # A bus that gives up on a publish quickly, so the outbox (not the publish retries) stores it.
    quick = bus.Timeouts(publish=0.3, publish_retries=1)
    async with bus.connect(nats_server.url, prefix=prefix, timeouts=quick) as b, running_recorder(cadenza_bus):
        async with bus.BusActivityService(b) as svc:
            rec = await svc.start_activity(bus.StartRequest(type="outbox"))
            await wait_record(cadenza_bus, rec.id, lambda r: r.status is ActivityStatus.RUNNING, timeout=30)
            info = await b.js.stream_info(stream)
            config: StreamConfig = info.config
            # The stream stops taking the activity subjects: publishes find no stream (as while a
            # cluster elects a leader, but for as long as the test wants).
            elsewhere = StreamConfig.from_response({**config.as_dict(), "subjects": [f"{prefix}.nothing"]})
            await b.js.update_stream(elsewhere)
            try:
                with pytest.raises(bus.PublishError):
                    await svc.complete_activity(rec.id, ActivityStatus.SUCCESS, "done", result={"n": 1})
                assert rec.id in svc.running(), "not stored yet: still open here"
            finally:
                await b.js.update_stream(config)
            got, _ = await wait_record(cadenza_bus, rec.id, lambda r: r.terminal, timeout=60)
            assert got.status is ActivityStatus.SUCCESS and got.result == {"n": 1}
            await eventually(lambda: rec.id not in svc.running(), timeout=30, what="the outbox finished it")


async def test_a_task_the_server_did_not_store_raises_publish_error_then_calls_work_again(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    # The caller does not wait for its task's acknowledgement unless the answer says it failed:
    # then it publishes again with the publish retries, and raises PublishError as before.
    prefix = cadenza_bus.topology.prefix
    stream = cadenza_bus.topology.stream_name("task")
    quick = bus.Timeouts(publish=0.3, publish_retries=1)
    async with bus.connect(nats_server.url, prefix=prefix, timeouts=quick) as b:
        w = bus.Worker(cadenza_bus, tasklist="unstored", enable_sessions=False, track_activities=False)

        @w.activity()
        async def echo(x: int) -> int:
            return x

        async with w:
            info = await b.js.stream_info(stream)
            config: StreamConfig = info.config
            elsewhere = StreamConfig.from_response({**config.as_dict(), "subjects": [f"{prefix}.nothing"]})
            await b.js.update_stream(elsewhere)
            try:
                with anyio.fail_after(30), pytest.raises(bus.PublishError):
                    await bus.execute_activity(b.context(), "echo", 1, tasklist="unstored", start_to_close_timeout=20)
            finally:
                await b.js.update_stream(config)
            with anyio.fail_after(30):
                assert await bus.execute_activity(b.context(), "echo", 2, tasklist="unstored") == 2


async def test_a_task_the_server_dropped_is_published_again_and_its_activity_runs_once(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    # The caller sends its task without asking for a PubAck (its worker's answer says it was
    # stored). A task no stream took (here: the stream was moved off the task subjects) is
    # published again, awaited, after task_store_check without an answer; retried until stored.
    prefix = cadenza_bus.topology.prefix
    stream = cadenza_bus.topology.stream_name("task")
    quick = bus.Timeouts(task_store_check=0.3, publish=1.0, publish_retries=30)
    runs = 0
    async with bus.connect(nats_server.url, prefix=prefix, timeouts=quick) as b:
        w = bus.Worker(cadenza_bus, tasklist="dropped", enable_sessions=False, track_activities=False)

        @w.activity()
        async def echo(x: int) -> int:
            nonlocal runs
            runs += 1
            return x

        async with w:
            info = await b.js.stream_info(stream)
            config: StreamConfig = info.config
            sent = anyio.Event()

            async def on_task(_msg: Any) -> None:
                sent.set()

            watch = await cadenza_bus.nc.subscribe(f"{prefix}.task.dropped.>", cb=on_task)
            await cadenza_bus.nc.flush()
            elsewhere = StreamConfig.from_response({**config.as_dict(), "subjects": [f"{prefix}.nothing"]})
            await b.js.update_stream(elsewhere)
            moved = True
            try:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        got: list[int] = []

                        async def call() -> None:
                            got.append(await bus.execute_activity(b.context(), "echo", 7, tasklist="dropped",
                                                                  start_to_close_timeout=50))  # fmt: skip

                        tg.start_soon(call)
                        await sent.wait()  # the first publish went out, to no stream
                        await b.js.update_stream(config)
                        moved = False
            finally:
                await watch.unsubscribe()
                if moved:
                    await b.js.update_stream(config)
            assert got == [7] and runs == 1


async def test_an_activity_longer_than_the_store_check_is_published_again_and_runs_once(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    # Still running at task_store_check: the task is published again, awaited; the server knows
    # its Nats-Msg-Id (a duplicate, stored once), so the worker gets it once.
    prefix = cadenza_bus.topology.prefix
    quick = bus.Timeouts(task_store_check=0.2)
    runs = 0
    release = anyio.Event()
    publishes = 0
    again = anyio.Event()
    async with bus.connect(nats_server.url, prefix=prefix, timeouts=quick) as b:
        w = bus.Worker(cadenza_bus, tasklist="longer", enable_sessions=False)

        @w.activity()
        async def slow(x: int) -> int:
            nonlocal runs
            runs += 1
            await release.wait()
            return x

        async def on_task(_msg: Any) -> None:
            nonlocal publishes
            publishes += 1
            if publishes == 2:
                again.set()

        async with w:
            watch = await cadenza_bus.nc.subscribe(f"{prefix}.task.longer.>", cb=on_task)
            await cadenza_bus.nc.flush()
            try:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        got: list[int] = []

                        async def call() -> None:
                            got.append(await bus.execute_activity(b.context(), "slow", 3, tasklist="longer",
                                                                  start_to_close_timeout=50))  # fmt: skip

                        tg.start_soon(call)
                        await again.wait()  # published again, while the activity runs
                        release.set()
            finally:
                await watch.unsubscribe()
            assert got == [3] and runs == 1 and publishes == 2
            stream = cadenza_bus.topology.stream_name("task")

            async def none_left() -> bool:
                # A work queue: the acked task is gone; a second copy would still be there.
                info = await b.js.stream_info(stream, subjects_filter=f"{prefix}.task.longer.>")
                return not info.state.subjects

            await eventually(none_left, timeout=30, what="no task of the tasklist left in the stream")
            assert runs == 1


@pytest.mark.parametrize("tracked", [True, False])
async def test_a_session_activity_longer_than_the_store_check_is_stored_twice_and_runs_once(
    cadenza_bus: bus.Bus, nats_server: Any, tracked: bool
) -> None:
    # A session's task is sent without Nats-Msg-Id: still running at task_store_check, it is
    # published again and stored as a second copy, which its worker takes without running it.
    prefix = cadenza_bus.topology.prefix
    quick = bus.Timeouts(task_store_check=0.2)
    runs, release, copies = 0, anyio.Event(), [0]
    async with bus.connect(nats_server.url, prefix=prefix, timeouts=quick) as b, running_broker(cadenza_bus):
        w = bus.Worker(cadenza_bus, tasklist="longer-s", track_activities=tracked, heartbeat_interval=0.5)

        @w.activity()
        async def slow(x: int) -> int:
            nonlocal runs
            runs += 1
            await release.wait()
            return x

        async with w:
            inbox = f"{prefix}.task.{w.worker_id}.inbox"

            async def on_task(msg: Any) -> None:
                if b'"name":"slow"' in msg.data:
                    copies[0] += 1

            watch = await cadenza_bus.nc.subscribe(inbox, cb=on_task)
            await cadenza_bus.nc.flush()
            opts = bus.SessionOptions(creation_timeout=10, execution_timeout=120, heartbeat_timeout=10,
                                      tasklist="longer-s")  # fmt: skip
            sctx = await bus.create_session(b.context(), opts)
            handled = cadenza_bus.stats.handled
            try:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        got: list[int] = []

                        async def call() -> None:
                            got.append(await bus.execute_activity(sctx, "slow", 3, start_to_close_timeout=50))

                        tg.start_soon(call)
                        await eventually(lambda: copies[0] == 2, timeout=30, what="the task published again")
                        # The second copy is stored and taken (nothing deduped it), the activity not run again.
                        await eventually(lambda: cadenza_bus.stats.handled > handled, timeout=30,
                                         what="the second copy taken")  # fmt: skip
                        assert runs == 1
                        release.set()
            finally:
                await watch.unsubscribe()
            assert got == [3] and runs == 1
            stream = cadenza_bus.topology.stream_name("task")

            async def none_left() -> bool:
                info = await b.js.stream_info(stream, subjects_filter=inbox)
                return not info.state.subjects

            await eventually(none_left, timeout=30, what="no task of the session left in the stream")
            assert runs == 1
            await bus.complete_session(sctx)


# ---------------------------------------------------------------- nothing a worker or the broker skips is silent


async def _letters(b: bus.Bus, consumer: str, n: int = 1) -> list[DeadLetter]:
    async def enough() -> bool:
        return await dead_letter_count(b, consumer) >= n

    await eventually(enough, timeout=30, interval=0.05, what=f"{n} dead letters of {consumer}")
    return await dead_letters(b, consumer)


async def test_a_refused_task_without_reply_to_and_a_notice_for_another_worker_are_dead_lettered(
    cadenza_bus: bus.Bus,
) -> None:
    b = cadenza_bus
    w = bus.Worker(b, tasklist="refusals", heartbeat_interval=0.3)

    @w.activity("echo")
    async def echo(x: object) -> object:
        return x

    async with w:
        await b.publish(ActivityTask(activity_id="no-such-1", name="nope", tasklist="refusals"))
        (letter,) = await _letters(b, "tasks-refusals")
        assert letter.error_type == "task_refused" and "no activity 'nope'" in letter.reason
        notice = SessionOpened(worker_id="someone-else", session_id="s-else")
        await b.publish(notice, subject=b.subjects.build("task", w.worker_id, "inbox"))
        (letter,) = await _letters(b, f"inbox-{w.worker_id}")
        assert letter.error_type == "wrong_worker" and "someone-else" in letter.reason
        assert w.open_sessions == 0


async def test_a_bucket_value_that_is_no_record_is_dead_lettered_by_the_broker(cadenza_bus: bus.Bus) -> None:
    from services.broker import Broker, BrokerConfig

    b = cadenza_bus
    async with anyio.create_task_group() as tg:
        await tg.start(Broker(b, BrokerConfig(token_key=b"k" * 32)).run)
        await (await b.kv("sessions")).put("garbage", b'{"state": 42}')
        (letter,) = await _letters(b, "broker-sessions")
        assert letter.error_type == "bad_shape" and "SessionRecord" in letter.reason
        tg.cancel_scope.cancel()


async def test_a_late_close_notice_does_not_put_a_worker_over_its_slots(cadenza_bus: bus.Bus) -> None:
    """A close notice redelivered late (lost in a node restart) must not leave the worker counting an
    ended session when the broker, whose slots say there is room, gives it the next one."""
    b = cadenza_bus
    w = bus.Worker(b, tasklist="late-close", heartbeat_interval=0.3, max_concurrent_sessions=1)
    kv = await b.kv("sessions")
    inbox = b.subjects.build("task", w.worker_id, "inbox")

    async def open_on_worker(sid: str) -> None:
        now = utcnow()
        record = SessionRecord(session_id=sid, tasklist="late-close", state=SessionState.OPEN,
                               worker_id=w.worker_id, opened_at=now, requested_at=now)  # fmt: skip
        await kv.put(sid, record.model_dump_json().encode())
        await b.publish(SessionOpened(worker_id=w.worker_id, session_id=sid), subject=inbox)

    async with w:
        await open_on_worker("s-first")
        await eventually(lambda: w.open_sessions == 1, timeout=30, what="the first session opened")
        # It ends; the broker frees the slot; its close notice to the worker is late.
        ended = SessionRecord(session_id="s-first", tasklist="late-close", state=SessionState.COMPLETED,
                              worker_id=w.worker_id, ended_at=utcnow())  # fmt: skip
        await kv.put("s-first", ended.model_dump_json().encode())
        await open_on_worker("s-second")
        await eventually(lambda: "s-second" in w._sessions, timeout=30, what="the second session opened")
        assert w.open_sessions == 1 and w.oversubscribed == 0
        assert "s-first" not in w._sessions


async def test_a_late_close_notice_does_not_put_a_worker_over_its_slots_when_a_task_comes_first(
    cadenza_bus: bus.Bus,
) -> None:
    """A node restart can hold up both notices (the close of one session and the opening of the next,
    in one lost pull): the next session's task then comes first and opens it from its record, which
    must free the ended session's slot too (the chaos run's 7th session on 6 slots)."""
    b = cadenza_bus
    w = bus.Worker(b, tasklist="late-both", heartbeat_interval=0.3, max_concurrent_sessions=1)

    @w.activity("echo")
    async def echo(x: object) -> object:
        return x

    kv = await b.kv("sessions")
    inbox = b.subjects.build("task", w.worker_id, "inbox")

    def record(sid: str, state: SessionState) -> bytes:
        now = utcnow()
        ended_at = None if state is SessionState.OPEN else now
        rec = SessionRecord(session_id=sid, tasklist="late-both", state=state, worker_id=w.worker_id,
                            opened_at=now, requested_at=now, ended_at=ended_at)  # fmt: skip
        return rec.model_dump_json().encode()

    async with w:
        await kv.put("s-one", record("s-one", SessionState.OPEN))
        await b.publish(SessionOpened(worker_id=w.worker_id, session_id="s-one"), subject=inbox)
        await eventually(lambda: w.open_sessions == 1, timeout=30, what="the first session opened")
        # It ends and the broker gives its slot to the next one; neither notice has come yet.
        await kv.put("s-one", record("s-one", SessionState.COMPLETED))
        await kv.put("s-two", record("s-two", SessionState.OPEN))
        reply = await _run_task(b, w.worker_id, "s-two")
        assert reply.ok and reply.result == "hi", reply
        assert w.oversubscribed == 0 and w.peak_sessions == 1, "the worker counted an ended session's slot"
        assert set(w._sessions) == {"s-two"}


async def test_a_result_too_large_to_send_is_answered_as_an_error(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    w = bus.Worker(b, tasklist="too-large", heartbeat_interval=0.3, enable_sessions=False)

    @w.activity("big")
    async def big() -> str:
        return "x" * (bus.MAX_EVENT_BYTES + 1)

    got: list[Any] = []
    inbox = b.nc.new_inbox()

    async def on_reply(msg: Any) -> None:
        got.append(msg)

    async with w:
        sub = await b.nc.subscribe(inbox, cb=on_reply)
        await b.publish(ActivityTask(activity_id="big-1", name="big", tasklist="too-large", reply_to=inbox))
        await eventually(lambda: bool(got), timeout=30, what="the worker's answer")
        await sub.unsubscribe()
    reply = bus.decode(got[0].data, got[0].headers, [ActivityResult])
    assert not reply.ok and reply.error is not None and reply.error.type == "ResultTooLargeError"
    # A result's type and version are in its body only (docs/wire.md, Headers).
    assert "Cadenza-Event-Type" not in (got[0].headers or {}) and reply.type == "task.result"
