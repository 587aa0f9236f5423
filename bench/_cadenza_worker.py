"""cadenza's bench worker: ``python -m bench._cadenza_worker --server URL --prefix P --probe DIR``.

With the session worker runtime of #4 (``bus.Worker``) it runs a session worker of tasklist
``bench`` with three activities: ``work`` (returns at once), ``wait_cancel`` (waits until its context
is cancelled and notes when) and nothing else. Without it (``--cancel-only``, or when ``bus.Worker``
is absent), it runs cadenza's cancel path as it is today: a :class:`bus.CancelRouter` that cancels
registered tokens, for scenario (d).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import anyio

import bus
from bench._common import write_probe


async def _cancel_only(b: bus.Bus, probe: str) -> None:
    """(d) on the foundation alone: a task registered with the router waits for its cancel."""
    router = bus.CancelRouter(b)
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)

        async def on_start(msg: Any) -> None:
            name = msg.data.decode()
            tg.start_soon(_wait_cancel_token, router, name, probe)

        sub = await b.nc.subscribe(f"{b.subjects.prefix}.bench.start", cb=on_start)
        print("cadenza: ready (cancel router)", flush=True)
        try:
            await anyio.sleep_forever()
        finally:
            await sub.unsubscribe()


async def _wait_cancel_token(router: bus.CancelRouter, name: str, probe: str) -> None:
    token = bus.CancelToken()
    with router.register(name, token):
        write_probe(probe, f"started-{name}", name)
        with token.scope():
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                write_probe(probe, f"cancel-{name}", repr(time.monotonic()))
                raise


async def _session_worker(b: bus.Bus, args: argparse.Namespace) -> None:
    worker_cls = bus.Worker  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {"tasklist": args.tasklist, "enable_sessions": True,
                              "max_concurrent_sessions": args.max_sessions}  # fmt: skip
    if args.heartbeat_interval:
        kwargs["heartbeat_interval"] = args.heartbeat_interval
    worker = worker_cls(b, **kwargs)

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
        print("cadenza: ready", getattr(worker, "worker_id", ""), flush=True)
        await anyio.sleep_forever()


async def _main(args: argparse.Namespace) -> None:
    async with bus.connect(args.server, prefix=args.prefix, name="bench-worker") as b:
        if args.cancel_only or not hasattr(bus, "Worker"):
            await _cancel_only(b, args.probe)
        else:
            await _session_worker(b, args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--probe", required=True)
    ap.add_argument("--tasklist", default="bench")
    ap.add_argument("--max-sessions", type=int, default=1000)
    ap.add_argument("--heartbeat-interval", type=float, default=0.0)
    ap.add_argument("--cancel-only", action="store_true")
    args = ap.parse_args()
    from services._runtime import run_service

    raise SystemExit(run_service(lambda: _main(args)))


if __name__ == "__main__":
    main()
