"""The demo worker: a few readable activities, served on tasklist ``demo``.

``python -m services.demo.worker --prefix P`` (or ``cadenza worker services.demo.worker:activities
--tasklist demo``) prints ``cadenza: ready worker <worker_id> ...`` once it serves.

Activities:

* ``download(url, chunks=5, delay=0.3)``: writes a progress line per chunk through
  ``bus.activity_writer()`` and returns what it "downloaded".
* ``transcode(name, seconds=10, step=0.5)``: writes a line per frame; when cancelled it writes where
  it stopped and why, then lets the cancellation end it.
* ``where()``: the worker id, host and pid that ran it, and the session it ran in.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import anyio

import bus
from services._runtime import add_server_args, announce_ready, run_service, service_bus, start_process, stop_process

__all__ = ("activities", "download", "main", "transcode", "where")

#: The activities ``cadenza worker services.demo.worker:activities`` serves.
activities = bus.ActivityRegistry()

#: This process's worker id once :func:`main` started the worker ("" under ``cadenza worker``).
_worker_id = ""


async def download(url: str, chunks: int = 5, delay: float = 0.3) -> dict[str, Any]:
    """Pretend to download ``url`` in ``chunks`` parts, one progress line each."""
    out = bus.activity_writer()
    chunks = max(1, min(int(chunks), 1000))
    for i in range(1, chunks + 1):
        await anyio.sleep(delay)
        out.write(f"downloading {url}: {i * 100 // chunks}% ({i}/{chunks} MiB)\n")
    return {"url": url, "bytes": chunks * 1_048_576, **_here()}


async def transcode(name: str, seconds: float = 10.0, step: float = 0.5) -> str:
    """Pretend to transcode ``name`` for ``seconds``, a line per frame; honours cancellation."""
    out = bus.activity_writer()
    frames = max(1, int(seconds / step))
    frame = 0
    try:
        for frame in range(1, frames + 1):
            await anyio.sleep(step)
            out.write(f"{name}: frame {frame}/{frames}\n")
    except anyio.get_cancelled_exc_class():
        cause = bus.activity_context().cause
        out.write(f"{name}: stopped at frame {frame}/{frames} ({cause.text() if cause else 'cancelled'})\n")
        raise
    return f"{name}.mp4"


async def where() -> dict[str, Any]:
    """Which worker, host and process ran this (and in which session)."""
    return _here()


# Registered by call rather than decorator: ActivityRegistry.activity() is typed as returning Any,
# which mypy reports as an untyped decorator.
for _fn in (download, transcode, where):
    activities.activity()(_fn)


def _here() -> dict[str, Any]:
    ctx = bus.activity_context()
    info = ctx.session
    worker_id = getattr(info, "worker_id", "") or _worker_id
    return {
        "worker_id": worker_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "session_id": getattr(info, "session_id", ""),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.demo.worker", description="the cadenza demo worker")
    add_server_args(p)
    p.add_argument("--tasklist", default="demo", help="tasklist to serve (default: demo)")
    p.add_argument("--max-sessions", type=int, default=100, help="max_concurrent_sessions (default: 100)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0,
                   help="seconds between heartbeats (default 1: heartbeat_timeout >= 2 fits)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    async def go() -> None:
        global _worker_id
        async with service_bus(args, "demo-worker") as b:
            worker = bus.Worker(
                b, tasklist=args.tasklist, max_concurrent_sessions=args.max_sessions,
                heartbeat_interval=args.heartbeat_interval, activities=activities,
            )  # fmt: skip
            _worker_id = worker.worker_id
            async with worker:
                announce_ready(f"worker {worker.worker_id} tasklist {args.tasklist} pid {os.getpid()} "
                               f"activities {', '.join(sorted(activities))}")  # fmt: skip
                await anyio.sleep_forever()

    start_process("worker", args)
    try:
        return run_service(go)
    finally:
        stop_process()


if __name__ == "__main__":
    sys.exit(main())
