"""The tracked round trip (docs/DESIGN.md): the worker sends the completion with the server's answer
routed to the caller, answers at once and leaves the task's ack to the caller, which acks it once the
answer says stored, or gives the task back (then the worker stores the completion and answers again).
A caller that dies before its ack gets the same redelivery after the ack wait: given back here by a
NAK, which is what a redelivery looks like to the worker."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats.js.errors
import pytest
from nats.aio.msg import Msg

import bus
from bus.sessions._client import SessionClient, client_of
from bus.testing import eventually
from bus.tracking._api import store_first_completion
from bus.transport._codec import HDR_DONE, HDR_STORE_ACK_TO, HDR_TASK_ACK, decode, encode
from schemas import ActivityCompleted, ActivityResult, ActivityStatus, ActivityTask
from tests._helpers import dead_letters, running_broker

TASKLIST = "handoff"


@contextlib.asynccontextmanager
async def _worker(b: bus.Bus, gate: anyio.Event | None = None, **kw: Any) -> AsyncIterator[bus.Worker]:
    w = bus.Worker(b, tasklist=TASKLIST, heartbeat_interval=0.5, **kw)

    @w.activity()
    async def quick(x: int) -> int:
        return x * 2

    @w.activity()
    async def gated() -> str:
        assert gate is not None
        await gate.wait()
        return "done"

    async with anyio.create_task_group() as tg:
        await tg.start(w.run)
        yield w
        tg.cancel_scope.cancel()


class _Caller:
    """A caller in plain NATS: a task with the hand-off header, and what comes back."""

    def __init__(self, b: bus.Bus) -> None:
        self.b = b
        self.inbox = b.nc.new_inbox()
        self.results: list[Msg] = []
        self.stored: list[Msg] = []

    async def start(self) -> None:
        async def on_result(msg: Msg) -> None:
            self.results.append(msg)

        async def on_stored(msg: Msg) -> None:
            self.stored.append(msg)

        await self.b.nc.subscribe(f"{self.inbox}.r", cb=on_result)
        await self.b.nc.subscribe(f"{self.inbox}.s", cb=on_stored)

    async def send(self, activity_id: str, store_ack_to: str | None = None) -> None:
        task = ActivityTask(activity_id=activity_id, name="quick", args=[21], tasklist=TASKLIST,
                            reply_to=f"{self.inbox}.r")  # fmt: skip
        body, headers = encode(task)
        headers[HDR_STORE_ACK_TO] = f"{self.inbox}.s" if store_ack_to is None else store_ack_to
        await self.b.js.publish(self.b.subjects.build("task", TASKLIST, "queued"), body, headers=headers)

    @classmethod
    async def answered(cls, b: bus.Bus, activity_id: str) -> _Caller:
        """A caller that sent one task and holds its result and the store's answer."""
        caller = cls(b)
        await caller.start()
        await caller.send(activity_id)
        await eventually(
            lambda: caller.results and caller.stored, what=f"the result of {activity_id} and its store's answer"
        )
        return caller

    def result(self, i: int) -> ActivityResult:
        event = decode(self.results[i].data, self.results[i].headers, [ActivityResult])
        assert isinstance(event, ActivityResult)
        return event


async def _unacked(b: bus.Bus) -> int:
    info = await b.js.consumer_info(b.topology.stream_name("task"), f"tasks-{TASKLIST}")
    return int(info.num_ack_pending) + int(info.num_pending)


async def _acked(b: bus.Bus) -> bool:
    return await _unacked(b) == 0


async def _completions(b: bus.Bus, activity_id: str) -> int:
    stream = b.topology.stream_name("activity")
    info = await b.js.stream_info(stream, subjects_filter=b.subjects.build("activity", activity_id, "completed"))
    return sum((info.state.subjects or {}).values())


