"""Sessions under faults, with the broker and the workers as real processes (SPEC-sessions "Survival").

A worker SIGKILLed with 50 open sessions; 500 creations against 300 slots; the broker SIGKILLed and
restarted in the middle of that load, or down for longer than a heartbeat timeout; two broker
replicas at once; forged recreate tokens. Counts come from the workers' own output (``sessions
<open> peak <peak>``) and from the broker's key-value buckets, never from the broker's word alone.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest

import bus
from bus.testing import ExternalServer, ServiceProcess, eventually, unique_prefix
from schemas import SessionState, WorkerRecord
from tests._helpers import (
    HEARTBEAT_TIMEOUT,
    broker,
    bucket_records,
    counts,
    peak_ever,
    process_opts,
    records_of,
    session_of,
    started,
    worker,
    worker_id,
)


@pytest.fixture
def procs(nats_server: Any) -> Iterator[ExitStack]:
    """Processes registered here are SIGKILLed at the end of the test, whatever happens."""
    if isinstance(nats_server, ExternalServer):
        pytest.skip("fault tests need the embedded server")
    with ExitStack() as stack:
        yield stack


def started_all(stack: ExitStack, *procs_: ServiceProcess) -> list[ServiceProcess]:
    """Start processes one after the other, on this thread.

    Not from worker threads: ServiceProcess children die with the thread that spawned them
    (PR_SET_PDEATHSIG), so a process started from a thread pool is SIGKILLed when that thread exits.
    """
    return [started(stack, proc) for proc in procs_]


async def worker_records(b: bus.Bus, wids: list[str]) -> dict[str, WorkerRecord | None]:
    """The workers bucket's record of each worker (None: no record)."""
    return await bucket_records(b, "workers", wids, WorkerRecord)


async def slot_lists(b: bus.Bus, wids: list[str]) -> dict[str, list[str]]:
    """The slots in use per worker, as the broker recorded them (a removed record holds none)."""
    return {wid: list(w.sessions) if w else [] for wid, w in (await worker_records(b, wids)).items()}


async def slots_in_use(b: bus.Bus, wids: list[str]) -> dict[str, int]:
    return {wid: len(sids) for wid, sids in (await slot_lists(b, wids)).items()}


async def _no_slots(b: bus.Bus, wids: list[str]) -> bool:
    return sum((await slots_in_use(b, wids)).values()) == 0


async def _workers_known(b: bus.Bus, wids: list[str]) -> bool:
    return all(w is not None for w in (await worker_records(b, wids)).values())


async def create_many(
    ctx: bus.Context, n: int, options: bus.SessionOptions, opened: list[bus.Context], failed: list[tuple[float, Any]]
) -> None:
    """``n`` concurrent creations; successes go to ``opened``, errors (with their wait) to ``failed``."""

    async def one() -> None:
        t0 = time.monotonic()
        try:
            opened.append(await bus.create_session(ctx, options))
        except bus.SessionCreationError as exc:
            failed.append((time.monotonic() - t0, exc))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)


async def complete_all(sessions: list[bus.Context]) -> None:
    limiter = anyio.CapacityLimiter(100)

    async def one(sctx: bus.Context) -> None:
        async with limiter:
            await bus.complete_session(sctx)

    async with anyio.create_task_group() as tg:
        for sctx in sessions:
            tg.start_soon(one, sctx)


# ---------------------------------------------------------------- 1. worker SIGKILLed


