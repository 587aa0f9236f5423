"""The event loop the services run on: uvloop where installed (a dependency of cadenza), the
standard asyncio loop with ``CADENZA_EVENT_LOOP=asyncio``, one clear line for anything else; and
their garbage collector (``CADENZA_GC_THRESHOLD``). Each check runs a real service entry point
(``run_service``) in its own process, as ``cadenza`` does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services._runtime import GC_THRESHOLD, event_loop, tune_gc

# A service whose main notes the loop it runs on and returns (exit 0).
_SERVICE = """
import asyncio, sys
from services._runtime import run_service
import gc
PYTHONS = gc.get_threshold()[0]  # this interpreter's own default (700 up to 3.13)
async def main():
    print("loop:", type(asyncio.get_running_loop()).__module__.split(".")[0])
    threshold = gc.get_threshold()[0]
    print("gc:", "python's" if threshold == PYTHONS else threshold, gc.get_freeze_count() > 0)
sys.exit(run_service(main))
"""


def _run_service(loop: str | None, gc_threshold: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CADENZA_", "OTEL_"))}
    if loop is not None:
        env["CADENZA_EVENT_LOOP"] = loop
    if gc_threshold is not None:
        env["CADENZA_GC_THRESHOLD"] = gc_threshold
    return subprocess.run([sys.executable, "-c", _SERVICE], capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_a_service_runs_on_uvloop_unless_told_otherwise() -> None:
    default, plain, named = _run_service(None), _run_service("asyncio"), _run_service(" UVLoop ")
    assert (default.returncode, default.stdout.splitlines()[0]) == (0, "loop: uvloop"), default.stderr
    assert (plain.returncode, plain.stdout.splitlines()[0]) == (0, "loop: asyncio"), plain.stderr
    assert (named.returncode, named.stdout.splitlines()[0]) == (0, "loop: uvloop"), named.stderr


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


def test_a_service_collects_garbage_less_often_unless_told_otherwise() -> None:
    # By default: start-up objects frozen out of the scans, a young collection every 20,000 net
    # allocations; 0 leaves Python's defaults (its threshold, nothing frozen); a number is taken as given.
    default, python, given = _run_service(None), _run_service(None, "0"), _run_service(None, " 5000 ")
    assert (default.returncode, default.stdout.splitlines()[1]) == (0, f"gc: {GC_THRESHOLD} True"), default.stderr
    assert (python.returncode, python.stdout.splitlines()[1]) == (0, "gc: python's False"), python.stderr
    assert (given.returncode, given.stdout.splitlines()[1]) == (0, "gc: 5000 True"), given.stderr


@pytest.mark.parametrize("value", ["lots", "-1", "1e4", "\uff12\uff10"])
def test_a_bad_gc_threshold_is_one_line_and_exit_2(value: str) -> None:
    out = _run_service(None, value)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"cadenza: CADENZA_GC_THRESHOLD={value!r} is not a whole number: use e.g. 20000, or 0 for Python's default"
    ]
    with pytest.raises(ValueError, match="is not a whole number"):
        tune_gc({"CADENZA_GC_THRESHOLD": value})
