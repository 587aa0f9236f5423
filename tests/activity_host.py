"""A handler process for the activity fault tests: one tracked activity, run until killed or completed.

``python -m tests.activity_host --prefix P --interval S --mode MODE`` starts one activity and
prints ``activity <id>`` then ``cadenza: ready``; modes: ``sleep`` (runs until killed), ``lines N``
(writes N lines through one writer, one every few ms, then completes).
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

import bus


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
