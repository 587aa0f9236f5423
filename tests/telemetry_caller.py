"""The caller of tests/test_telemetry.py, in its own process (no tests here).

``python -m tests.telemetry_caller --prefix P --tasklist T`` installs the SDK as every ``cadenza``
command does, then under one root span opens a session, runs ``download`` in it, starts ``transcode``
and cancels it once the recorder lists it as running, and completes the session. It prints
``trace <trace id>`` and exits, flushing its spans.
"""

from __future__ import annotations

import argparse

import anyio
from opentelemetry import trace

import bus
from bus.testing import eventually
from services._runtime import start_process, stop_process


async def _scenario(prefix: str, tasklist: str) -> str:
    tracer = trace.get_tracer("tests.telemetry_caller")
    async with bus.connect(prefix=prefix, name="caller") as b:
        with tracer.start_as_current_span("caller scenario") as root:
            opts = bus.SessionOptions(execution_timeout=120, creation_timeout=30, heartbeat_timeout=10,
                                      tasklist=tasklist)  # fmt: skip
            async with bus.session(b.context(), opts) as sctx:
                await bus.execute_activity(sctx, "download", "file", 2, 0.01)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: bus.execute_activity(sctx, "transcode", "clip", 120.0, 0.05))
                    client = bus.ActivityClient(b)

                    async def transcoding() -> bool:
                        return bool((await client.list(status=["running"], type="transcode")).items)

                    await eventually(transcoding, timeout=60, interval=0.05, what="the transcode recorded running")
                    tg.cancel_scope.cancel()  # the caller gives up: a cancel request goes to the worker
        return format(root.get_span_context().trace_id, "032x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--tasklist", required=True)
    args = ap.parse_args()
    start_process("caller", args, one_shot=True)
    try:
        trace_id = anyio.run(_scenario, args.prefix, args.tasklist)
    finally:
        stop_process()
    print(f"trace {trace_id}", flush=True)


if __name__ == "__main__":
    main()
