"""cadenza in the benchmark: an embedded nats-server, the broker and recorder services and bench
workers (:mod:`bench._cadenza_worker`), each in its own process; the caller is this process.

What each figure measures (the same patterns as the limit, through cadenza's API):

(a) ``create_session`` then ``execute_activity`` in it, until the result is back in the caller.
(b) ``execute_activity`` in an open session, one after another; caller-side round trip.
(c) (b) from 1, 10 or 100 concurrent sessions, all opened before the clock starts.
(d) ``bus.request_cancel`` for a running activity (stored on the cancel stream and broadcast) until
    the activity's cancel scope fires in the worker process.
(e) SIGKILL of the worker holding a session -> the caller's next ``execute_activity`` in it fails
    with ``SessionFailedError`` (the broker declares the worker lost from missed heartbeats).
(f) messages on ``<prefix>.worker.*.heartbeat`` and on everything (``>``) while the sessions idle.
(g) resident memory of the broker, the largest worker and nats-server with the sessions open.

The session and worker runtime come from issue #4; until they are in the tree, the scenarios that
need them say so instead of a figure. (d) needs only the cancel path, which the foundation has.
"""

from __future__ import annotations

import contextlib
import importlib.util
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

import bus
from bus import EmbeddedServer

from ._common import NotAvailable, Sizes, now, rss_mb, wait_probe
from ._peer import Peer, notes_from
from ._procs import Proc, start_all, stop_all

__all__ = ("CadenzaPeer",)


def _missing_session_api() -> str:
    """Why the session scenarios cannot run in this tree, or "" when they can."""
    names = ("create_session", "complete_session", "execute_activity", "Worker", "SessionOptions")
    absent = [n for n in names if not hasattr(bus, n)]
    if importlib.util.find_spec("services.broker") is None:
        absent.append("services.broker")
    return ("session API (#4) not in this tree yet: " + ", ".join(absent)) if absent else ""


class CadenzaPeer(Peer):
    name = "cadenza"
    notes = notes_from(__doc__)

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        super().__init__(sizes, workdir)
        self.server: EmbeddedServer | None = None
        self.procs: list[Proc] = []
        self.probe = workdir / "probes"
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.missing = _missing_session_api()
        self.meta: dict[str, object] = {}
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        self.probe.mkdir(parents=True, exist_ok=True)
        self.server = EmbeddedServer(str(self.workdir / "store"))
        self.server.start()
        self.url = self.server.url
        self.bus = await self._stack.enter_async_context(bus.connect(self.url, prefix=self.prefix, name="bench"))
        if not self.missing:
            services = [Proc.module("services.broker", "--server", self.url, "--prefix", self.prefix)]
            if importlib.util.find_spec("services.recorder") is not None:
                services.append(Proc.module("services.recorder", "--server", self.url, "--prefix", self.prefix))
            self.procs += await start_all(services)
            self.procs += await start_all([self._worker() for _ in range(self.sizes.workers)])
        else:
            self.meta["missing"] = self.missing
        self.cancel_worker = (await start_all([self._worker("--cancel-only")]))[0]
        self.procs.append(self.cancel_worker)

    def _worker(self, *flags: str, prefix: str = "", max_sessions: int = 1000) -> Proc:
        return Proc.module(
            "bench._cadenza_worker", "--server", self.url, "--prefix", prefix or self.prefix,
            "--probe", str(self.probe), "--max-sessions", str(max_sessions), *flags, name="cadenza-worker",
        )  # fmt: skip

    async def close(self) -> None:
        stop_all(self.procs, timeout=5)
        await self._stack.aclose()
        if self.server is not None:
            self.server.stop()

    # ---------------------------------------------------------------- the API of #4, in one place

    def _need_sessions(self) -> None:
        if self.missing:
            raise NotAvailable(self.missing)

    def _options(self, heartbeat_timeout: float = 20.0) -> Any:
        return bus.SessionOptions(  # type: ignore[attr-defined]
            execution_timeout=timedelta(hours=1), creation_timeout=timedelta(seconds=30),
            heartbeat_timeout=timedelta(seconds=heartbeat_timeout),
        )  # fmt: skip

    async def _open(self, heartbeat_timeout: float = 20.0) -> Any:
        ctx = bus.background().with_value("bus", self.bus)
        return await bus.create_session(ctx, self._options(heartbeat_timeout))  # type: ignore[attr-defined]

    async def _run(self, ctx: Any, name: str, *args: Any) -> Any:
        return await bus.execute_activity(ctx, name, *args)  # type: ignore[attr-defined]

    async def _close(self, ctx: Any) -> None:
        await bus.complete_session(ctx)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- scenarios

    async def create_first(self, n: int) -> list[float]:
        self._need_sessions()
        out = []
        for _ in range(n):
            t0 = now()
            ctx = await self._open()
            await self._run(ctx, "work")
            out.append(now() - t0)
            await self._close(ctx)
        return out

    async def round_trip(self, n: int) -> list[float]:
        self._need_sessions()
        ctx = await self._open()
        try:
            await self._run(ctx, "work")
            out = []
            for _ in range(n):
                t0 = now()
                await self._run(ctx, "work")
                out.append(now() - t0)
            return out
        finally:
            await self._close(ctx)

    async def throughput(self, sessions: int, ops: int) -> float:
        self._need_sessions()
        ctxs = [await self._open() for _ in range(sessions)]
        per = max(1, ops // sessions)

        async def run(ctx: Any) -> None:
            for _ in range(per):
                await self._run(ctx, "work")

        try:
            t0 = now()
            async with anyio.create_task_group() as tg:
                for ctx in ctxs:
                    tg.start_soon(run, ctx)
            return per * sessions / (now() - t0)
        finally:
            for ctx in ctxs:
                await self._close(ctx)

    async def cancel(self, n: int) -> list[float]:
        out = []
        cause = bus.CancelCause(kind=bus.CancelKind.USER, who="bench", reason="cancel latency")
        for _ in range(n):
            name = uuid.uuid4().hex
            await self.bus.nc.publish(f"{self.prefix}.bench.start", name.encode())
            await wait_probe(self.probe, f"started-{name}", timeout=10)
            t0 = now()
            await bus.request_cancel(self.bus, "activity", name, cause)
            seen = float(await wait_probe(self.probe, f"cancel-{name}", timeout=10))
            out.append(seen - t0)
        return out

    async def worker_loss(self, n: int, heartbeat_timeout: float) -> list[float]:
        self._need_sessions()
        raise NotAvailable("the session worker runtime landed after this harness was written; not wired yet")

    async def heartbeats(
        self, sessions: int, workers: int, heartbeat_timeout: float, window: float
    ) -> dict[str, float]:
        self._need_sessions()
        raise NotAvailable("the session worker runtime landed after this harness was written; not wired yet")

    async def memory(self, sessions: int, workers: int) -> dict[str, float]:
        self._need_sessions()
        assert self.server is not None and self.server._proc is not None
        _ = rss_mb
        raise NotAvailable("the session worker runtime landed after this harness was written; not wired yet")
