"""``cadenza dev`` and ``cadenza demo``, run as a user runs them: real processes, a real server."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import bus
from bus.testing import unique_prefix


@dataclass
class Dev:
    proc: subprocess.Popen[str]
    url: str
    prefix: str
    lines: list[str]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "CADENZA_PREFIX")}


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    """``cadenza dev --port 0`` in its own process (until it printed its ready line); SIGTERM stops it
    and everything it started, with exit code 0."""
    prefix = unique_prefix("demo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "dev", "--port", "0", "--prefix", prefix, "--duration", "110"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=_env(),
    )  # fmt: skip
    lines: list[str] = []
    got: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            got.put(line)
        got.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = ""
        while True:
            line = got.get(timeout=60)  # raises queue.Empty: dev did not come up
            assert line is not None, "cadenza dev exited early:\n" + "".join(lines)
            if line.startswith("export NATS_URL="):
                url = line.split("=", 1)[1].strip()
            if "cadenza: ready dev" in line:
                break
        assert url, "".join(lines)
        yield Dev(proc, url, prefix, lines)
    finally:
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert code == 0, "cadenza dev did not stop cleanly on SIGTERM:\n" + "".join(lines[-30:])


def test_dev_starts_the_recorder_broker_and_demo_worker_and_says_how_to_run_the_demo(dev: Dev) -> None:
    text = "".join(dev.lines)
    for label in ("recorder", "broker", "demo worker", "console"):
        assert re.search(rf"^  {label}: running \(pid \d+\)", text, flags=re.M), text
    assert "not available" not in text and "failed to start" not in text
    assert f"cadenza demo --prefix {dev.prefix}" in text
    console = re.search(r"^  (http://127\.0\.0\.1:\d+/) +the web console", text, flags=re.M)
    assert console is not None, text
    with urllib.request.urlopen(console.group(1) + "api/meta", timeout=10) as r:
        assert json.load(r)["prefix"] == dev.prefix


def test_demo_scenario_runs_against_dev(dev: Dev) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services", "demo", "--server", dev.url, "--prefix", dev.prefix, "--pace", "0"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    text = out.stdout
    assert out.returncode == 0, text + out.stderr
    placed = re.findall(r"session (\d) \w+ placed on worker (\S+)", text)
    assert len(placed) == 2, text
    # Least loaded first: with the dev worker and the demo's own worker idle, one session on each.
    assert placed[0][1] != placed[1][1], text
    assert text.count("the same worker: pinned") == 2, text
    assert "downloading https://example.com/big.iso: 100%" in text
    assert "the caller got ActivityCancelledError" in text
    assert re.search(r"the recorder shows activity \S+ ended cancelled$", text, flags=re.M), text
    assert "the caller got SessionFailedError" in text and "cause worker_lost" in text, text
    assert "is failed (worker_lost)" in text
    assert "fails at once" in text and "is completed" in text
    # The demo's own worker was killed and reaped; the dev worker still serves.
    assert dev.proc.poll() is None


def test_demo_without_a_server_says_how_to_give_one() -> None:
    out = subprocess.run([sys.executable, "-m", "services", "demo"], capture_output=True, text=True, timeout=30,
                         env=_env())  # fmt: skip
    assert out.returncode == 2
    assert "cadenza dev" in out.stderr and "--server" in out.stderr


def test_demo_against_a_server_without_a_broker_fails_clearly(nats_server: bus.EmbeddedServer) -> None:
    # A fresh prefix: no broker, recorder or dev worker serve it.
    out = subprocess.run(
        [sys.executable, "-m", "services", "demo", "--server", nats_server.url, "--prefix", unique_prefix("nobody"),
         "--pace", "0", "--wait", "2"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "broker did not register" in out.stderr


def test_cadenza_worker_can_serve_the_demo_activities() -> None:
    # What deploy/compose.yaml runs: `cadenza worker services.demo.worker:activities --tasklist demo`.
    from services.broker._cli import load_activities

    assert sorted(load_activities("services.demo.worker:activities")) == ["download", "transcode", "where"]
