"""A load-generating caller in its own process, for tests/test_cluster_chaos.py (no tests here).

``python -m tests.chaos_caller --prefix P --concurrency N --execution-timeout S`` runs N loops, each:
create a session, run two ``echo`` activities in it, publish a tracked activity of its own (its
``started`` and ``completed`` events, each through ``Bus.publish``), complete the session (every
fifth is left open on purpose, for the broker's execution-timeout sweep, at most one per loop at a
time). It prints ``cadenza: ready
caller`` and then one line per fact the test checks:

- ``opened <session_id> <worker_id> <seconds>``: a creation that succeeded, and how long it took;
- ``create_failed <seconds> <error type>: <text>``;
- ``result <activity_id> <session_id>``: the caller got the activity's result;
- ``activity_error <activity_id> <error type>: <text>``;
- ``ack <event_id> <subject>``: JetStream acknowledged this publish (it must be stored);
- ``publish_failed <event_id> <error type>``;
- ``completed <session_id>`` / ``left_open <session_id>``.
"""

from __future__ import annotations

import argparse
import time
import uuid

import anyio

import bus
from schemas import ActivityCompleted, ActivityStarted, ActivityStatus
from services._runtime import announce_ready, run_service


def _say(*words: object) -> None:
    print(" ".join(str(w).replace("\n", " ") for w in words), flush=True)


async def _publish(b: bus.Bus, event: ActivityStarted | ActivityCompleted) -> bool:
    try:
        await b.publish(event)
    except bus.CadenzaError as exc:
        _say("publish_failed", event.event_id, type(exc).__name__)
        return False
    _say("ack", event.event_id, b.subject_of(event))
    return True


async def _tracked(b: bus.Bus) -> None:
    aid = str(uuid.uuid4())
    started = ActivityStarted(event_id=f"{aid}.started", activity_id=aid, activity_type="chaos_probe", rev=1)
    if await _publish(b, started):
        done = ActivityCompleted(event_id=f"{aid}.completed", activity_id=aid, status=ActivityStatus.SUCCESS, rev=2)
        await _publish(b, done)


async def _loop(b: bus.Bus, args: argparse.Namespace, n: int) -> None:
    options = bus.SessionOptions(
        execution_timeout=args.execution_timeout, creation_timeout=args.creation_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
    )  # fmt: skip
    ctx = b.context()
    round_ = 0
    # At most one session of this loop left open at a time: how many slots they hold must not grow
    # with the throughput (at 8 sessions/s, every fifth left open for 15 s would fill 18 slots).
    open_until = 0.0
    while True:
        round_ += 1
        t0 = time.monotonic()
        try:
            sctx = await bus.create_session(ctx, options)
        except bus.CadenzaError as exc:
            _say("create_failed", f"{time.monotonic() - t0:.3f}", f"{type(exc).__name__}: {exc}")
            await anyio.sleep(0.2)
            continue
        info = bus.get_session_info(sctx)
        assert info is not None
        _say("opened", info.session_id, info.worker_id, f"{time.monotonic() - t0:.3f}")
        for _ in range(2):
            aid = str(uuid.uuid4())
            try:
                await bus.execute_activity(sctx, "echo", aid, activity_id=aid,
                                           start_to_close_timeout=args.activity_timeout)  # fmt: skip
            except bus.CadenzaError as exc:
                _say("activity_error", aid, f"{type(exc).__name__}: {exc}")
                break
            _say("result", aid, info.session_id)
        await _tracked(b)
        if (round_ + n) % 5 == 0 and time.monotonic() >= open_until:
            open_until = time.monotonic() + args.execution_timeout + 5.0
            _say("left_open", info.session_id)
            continue
        try:
            await bus.complete_session(sctx)
            _say("completed", info.session_id)
        except bus.CadenzaError as exc:
            _say("complete_failed", info.session_id, f"{type(exc).__name__}: {exc}")
        await anyio.sleep(args.pause)


async def _main(args: argparse.Namespace) -> None:
    async with bus.connect(prefix=args.prefix, name="chaos-caller") as b, anyio.create_task_group() as tg:
        announce_ready("caller")
        for n in range(args.concurrency):
            tg.start_soon(_loop, b, args, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--execution-timeout", type=float, default=15.0)
    ap.add_argument("--creation-timeout", type=float, default=10.0)
    ap.add_argument("--heartbeat-timeout", type=float, default=3.0)
    ap.add_argument("--activity-timeout", type=float, default=15.0)
    ap.add_argument("--pause", type=float, default=0.1)
    raise SystemExit(run_service(lambda: _main(ap.parse_args())))


if __name__ == "__main__":
    main()
