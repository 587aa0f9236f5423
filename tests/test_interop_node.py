"""A non-Python client speaks the wire contract: Node.js with the official ``nats`` npm client.

tests/interop/client.mjs is written from docs/wire.md and schemas/json/ only. Against a real
nats-server and real cadenza processes (recorder, broker, a Python session worker) it tracks an
activity, cancels a Python worker's running activity as a user, and runs a session end to end
(request, assigned, a task to the worker's inbox with a reply inbox, the result, complete, recreate).
This test then reads what the Python side recorded. A second test runs the real AsyncAPI parser
(``@asyncapi/parser``) on schemas/asyncapi.json.

Skipped only where node is not installed; the npm packages are installed from
tests/interop/package-lock.json (``npm ci``, as .ci/run does) when they are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import bus
from bus.testing import ExternalServer, ServiceProcess, unique_prefix
from schemas import ASYNCAPI_PATH, GetActivityReply, GetActivityRequest

INTEROP = Path(__file__).parent / "interop"
TASKLIST = "interop"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed: the Node.js interop checks need it")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/interop/node_modules, installed from the lock file when missing."""
    modules = INTEROP / "node_modules"
    if not (modules / "nats").is_dir() or not (modules / "@asyncapi" / "parser").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: install npm to run the interop checks"
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=INTEROP, capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, f"npm ci failed: {done.stderr[-2000:]}"
    return modules


def _node(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, *args], cwd=INTEROP, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_asyncapi_document_passes_the_real_parser(node_modules: Path) -> None:
    done = _node("validate_asyncapi.mjs", str(ASYNCAPI_PATH), timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "valid AsyncAPI 3.0.0" in done.stdout


def test_an_invalid_asyncapi_document_fails_the_parser(node_modules: Path, tmp_path: Path) -> None:
    doc = json.loads(ASYNCAPI_PATH.read_text())
    doc["operations"]["caller_send_session_requested"]["channel"] = {"$ref": "#/channels/no_such_channel"}
    broken = tmp_path / "asyncapi.json"
    broken.write_text(json.dumps(doc))
    done = _node("validate_asyncapi.mjs", str(broken), timeout=120)
    assert done.returncode == 1 and "INVALID" in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def services(nats_server: Any) -> Iterator[tuple[str, str]]:
    if isinstance(nats_server, ExternalServer):
        pytest.skip("needs the embedded server (starts service processes)")
    prefix, url = unique_prefix(), nats_server.url
    procs = [
        ServiceProcess("services.recorder", "--prefix", prefix, url=url),
        ServiceProcess("services.broker", "--prefix", prefix, url=url, env={"CADENZA_TOKEN_KEY": "k" * 32}),
        ServiceProcess("tests.session_worker", "--prefix", prefix, "--tasklist", TASKLIST, "--interval", "0.5",
                       url=url),
    ]  # fmt: skip
    try:
        for p in procs:
            p.start(timeout=40)
        yield url, prefix
        for p in procs:
            assert p.proc is not None and p.proc.poll() is None, f"{p.module} died during the interop run"
    finally:
        for p in procs:
            p.kill()


async def _get(url: str, prefix: str, activity_id: str) -> GetActivityReply:
    async with bus.connect(url, prefix=prefix, name="interop-check", ensure_topology=False) as b:
        return await b.request(b.rpc_subject("recorder", "get"), GetActivityRequest(activity_id=activity_id),
                               GetActivityReply)  # fmt: skip


def test_a_node_client_tracks_cancels_and_runs_a_session(node_modules: Path, services: tuple[str, str]) -> None:
    url, prefix = services
    done = _node("client.mjs", "--url", url, "--prefix", prefix, "--tasklist", TASKLIST, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), done.stdout[-3000:] + done.stderr[-3000:]
    out = {r["scenario"]: r for r in map(json.loads, done.stdout.strip().splitlines()[:-1])}

    # (a) the tracked activity, as the recorder shows it
    track = out["track"]
    assert track["status"] == "success" and track["progress"] == 100.0 and track["found_by_prefix"], track
    assert (track["message_count"], track["last_seq"]) == (3, 3), track
    assert track["messages"] == ["read 10 rows", "row 7 skipped", "imported 10 rows"], track
    record = anyio.run(_get, url, prefix, track["activity_id"]).activity
    assert record.type == "node_import" and record.result == {"rows": 10}, record
    assert record.latest_message == "imported 10 rows", record

    # (b) the Python worker's activity, cancelled by a user from Node
    cancel = out["cancel"]
    assert cancel["outcome"] == "accepted" and cancel["ok"] is False, cancel
    assert cancel["error"]["cause"]["kind"] == "user" and cancel["error"]["cause"]["who"] == "node", cancel
    assert cancel["status"] == "cancelled", cancel
    record = anyio.run(_get, url, prefix, cancel["activity_id"]).activity
    assert record.status == "cancelled" and record.worker_id, record

    # (c) the session: assigned, the task ran on the worker, completed; recreated on the same worker
    session = out["session"]
    assert session["ok"] is True and session["result"] == {"from": "node", "n": [1, 2, 3]}, session
    assert session["ended"] == "session.completed" and session["recreated_ended"] == "session.completed", session
    assert session["recreated_worker_id"] == session["worker_id"] == session["recreated_where"], session
    record = anyio.run(_get, url, prefix, session["activity_id"]).activity
    assert record.status == "success" and record.session_id == session["session_id"], record
