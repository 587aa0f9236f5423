"""Console load check: API latency of the list pages and the first event of a stream, at scale.

``python -m bench.console [--activities 10000] [--sessions 1000] [--samples 200] [--out FILE]``
starts an embedded nats-server, an in-process recorder and the console (uvicorn on a loopback port),
seeds the activities through the recorder (real ``activity`` events, folded into its bucket) and the
sessions and workers into the broker's buckets, waits until the console's caches and the recorder
hold them all, then measures with one httpx client, one request at a time:

* each list page (with and without filters, a deep page) p50 / p99;
* an activity stream: from opening it to its first message event ("first event"), and from
  publishing a new message to the browser-side event ("live").

A benchmark, not a test: it prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

import bus
from bench._common import percentile
from bench._common import run as run_loop
from bus.testing import embedded_server, unique_prefix
from schemas import (
    ActivityCompleted,
    ActivityMessage,
    ActivityStarted,
    ActivityStatus,
    MessageEntry,
    SessionRecord,
    SessionState,
    WorkerRecord,
    utcnow,
)
from services.console import ConsoleConfig, ConsoleState, running_console
from services.recorder import Recorder, RecorderConfig

TYPES = ("image_pull", "deploy", "backup", "transcode", "build")
QUERIES = (
    ("activities, page 1", "/api/activities"),
    ("activities, status=running", "/api/activities?status=running"),
    ("activities, type + search", "/api/activities?type=deploy&search=shop-1"),
    ("activities, page 150 of 200", "/api/activities?page=150"),
    ("sessions, page 1", "/api/sessions"),
    ("sessions, state=open + tasklist", "/api/sessions?state=open&tasklist=tl-3"),
    ("workers", "/api/workers"),
    ("dead letters", "/api/dead-letters"),
    ("one activity", "/api/activities/a-00042"),
    ("page shell (HTML)", "/activities"),
)


async def _seed_activities(b: bus.Bus, n: int) -> None:
    now = utcnow()
    limiter = anyio.CapacityLimiter(64)

    async def one(i: int) -> None:
        async with limiter:
            aid = f"a-{i:05d}"
            t = now - timedelta(seconds=n - i)
            await b.publish(
                ActivityStarted(
                    activity_id=aid,
                    time=t,
                    environment_id="" if i % 10 else "prod",
                    activity_type=TYPES[i % 5],
                    resource_type="project",
                    resource_name=f"shop-{i % 100}",
                    message=f"working on shop-{i % 100}",
                )
            )
            if i % 10 < 7:  # seven in ten have ended
                status = (ActivityStatus.SUCCESS, ActivityStatus.FAILED, ActivityStatus.CANCELLED)[i % 3]
                await b.publish(ActivityCompleted(activity_id=aid, rev=1, time=t + timedelta(seconds=1), status=status))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def _seed_sessions(b: bus.Bus, n: int) -> None:
    sessions, workers = await b.kv("sessions"), await b.kv("workers")
    now = utcnow()
    for w in range(50):
        rec = WorkerRecord(
            worker_id=f"w-{w:02d}",
            host_name=f"host-{w}",
            tasklist=f"tl-{w % 10}",
            max_sessions=40,
            sessions=[f"s-{i:05d}" for i in range(n) if i % 50 == w and i % 4 == 0],
        )
        await workers.put(rec.worker_id, rec.model_dump_json().encode())
    limiter = anyio.CapacityLimiter(64)

    async def one(i: int) -> None:
        async with limiter:
            state = SessionState.OPEN if i % 4 == 0 else (SessionState.COMPLETED, SessionState.FAILED)[i % 2]
            rec = SessionRecord(
                session_id=f"s-{i:05d}",
                tasklist=f"tl-{(i % 50) % 10}",
                state=state,
                worker_id=f"w-{i % 50:02d}",
                requested_at=now - timedelta(seconds=n - i),
            )
            await sessions.put(rec.session_id, rec.model_dump_json().encode())

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def _timed(http: httpx.AsyncClient, path: str, samples: int) -> list[float]:
    out = []
    for i in range(samples + 10):
        t0 = time.perf_counter()
        r = await http.get(path)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")
        if i >= 10:  # warm-up
            out.append(dt)
    return out


async def _stream(http: httpx.AsyncClient, b: bus.Bus, samples: int) -> tuple[list[float], list[float]]:
    """(connect -> first message event, publish -> event) for one live activity."""
    aid = "a-live"
    await b.publish(ActivityStarted(activity_id=aid, activity_type="live", message="watching"))
    await b.publish(ActivityMessage(activity_id=aid, seq=1, entries=[MessageEntry(message="first")]))
    client = bus.ActivityClient(b)
    with anyio.fail_after(30):
        while (await client.get(aid, limit=0)).activity.message_count < 1:  # noqa: ASYNC110 - polling the recorder
            await anyio.sleep(0.01)
    first: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        async with http.stream("GET", f"/api/activities/{aid}/stream") as r:
            async for line in r.aiter_lines():
                if line == "event: message":
                    first.append(time.perf_counter() - t0)
                    break
    live: list[float] = []
    seq = 1
    with anyio.fail_after(300):
        async with http.stream("GET", f"/api/activities/{aid}/stream", headers={"Last-Event-ID": "1"}) as r:
            lines = r.aiter_lines()
            for _ in range(samples):
                seq += 1
                t0 = time.perf_counter()
                await b.publish(ActivityMessage(activity_id=aid, seq=seq, entries=[MessageEntry(message=f"m{seq}")]))
                async for line in lines:
                    if line == f"id: {seq}":
                        live.append(time.perf_counter() - t0)
                        break
    return first, live


def loaded(state: ConsoleState, n_activities: int, n_sessions: int) -> bool:
    return len(state.activities) >= n_activities and len(state.sessions) >= n_sessions


async def run(n_activities: int, n_sessions: int, samples: int) -> dict[str, Any]:
    with embedded_server() as server:
        async with bus.connect(server.url, prefix=unique_prefix("bc"), name="bench-console") as b:
            rec = Recorder(b, RecorderConfig(retention_count=0, retention_days=0, prune_interval=3600))
            async with anyio.create_task_group() as tg:
                await tg.start(rec.run)
                t0 = time.perf_counter()
                await _seed_activities(b, n_activities)
                await _seed_sessions(b, n_sessions)
                async with running_console(b, config=ConsoleConfig(services_interval=5)) as console:
                    with anyio.fail_after(600):
                        while not loaded(console.state, n_activities, n_sessions):  # noqa: ASYNC110 - polling caches
                            await anyio.sleep(0.1)
                    seeded = time.perf_counter() - t0
                    async with httpx.AsyncClient(base_url=console.url, timeout=30) as http:
                        total = (await http.get("/api/activities")).json()["total"]
                        rows: list[dict[str, Any]] = []
                        for label, path in QUERIES:
                            xs = await _timed(http, path, samples)
                            rows.append(
                                {
                                    "page": label,
                                    "path": path,
                                    "p50_ms": percentile(xs, 50) * 1000,
                                    "p99_ms": percentile(xs, 99) * 1000,
                                }
                            )
                        first, live = await _stream(http, b, max(20, samples // 4))
                tg.cancel_scope.cancel()
    return {
        "activities": n_activities,
        "sessions": n_sessions,
        "listed": total,
        "seed_s": seeded,
        "samples": samples,
        "pages": rows,
        "stream": {
            "first_event_p50_ms": percentile(first, 50) * 1000,
            "first_event_p99_ms": percentile(first, 99) * 1000,
            "live_p50_ms": percentile(live, 50) * 1000,
            "live_p99_ms": percentile(live, 99) * 1000,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__.splitlines()[0])
    p.add_argument("--activities", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=1_000)
    p.add_argument("--samples", type=int, default=200, help="requests per page")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    result = run_loop(run, args.activities, args.sessions, args.samples)
    print(
        f"console API latency, {result['activities']:,} activities ({result['listed']:,} listed in the local "
        f"environment), {result['sessions']:,} sessions; one client, {result['samples']} requests per page"
    )
    print(f"{'page':<34} {'p50 ms':>8} {'p99 ms':>8}")
    for row in result["pages"]:
        print(f"{row['page']:<34} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    s = result["stream"]
    print(f"{'stream: open -> first message':<34} {s['first_event_p50_ms']:>8.2f} {s['first_event_p99_ms']:>8.2f}")
    print(f"{'stream: publish -> event (live)':<34} {s['live_p50_ms']:>8.2f} {s['live_p99_ms']:>8.2f}")
    print(f"(seeding and loading took {result['seed_s']:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
