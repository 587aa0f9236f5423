"""A worker for the console's tests: one activity that reports progress and streams lines.

``python -m tests.console_worker --prefix P --tasklist T`` prints ``cadenza: ready worker <id>``
once it serves (the browser test runs it as a real process and SIGKILLs it).
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

import bus
from bus.sessions._activity import _current  # the running activity's tracker: there is no public progress call yet
from services._runtime import add_server_args, announce_ready, run_service, service_bus

activities = bus.ActivityRegistry()


async def render(name: str, frames: int = 100, delay: float = 0.2) -> str:
    """Render ``frames`` frames: a line and a progress step each; honours cancellation."""
    run = _current.get()
    assert run is not None
    out = bus.activity_writer()
    for frame in range(1, frames + 1):
        await anyio.sleep(delay)
        out.write(f"{name}: frame {frame}/{frames}\n")
        step = "encoding" if frame * 2 > frames else "rendering"
        await run.service.update_activity(
            run.task.activity_id, bus.UpdateRequest(progress=100.0 * frame / frames, step=step)
        )
    return f"{name}.mp4"


activities.activity()(render)


def main() -> int:
    p = argparse.ArgumentParser()
    add_server_args(p)
    p.add_argument("--tasklist", default="console")
    p.add_argument("--heartbeat-interval", type=float, default=0.25)
    args = p.parse_args()

    async def go() -> None:
        async with service_bus(args, "console-test-worker") as b:
            worker = bus.Worker(b, tasklist=args.tasklist, max_concurrent_sessions=4,
                                heartbeat_interval=args.heartbeat_interval, activities=activities)  # fmt: skip
            async with worker:
                announce_ready(f"worker {worker.worker_id} pid {os.getpid()}")
                await anyio.sleep_forever()

    return run_service(go)


if __name__ == "__main__":
    sys.exit(main())
