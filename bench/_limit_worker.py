"""The limit's stand-ins: raw nats-py, no cadenza code. Run as ``python -m bench._limit_worker``.

``--role worker``: pull-consumes (continuous pull) its own task subject ``<p>.task.<id>`` of a work-queue stream,
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
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from ._common import new_event_loop, write_probe

_BATCH = 128


def _urls(text: str) -> list[str]:
    """``--url``: one URL, or a cluster's URLs comma-joined."""
    return [u.strip() for u in text.split(",") if u.strip()]


async def _pull_forever(nc: NATS, stream: str, durable: str, handle: object) -> None:
    """Continuous pull: keep pull requests outstanding and handle each message as it arrives.

    nats-py's ``fetch`` ends a long poll before it asks again, and a message that lands in that gap
    waits (we measured 250 ms and more); a floor must not carry that. This is the JetStream pull
    protocol itself (what nats.go's ``Consume`` does): a request for ``_BATCH`` messages, renewed
    when half of it is used or when the server says it expired.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"

    async def pull() -> None:
        req = {"batch": _BATCH, "expires": 5_000_000_000}
        await nc.publish(subject, json.dumps(req).encode(), reply=inbox)

    await pull()
    credit = _BATCH
    async for msg in sub.messages:
        if not msg.data and msg.headers and msg.headers.get("Status"):
            # 408 (expired), 409, 404: that request is over; ask again.
            await pull()
            credit = _BATCH
            continue
        credit -= 1
        if credit <= _BATCH // 2:
            await pull()
            credit += _BATCH
        await handle(msg)  # type: ignore[operator]


async def _worker(args: argparse.Namespace) -> None:
    nc = await nats.connect(servers=_urls(args.url), name=f"limit-{args.id}")
    js = nc.jetstream()
    p = args.prefix

    async def on_cancel(msg: Msg) -> None:
        seen = time.monotonic()
        write_probe(args.probe, f"cancel-{msg.data.decode()}", repr(seen))

    await nc.subscribe(f"{p}.cancel.{args.id}", cb=on_cancel)
    durable = f"w_{args.id}"
    await js.add_consumer(
        args.stream,
        ConsumerConfig(durable_name=durable, filter_subject=f"{p}.task.{args.id}", ack_wait=30, max_ack_pending=10_000),
    )

    async def on_task(msg: Msg) -> None:
        task = json.loads(msg.data)
        await msg.ack()
        await nc.publish(task["r"], json.dumps({"id": task["id"], "w": args.id}).encode())

    async def beat() -> None:
        while True:
            await nc.publish(f"{p}.hb.{args.id}", args.id.encode())
            await asyncio.sleep(args.hb_interval)

    beats = asyncio.create_task(beat())
    print("cadenza: ready", args.id, flush=True)
    try:
        await _pull_forever(nc, args.stream, durable, on_task)
    finally:
        beats.cancel()
        await nc.close()


async def _broker(args: argparse.Namespace) -> None:
    nc = await nats.connect(servers=_urls(args.url), name="limit-broker")
    js = nc.jetstream()
    p = args.prefix
    last: dict[str, float] = {}
    sessions: dict[str, str] = {}
    workers: list[str] = []
    turn = 0

    async def on_beat(msg: Msg) -> None:
        wid = msg.data.decode()
        if wid not in last:
            workers.append(wid)
        last[wid] = time.monotonic()

    async def on_count(msg: Msg) -> None:
        await msg.respond(str(len(workers)).encode())

    await nc.subscribe(f"{p}.hb.*", cb=on_beat)
    await nc.subscribe(f"{p}.workers", cb=on_count)
    await js.add_consumer(
        args.stream,
        ConsumerConfig(durable_name="broker", filter_subject=f"{p}.create.>", ack_wait=30, max_ack_pending=10_000),
    )

    async def on_create(msg: Msg) -> None:
        nonlocal turn
        req = json.loads(msg.data)
        await msg.ack()
        wid = req.get("w") or (workers[turn % len(workers)] if workers else "")
        turn += 1
        sessions[req["id"]] = wid
        await nc.publish(req["r"], json.dumps({"id": req["id"], "w": wid}).encode())

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
        await _pull_forever(nc, args.stream, "broker", on_create)
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
    loop = new_event_loop()
    task = loop.create_task(_worker(args) if args.role == "worker" else _broker(args))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)


if __name__ == "__main__":
    main()
