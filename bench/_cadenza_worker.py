"""cadenza's bench worker: ``python -m bench._cadenza_worker --server URL --prefix P --probe DIR``.

A session worker (:class:`bus.Worker` with ``enable_sessions=True``) of one tasklist, serving two
activities:

- ``work``: returns at once (the time it ran, CLOCK_MONOTONIC);
- ``wait_cancel(name)``: notes that it started, waits until its context is cancelled and notes the
  moment the cancel reached it (scenario (d)).

Activities are tracked (``track_activities=True``, the default): every activity publishes its
started and completed events for the recorder, as every session activity of a real deployment does.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import anyio

import bus
from bench._common import write_probe


async def _main(args: argparse.Namespace) -> None:
    async with bus.connect(args.server, prefix=args.prefix, name="bench-worker") as b:
        worker = bus.Worker(
            b, tasklist=args.tasklist, enable_sessions=True, max_concurrent_sessions=args.max_sessions,
            heartbeat_interval=args.heartbeat_interval, track_activities=not args.untracked,
        )  # fmt: skip

        @worker.activity("work")
        async def work(*_args: Any) -> float:
            return time.monotonic()

        @worker.activity("wait_cancel")
        async def wait_cancel(name: str) -> None:
            write_probe(args.probe, f"started-{name}", str(os.getpid()))
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                write_probe(args.probe, f"cancel-{name}", repr(time.monotonic()))
                raise

        async with worker:
            print("cadenza: ready", worker.worker_id, flush=True)
            await anyio.sleep_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--probe", required=True)
    ap.add_argument("--tasklist", default="bench")
    ap.add_argument("--max-sessions", type=int, default=1000)
    ap.add_argument("--heartbeat-interval", type=float, default=5.0)
    ap.add_argument("--untracked", action="store_true", help="track_activities=False (no activity events)")
    args = ap.parse_args()
    from services._runtime import run_service

    raise SystemExit(run_service(lambda: _main(args)))


if __name__ == "__main__":
    main()