async def test_worker_sigkilled_with_50_open_sessions_fails_them_all_worker_lost_and_wakes_every_caller(
    nats_server: Any, procs: ExitStack
) -> None:
    prefix, url = unique_prefix(), nats_server.url
    _, w = started_all(procs, broker(prefix, url), worker(prefix, url))
    async with bus.connect(url, prefix=prefix) as b:
        ctx = b.context()
        sessions: list[bus.Context] = []
        errors: list[tuple[float, BaseException]] = []
        await create_many(ctx, 50, process_opts(), sessions, [])
        assert len(sessions) == 50
        await eventually(lambda: counts(w) == (50, 50), what="the worker holds 50 sessions")
        stream = b.topology.stream_name("activity")

        async def sleeper(i: int, sctx: bus.Context) -> None:
            try:
                await bus.execute_activity(sctx, "sleep", 30, start_to_close_timeout=60, activity_id=f"sleep-{i}")
            except BaseException as exc:  # recorded and checked below; cancellation re-raised
                errors.append((time.monotonic(), exc))
                if not isinstance(exc, Exception):
                    raise

        async def all_running() -> bool:
            info = await b.js.stream_info(stream, subjects_filter=b.subjects.filter("activity", event="started"))
            return len(info.state.subjects or {}) == 50

        with anyio.fail_after(HEARTBEAT_TIMEOUT + 30):
            async with anyio.create_task_group() as tg:
                for i, sctx in enumerate(sessions):
                    tg.start_soon(sleeper, i, sctx)
                await eventually(
                    all_running, timeout=20, interval=0.05, what="50 sleep activities started on the worker"
                )
                assert not errors
                w.kill()
                killed = time.monotonic()

        # Every caller woke with the session's failure, none waited for its 30 s sleep.
        assert len(errors) == 50
        assert all(isinstance(e, bus.SessionFailedError) for _, e in errors), [repr(e) for _, e in errors][:3]
        assert all(e.cause == "worker_lost" and "session has failed" in str(e) for _, e in errors)  # type: ignore[attr-defined]
        assert max(t for t, _ in errors) - killed < HEARTBEAT_TIMEOUT + 1.0

        infos = [session_of(s) for s in sessions]
        assert all(i.state is SessionState.FAILED and i.cause == "worker_lost" for i in infos)
        records = await records_of(b, [i.session_id for i in infos])
        assert {r.state if r else None for r in records.values()} == {SessionState.FAILED}

        # Later activities in them fail at once, and nothing is published for them.
        task_stream = b.topology.stream_name("task")
        before = (await b.js.stream_info(task_stream)).state.messages
        for sctx in sessions[:10]:
            with pytest.raises(bus.SessionFailedError, match="session has failed") as caught:
                await bus.execute_activity(sctx, "echo", 1, start_to_close_timeout=30)
            assert caught.value.cause == "worker_lost"
        assert (await b.js.stream_info(task_stream)).state.messages == before
        # No slot of the dead worker stays taken.
        await eventually(lambda: _no_slots(b, [worker_id(w)]), timeout=10, what="the dead worker's slots are released")


# ---------------------------------------------------------------- 2. a burst beyond capacity


async def _burst_against_three_workers(
    b: bus.Bus, workers: list[ServiceProcess], *, n: int, creation_timeout: float,
    during: Callable[[list[bus.Context]], Awaitable[None]] | None = None,
) -> tuple[list[bus.Context], list[tuple[float, Any]]]:  # fmt: skip
    opened: list[bus.Context] = []
    failed: list[tuple[float, Any]] = []
    ctx = b.context()
    async with anyio.create_task_group() as tg:
        tg.start_soon(create_many, ctx, n, process_opts(creation_timeout), opened, failed)
        if during is not None:
            await during(opened)
    return opened, failed


async def test_500_creations_against_300_slots_open_exactly_300_and_reject_200_for_capacity(
    nats_server: Any, procs: ExitStack
) -> None:
    prefix, url = unique_prefix(), nats_server.url
    _, *workers = started_all(procs, broker(prefix, url), *(worker(prefix, url) for _ in range(3)))
    wids = [worker_id(w) for w in workers]
    creation_timeout = 5.0
    async with bus.connect(url, prefix=prefix) as b:
        await eventually(
            lambda: _workers_known(b, wids), timeout=10, interval=0.05, what="the broker knows the 3 workers"
        )
        opened, failed = await _burst_against_three_workers(b, workers, n=500, creation_timeout=creation_timeout)
        assert len(opened) == 300 and len(failed) == 200, (len(opened), {str(e)[:200] for _, e in failed})
        assert {e.reason for _, e in failed} == {"capacity"}, {e.reason for _, e in failed}
        assert all("capacity" in str(e) for _, e in failed)
        # Rejected only once the creation timeout ran out (a free slot could have come until then).
        assert min(waited for waited, _ in failed) >= creation_timeout - 0.5
        await eventually(lambda: sum(counts(w)[0] for w in workers) == 300, what="the workers hold 300")
        assert [peak_ever(w) <= 100 for w in workers] == [True] * 3, [counts(w) for w in workers]
        assert sorted(counts(w)[0] for w in workers) == [100, 100, 100]
        used = await slots_in_use(b, wids)
        assert sorted(used.values()) == [100, 100, 100]
        by_worker: dict[str, int] = {}
        for sctx in opened:
            info = session_of(sctx)
            by_worker[info.worker_id] = by_worker.get(info.worker_id, 0) + 1
        assert by_worker == {worker_id(w): 100 for w in workers}
        await complete_all(opened)
        await eventually(
            lambda: _no_slots(b, wids), timeout=15, interval=0.05, what="every slot is free after completing"
        )
        await eventually(lambda: all(counts(w)[0] == 0 for w in workers), what="the workers hold none")


