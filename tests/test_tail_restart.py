"""``cadenza tail`` and ``cadenza activities tail`` ride out a nats-server killed with SIGKILL and started
again on the same port and store: one line when the connection drops, one when it is back, the events
published after the restart printed by the same process, never a traceback; a server that stays away
ends the command with one line and exit code 1."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import IO

import pytest

import bus
from bus.testing import ServiceProcess, unique_prefix

WAIT = 60.0  # generous: every wait ends on an event, this only bounds a broken run


class Lines:
    """The lines of a pipe, read by a thread, to wait for one with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        """The first line not read yet that contains ``text`` (AssertionError after ``timeout`` s)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout:g}s; seen: {self.seen}") from None
            if line is None:
                raise AssertionError(f"the process ended before a line with {text!r}; seen: {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Every line until the pipe closes."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                return self.seen
            self.seen.append(line)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "CADENZA_LOG")}


def _publish(url: str, prefix: str, worker_id: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services", "publish", "worker.heartbeat", json.dumps({"worker_id": worker_id}),
         "--server", url, "--prefix", prefix],
        capture_output=True, text=True, timeout=WAIT, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def _start(*args: str) -> tuple[subprocess.Popen[str], Lines, Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("history", [(), ("--all",)], ids=["live", "all"])
def test_tail_keeps_printing_after_the_server_is_killed_and_restarted(
    own_server: bus.EmbeddedServer, history: tuple[str, ...]
) -> None:
    prefix, url = unique_prefix(), own_server.url
    if history:
        _publish(url, prefix, "before")  # stored: --all prints it first
    tail, out, err = _start("tail", "worker.>", "--json", *history, "--server", url, "--prefix", prefix)
    try:
        err.wait_for("following")
        if not history:
            _publish(url, prefix, "before")
        assert '"before"' in out.wait_for('"worker_id"')

        own_server.kill()
        err.wait_for("lost the connection")
        own_server.restart()
        err.wait_for("reconnected")

        _publish(url, prefix, "after")
        line = json.loads(out.wait_for('"after"'))
        assert line["subject"] == f"{prefix}.worker.after.heartbeat"
        assert tail.poll() is None, "tail exited"
    finally:
        code = _stop(tail)
    lines = err.rest()
    assert code in (0, 130), lines
    assert not [line for line in lines if "Traceback" in line or "WARNING" in line], lines
    assert sum("lost the connection" in line for line in lines) == 1, lines
    assert sum("reconnected" in line for line in lines) == 1, lines
    printed = [json.loads(line)["event"]["worker_id"] for line in out.rest()]
    assert printed == ["before", "after"], printed  # nothing twice, nothing lost


def test_tail_gives_up_in_one_line_when_the_server_stays_away(own_server: bus.EmbeddedServer) -> None:
    tail, _out, err = _start("tail", ">", "--reconnect-timeout", "1", "--server", own_server.url,
                             "--prefix", unique_prefix())  # fmt: skip
    try:
        err.wait_for("following")
        own_server.kill()
        err.wait_for("lost the connection")
        code = tail.wait(timeout=WAIT)
    finally:
        _stop(tail)
    lines = err.rest()
    assert code == 1, lines
    assert lines[-1].startswith("cadenza: ") and "did not come back within 1s" in lines[-1], lines
    assert not [line for line in lines if "Traceback" in line], lines


def test_activities_tail_keeps_following_after_the_server_is_killed_and_restarted(
    own_server: bus.EmbeddedServer,
) -> None:
    prefix, url = unique_prefix(), own_server.url
    common = ("--server", url, "--prefix", prefix)
    # The recorder and the activity's host reconnect on their own (services reconnect forever); a
    # heartbeat every 2 s keeps the recorder's host-lost sweep away during the restart.
    recorder = ServiceProcess("services.recorder", "--prefix", prefix, "--sweep-interval", "0.1", url=url)
    host = ServiceProcess("tests.activity_host", "--prefix", prefix, "--interval", "2.0", url=url)
    with recorder, host:
        activity_id = next(line.split()[1] for line in host.output if line.startswith("activity "))
        _until_ok("activities", "get", activity_id, *common)  # the recorder has it
        tail, out, err = _start("activities", "tail", activity_id, *common)
        try:
            err.wait_for("following")
            own_server.kill()
            err.wait_for("lost the connection")
            own_server.restart()
            err.wait_for("reconnected")
            _until_ok("activities", "cancel", activity_id, "--who", "frank", *common)
            out.wait_for("Cancellation requested by frank")
            code = tail.wait(timeout=WAIT)
        finally:
            _stop(tail)
    lines = err.rest()
    assert code == 0, lines
    assert lines[-1].startswith("-- cancelled"), lines
    assert not [line for line in lines if "Traceback" in line or "WARNING" in line], lines
    assert sum("lost the connection" in line for line in lines) == 1, lines


def _until_ok(*args: str) -> None:
    """Run ``cadenza ARGS`` until it succeeds (the services may still be reconnecting), within WAIT."""
    import time

    deadline = time.monotonic() + WAIT
    while True:
        out = subprocess.run([sys.executable, "-m", "services", *args], capture_output=True, text=True,
                             timeout=WAIT, env=_env())  # fmt: skip
        if out.returncode == 0:
            return
        assert time.monotonic() < deadline, f"cadenza {' '.join(args)} kept failing: {out.stderr}"