async def test_the_worker_hands_the_ack_to_the_caller_with_the_stores_answer(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with _worker(b) as w:
        caller = await _Caller.answered(b, "h-1")
        assert caller.result(0).ok and caller.result(0).result == 42
        ack = (caller.results[0].headers or {}).get(HDR_TASK_ACK, "")
        assert ack.startswith("$JS.ACK."), caller.results[0].headers
        answer: dict[str, Any] = json.loads(caller.stored[0].data)
        assert answer["seq"] > 0 and "error" not in answer
        assert "h-1" in w._handed
        # Not acked by the worker: the task waits for the caller's ack.
        assert await _unacked(b) == 1
        await b.nc.publish(ack, b"+ACK")

        await eventually(lambda: _acked(b), what="the task acked by the caller")
        assert await _completions(b, "h-1") == 1


async def test_a_cancelled_activity_is_stored_by_its_worker_and_its_task_acked_at_once(cadenza_bus: bus.Bus) -> None:
    """Its caller has stopped waiting (here: its own cancel), so no caller would ack the task: the
    worker stores the completion before it answers and acks the task itself, within the ack wait
    (30 s), not after it."""
    b, gate = cadenza_bus, anyio.Event()
    async with _worker(b, gate) as w:
        call = b.context().child()
        cause = bus.CancelCause(kind=bus.CancelKind.USER, who="test", reason="not wanted")
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    with contextlib.suppress(bus.ActivityCancelledError):
                        await bus.execute_activity(call, "gated", activity_id="h-9", tasklist=TASKLIST,
                                                   start_to_close_timeout=60)  # fmt: skip

                tg.start_soon(run)
                await eventually(lambda: "h-9" in w.service._tracks, what="the activity running")
                call.token.cancel(cause)
        await eventually(lambda: _acked(b), timeout=20, what="the task acked by the worker")
        assert "h-9" not in w._handed
        assert await _completions(b, "h-9") == 1


async def test_a_result_nobody_waits_for_any_more_gives_its_task_back_at_once(cadenza_bus: bus.Bus) -> None:
    """A hand-off result for a call that ended first (its session failed, or the deadline passed as
    the activity ended) is handed back to its worker with a NAK, not left to the ack wait."""
    b = cadenza_bus
    client = await client_of(b)
    ack_subject = "$JS.ACK.CADENZA_TASK.test-consumer.1.7.7.1700000000000000000.0"
    nacks: list[bytes] = []

    async def on_ack(msg: Msg) -> None:
        nacks.append(msg.data)

    await b.nc.subscribe(ack_subject, cb=on_ack)
    result = ActivityResult(activity_id="h-10", ok=True, result=1)
    body, headers = encode(result)
    headers[HDR_TASK_ACK] = ack_subject
    await b.nc.publish(f"{client.inbox}.h-10", body, headers=headers)
    await eventually(lambda: nacks == [b"-NAK"], what="the task handed back")


async def test_a_task_given_back_is_stored_by_its_worker_and_answered_again(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with _worker(b) as w:
        caller = await _Caller.answered(b, "h-2")
        await b.nc.publish((caller.results[0].headers or {})[HDR_TASK_ACK], b"-NAK")
        await eventually(lambda: len(caller.results) == 2, what="the second answer")
        again = caller.result(1)
        assert again.ok and again.result == 42
        assert HDR_TASK_ACK not in (caller.results[1].headers or {}), "the worker acks a task it answers again"
        assert len(caller.stored) == 1 and "h-2" not in w._handed

        await eventually(lambda: _acked(b), what="the task acked by the worker")
        assert await _completions(b, "h-2") == 1  # the first completion stays: stored once


async def test_a_caller_that_never_acks_gets_the_task_stored_and_acked_by_the_worker_after_the_ack_wait(
    cadenza_bus: bus.Bus,
) -> None:
    """What a caller killed between the result and its ack leaves: the task comes back to the worker
    after the ack wait, which stores the completion (the first one stays: once) and acks it."""
    b = cadenza_bus
    async with _worker(b, task_ack_wait=2.0) as w:
        caller = await _Caller.answered(b, "h-7")
        # No ack: the server delivers the task again after 2 s.
        await eventually(lambda: len(caller.results) == 2, timeout=30, what="the answer after the ack wait")
        assert caller.result(1).ok and HDR_TASK_ACK not in (caller.results[1].headers or {})
        assert "h-7" not in w._handed

        await eventually(lambda: _acked(b), what="the task acked by the worker")
        assert await _completions(b, "h-7") == 1


async def test_a_task_given_back_after_its_completion_is_forgotten_is_answered_from_the_stream(
    cadenza_bus: bus.Bus,
) -> None:
    b = cadenza_bus
    async with _worker(b) as w:
        caller = _Caller(b)
        await caller.start()
        for aid in ("h-3", "h-4"):
            await caller.send(aid)
        await eventually(lambda: len(caller.results) == 2 and len(caller.stored) == 2, what="both answers")
        w._handed.clear()  # past the completions a worker keeps (4096)
        # h-4's completion is not in the stream either: its result is lost, and the answer says so.
        stream = b.topology.stream_name("activity")
        await b.js.purge_stream(stream, subject=b.subjects.build("activity", "h-4", "completed"))
        by_id = {caller.result(i).activity_id: caller.results[i] for i in range(2)}
        for aid in ("h-3", "h-4"):
            await b.nc.publish((by_id[aid].headers or {})[HDR_TASK_ACK], b"-NAK")
        await eventually(lambda: len(caller.results) == 4, what="the answers again")
        again = {r.activity_id: r for r in (caller.result(2), caller.result(3))}
        assert again["h-3"].ok and again["h-3"].result == 42
        lost = again["h-4"]
        assert not lost.ok and lost.error is not None and "result is lost" in lost.error.message

        await eventually(lambda: _acked(b), what="both tasks acked by the worker")


async def test_a_store_ack_subject_no_reply_can_go_to_makes_the_worker_store_first(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    async with _worker(b) as w:
        caller = _Caller(b)
        await caller.start()
        await caller.send("h-5", store_ack_to="not a subject.*")
        await eventually(lambda: caller.results, what="the answer")
        assert caller.result(0).ok and HDR_TASK_ACK not in (caller.results[0].headers or {})
        assert not caller.stored and "h-5" not in w._handed
        assert await _completions(b, "h-5") == 1  # stored before the answer

        await eventually(lambda: _acked(b), what="the task acked by the worker")


async def test_a_refused_store_is_given_back_and_stored_by_the_worker(cadenza_bus: bus.Bus) -> None:
    """The activity stream is gone when the activity ends (503 to the caller): the caller gives the
    task back; the worker stores the completion (within about 3 s, else in the background while the
    caller is answered, as when it stores a completion itself) and answers again."""
    b, gate = cadenza_bus, anyio.Event()
    stream = b.topology.stream_name("activity")
    async with running_broker(b), _worker(b, gate) as w:
        opts = bus.SessionOptions(creation_timeout=10, execution_timeout=120, heartbeat_timeout=10, tasklist=TASKLIST)
        sctx = await bus.create_session(b.context(), opts)
        got: list[Any] = []

        async def call() -> None:
            got.append(await bus.execute_activity(sctx, "gated", activity_id="h-6", start_to_close_timeout=60))

        async def announced() -> bool:
            try:
                await b.js.get_last_msg(stream, b.subjects.build("activity", "h-6", "started"))
            except nats.js.errors.NotFoundError:
                return False
            return True

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            # Announced first (so nothing of the activity waits in the outbox when it ends).
            await eventually(announced, timeout=20, what="the activity's start stored")
            await b.js.delete_stream(stream)
            gate.set()
            inbox = f"inbox-{w.worker_id}"

            async def given_back() -> bool:
                info = await b.js.consumer_info(b.topology.stream_name("task"), inbox)
                return int(info.num_redelivered) > 0

            await eventually(given_back, timeout=30, what="the task given back to the worker")
            await b.topology.ensure(b.js)
            await eventually(lambda: got == ["done"], timeout=60, what="the result")

            async def stored() -> bool:
                return await _completions(b, "h-6") == 1

            await eventually(stored, timeout=60, what="the completion stored once the stream is back")


async def test_a_completion_left_to_the_outbox_is_stored_once_the_stream_is_back(cadenza_bus: bus.Bus) -> None:
    """What a worker does with a given-back task's completion it could not store within about 3 s."""
    b = cadenza_bus
    async with _worker(b) as w:
        completion = ActivityCompleted(event_id="h-8.completed", activity_id="h-8", rev=1,
                                       status=ActivityStatus.SUCCESS, result=42)  # fmt: skip
        await b.js.delete_stream(b.topology.stream_name("activity"))
        w.service.store_later(completion)
        await b.topology.ensure(b.js)

        async def stored() -> bool:
            return await _completions(b, "h-8") == 1

        await eventually(stored, timeout=30, what="the completion stored by the outbox")


# ---------------------------------------------------------------- the completion republished to its caller


class _DoneCaller(_Caller):
    """A caller in plain NATS that asks for its completions republished (``Cadenza-Done``): its ids
    start with ``<user>~<client>~`` and it listens on ``<prefix>.done.<user>.<client>.>``."""

    ROUTE = "t~c1~"

    def __init__(self, b: bus.Bus) -> None:
        super().__init__(b)
        self.done: list[Msg] = []

    async def start(self) -> None:
        await super().start()

        async def on_done(msg: Msg) -> None:
            self.done.append(msg)

        await self.b.nc.subscribe(self.b.topology.done_filter(self.ROUTE), cb=on_done)
        await self.b.nc.flush()

    async def send(self, activity_id: str, store_ack_to: str | None = None) -> None:
        task = ActivityTask(activity_id=activity_id, name="quick", args=[21], tasklist=TASKLIST,
                            reply_to=f"{self.inbox}.r")  # fmt: skip
        body, headers = encode(task)
        headers[HDR_STORE_ACK_TO] = f"{self.inbox}.s"
        headers[HDR_DONE] = "1"
        await self.b.js.publish(self.b.subjects.build("task", TASKLIST, "queued"), body, headers=headers)

    def completion(self, i: int) -> ActivityCompleted:
        event = decode(self.done[i].data, self.done[i].headers, [ActivityCompleted])
        assert isinstance(event, ActivityCompleted)
        return event


async def test_a_caller_that_asks_hears_its_stored_completion_republished_and_no_result(cadenza_bus: bus.Bus) -> None:
    """A success: the completion, stored, comes to the caller from the stream (its result and the
    proof it is stored in one message); the worker acks the task on the store's answer, which it
    takes itself; no result and no store answer go to the caller."""
    b = cadenza_bus
    aid = f"{_DoneCaller.ROUTE}h-20"
    async with _worker(b) as w:
        caller = _DoneCaller(b)
        await caller.start()
        await caller.send(aid)
        await eventually(lambda: caller.done, what="the stored completion republished to its caller")
        done = caller.completion(0)
        assert done.activity_id == aid and done.status is ActivityStatus.SUCCESS and done.result == 42
        assert caller.done[0].subject == f"{b.topology.prefix}.done.t.c1.h-20"
        await eventually(lambda: _acked(b), what="the task acked by its worker")
        assert aid not in w._settle
        await b.nc.flush()
        assert caller.results == [] and caller.stored == []
        assert await _completions(b, aid) == 1


async def test_a_republished_completion_whose_store_is_refused_is_given_back_and_answered(cadenza_bus: bus.Bus) -> None:
    """Another completion of the activity is stored first (first completion wins): no success is
    republished, the worker gives the task back on the store's refusal, and its redelivery answers
    the caller with a result, as when the caller judged the store (its worker's result)."""
    b = cadenza_bus
    aid = f"{_DoneCaller.ROUTE}h-21"
    async with _worker(b):
        caller = _DoneCaller(b)
        await caller.start()
        first = ActivityCompleted(event_id=f"{aid}.completed", activity_id=aid, rev=1, status=ActivityStatus.FAILED,
                                  error="ended elsewhere first")  # fmt: skip
        await b.publish(first, headers=dict(bus.FIRST_COMPLETION))
        await eventually(lambda: caller.done, what="the first completion republished")
        await caller.send(aid)
        await eventually(lambda: caller.results, timeout=30, what="the result of the task given back")
        assert caller.result(0).ok and caller.result(0).result == 42
        await eventually(lambda: _acked(b), what="the task acked")
        assert [caller.completion(i).status for i in range(len(caller.done))] == [ActivityStatus.FAILED]
        assert await _completions(b, aid) == 1


async def test_the_session_client_hears_completions_republished_where_the_stream_does_it(
    cadenza_bus: bus.Bus, nats_server: Any
) -> None:
    """The client's ids carry its route when the activity stream republishes completions, and its
    calls return from them; a client of a stream set up without the republish (an older cadenza's)
    makes plain ids and takes replies."""
    b = cadenza_bus
    async with running_broker(b), _worker(b):
        opts = bus.SessionOptions(creation_timeout=10, execution_timeout=120, heartbeat_timeout=10, tasklist=TASKLIST)
        client = await client_of(b)
        assert client.route.startswith("_~"), client.route  # a server without users: "_"
        async with bus.session(b.context(), opts) as sctx:
            assert await bus.execute_activity(sctx, "quick", 4, start_to_close_timeout=30) == 8
        stream = b.topology.stream_name("activity")
        cfg = (await b.js.stream_info(stream)).config
        cfg.republish = None
        await b.js.update_stream(cfg)
        async with bus.connect(nats_server.url, prefix=b.topology.prefix, name="old-stream",
                               ensure_topology=False) as old:  # fmt: skip
            assert (await client_of(old)).route == ""
            async with bus.session(old.context(), opts) as sctx:
                assert await bus.execute_activity(sctx, "quick", 5, start_to_close_timeout=30) == 10
        await b.topology.ensure(b.js)  # the republish is put back by the next set-up
        assert (await b.js.stream_info(stream)).config.republish == b.topology.done_republish()


@contextlib.asynccontextmanager
async def _gated_call(b: bus.Bus, timeout: float) -> AsyncIterator[tuple[SessionClient, list[Any]]]:
    """A session of ``b``'s with one call of ``gated`` on its way: the client, and the list its result goes to."""
    opts = bus.SessionOptions(creation_timeout=10, execution_timeout=300, heartbeat_timeout=10, tasklist=TASKLIST)
    client = await client_of(b)
    got: list[Any] = []
    async with bus.session(b.context(), opts) as sctx, anyio.create_task_group() as tg:

        async def call() -> None:
            got.append(await bus.execute_activity(sctx, "gated", start_to_close_timeout=timeout))

        tg.start_soon(call)
        await eventually(lambda: client.calls, what="the call sent")
        yield client, got


async def test_a_call_whose_answer_was_lost_with_its_connection_reads_the_stored_outcome_after_the_reconnect(
    cadenza_bus: bus.Bus, nats_server: Any, monkeypatch: Any
) -> None:
    """The republished completion does not reach the caller (dropped here, as a connection lost at
    that moment drops it); once the caller's connection has reconnected, the call reads the stored
    completion and returns, long before its deadline."""
    b, gate = cadenza_bus, anyio.Event()
    lost: list[Any] = []
    monkeypatch.setattr(SessionClient, "_on_done_msg", lambda self, msg: lost.append(msg))
    async with (
        running_broker(b), _worker(b, gate),
        bus.connect(nats_server.url, prefix=b.topology.prefix, name="lossy-caller") as cb,
    ):  # fmt: skip
        async with _gated_call(cb, 240) as (client, got):
            assert client.route
            gate.set()
            await eventually(lambda: lost, timeout=30, what="the stored completion republished (and lost)")
            before = cb.nc.stats["reconnects"]
            await cb.nc.force_reconnect()
            await eventually(lambda: cb.nc.stats["reconnects"] > before and cb.nc.is_connected, timeout=30,
                             what="the caller reconnected")  # fmt: skip
            await eventually(lambda: got == ["done"], timeout=30, what="the result read from the stream")


async def test_a_republished_message_that_is_no_completion_is_dead_lettered_and_the_call_goes_on(
    cadenza_bus: bus.Bus,
) -> None:
    """Bad input on a caller's ``done`` subject (here published by hand; deploy's permissions let
    only the server publish there): a dead letter with the reason, and the call returns its result."""
    b, gate = cadenza_bus, anyio.Event()
    async with running_broker(b), _worker(b, gate):
        async with _gated_call(b, 60) as (client, got):
            aid = next(iter(client.calls))
            subject = f"{b.topology.prefix}.done.{aid.replace('~', '.')}"
            await b.nc.publish(subject, b'{"type": "activity.completed", "activity_id": 7}')
            await b.nc.publish(subject, b"not json")

            async def dead() -> bool:
                return len(await dead_letters(b, "session-client")) >= 2

            await eventually(dead, timeout=20, what="both dead-lettered")
            assert got == [] and aid in client.calls
            gate.set()
            await eventually(lambda: got == ["done"], timeout=30, what="the result")
        letters = await dead_letters(b, "session-client")
        assert {d.error_type for d in letters} <= {"bad_json", "bad_shape"}, letters
        assert all(d.subject == subject for d in letters)


@pytest.mark.parametrize("tracked", [True, False])
async def test_a_sessions_task_stored_twice_runs_once(cadenza_bus: bus.Bus, tracked: bool) -> None:
    """A session's task is sent without ``Nats-Msg-Id`` (the stream's duplicate check is server CPU
    per task); a copy its caller sends again (no answer within ``task_store_check``) is stored as a
    second message, which the worker takes without running the activity again, tracked or not."""
    b, runs = cadenza_bus, [0]
    async with running_broker(b), _worker(b, track_activities=tracked) as w:

        @w.activity()
        async def counted() -> int:
            runs[0] += 1
            return runs[0]

        opts = bus.SessionOptions(creation_timeout=10, execution_timeout=120, heartbeat_timeout=10, tasklist=TASKLIST)
        sctx = await bus.create_session(b.context(), opts)
        info = sctx.session
        assert isinstance(info, bus.SessionInfo)
        replies: list[Msg] = []
        inbox = b.nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            replies.append(msg)

        await b.nc.subscribe(inbox, cb=on_reply)
        task = ActivityTask(activity_id=f"twice-{tracked}", name="counted", tasklist=TASKLIST, worker_id=info.worker_id,
                            session_id=info.session_id, reply_to=inbox)  # fmt: skip
        handled = w.bus.stats.handled
        for _ in range(2):
            await b.send_stored_to(task, "", None, dedupe=False)
        # Both copies stored and taken (the server deduped neither), the activity run once.
        await eventually(lambda: w.bus.stats.handled >= handled + 2, timeout=30, what="both copies taken")
        await eventually(lambda: replies, timeout=30, what="the answer")
        # A third copy after the session ended is not answered from the session's state either
        # ("completed before the activity started" would beat a long activity's own answer).
        await bus.complete_session(sctx)
        await eventually(lambda: info.session_id in w._ended, timeout=30, what="the worker heard of the end")
        await b.send_stored_to(task, "", None, dedupe=False)
        await eventually(lambda: w.bus.stats.handled >= handled + 3, timeout=30, what="the third copy taken")
        await w.bus.nc.flush(timeout=10)  # whatever it answered is routed before its PONG
        await b.nc.flush(timeout=10)
        assert runs == [1]
        assert len(replies) == 1 and json.loads(replies[0].data)["result"] == 1, [m.data for m in replies]


async def test_a_completion_is_stored_without_a_dedupe_id_and_stored_once(cadenza_bus: bus.Bus) -> None:
    """A completion carries no ``Nats-Msg-Id`` (the first one wins in the stream anyway): the same
    completion published again (a retry whose first try was stored) is refused as a second one,
    which its sender takes as stored first."""
    b = cadenza_bus
    event = ActivityCompleted(event_id="once-1.completed", activity_id="once-1", rev=1, status=ActivityStatus.SUCCESS,
                              result=1)  # fmt: skip
    assert await store_first_completion(b, event) is True
    assert await store_first_completion(b, event) is False
    assert await _completions(b, "once-1") == 1
    stored = await b.js.get_last_msg(b.topology.stream_name("activity"), b.subjects.build("activity", "once-1",
                                                                                          "completed"))  # fmt: skip
    assert "Nats-Msg-Id" not in (stored.headers or {}), stored.headers
