"""The limit's stand-ins: raw nats-py, no cadenza code. Run as ``python -m bench._limit_worker``.

``--role worker``: pull-consumes its own task subject ``<p>.task.<id>`` of a work-queue stream,
acks each task and publishes the result on the core subject the task names; listens on the core
subject ``<p>.cancel.<id>`` and notes the moment the callback runs; publishes one core heartbeat
``<p>.hb.<id>`` per interval.

``--role broker``: pull-consumes ``<p>.create.>`` (a session request stored on the same stream),
acks it, places the session on the next worker, keeps it in a dict, answers on the core subject the
request names; follows the heartbeats and publishes ``<p>.lost.<id>`` when a worker has missed
them for the heartbeat timeout (checked every 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time

import nats
import nats.errors
from nats.js.api import ConsumerConfig

from ._common import write_probe


async def _worker(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, name=f"limit-{args.id}")
    js = nc.jetstream()
    p = args.prefix

    async def on_cancel(msg: nats.aio.msg.Msg) -> None:
        seen = time.monotonic()
        write_probe(args.probe, f"cancel-{msg.data.decode()}", repr(seen))

    await nc.subscribe(f"{p}.cancel.{args.id}", cb=on_cancel)
    durable = f"w_{args.id}"
    sub = await js.pull_subscribe(
        f"{p}.task.{args.id}", durable=durable, stream=args.stream,
        config=ConsumerConfig(ack_wait=30, max_ack_pending=10_000),
    )  # fmt: skip

    async def beat() -> None:
        while True:
            await nc.publish(f"{p}.hb.{args.id}", args.id.encode())
            await asyncio.sleep(args.hb_interval)

    beats = asyncio.create_task(beat())
    print("cadenza: ready", args.id, flush=True)
    try:
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                task = json.loads(msg.data)
                await msg.ack()
                await nc.publish(task["r"], json.dumps({"id": task["id"], "w": args.id}).encode())
    finally:
        beats.cancel()
        await nc.close()


async def _broker(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, name="limit-broker")
    js = nc.jetstream()
    p = args.prefix
    last: dict[str, float] = {}
    sessions: dict[str, str] = {}
    workers: list[str] = []
    turn = 0

    async def on_beat(msg: nats.aio.msg.Msg) -> None:
        wid = msg.data.decode()
        if wid not in last:
            workers.append(wid)
        last[wid] = time.monotonic()

    async def on_count(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(str(len(workers)).encode())

    await nc.subscribe(f"{p}.hb.*", cb=on_beat)
    await nc.subscribe(f"{p}.workers", cb=on_count)
    sub = await js.pull_subscribe(
        f"{p}.create.>", durable="broker", stream=args.stream,
        config=ConsumerConfig(ack_wait=30, max_ack_pending=10_000),
    )  # fmt: skip

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.01)
            deadline = time.monotonic() - args.hb_timeout
            for wid, t in list(last.items()):
                if t < deadline:
                    del last[wid]
                    workers.remove(wid)
                    await nc.publish(f"{p}.lost.{wid}", wid.encode())

    watcher = asyncio.create_task(watch())
    print("cadenza: ready broker", flush=True)
    try:
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                req = json.loads(msg.data)
                await msg.ack()
                wid = req.get("w") or (workers[turn % len(workers)] if workers else "")
                turn += 1
                sessions[req["id"]] = wid
                await nc.publish(req["r"], json.dumps({"id": req["id"], "w": wid}).encode())
    finally:
        watcher.cancel()
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=("worker", "broker"), required=True)
    ap.add_argument("--url", default=os.environ.get("NATS_URL", ""))
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--id", default="broker")
    ap.add_argument("--probe", default="")
    ap.add_argument("--hb-interval", type=float, default=1.0)
    ap.add_argument("--hb-timeout", type=float, default=3.0)
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    task = loop.create_task(_worker(args) if args.role == "worker" else _broker(args))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)


if __name__ == "__main__":
    main()
