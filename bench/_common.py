"""What every side of the benchmark shares: sizes, samples, probes, percentiles, process memory."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio

__all__ = (
    "NotAvailable",
    "Sizes",
    "concurrently",
    "count_probes",
    "event_loop",
    "new_event_loop",
    "now",
    "percentile",
    "quiet_machine",
    "read_probe",
    "rss_mb",
    "run",
    "tune_gc",
    "wait_probe",
    "wait_probes",
    "write_probe",
)


T = TypeVar("T")


def event_loop() -> str:
    """The event loop of every process of a run: the one cadenza's services run on
    (``services._runtime.event_loop``: uvloop where installed, ``CADENZA_EVENT_LOOP`` to choose), so
    the limit's processes run on the same loop as cadenza's. A bad ``CADENZA_EVENT_LOOP`` is one line."""
    from services._runtime import event_loop as services_loop

    try:
        return services_loop()
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None


def tune_gc() -> int:
    """This process's garbage collector set as cadenza's services set theirs
    (``services._runtime.tune_gc``: ``CADENZA_GC_THRESHOLD``), so every system's processes of a run
    (the driver, the limit's stand-ins, Temporal's worker) collect alike; the threshold in force.
    A bad ``CADENZA_GC_THRESHOLD`` is one line."""
    from services._runtime import tune_gc as services_gc

    try:
        return services_gc()
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run`` on the run's :func:`event_loop`, with the run's garbage collector (:func:`tune_gc`)."""
    tune_gc()
    return anyio.run(fn, *args, backend_options={"use_uvloop": event_loop() == "uvloop"})


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the run's :func:`event_loop` (for a process that drives its own), with the
    run's garbage collector (:func:`tune_gc`)."""
    tune_gc()
    if event_loop() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class NotAvailable(Exception):
    """A system cannot run a scenario in this run; the message says why (it is printed in the table)."""


def now() -> float:
    """Seconds on CLOCK_MONOTONIC: one clock for every process of this machine, so a time taken in a
    worker process and one taken in the driver can be subtracted."""
    return time.monotonic()


async def concurrently(lanes: int, per: int, step: Callable[[int], Awaitable[object]]) -> float:
    """``per`` awaits of ``step(lane)`` one after another in each of ``lanes`` lanes, all lanes at once;
    steps per second (of the whole run)."""

    async def lane(i: int) -> None:
        for _ in range(per):
            await step(i)

    t0 = now()
    async with anyio.create_task_group() as tg:
        for i in range(lanes):
            tg.start_soon(lane, i)
    return per * lanes / (now() - t0)


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples`` by nearest rank on the sorted list."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, all) clock ticks of every CPU since boot (``/proc/stat``), or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


async def quiet_machine(*, below: float = 0.25, window: float = 0.3, bound: float = 20.0) -> tuple[float, float]:
    """Wait until the whole machine uses less than ``below`` CPUs over ``window`` seconds, at most
    ``bound`` seconds: what one system left running after its round (a Temporal server busy for
    seconds after its last workflow, a recorder pruning) is not measured as the next one's noise.
    Returns the seconds waited and the CPUs in use over the last window (NaN: no ``/proc/stat``)."""
    cpus = os.cpu_count() or 1
    t0 = now()
    while True:
        before = _cpu_jiffies()
        await anyio.sleep(window)
        after = _cpu_jiffies()
        if before is None or after is None:
            return now() - t0, math.nan
        total = after[1] - before[1]
        used = cpus * (after[0] - before[0]) / total if total > 0 else 0.0
        if used < below or now() - t0 >= bound:
            return now() - t0, used


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does. ``quick`` is the CI smoke test; ``full`` is the published run."""

    rounds: int
    create_samples: int  # (a) per round
    rtt_samples: int  # (b) per round
    concurrency: tuple[int, ...]  # (c) sessions at once
    throughput_ops: int  # (c) activities per round, spread over the sessions
    throughput_rounds: int
    cancel_samples: int  # (d) per round
    loss_samples: int  # (e) per round
    loss_heartbeat_timeout: float  # (e) seconds
    loss_rounds: int
    hb_sessions: int  # (f)
    hb_workers: int  # (f) and (g)
    hb_heartbeat_timeout: float  # (f)
    hb_window: float  # (f) seconds counted
    mem_sessions: int  # (g)
    fixed_rounds: int  # (f) and (g)
    workers: int  # worker processes of (a)-(d)
    #: (c) at least this many activities per session and round: a round of ``throughput_ops`` over
    #: 100 sessions was 10 activities each, so the sessions' first tasks and the ramp up and down of
    #: 100 lanes weighed in as much as the steady state (the limit's round lasted 60 ms).
    throughput_per_session: int = 1
    #: Seconds a round waits at most for a quiet machine before it starts (:func:`quiet_machine`).
    quiet_wait: float = 1.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            rounds=2, create_samples=3, rtt_samples=20, concurrency=(1, 10, 100), throughput_ops=100,
            throughput_rounds=1, cancel_samples=6, loss_samples=1, loss_heartbeat_timeout=1.0, loss_rounds=1,
            hb_sessions=40, hb_workers=4, hb_heartbeat_timeout=1.5, hb_window=2.0, mem_sessions=60,
            fixed_rounds=1, workers=2,
        )  # fmt: skip

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            rounds=5, create_samples=20, rtt_samples=200, concurrency=(1, 10, 100), throughput_ops=1000,
            throughput_rounds=3, cancel_samples=60, loss_samples=2, loss_heartbeat_timeout=2.0, loss_rounds=3,
            hb_sessions=1000, hb_workers=10, hb_heartbeat_timeout=3.0, hb_window=9.0, mem_sessions=10_000,
            fixed_rounds=1, workers=2, throughput_per_session=300, quiet_wait=20.0,
        )  # fmt: skip


# ---------------------------------------------------------------- probes
# A worker process notes when something happened (the activity started, the cancel reached it) in a
# small file; the driver reads it. The time is taken before the file is written, so the side channel
# costs nothing in the measured interval.


def write_probe(directory: str | os.PathLike[str], name: str, value: str) -> None:
    path = Path(directory) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.replace(path)


def read_probe(directory: str | os.PathLike[str], name: str) -> str | None:
    try:
        return (Path(directory) / name).read_text()
    except FileNotFoundError:
        return None


async def wait_probe(directory: str | os.PathLike[str], name: str, *, timeout: float) -> str:
    """Wait for a probe file; raises TimeoutError after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            value = read_probe(directory, name)
            if value is not None:
                return value
            await anyio.sleep(0.001)


async def wait_probes(directory: str | os.PathLike[str], prefix: str, count: int, *, timeout: float) -> None:
    """Wait until ``count`` probe files whose names start with ``prefix`` exist."""
    with anyio.fail_after(timeout):
        # Polling on purpose: the files are written by other processes. A directory listing is
        # a local, cheap call.
        while sum(1 for p in Path(directory).iterdir() if p.name.startswith(prefix)) < count:  # noqa: ASYNC110, ASYNC240
            await anyio.sleep(0.05)


def count_probes(directory: str | os.PathLike[str], prefix: str) -> int:
    return sum(1 for p in Path(directory).iterdir() if p.name.startswith(prefix))


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (VmRSS from /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan
