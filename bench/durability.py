"""The cost of JetStream's ``sync_interval: always`` (fsync before every acknowledgement), issue 9.

``python -m bench.durability`` publishes a tiny event through ``Bus.publish`` on four servers, one
after the other: one node and a 3-node R3 :class:`~bus.testing.EmbeddedCluster`, each with the
server's default ``sync_interval`` (2 minutes: durability from the replicas) and with ``always``.
For each it reports the publish round trip (one at a time, until JetStream acknowledges it: p50,
p99) and publishes per second with ``--concurrency`` publishes in flight. ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

import bus
from bus.testing import EmbeddedCluster
from schemas import ActivityUpdated

from ._common import percentile
from ._common import run as run_loop


@dataclass(frozen=True)
class Row:
    setup: str
    p50_ms: float
    p99_ms: float
    per_s: float


@contextmanager
def _servers(nodes: int, sync: str | None, root: Path) -> Iterator[str]:
    if nodes == 1:
        with bus.EmbeddedServer(root, sync_interval=sync) as server:
            yield server.url
    else:
        with EmbeddedCluster(nodes, root, sync_interval=sync, name="bench") as cluster:
            yield cluster.urls


def _event() -> ActivityUpdated:
    return ActivityUpdated(activity_id=str(uuid.uuid4()), progress=0.5)


async def _measure(url: str, replicas: int, samples: int, burst: int, concurrency: int) -> tuple[list[float], float]:
    async with bus.connect(url, prefix=f"bench{uuid.uuid4().hex[:8]}", replicas=replicas, name="bench") as b:
        for _ in range(20):  # warm-up: connections, stream leaders, caches
            await b.publish(_event())
        rtts: list[float] = []
        for _ in range(samples):
            event = _event()
            t0 = time.perf_counter()
            await b.publish(event)
            rtts.append(time.perf_counter() - t0)
        events = [_event() for _ in range(burst)]
        limiter = anyio.Semaphore(concurrency)

        async def one(event: ActivityUpdated) -> None:
            async with limiter:
                await b.publish(event)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for event in events:
                tg.start_soon(one, event)
        return rtts, burst / (time.perf_counter() - t0)


def run(samples: int, burst: int, concurrency: int, progress: bool = True) -> list[Row]:
    rows: list[Row] = []
    for nodes in (1, 3):
        for sync in (None, "always"):
            label = f"{'1 node' if nodes == 1 else '3 nodes, R3'}, sync_interval {sync or 'default (2m)'}"
            with tempfile.TemporaryDirectory(prefix="cadenza-bench-") as root, _servers(nodes, sync, Path(root)) as url:
                rtts, per_s = run_loop(_measure, url, 3 if nodes == 3 else 1, samples, burst, concurrency)
            row = Row(label, percentile(rtts, 50) * 1e3, percentile(rtts, 99) * 1e3, per_s)
            rows.append(row)
            if progress:
                print(f"  {row.setup}: p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms, {row.per_s:,.0f}/s",
                      flush=True)  # fmt: skip
    return rows


def markdown(rows: list[Row], samples: int, burst: int, concurrency: int) -> str:
    lines = [
        f"| setup | publish round trip p50 | p99 | publishes/s ({concurrency} in flight) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.setup} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.per_s:,.0f} |" for r in rows]
    lines.append(
        f"\n{samples} sequential publishes, then {burst} with {concurrency} in flight, per setup; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000, help="sequential publishes per setup")
    ap.add_argument("--burst", type=int, default=4000, help="publishes for the rate, per setup")
    ap.add_argument("--concurrency", type=int, default=64, help="publishes in flight for the rate")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 samples, a burst of 100")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.burst = 30, 100
    rows = run(args.samples, args.burst, args.concurrency)
    print()
    print(markdown(rows, args.samples, args.burst, args.concurrency))


if __name__ == "__main__":
    main()
