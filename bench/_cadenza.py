"""cadenza in the benchmark: an embedded nats-server, the broker and recorder services and session
workers (:mod:`bench._cadenza_worker`), each in its own process; the caller is this process.

What each figure measures (the same patterns as the limit, through cadenza's API):

(a) ``create_session`` then ``execute_activity`` in it, until the result is back in the caller.
(b) ``execute_activity`` in an open session, one after another; caller-side round trip. Activities
    are tracked (the worker sends one ``completed`` event, carrying the start, with its PubAck routed
    to the caller, and answers at once; the caller returns once that PubAck says stored, and acks the
    task; the recorder folds the completion from the stream).
(c) (b) from 1, 10 or 100 concurrent sessions, all opened before the clock starts.
(d) ``execute_activity`` of an activity that waits in the session's worker; the caller's context
    is cancelled (the call publishes the stored cancel event; the worker's router cancels the
    activity's scope); the time until the activity sees the cancel. 10 ms between samples, as
    the limit pauses (back to back, a sample's cancel met the last one's trailing work).
(e) SIGKILL of the worker holding a session (heartbeats every timeout/3) -> the caller's next
    ``execute_activity`` in it raises ``SessionFailedError`` (the broker declares the worker lost
    from missed heartbeats and announces the session failed).
(f) messages on ``<prefix>.worker.*.heartbeat`` and on everything (``>``) while the sessions idle.
(g) resident memory of the broker, the largest worker and nats-server with the sessions open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import uuid
from pathlib import Path
from typing import Any

import anyio

import bus

from ._common import Sizes, concurrently, now, rss_mb, wait_probe
from ._peer import Peer, notes_from
from ._procs import Proc, start_all, stop_all
from ._servers import Servers

__all__ = ("CadenzaPeer", "UntrackedCadenzaPeer")

_log = logging.getLogger("bench")
#: Seconds after the workers are up before the first measured activity (see :meth:`CadenzaPeer.start`).
_ROUTER_MARGIN = 2.5
#: Seconds between the recorder's prune passes (its default is 60): in steady state every quick
#: activity is pruned once, and a pass every minute fell inside few of the bench's rounds of a few
#: seconds, so their figures mostly left that cost out (docs/performance.md, "The recorder's prune
#: pass"). Every 5 s, each round carries about its own activities' share of it.
PRUNE_INTERVAL = 5.0
_USER_CANCEL = bus.CancelCause(kind=bus.CancelKind.USER, who="bench", reason="cancel latency")


class CadenzaPeer(Peer):
    name = "cadenza"
    notes = notes_from(__doc__)
    #: Worker flags (:class:`UntrackedCadenzaPeer` turns activity tracking off).
    worker_flags: tuple[str, ...] = ()

    def __init__(self, sizes: Sizes, workdir: Path, servers: Servers | None = None) -> None:
        super().__init__(sizes, workdir)
        #: The nats-server(s) it runs on: its own single server, or a cluster shared with the limit.
        self.servers = servers or Servers(workdir / "store")
        self._own_servers = servers is None
        self.procs: list[Proc] = []
        self.probe = workdir / "probes"
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.meta: dict[str, object] = {"recorder_prune_interval_s": PRUNE_INTERVAL}
        self._stack = contextlib.AsyncExitStack()
        # A fresh signing key for recreate tokens, per run (the broker would otherwise make one in KV).
        self._env = {"CADENZA_TOKEN_KEY": secrets.token_hex(32), "CADENZA_LOG": "WARNING"}
        if self.servers.cluster:
            # Every process creates (or checks) the streams and buckets with this many replicas.
            self._env["CADENZA_REPLICAS"] = str(self.servers.replicas)

    async def start(self) -> None:
        self.probe.mkdir(parents=True, exist_ok=True)
        if self._own_servers:
            self.servers.start()
        self.url = self.servers.url
        self.bus = await self._stack.enter_async_context(
            bus.connect(self.url, prefix=self.prefix, name="bench", replicas=self.servers.replicas)
        )
        args = ("--server", self.url, "--prefix", self.prefix)
        self.procs += await start_all([
            Proc.module("services.broker", *args, env=self._env),
            Proc.module("services.recorder", *args, "--prune-interval", str(PRUNE_INTERVAL), env=self._env),
        ])  # fmt: skip
        self.procs += await start_all([self._worker() for _ in range(self.sizes.workers)])
        # A worker's cancel router asks the cancel stream about each task sent within 2 s of its own
        # start (a cancel published then may have come before it listened: bus._cancel.seen_since),
        # one request per activity more: a start-up cost, kept out of the steady-state figures.
        await anyio.sleep(_ROUTER_MARGIN)

    async def check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.alive:
                continue
            code = proc.proc.poll() if proc.proc is not None else None
            tail = "".join(proc.output[-40:])
            _log.warning("%s (pid %s) died with code %s; restarting it. Its last output:\n%s",
                         proc.name, proc.proc.pid if proc.proc else "?", code, tail)  # fmt: skip
            restarts = self.meta.setdefault("restarts", [])
            assert isinstance(restarts, list)
            restarts.append(f"{proc.name} exited with code {code}: {' | '.join(proc.output[-3:])[-300:]}")
            self.procs[i] = (await start_all([proc.fresh()]))[0]

    def _worker(self, *, tasklist: str = "bench", max_sessions: int = 1000, interval: float = 5.0) -> Proc:
        return Proc.module(
            "bench._cadenza_worker", "--server", self.url, "--prefix", self.prefix, "--tasklist", tasklist,
            "--probe", str(self.probe), "--max-sessions", str(max_sessions), "--heartbeat-interval", str(interval),
            *self.worker_flags, env=self._env, name="cadenza-worker",
        )  # fmt: skip

    async def close(self) -> None:
        stop_all(self.procs, timeout=5)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._stack.aclose()
        if self._own_servers:
            self.servers.stop()

    # ---------------------------------------------------------------- the session API, in one place

    async def _open(self, heartbeat_timeout: float = 20.0, tasklist: str = "bench") -> bus.Context:
        options = bus.SessionOptions(
            execution_timeout=3600, creation_timeout=30, heartbeat_timeout=heartbeat_timeout, tasklist=tasklist
        )
        return await bus.create_session(self.bus.context(), options)

    async def _run(self, ctx: bus.Context, name: str, *args: Any) -> Any:
        return await bus.execute_activity(ctx, name, *args, start_to_close_timeout=60)

    async def _close(self, ctx: bus.Context) -> None:
        await bus.complete_session(ctx)

    async def _open_many(
        self, sessions: int, tasklist: str = "bench", heartbeat_timeout: float = 20.0
    ) -> list[bus.Context]:
        ctxs: list[bus.Context] = []
        sem = anyio.Semaphore(100)

        async def one() -> None:
            async with sem:
                ctxs.append(await self._open(heartbeat_timeout, tasklist))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(sessions):
                    tg.start_soon(one)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close_many(ctxs)
            raise
        return ctxs

    async def _close_many(self, ctxs: list[bus.Context]) -> None:
        sem = anyio.Semaphore(100)

        async def one(ctx: bus.Context) -> None:
            async with sem:
                with contextlib.suppress(bus.CadenzaError):
                    await self._close(ctx)

        with anyio.move_on_after(300):
            async with anyio.create_task_group() as tg:
                for ctx in ctxs:
                    tg.start_soon(one, ctx)

    # ---------------------------------------------------------------- scenarios

    async def create_first(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = now()
            ctx = await self._open()
            await self._run(ctx, "work")
            out.append(now() - t0)
            await self._close(ctx)
        return out

    async def round_trip(self, n: int) -> list[float]:
        ctx = await self._open()
        try:
            await self._run(ctx, "work")  # warm
            out = []
            for _ in range(n):
                t0 = now()
                await self._run(ctx, "work")
                out.append(now() - t0)
            return out
        finally:
            await self._close(ctx)

    async def throughput(self, sessions: int, ops: int) -> float:
        ctxs = await self.open_sessions(sessions)
        try:
            return await self.run_in_sessions(ctxs, ops)
        finally:
            await self.close_sessions(ctxs)

    async def open_sessions(self, sessions: int) -> list[bus.Context]:
        return await self._open_many(sessions)

    async def close_sessions(self, ctxs: list[bus.Context]) -> None:
        await self._close_many(ctxs)

    async def run_in_sessions(self, ctxs: list[bus.Context], ops: int) -> float:
        """``ops // len(ctxs)`` activities one after another in each session, all sessions at once;
        activities per second."""
        return await concurrently(len(ctxs), max(1, ops // len(ctxs)), lambda i: self._run(ctxs[i], "work"))

    async def run_shared(self, callers: int, ops: int) -> float:
        """``execute_activity`` outside a session (to the tasklist's shared queue, any worker takes it),
        ``callers`` at once, ``ops // callers`` each; activities per second."""

        async def one(_i: int) -> None:
            await bus.execute_activity(self.bus.context(), "work", tasklist="bench", start_to_close_timeout=60)

        return await concurrently(callers, max(1, ops // callers), one)

    async def run_handler(self, service: bus.BusActivityService, callers: int, ops: int) -> float:
        """``run_handler_activity`` in this process (a service tracking its own work, no worker), tracked by
        ``service``; ``callers`` at once, ``ops // callers`` each; activities per second."""
        opts = bus.HandlerOptions(type="bench")

        async def action(_ctx: bus.Context) -> None:
            return None

        async def one(_i: int) -> None:
            _aid, err = await bus.run_handler_activity(self.bus.context(), service, opts, action)
            if err is not None:
                raise err

        return await concurrently(callers, max(1, ops // callers), one)

    async def cancel(self, n: int) -> list[float]:
        sctx = await self._open()
        out = []
        try:
            await self._run(sctx, "work")  # warm
            for _ in range(n):
                name = uuid.uuid4().hex
                call = sctx.child()
                async with anyio.create_task_group() as tg:

                    async def execute(call: bus.Context = call, name: str = name) -> None:
                        with contextlib.suppress(bus.ActivityCancelledError):
                            await self._run(call, "wait_cancel", name)

                    tg.start_soon(execute)
                    await wait_probe(self.probe, f"started-{name}", timeout=10)
                    t0 = now()
                    call.token.cancel(_USER_CANCEL)
                    seen = float(await wait_probe(self.probe, f"cancel-{name}", timeout=10))
                out.append(seen - t0)
                await anyio.sleep(0.01)
            return out
        finally:
            await self._close(sctx)

    async def worker_loss(self, n: int, heartbeat_timeout: float) -> list[float]:
        out = []
        for _ in range(n):
            tasklist = f"loss{uuid.uuid4().hex[:8]}"
            victim = (await start_all([self._worker(tasklist=tasklist, interval=heartbeat_timeout / 3)]))[0]
            try:
                ctx = await self._open(heartbeat_timeout, tasklist)
                await self._run(ctx, "work")
                # Kill at a random phase of the heartbeat interval, as a real crash would.
                await anyio.sleep(heartbeat_timeout / 3 * (uuid.uuid4().int % 1000) / 1000)
                victim.kill()
                t0 = now()
                with anyio.fail_after(heartbeat_timeout * 5):
                    try:
                        await self._run(ctx, "work")
                    except bus.SessionFailedError:
                        pass
                    else:
                        raise RuntimeError("an activity ran in the session of a killed worker")
                out.append(now() - t0)
            finally:
                stop_all([victim], timeout=2)
        return out

    async def heartbeats(
        self, sessions: int, workers: int, heartbeat_timeout: float, window: float
    ) -> dict[str, float]:
        tasklist = f"hb{uuid.uuid4().hex[:8]}"
        per = -(-sessions // workers)
        interval = heartbeat_timeout / 3
        procs = await start_all([
            self._worker(tasklist=tasklist, max_sessions=per, interval=interval) for _ in range(workers)
        ])  # fmt: skip
        try:
            ctxs = await self._open_many(sessions, tasklist, heartbeat_timeout)
            self.meta["heartbeat_interval"] = interval
            counts = {"hb": 0, "all": 0}

            async def on_hb(msg: Any) -> None:
                counts["hb"] += 1
                with contextlib.suppress(Exception):
                    self.meta["heartbeat_interval"] = float(json.loads(msg.data)["interval"])

            async def on_all(_msg: Any) -> None:
                counts["all"] += 1

            await anyio.sleep(1.0)  # let the creations' announcements settle
            s1 = await self.bus.nc.subscribe(self.bus.subjects.filter("worker", event="heartbeat"), cb=on_hb)
            s2 = await self.bus.nc.subscribe(">", cb=on_all)
            await anyio.sleep(window)
            await s1.unsubscribe()
            await s2.unsubscribe()
            await self._close_many(ctxs)
            return {"heartbeats/s": counts["hb"] / window, "messages/s": counts["all"] / window}
        finally:
            stop_all(procs, timeout=3)

    async def memory(self, sessions: int, workers: int) -> dict[str, float]:
        tasklist = f"mem{uuid.uuid4().hex[:8]}"
        per = -(-sessions // workers)
        procs = await start_all([self._worker(tasklist=tasklist, max_sessions=per) for _ in range(workers)])
        try:
            t0 = now()
            ctxs = await self._open_many(sessions, tasklist)
            self.meta["g_open_s"] = round(now() - t0, 1)
            await anyio.sleep(1.0)
            broker = next(p for p in self.procs if p.name == "services.broker")
            got = {
                "broker": broker.rss(),
                "worker": max(p.rss() for p in procs),
                "server": max(rss_mb(pid) for pid in self.servers.pids().values()),
            }
            await self._close_many(ctxs)
            return got
        finally:
            stop_all(procs, timeout=3)


class UntrackedCadenzaPeer(CadenzaPeer):
    """cadenza with ``track_activities=False`` in the workers: no activity events (a diagnosis aid:
    how much of the gap to the limit is the recorder's events). Not in the default run."""

    name = "cadenza-untracked"
    worker_flags = ("--untracked",)
