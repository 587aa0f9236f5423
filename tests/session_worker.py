"""A session worker in its own process, for tests that kill or stop it (no tests here).

``python -m tests.session_worker --prefix P --tasklist T --max-sessions N --interval S`` serves the
activities below and prints ``cadenza: ready worker <worker_id>``. Every change of its own session
count is printed as ``sessions <open> peak <peak>`` (so a test reads the worker's count, not the
broker's).

Activities: ``echo(x)`` returns x; ``where()`` returns the worker id; ``sleep(seconds)`` sleeps in
its cancel scope (after printing ``running <activity_id>``) and returns "slept"; ``boom(text)``
raises RuntimeError(text).
"""

from __future__ import annotations

import argparse
import os

import anyio

import bus
from services._runtime import announce_ready, run_service

registry = bus.ActivityRegistry()


@registry.activity()
async def echo(x: object) -> object:
    return x


@registry.activity()
async def where() -> str:
    info = bus.activity_context().session
    return str(getattr(info, "worker_id", "")) or os.environ.get("CADENZA_WORKER_ID", "")


@registry.activity()
async def sleep(seconds: float) -> str:
    print(f"running {bus.activity_context().activity_id}", flush=True)
    await anyio.sleep(seconds)
    return "slept"


@registry.activity()
async def boom(text: str) -> None:
    raise RuntimeError(text)


async def _main(args: argparse.Namespace) -> None:
    async with bus.connect(prefix=args.prefix, name="session-worker") as b:
        worker = bus.Worker(
            b, tasklist=args.tasklist, max_concurrent_sessions=args.max_sessions,
            heartbeat_interval=args.interval, activities=registry, announce_after=args.announce_after,
        )  # fmt: skip
        os.environ["CADENZA_WORKER_ID"] = worker.worker_id
        async with worker:
            announce_ready(f"worker {worker.worker_id}")
            last = (-1, -1)
            while True:
                now = (worker.open_sessions, worker.peak_sessions)
                if now != last:
                    print(f"sessions {now[0]} peak {now[1]}", flush=True)
                    last = now
                await anyio.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--tasklist", default="default")
    ap.add_argument("--max-sessions", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--announce-after", type=float, default=0.5)
    raise SystemExit(run_service(lambda: _main(ap.parse_args())))


if __name__ == "__main__":
    main()
