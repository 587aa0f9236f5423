"""The event loop the services run on: uvloop where installed (a dependency of cadenza), the
standard asyncio loop with ``CADENZA_EVENT_LOOP=asyncio``, one clear line for anything else. Each
check runs a real service entry point (``run_service``) in its own process, as ``cadenza`` does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services._runtime import event_loop

# A service whose main notes the loop it runs on and returns (exit 0).
_SERVICE = """
import asyncio, sys
from services._runtime import run_service
async def main():
    print("loop:", type(asyncio.get_running_loop()).__module__.split(".")[0])
sys.exit(run_service(main))
"""


def _run_service(loop: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CADENZA_", "OTEL_"))}
    if loop is not None:
        env["CADENZA_EVENT_LOOP"] = loop
    return subprocess.run([sys.executable, "-c", _SERVICE], capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_a_service_runs_on_uvloop_unless_told_otherwise() -> None:
    default, plain, named = _run_service(None), _run_service("asyncio"), _run_service(" UVLoop ")
    assert (default.returncode, default.stdout.strip()) == (0, "loop: uvloop"), default.stderr
    assert (plain.returncode, plain.stdout.strip()) == (0, "loop: asyncio"), plain.stderr
    assert (named.returncode, named.stdout.strip()) == (0, "loop: uvloop"), named.stderr


def test_an_unknown_event_loop_is_one_line_and_exit_2() -> None:
    out = _run_service("tokio")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "cadenza: CADENZA_EVENT_LOOP='tokio' is not an event loop: use uvloop or asyncio"
    ]


def test_the_choice_follows_the_environment_given() -> None:
    assert event_loop({}) == "uvloop"
    assert event_loop({"CADENZA_EVENT_LOOP": ""}) == "uvloop"
    assert event_loop({"CADENZA_EVENT_LOOP": "asyncio"}) == "asyncio"
    with pytest.raises(ValueError, match="is not an event loop"):
        event_loop({"CADENZA_EVENT_LOOP": "trio"})
