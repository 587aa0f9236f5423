"""Temporal's side of the benchmark: workflows, activities and a worker process.

Run as ``python -m bench._temporal_worker --address HOST:PORT --shared QUEUE --probe DIR``.

Sessions are Temporal's documented replacement outside Go, the worker-specific task queue: each
worker process polls the shared queue (workflows and ``get_worker_queue``) and a queue of its own;
a workflow's first activity, on the shared queue, returns that worker's queue, and the session's
activities run there. Scenarios (e) and (f) add what Go's sessions do to notice a lost worker: a
"keeper" activity on the worker's queue that heartbeats for the life of the session.

Tuned in Temporal's favour: workflows run unsandboxed, and heartbeats are throttled at 50 ms at
most (the SDK's default would throttle at 80% of the heartbeat timeout, delaying cancellation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from ._common import new_event_loop, write_probe

_QUEUE = f"bench-worker-{uuid.uuid4().hex[:12]}"
_PROBE = ""
_NO_RETRY = RetryPolicy(maximum_attempts=1)
_T30 = timedelta(seconds=30)


# ---------------------------------------------------------------- activities


@activity.defn(name="get_worker_queue")
async def get_worker_queue(probe: str) -> str:
    if probe:
        write_probe(_PROBE, probe, f"{os.getpid()} {_QUEUE}")
    return _QUEUE


@activity.defn(name="work")
async def work() -> float:
    return time.monotonic()


@activity.defn(name="wait_cancel")
async def wait_cancel(name: str) -> None:
    write_probe(_PROBE, f"started-{name}", str(os.getpid()))
    try:
        while True:
            activity.heartbeat()
            await asyncio.sleep(0.005)
    except asyncio.CancelledError:
        seen = time.monotonic()
        write_probe(_PROBE, f"cancel-{name}", repr(seen))
        raise


@activity.defn(name="keeper")
async def keeper(name: str, interval: float) -> None:
    write_probe(_PROBE, f"kept-{name}", str(os.getpid()))
    while True:
        activity.heartbeat()
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- workflows


async def _worker_queue(shared: str, probe: str = "") -> str:
    return str(
        await workflow.execute_activity(
            "get_worker_queue", probe, task_queue=shared, start_to_close_timeout=_T30, retry_policy=_NO_RETRY
        )
    )


@workflow.defn(name="CreateFirst")
class CreateFirst:
    @workflow.run
    async def run(self, shared: str) -> float:
        queue = await _worker_queue(shared)
        return float(
            await workflow.execute_activity(
                "work", task_queue=queue, start_to_close_timeout=_T30, retry_policy=_NO_RETRY
            )
        )


@workflow.defn(name="Session")
class Session:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def start(self) -> None:
        self.go = True

    @workflow.run
    async def run(self, shared: str, n: int, probe: str, wait_go: bool) -> list[float]:
        queue = await _worker_queue(shared, probe)
        if wait_go:
            await workflow.wait_condition(lambda: self.go)
        # One after another, as a session runs them (a comprehension would read the same).
        return [
            float(
                await workflow.execute_activity(
                    "work", task_queue=queue, start_to_close_timeout=_T30, retry_policy=_NO_RETRY
                )
            )
            for _ in range(n)
        ]


@workflow.defn(name="CancelOne")
class CancelOne:
    @workflow.run
    async def run(self, shared: str, name: str) -> str:
        queue = await _worker_queue(shared)
        await workflow.execute_activity(
            "wait_cancel", name, task_queue=queue, start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=2), retry_policy=_NO_RETRY,
        )  # fmt: skip
        return "done"


@workflow.defn(name="Hold")
class Hold:
    """An open session: its worker queue, optionally a heartbeating keeper, until ``complete``."""

    def __init__(self) -> None:
        self.done = False

    @workflow.signal
    def complete(self) -> None:
        self.done = True

    @workflow.run
    async def run(self, shared: str, name: str, heartbeat_timeout: float, keep: bool) -> str:
        queue = await _worker_queue(shared, f"queue-{name}")
        if not keep:
            await workflow.wait_condition(lambda: self.done)
            return "completed"
        handle = workflow.start_activity(
            "keeper", args=[name, heartbeat_timeout / 3], task_queue=queue,
            start_to_close_timeout=timedelta(hours=24), heartbeat_timeout=timedelta(seconds=heartbeat_timeout),
            retry_policy=_NO_RETRY,
        )  # fmt: skip
        await workflow.wait_condition(lambda: self.done or handle.done())
        if handle.done():
            try:
                await handle
            except ActivityError:
                return "lost"
            return "ended"
        handle.cancel()
        return "completed"


WORKFLOWS = [CreateFirst, Session, CancelOne, Hold]


async def _main(args: argparse.Namespace) -> None:
    global _PROBE
    _PROBE = args.probe
    client = await Client.connect(args.address)
    throttle = timedelta(milliseconds=50)
    common = {
        "max_concurrent_activities": args.slots, "max_concurrent_workflow_tasks": 200,
        "max_heartbeat_throttle_interval": throttle, "default_heartbeat_throttle_interval": throttle,
        "graceful_shutdown_timeout": timedelta(seconds=1),
    }  # fmt: skip
    shared = Worker(
        client, task_queue=args.shared, workflows=[] if args.no_workflows else WORKFLOWS,
        activities=[get_worker_queue],
        workflow_runner=UnsandboxedWorkflowRunner(), **common,
    )  # fmt: skip
    own = Worker(client, task_queue=_QUEUE, activities=[work, wait_cancel, keeper], **common)
    async with shared, own:
        print("cadenza: ready", _QUEUE, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--probe", required=True)
    ap.add_argument("--slots", type=int, default=1000)
    ap.add_argument("--no-workflows", action="store_true", help="serve activities only")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:  # the loop of the run's other processes
            runner.run(_main(args))


if __name__ == "__main__":
    main()
