"""The limit: raw nats-py doing each scenario's message pattern with no cadenza code.

What each figure measures (the driver below, the stand-ins in :mod:`bench._limit_worker`, each in
its own process, on a nats-server of their own started like cadenza's embedded one):

(a) a session request stored on a work-queue stream (``js.publish``, awaited PubAck); the broker
    stand-in pull-consumes it, acks, picks a worker and publishes the answer on the requester's
    core subject; then one (b) round trip to that worker.
(b) the requester (subscribed first) stores a task on the worker's subject of a work-queue stream
    (without a reply subject, so no PubAck: cadenza's pattern since 0.2, whose worker's answer says
    the task was stored); the worker pull-consumes it, acks and publishes the result on the
    requester's core subject; the time until the result arrives.
(c) (b) from 1, 10 or 100 concurrent sessions spread over the workers, in one driver process.
(d) one core publish of a cancel message until the worker's subscription callback runs (10 ms between
    samples).
(e) workers publish a core heartbeat every timeout/3; the broker stand-in checks every 10 ms and
    announces a worker silent for the timeout; SIGKILL -> the announcement reaches the requester.
(f) the heartbeats of that design: one core message per worker per interval.
(g) the broker stand-in holding the sessions in a dict; workers hold nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from pathlib import Path

import anyio
import nats
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from ._common import Sizes, concurrently, now, rss_mb, wait_probe
from ._peer import Peer, notes_from
from ._procs import Proc, start_all, stop_all
from ._servers import Servers

__all__ = ("LimitPeer",)


class _Install:
    """One stream, a broker stand-in and workers on their own subject prefix."""

    def __init__(self, peer: LimitPeer, workers: int, hb_timeout: float) -> None:
        self.peer = peer
        self.prefix = f"lim{uuid.uuid4().hex[:8]}"
        self.stream = self.prefix.upper()
        self.hb_timeout = hb_timeout
        self.worker_ids = [f"w{i}" for i in range(workers)]
        self.broker: Proc | None = None
        self.workers: dict[str, Proc] = {}

    def _worker(self, wid: str) -> Proc:
        return Proc.module(
            "bench._limit_worker", "--role", "worker", "--url", self.peer.url, "--prefix", self.prefix,
            "--stream", self.stream, "--id", wid, "--probe", str(self.peer.probe),
            "--hb-interval", str(self.hb_timeout / 3), name=f"limit-{wid}",
        )  # fmt: skip

    async def start(self) -> None:
        js = self.peer.nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=self.stream, subjects=[f"{self.prefix}.task.>", f"{self.prefix}.create.>"],
                retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE, max_age=600,
                num_replicas=self.peer.servers.replicas,
            )
        )  # fmt: skip
        self.broker = Proc.module(
            "bench._limit_worker", "--role", "broker", "--url", self.peer.url, "--prefix", self.prefix,
            "--stream", self.stream, "--hb-timeout", str(self.hb_timeout), name="limit-broker",
        )  # fmt: skip
        # The broker first: it must hear every worker's first heartbeat.
        await start_all([self.broker])
        self.workers = {wid: self._worker(wid) for wid in self.worker_ids}
        await start_all(list(self.workers.values()))
        await self.wait_workers(len(self.workers))

    async def wait_workers(self, count: int) -> None:
        """Until the broker stand-in has heard every worker (it places sessions only on those)."""
        with anyio.fail_after(10):
            while True:
                msg = await self.peer.nc.request(f"{self.prefix}.workers", b"", timeout=5)
                if int(msg.data) >= count:
                    return
                await anyio.sleep(0.02)

    async def add_worker(self, wid: str) -> Proc:
        proc = self._worker(wid)
        await start_all([proc])
        self.workers[wid] = proc
        return proc

    async def stop(self) -> None:
        stop_all([p for p in [self.broker, *self.workers.values()] if p is not None])
        js = self.peer.nc.jetstream()
        await js.delete_stream(self.stream)


class LimitPeer(Peer):
    name = "limit"
    notes = notes_from(__doc__)

    def __init__(self, sizes: Sizes, workdir: Path, servers: Servers | None = None) -> None:
        super().__init__(sizes, workdir)
        #: The nats-server(s) it runs on: its own single server, or a cluster shared with cadenza.
        self.servers = servers or Servers(workdir / "limit-store")
        self._own_servers = servers is None
        self.url = ""
        self.probe = workdir / "limit-probes"
        self._pending: dict[str, asyncio.Future[dict[str, str]]] = {}
        self._ids = itertools.count()
        self.reply = f"limres.{uuid.uuid4().hex[:8]}"
        self.main: _Install | None = None

    async def start(self) -> None:
        self.probe.mkdir(parents=True, exist_ok=True)
        if self._own_servers:
            self.servers.start()
        self.url = self.servers.url
        self.nc = await nats.connect(servers=self.servers.urls, name="limit-driver")
        self.js = self.nc.jetstream()
        await self.nc.subscribe(self.reply, cb=self._on_result)
        self.main = _Install(self, self.sizes.workers, 20.0)
        await self.main.start()

    async def close(self) -> None:
        if self.main is not None:
            stop_all([p for p in [self.main.broker, *self.main.workers.values()] if p is not None])
        if getattr(self, "nc", None) is not None:
            if self.main is not None and not self._own_servers:
                # A shared cluster outlives this side: leave nothing of it behind.
                with anyio.move_on_after(10), contextlib.suppress(Exception):
                    await self.nc.jetstream().delete_stream(self.main.stream)
            await self.nc.close()
        if self._own_servers:
            self.servers.stop()

    async def _on_result(self, msg: Msg) -> None:
        body = json.loads(msg.data)
        fut = self._pending.pop(body["id"], None)
        if fut is not None and not fut.done():
            fut.set_result(body)

    async def _call(self, subject: str, *, acked: bool = True) -> dict[str, str]:
        """Store a request on ``subject`` (awaiting its PubAck if ``acked``) and wait for its answer."""
        rid = str(next(self._ids))
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        body = json.dumps({"id": rid, "r": self.reply}).encode()
        try:
            with anyio.fail_after(10):
                if acked:
                    await self.js.publish(subject, body)
                else:
                    await self.nc.publish(subject, body)
                return await fut
        finally:
            self._pending.pop(rid, None)

    async def _session(self, inst: _Install) -> str:
        answer = await self._call(f"{inst.prefix}.create.{uuid.uuid4().hex}")
        return answer["w"]

    async def _activity(self, inst: _Install, wid: str) -> None:
        await self._call(f"{inst.prefix}.task.{wid}", acked=False)

    # ---------------------------------------------------------------- scenarios

    async def create_first(self, n: int) -> list[float]:
        assert self.main is not None
        out = []
        for _ in range(n):
            t0 = now()
            wid = await self._session(self.main)
            await self._activity(self.main, wid)
            out.append(now() - t0)
        return out

    async def round_trip(self, n: int) -> list[float]:
        assert self.main is not None
        wid = await self._session(self.main)
        await self._activity(self.main, wid)  # warm
        out = []
        for _ in range(n):
            t0 = now()
            await self._activity(self.main, wid)
            out.append(now() - t0)
        return out

    async def throughput(self, sessions: int, ops: int) -> float:
        placed = await self.open_sessions(sessions)
        try:
            return await self.run_in_sessions(placed, ops)
        finally:
            await self.close_sessions(placed)

    async def open_sessions(self, sessions: int) -> list[str]:
        """Place ``sessions`` sessions (the worker id of each)."""
        assert self.main is not None
        return [await self._session(self.main) for _ in range(sessions)]

    async def run_in_sessions(self, placed: list[str], ops: int) -> float:
        """``ops // len(placed)`` activities one after another in each session, all sessions at once;
        activities per second."""
        main = self.main
        assert main is not None
        return await concurrently(len(placed), max(1, ops // len(placed)), lambda i: self._activity(main, placed[i]))

    async def close_sessions(self, placed: list[str]) -> None:
        """Nothing to end: the broker stand-in keeps sessions in a dict and never closes them."""

    async def cancel(self, n: int) -> list[float]:
        assert self.main is not None
        wid = await self._session(self.main)
        out = []
        for _ in range(n):
            cid = uuid.uuid4().hex
            t0 = now()
            await self.nc.publish(f"{self.main.prefix}.cancel.{wid}", cid.encode())
            seen = float(await wait_probe(self.probe, f"cancel-{cid}", timeout=10))
            out.append(seen - t0)
            await anyio.sleep(0.01)
        return out

    async def worker_loss(self, n: int, heartbeat_timeout: float) -> list[float]:
        out = []
        for _ in range(n):
            inst = _Install(self, 1, heartbeat_timeout)
            try:
                await inst.start()
                lost = anyio.Event()

                async def on_lost(_m: Msg, lost: anyio.Event = lost) -> None:
                    lost.set()

                sub = await self.nc.subscribe(f"{inst.prefix}.lost.w0", cb=on_lost)
                wid = await self._session(inst)
                await self._activity(inst, wid)
                # Kill at a random phase of the heartbeat interval, as a real crash would.
                await anyio.sleep(heartbeat_timeout / 3 * (uuid.uuid4().int % 1000) / 1000)
                inst.workers[wid].kill()
                t0 = now()
                with anyio.fail_after(heartbeat_timeout * 5):
                    await lost.wait()
                out.append(now() - t0)
                await sub.unsubscribe()
            finally:
                await inst.stop()
        return out

    async def heartbeats(
        self, sessions: int, workers: int, heartbeat_timeout: float, window: float
    ) -> dict[str, float]:
        inst = _Install(self, workers, heartbeat_timeout)
        try:
            await inst.start()
            for _ in range(sessions):
                await self._session(inst)
            counts = {"hb": 0, "all": 0}

            async def on_hb(_m: Msg) -> None:
                counts["hb"] += 1

            async def on_all(_m: Msg) -> None:
                counts["all"] += 1

            s1 = await self.nc.subscribe(f"{inst.prefix}.hb.*", cb=on_hb)
            s2 = await self.nc.subscribe(">", cb=on_all)
            await anyio.sleep(window)
            await s1.unsubscribe()
            await s2.unsubscribe()
            return {"heartbeats/s": counts["hb"] / window, "messages/s": counts["all"] / window}
        finally:
            await inst.stop()

    async def memory(self, sessions: int, workers: int) -> dict[str, float]:
        inst = _Install(self, workers, 20.0)
        try:
            await inst.start()
            sem = anyio.Semaphore(100)

            async def one() -> None:
                async with sem:
                    await self._session(inst)

            async with anyio.create_task_group() as tg:
                for _ in range(sessions):
                    tg.start_soon(one)
            assert inst.broker is not None
            return {
                "broker": inst.broker.rss(),
                "worker": max(p.rss() for p in inst.workers.values()),
                "server": max(rss_mb(pid) for pid in self.servers.pids().values()),
            }
        finally:
            await inst.stop()
