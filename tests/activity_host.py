"""Helpers of the activity tests, and a handler process for the fault tests (no tests here).

``python -m tests.test_activity_host --prefix P --interval S --mode MODE`` starts one activity and
prints ``activity <id>`` then ``cadenza: ready``; modes: ``sleep`` (runs until killed), ``lines N``
(writes N lines through one writer, one every few ms, then completes).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

import bus
from schemas import ActivityRecord, MessageRecord
from services.recorder import Recorder, RecorderConfig

FAST = RecorderConfig(sweep_interval=0.1, prune_interval=3600)


@asynccontextmanager
async def running_recorder(b: bus.Bus, config: RecorderConfig = FAST) -> AsyncIterator[Recorder]:
    """An in-process recorder for the duration of the block."""
    rec = Recorder(b, config)
    async with anyio.create_task_group() as tg:
        await tg.start(rec.run)
        yield rec
        tg.cancel_scope.cancel()


async def wait_record(
    b: bus.Bus, activity_id: str, until: Callable[[ActivityRecord], bool], *, timeout: float = 10.0
) -> tuple[ActivityRecord, list[MessageRecord]]:
    """Poll the recorder's ``get`` until ``until(record)``; returns the record and its messages."""
    client = bus.ActivityClient(b)
    last: ActivityRecord | None = None
    try:
        with anyio.fail_after(timeout):
            while True:
                try:
                    reply = await client.get(activity_id, limit=0)
                    last = reply.activity
                    if until(reply.activity):
                        reply = await client.get(activity_id)
                        return reply.activity, reply.messages
                except bus.RemoteError as exc:
                    if exc.remote_code != "not_found":
                        raise
                except bus.RequestError:
                    pass  # no reply in time: a recorder busy folding a large backlog answers late; ask again
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"activity {activity_id} never matched; last seen: {last!r}") from None


def terminal(r: ActivityRecord) -> bool:
    return r.terminal


async def _host(args: argparse.Namespace) -> None:
    async with bus.connect(prefix=args.prefix, name="activity-host") as b:
        async with bus.BusActivityService(b, heartbeat_interval=args.interval) as svc:
            record = await svc.start_activity(bus.StartRequest(type="host-test"))
            work = await svc.track(bus.background(), record.id)
            print(f"activity {record.id}", flush=True)
            print(f"worker {svc.worker_id}", flush=True)
            print("cadenza: ready", flush=True)
            if args.mode == "sleep":
                with work.token.scope():
                    await anyio.sleep(3600)
                err = bus.ActivityCancelledError(work.cause) if work.cause else None
                await bus.complete_handler_activity(work, svc, record.id, "done", err)
                print("completed", flush=True)
                return
            w = bus.new_writer(work, svc)
            for i in range(args.lines):
                w.write(f"line {i}\n")
                if i % 100 == 0:
                    await anyio.sleep(0.005)
            await bus.flush_writer(w, timeout=60)
            await svc.complete_activity(record.id, bus.ActivityStatus.SUCCESS, "done")
            print("completed", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--prefix", required=True)
    p.add_argument("--interval", type=float, default=0.3)
    p.add_argument("--mode", choices=("sleep", "lines"), default="sleep")
    p.add_argument("--lines", type=int, default=0)
    args = p.parse_args()
    if not os.environ.get("NATS_URL"):
        print("NATS_URL must be set", file=sys.stderr)
        return 2
    anyio.run(_host, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
