"""The NATS messages one activity costs, counted on a real server (issue #10's budget, not a timing).

A ``>`` subscriber on a connection of its own sees every message the server routes: publishes,
JetStream acknowledgements (PubAcks) and deliveries (both to ``_INBOX`` subjects), consumer acks
(``$JS.ACK``), pull requests (``$JS.API.CONSUMER.MSG.NEXT``), core replies. Caller, broker, recorder
and worker each have their own connection, as separate processes would. Worker heartbeats are left
out (one per interval for the whole process, not per activity), and so are the workers' pull
requests, counted apart: one asks for up to 256 tasks and is renewed at half of that, so it is a
cost per batch, not per activity (bounded below). Everything else the activities cause is counted,
in steady state (after a warm-up, every process flushed before the count stops).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import bus
from bus.testing import eventually, unique_prefix
from schemas import utcnow
from services.broker import Broker, BrokerConfig
from services.recorder import Recorder, RecorderConfig

KEY = b"k" * 32
WARM, COUNTED = 20, 100
#: Issue #10 asks tracked <= 8 per activity, untracked <= 6; these are what is reached (the task is
#: sent without a PubAck since 0.2), so that a message more per activity fails here. An id the user
#: gives is answered by a reply, its completion's store acknowledged to the caller (7 messages as
#: before the republish), and the stream's republish of its completion to ``<prefix>.done.<id>``
#: reaches this test's ``>`` counter alone (with nobody else listening the server sends it nowhere).
BUDGET = {"tracked": 7.0, "untracked": 4.0, "tracked-given-ids": 8.0}


def _kind(subject: str, prefix: str) -> str:
    """A readable class of a routed message, for the breakdown printed on failure."""
    if subject.startswith(f"{prefix}.done."):
        return "done (a stored completion, republished)"
    if subject.startswith(f"{prefix}."):
        parts = subject.split(".")
        return f"{parts[1]}.{parts[-1]}" if len(parts) > 2 else parts[1]
    if subject.startswith("$JS.ACK."):
        return "consumer ack"
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return "pull request"
    if subject.startswith("$JS.API."):
        return "JetStream API " + ".".join(subject.split(".")[2:4])
    if subject.startswith("$JS.EVENT."):
        return ".".join(subject.split(".")[:5])  # $JS.EVENT.ADVISORY.<kind>.<what>, of one of our streams
    if subject.startswith("$JS.FC."):
        return "flow control"
    if subject.startswith("$KV."):
        return "KV write"
    if subject.startswith("_INBOX"):
        return "inbox (PubAck, delivery or reply)"
    return ".".join(subject.split(".")[:3])


@contextlib.asynccontextmanager
async def _system(url: str, prefix: str, tracked: bool) -> AsyncIterator[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        buses = {
            name: await stack.enter_async_context(bus.connect(url, prefix=prefix, name=name))
            for name in ("caller", "broker", "recorder", "worker")
        }
        tg = await stack.enter_async_context(anyio.create_task_group())
        recorder = Recorder(buses["recorder"], RecorderConfig(prune_interval=3600))
        await tg.start(Broker(buses["broker"], BrokerConfig(token_key=KEY)).run)
        await tg.start(recorder.run)
        # announce_after well above the default 0.5 s: the count is of the quick-activity pattern, and on
        # a loaded CI machine one activity in a hundred can take longer than 0.5 s (then it is announced:
        # three messages more, and this test failed once so under load).
        worker = bus.Worker(buses["worker"], heartbeat_interval=30.0, track_activities=tracked, announce_after=30.0)

        @worker.activity()
        async def echo(x: int) -> int:
            return x

        await tg.start(worker.run)
        yield {"buses": buses, "recorder": recorder, "worker": worker}
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["tracked", "untracked", "tracked-given-ids"])
async def test_an_in_session_activity_stays_within_its_message_budget(nats_server: Any, kind: str) -> None:
    tracked, given = kind != "untracked", kind == "tracked-given-ids"
    prefix = unique_prefix()
    async with _system(nats_server.url, prefix, tracked) as s, bus.connect(nats_server.url, prefix=prefix,
                                                                           name="counter") as counter:  # fmt: skip
        buses, recorder = s["buses"], s["recorder"]
        caller = buses["caller"]
        options = bus.SessionOptions(creation_timeout=10, execution_timeout=600, heartbeat_timeout=120)
        sctx = await bus.create_session(caller.context(), options)

        ran = [0]

        async def run(n: int, base: int) -> None:
            for i in range(n):
                aid = f"budget-{base + i}" if given else None
                assert await bus.execute_activity(sctx, "echo", i, activity_id=aid) == i
            ran[0] += n

        def folded() -> int:
            return sum(1 for entry in recorder.cache.values() if entry.record.terminal)

        async def settled(counter_sub: Any = None) -> None:
            """Nothing of the activities run so far is still on its way (so none is counted in the
            wrong window): the recorder folded every one, the worker acked every task (its ack is
            sent as it counts the task handled), every process's messages were routed (flush), and
            the counter's callback took every message it was sent."""
            if tracked:
                await eventually(lambda: folded() >= ran[0], timeout=20,
                                 what="the recorder folded every activity")  # fmt: skip
            await eventually(lambda: buses["worker"].stats.handled >= ran[0], timeout=20,
                             what="the worker acked every task")  # fmt: skip
            for b in buses.values():  # every message a process sent is routed before its PONG
                await b.nc.flush(timeout=10)
            await counter.nc.flush(timeout=10)
            if counter_sub is not None:
                await eventually(lambda: counter_sub.pending_msgs == 0, timeout=20,
                                 what="the counter took every message")  # fmt: skip

        await run(WARM, 0)
        await settled()
        # The worker's cancel router has listened long enough that no task needs a look-up of stored
        # cancels any more (a start-up cost, not a per-activity one).
        worker = s["worker"]
        await eventually(lambda: worker.router.seen_since(utcnow()), timeout=20, what="the router's start-up margin")
        await run(WARM, 1000)
        await settled()
        seen: Counter[str] = Counter()

        # The server's advisories ($JS.EVENT.ADVISORY.<kind>.<stream>...) name their stream: those of
        # another test's streams on this shared server are not ours (one was counted here once).
        ours = tuple(f".{caller.topology.stream_name(d)}" for d in ("task", "activity", "session", "cancel", "worker"))

        async def count(msg: Any) -> None:
            subject = msg.subject
            if subject.startswith(f"{prefix}.worker."):
                return
            if not msg.data and (msg.headers or {}).get("Description") == "Idle Heartbeat":
                # The followers' idle heartbeats (one a second per idle ordered consumer, to notice
                # one lost with its node): a cost per second of quiet, not per activity.
                return
            if subject.startswith("$JS.EVENT.") and not any(s + "." in subject + "." for s in ours):
                return
            if subject.startswith("$JS.ACK.") and not any(subject.startswith(f"$JS.ACK{s}.") for s in ours):
                # An ack of another test's consumer on this shared server ($JS.ACK.<stream>.…): one
                # was counted here once, under load in CI (1.01 acks per activity, no extra delivery).
                return
            if not msg.data and (msg.headers or {}).get("Status") in ("408", "409"):
                # The end of a pull request (it expired, or was renewed): with the request, a cost
                # per batch and per expiry period, not per activity (counted with the pulls below;
                # two were counted as activities' once, when the count outlasted an expiry under load).
                seen["pull request"] += 1
                return
            seen[_kind(subject, prefix)] += 1

        sub = await counter.nc.subscribe(">", cb=count)
        await counter.nc.flush(timeout=10)
        # One activity more before the count: the counter's interest in a process's messages can lag
        # behind its flush (the first task's publish once went uncounted while its delivery was
        # counted; a core message of the caller's once did not reach it within 20 s). What it saw of
        # this one is dropped; the count is of the hundred after it.
        await run(1, 2000)
        await settled(sub)
        seen.clear()
        await run(COUNTED, WARM)
        await settled(sub)
        await sub.unsubscribe()
        await bus.complete_session(sctx)

    pulls = seen.pop("pull request", 0)
    per = sum(seen.values()) / COUNTED
    breakdown = ", ".join(f"{k}: {v / COUNTED:.2f}" for k, v in seen.most_common()) + f"; pull requests: {pulls}"
    if tracked:  # every completion republished (a caller-made id's to its caller, who needs no reply)
        assert seen["done (a stored completion, republished)"] == COUNTED, breakdown
    assert per <= BUDGET[kind], f"{per:.2f} messages per activity (budget {BUDGET[kind]:g}): {breakdown}"
    assert pulls <= 6, f"pull requests (and their ends) are per batch, not per activity: {breakdown}"
    # Not vacuous: the pattern's own messages were seen (the task, its delivery, the reply...).
    assert per >= 4, f"only {per:.2f} messages per activity counted: {breakdown}"
    if tracked:
        # A delivery shows its stream subject: the completion's publish and the recorder's delivery.
        assert seen["activity.completed"] == 2 * COUNTED, breakdown
        assert seen["activity.started"] == 0, f"quick activities are announced by their completion: {breakdown}"
