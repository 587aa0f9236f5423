"""The foundation's CLI commands, run as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys

import bus
from bus.testing import unique_prefix


def cadenza(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "services", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def test_subjects_prints_every_stream_and_bucket() -> None:
    out = cadenza("subjects", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    streams = {r["stream"] for r in rows}
    for domain in ("SESSION", "WORKER", "TASK", "ACTIVITY", "CANCEL", "DLQ"):
        assert f"CADENZA_{domain}" in streams


def test_schemas_check_passes_on_a_clean_tree() -> None:
    out = cadenza("schemas", "check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_schemas_check_fails_on_a_stale_directory(tmp_path: object) -> None:
    out = cadenza("schemas", "check", "--dir", str(tmp_path))
    assert out.returncode == 1 and "stale" in out.stdout


def test_publish_rejects_bad_json_and_wrong_shapes_with_a_clear_message() -> None:
    out = cadenza("publish", "worker.heartbeat", "{not json", "--server", "nats://127.0.0.1:1")
    assert out.returncode == 2 and "not JSON" in out.stderr
    out = cadenza("publish", "worker.heartbeat", '{"worker_id": "a b"}', "--server", "nats://127.0.0.1:1")
    assert out.returncode == 2 and "worker_id" in out.stderr and "schemas/json/worker.heartbeat.json" in out.stderr
    out = cadenza("publish", "no.such", "{}")
    assert out.returncode == 2 and "unknown event type" in out.stderr


def test_publish_without_a_server_says_how_to_give_one() -> None:
    out = cadenza("publish", "worker.heartbeat", '{"worker_id": "w1"}')
    assert out.returncode == 2 and "--server" in out.stderr and "NATS_URL" in out.stderr


def test_publish_and_tail_against_a_real_server(nats_server: bus.EmbeddedServer) -> None:
    prefix = unique_prefix()
    tail = subprocess.Popen(
        [sys.executable, "-m", "services", "tail", "worker.>", "--json", "--count", "1", "--timeout", "30",
         "--server", nats_server.url, "--prefix", prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tail.stderr is not None
        assert "following" in tail.stderr.readline()
        out = cadenza("publish", "worker.heartbeat", '{"worker_id": "w1", "seq": 3}',
                      "--server", nats_server.url, "--prefix", prefix)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert f"{prefix}.worker.w1.heartbeat" in out.stdout
        stdout, _ = tail.communicate(timeout=30)
    finally:
        tail.kill()
    line = json.loads(stdout.splitlines()[0])
    assert line["subject"] == f"{prefix}.worker.w1.heartbeat"
    assert line["event"]["type"] == "worker.heartbeat" and line["event"]["seq"] == 3


def test_server_command_runs_the_embedded_server_and_stops_on_sigterm() -> None:
    import signal

    import nats

    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "server", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        url = next(line.split("=", 1)[1].strip() for line in lines if line.startswith("export NATS_URL="))
        assert "cadenza: ready" in lines[2]

        async def ping() -> None:
            nc = await nats.connect(url)
            await nc.flush()
            await nc.close()

        import anyio

        anyio.run(ping)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()


def test_tail_reads_history_with_subjects_ellipses_and_dead_letters(nats_server: bus.EmbeddedServer) -> None:
    import anyio

    prefix = unique_prefix()

    async def seed() -> None:
        async with bus.connect(nats_server.url, prefix=prefix, name="seed") as b:
            from schemas import WorkerHeartbeat

            await b.publish(WorkerHeartbeat(worker_id="w" + "x" * 90, seq=1))
            await b.dead_letter(consumer="recorder", subject=f"{prefix}.activity.a.started", data=b"{bad",
                                headers=None, reason="not JSON", error_type="bad_json")  # fmt: skip

    anyio.run(seed)
    common = ("--server", nats_server.url, "--prefix", prefix, "--timeout", "30")
    out = cadenza("tail", ">", "--all", "--count", "2", *common)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    heartbeat = next(ln for ln in lines if "worker.heartbeat" in ln)
    assert f"{prefix}.worker." in heartbeat and "…" in heartbeat and "x" * 90 not in heartbeat
    dead = next(ln for ln in lines if "dlq.rejected" in ln)
    assert f"{prefix}.dlq.recorder.rejected" in dead and "reason=not JSON" in dead
    js = cadenza("tail", "dlq.>", "--since", "10m", "--json", "--count", "1", *common)
    assert js.returncode == 0, js.stderr
    line = json.loads(js.stdout)
    assert line["subject"] == f"{prefix}.dlq.recorder.rejected" and line["event"]["error_type"] == "bad_json"