# ---------------------------------------------------------------- 3. broker SIGKILLed mid-load


async def _broker_killed_mid_load(
    prefix: str, url: str, procs: ExitStack, *, n: int, slots: int, kill_after: int, creation_timeout: float
) -> None:
    first, *workers = started_all(
        procs, broker(prefix, url, "--request-ack-wait", "2"), *(worker(prefix, url, slots=slots) for _ in range(3))
    )
    wids = [worker_id(w) for w in workers]
    restarted: list[ServiceProcess] = []

    async def kill_and_restart(opened: list[bus.Context]) -> None:
        await eventually(lambda: len(opened) >= kill_after, timeout=30, what=f"{kill_after} sessions open")
        first.kill()
        # Started on the event loop's thread (see started_all); the loop waits for the boot.
        restarted.append(started(procs, broker(prefix, url, "--request-ack-wait", "2")))

    async with bus.connect(url, prefix=prefix) as b:
        await eventually(
            lambda: _workers_known(b, wids), timeout=10, interval=0.05, what="the broker knows the 3 workers"
        )
        opened, failed = await _burst_against_three_workers(
            b, workers, n=n, creation_timeout=creation_timeout, during=kill_and_restart
        )
        assert restarted and first.proc is not None and first.proc.returncode is not None
        total = 3 * slots
        ids = [session_of(s).session_id for s in opened]
        records = await records_of(b, ids)
        held = await slot_lists(b, wids)
        states: dict[str, int] = {}
        for r in records.values():
            states[r.state.value if r else "none"] = states.get(r.state.value if r else "none", 0) + 1
        seen = (len(opened), len(set(ids)), states, {w: len(h) for w, h in held.items()},
                [(counts(w), peak_ever(w)) for w in workers], [str(e) for _, e in failed][:2])  # fmt: skip
        assert len(opened) == total, seen
        assert len(failed) == n - total and {e.reason for _, e in failed} <= {"capacity"}
        # No session lost: each success is open in the bucket and holds a slot on its worker, and
        # the slots in use are exactly the successes.
        assert len(set(ids)) == total
        lost = {sid: r for sid, r in records.items() if r is None or r.state is not SessionState.OPEN}
        assert not lost, lost
        assert sorted(sid for sids in held.values() for sid in sids) == sorted(ids)
        assert all(records[session_of(s).session_id].worker_id == session_of(s).worker_id for s in opened)  # type: ignore[union-attr]
        await eventually(lambda: sum(counts(w)[0] for w in workers) == total, what=f"the workers hold {total}")
        assert all(peak_ever(w) <= slots for w in workers), [counts(w) for w in workers]
        used = await slots_in_use(b, wids)
        assert sorted(used.values()) == [slots] * 3
        # Each session is where its worker says (an echo through each worker's inbox works).
        for sctx in opened[:: max(1, total // 30)]:
            assert await bus.execute_activity(sctx, "where", start_to_close_timeout=20) == session_of(sctx).worker_id
        # No slot leaked: after completing everything, every list is empty and every worker holds none.
        await complete_all(opened)
        await eventually(
            lambda: _no_slots(b, wids), timeout=20, interval=0.05, what="every slot is free after completing"
        )
        await eventually(lambda: all(counts(w)[0] == 0 for w in workers), what="the workers hold none")
        records = await records_of(b, ids)
        assert all(r is not None and r.state is SessionState.COMPLETED for r in records.values())


async def test_broker_sigkilled_and_restarted_mid_load_loses_no_session_leaks_no_slot(
    nats_server: Any, procs: ExitStack
) -> None:
    await _broker_killed_mid_load(
        unique_prefix(), nats_server.url, procs, n=150, slots=30, kill_after=30, creation_timeout=10
    )


@pytest.mark.slow
async def test_broker_sigkilled_and_restarted_mid_load_of_500_creations_against_300_slots(
    nats_server: Any, procs: ExitStack
) -> None:
    await _broker_killed_mid_load(
        unique_prefix(), nats_server.url, procs, n=500, slots=100, kill_after=100, creation_timeout=15
    )


# ---------------------------------------------------------------- 4. broker down longer than a heartbeat timeout


async def test_restarted_broker_does_not_declare_healthy_workers_lost_because_it_was_down(
    nats_server: Any, procs: ExitStack
) -> None:
    prefix, url = unique_prefix(), nats_server.url
    first, w = started_all(procs, broker(prefix, url), worker(prefix, url))
    async with bus.connect(url, prefix=prefix) as b:
        sessions: list[bus.Context] = []
        await create_many(b.context(), 10, process_opts(), sessions, [])
        assert len(sessions) == 10
        first.kill()
        down = time.monotonic()
        # The scenario, not a synchronisation: the broker stays down longer than the timeout.
        await anyio.sleep(HEARTBEAT_TIMEOUT + 1.0)
        second = started(procs, broker(prefix, url))
        assert time.monotonic() - down > HEARTBEAT_TIMEOUT
        # Give the restarted broker more than a heartbeat timeout of sweeps to (wrongly) fail them.
        await anyio.sleep(HEARTBEAT_TIMEOUT + 0.5)
        assert second.proc is not None and second.proc.poll() is None
        assert all(session_of(s).state is SessionState.OPEN for s in sessions)
        records = await records_of(b, [session_of(s).session_id for s in sessions])
        assert all(r is not None and r.state is SessionState.OPEN for r in records.values())
        assert counts(w)[0] == 10
        for sctx in sessions:
            assert await bus.execute_activity(sctx, "echo", "alive", start_to_close_timeout=10) == "alive"
        # The restarted broker still does its job: a new session opens, a killed worker is noticed.
        async with bus.session(b.context(), process_opts()) as extra:
            assert await bus.execute_activity(extra, "echo", 1, start_to_close_timeout=10) == 1
        w.kill()
        await eventually(
            lambda: all(session_of(s).state is SessionState.FAILED for s in sessions),
            timeout=HEARTBEAT_TIMEOUT + 5, what="the killed worker's sessions fail",
        )  # fmt: skip
        assert {session_of(s).cause for s in sessions} == {"worker_lost"}


# ---------------------------------------------------------------- 5. two broker replicas


async def _stored_failed(b: bus.Bus, sid: str) -> int:
    """How many ``failed`` announcements the session stream stores for ``sid``."""
    subject = b.subjects.build("session", sid, "failed")
    info = await b.js.stream_info(b.topology.stream_name("session"), subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_two_broker_replicas_never_oversubscribe_and_announce_a_failure_once(
    nats_server: Any, procs: ExitStack
) -> None:
    prefix, url = unique_prefix(), nats_server.url
    slots = 40
    _, _, *workers = started_all(
        procs, broker(prefix, url), broker(prefix, url), *(worker(prefix, url, slots=slots) for _ in range(2))
    )
    async with bus.connect(url, prefix=prefix) as b:
        heard: dict[str, int] = {}

        async def on_failed(msg: Any) -> None:
            sid = msg.subject.split(".")[-2]
            heard[sid] = heard.get(sid, 0) + 1

        core = await b.nc.subscribe(b.subjects.filter("session", event="failed"), cb=on_failed)
        try:
            await eventually(
                lambda: _workers_known(b, [worker_id(w) for w in workers]),
                timeout=10,
                interval=0.05,
                what="the brokers know the 2 workers",
            )
            opened: list[bus.Context] = []
            failed: list[tuple[float, Any]] = []
            # A creation bound of 8 s: under a loaded full run a placement may take longer than 4 s, and
            # is then refused as capacity (tests/test_sessions.py, the burst test, saw it at 1.5 s).
            await create_many(b.context(), 3 * slots, process_opts(8.0), opened, failed)
            assert len(opened) == 2 * slots and len(failed) == slots, [(round(t, 2), e) for t, e in failed]
            assert {e.reason for _, e in failed} == {"capacity"}
            await eventually(lambda: sum(counts(w)[0] for w in workers) == 2 * slots, what="both workers full")
            assert all(peak_ever(w) <= slots for w in workers), [counts(w) for w in workers]
            assert sorted((await slots_in_use(b, [worker_id(w) for w in workers])).values()) == [slots, slots]

            victim = workers[0]
            victim_id = worker_id(victim)
            lost = [s for s in opened if session_of(s).worker_id == victim_id]
            assert len(lost) == slots
            victim.kill()
            await eventually(
                lambda: all(session_of(s).state is SessionState.FAILED for s in lost),
                timeout=HEARTBEAT_TIMEOUT + 5, what="the victim's sessions fail",
            )  # fmt: skip
            lost_ids = {session_of(s).session_id for s in lost}
            await eventually(
                lambda: _no_slots(b, [victim_id]), timeout=10, interval=0.05, what="the victim's slots are freed"
            )
            await eventually(lambda: set(heard) >= lost_ids, what="every failure heard")
            # Let any second (wrong) announcement arrive before counting.
            await b.nc.flush()
            await anyio.sleep(1.0)
            for sid in lost_ids:
                assert await _stored_failed(b, sid) == 1, sid
            assert {sid: heard[sid] for sid in lost_ids} == dict.fromkeys(lost_ids, 1)
            survivors = [s for s in opened if session_of(s).worker_id != victim_id]
            assert all(session_of(s).state is SessionState.OPEN for s in survivors)
            assert not set(heard) - lost_ids
            await complete_all(survivors)
        finally:
            await core.unsubscribe()


# ---------------------------------------------------------------- 6. forged tokens


def _tamper(token: bytes) -> list[bytes]:
    body, _, sig = token.decode().partition(".")
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[len(raw) // 2] ^= 0x01
    altered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    other_sig = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    forged_body = base64.urlsafe_b64encode(b'{"w":"someone-else","h":"evil"}').decode().rstrip("=")
    return [
        f"{altered}.{sig}".encode(),  # the claim changed, the signature kept
        f"{body}.{other_sig}".encode(),  # the signature changed
        f"{forged_body}.{sig}".encode(),  # a claim of one's own
        f"{body}.".encode(),  # no signature
    ]


async def test_forged_or_altered_recreate_token_is_rejected_bad_token_by_the_broker(
    nats_server: Any, procs: ExitStack
) -> None:
    prefix, url = unique_prefix(), nats_server.url
    _, w = started_all(procs, broker(prefix, url), worker(prefix, url))
    async with bus.connect(url, prefix=prefix) as b:
        ctx = b.context()
        sctx = await bus.create_session(ctx, process_opts())
        info = session_of(sctx)
        await bus.complete_session(sctx)
        # The genuine token works (so the rejections below are about the tampering).
        again = await bus.recreate_session(ctx, info.recreate_token, process_opts())
        assert session_of(again).worker_id == info.worker_id == worker_id(w)
        assert session_of(again).session_id != info.session_id
        await bus.complete_session(again)
        for bad in _tamper(info.recreate_token):
            t0 = time.monotonic()
            with pytest.raises(bus.SessionCreationError) as caught:
                await bus.recreate_session(ctx, bad, process_opts(creation_timeout=30))
            assert caught.value.reason == "bad_token", (bad, caught.value)
            assert time.monotonic() - t0 < 30  # refused, not left to time out
        # The broker refused each (one stored rejection per request), nothing else was refused.
        rejected = b.subjects.filter("session", event="rejected")
        stored = await b.js.stream_info(b.topology.stream_name("session"), subjects_filter=rejected)
        assert len(stored.state.subjects or {}) == 4 and set((stored.state.subjects or {}).values()) == {1}
        await eventually(lambda: _no_slots(b, [worker_id(w)]), timeout=10, what="no slot taken")
        await eventually(lambda: counts(w)[0] == 0, what="the worker holds none")
