"""Every ``cadenza`` command with bad input: one line on stderr saying what to fix, a non-zero exit,
no traceback, and nothing written to the streams or buckets. Run as a user would, as subprocesses
against a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import bus
from bus.testing import unique_prefix

_BAD = "http://127.0.0.1:4222"


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{s.getsockname()[1]}"  # nobody listens once the socket is closed


#: (case id, arguments, extra environment or None, a piece of the expected line)
CASES: list[tuple[str, list[str], dict[str, str] | None, str]] = [
    ("sessions get bad characters", ["sessions", "get", "garbage!!"], None, "is not a session id"),
    ("sessions get empty", ["sessions", "get", ""], None, "an empty session id"),
    ("sessions get wildcard", ["sessions", "get", "a*"], None, "is not a session id"),
    ("sessions get unknown", ["sessions", "get", "nonexistent"], None, "no session nonexistent"),
    ("sessions complete unknown", ["sessions", "complete", "nonexistent"], None, "no session nonexistent"),
    ("sessions complete bad", ["sessions", "complete", "bad!"], None, "is not a session id"),
    ("sessions ls bad state", ["sessions", "ls", "--state", "sleepy"], None, "invalid choice"),
    ("sessions ls limit 0", ["sessions", "ls", "--limit", "0"], None, "must be at least 1"),
    ("sessions no action", ["sessions"], None, "required"),
    ("activities get bad", ["activities", "get", "bad id!*"], None, "is not an activity id"),
    ("activities get limit", ["activities", "get", "abc", "--limit", "1000"], None, "between 0 and 500"),
    # No recorder runs here: it is the one that knows the ids, and the line says so.
    ("activities get unknown", ["activities", "get", "nonexistent"], None, "rpc.recorder.get; is it running"),
    ("activities ls limit 0", ["activities", "ls", "--limit", "0"], None, "between 1 and 500"),
    ("activities ls limit text", ["activities", "ls", "--limit", "many"], None, "not a whole number"),
    ("activities ls bad status", ["activities", "ls", "--status", "done"], None, "invalid choice"),
    ("activities ls offset", ["activities", "ls", "--offset", "-1"], None, "at least 0"),
    ("activities tail bad", ["activities", "tail", "a b"], None, "is not an activity id"),
    ("activities tail unknown", ["activities", "tail", "nonexistent"], None, "rpc.recorder.get; is it running"),
    ("activities cancel unknown", ["activities", "cancel", "nonexistent"], None, "rpc.recorder.get; is it running"),
    ("activities cancel wildcard", ["activities", "cancel", ">"], None, "is not an activity id"),
    ("schemas check missing dir", ["schemas", "check", "--dir", "/nonexistent"], None, "no such directory"),
    ("schemas export missing dir", ["schemas", "export", "--dir", "/nonexistent/deeper"], None, "no such directory"),
    ("schemas bad action", ["schemas", "delete"], None, "invalid choice"),
    ("publish unknown type", ["publish", "no.such", "{}"], None, "unknown event type"),
    ("publish not json", ["publish", "activity.started", "{not json"], None, "JSON Schema is"),
    ("publish wrong shape", ["publish", "worker.heartbeat", '{"seq": "x"}'], None, "JSON Schema is"),
    ("publish missing file", ["publish", "worker.heartbeat", "@/nonexistent.json"], None, "cannot read"),
    ("worker no colon", ["worker", "services.demo.worker"], None, "expected MODULE:OBJECT"),
    ("worker no module", ["worker", "nosuchmodule_xyz:registry"], None, "must be importable"),
    ("worker no object", ["worker", "services.demo.worker:nothing"], None, "has no 'nothing'"),
    ("worker max sessions", ["worker", "services.demo.worker:activities", "--max-sessions", "0"], None, "at least 1"),
    ("worker tasklist", ["worker", "services.demo.worker:activities", "--tasklist", "a.b"], None, "not a tasklist"),
    ("broker negative", ["broker", "--sweep-interval", "-1"], None, "out of range"),
    ("recorder text", ["recorder", "--retention-days", "soon"], None, "not a number"),
    ("tail bad subject", ["tail", "a b", "--count", "1"], None, "cadenza:"),
    ("unknown command", ["nosuch"], None, "invalid choice"),
    ("http url", ["sessions", "ls"], {"NATS_URL": _BAD}, "NATS URLs start with nats:// or tls://"),
    ("http url option", ["workers", "ls", "--server", _BAD], None, "NATS URLs start with nats:// or tls://"),
    ("closed port", ["sessions", "ls"], {"NATS_URL": "closed"}, "cannot connect to NATS"),
    (
        "closed port publish",
        ["publish", "worker.heartbeat", '{"worker_id": "w", "seq": 1}'],
        {"NATS_URL": "closed"},
        "cannot connect to NATS",
    ),
    ("no server", ["activities", "ls"], {"NATS_URL": ""}, "no server given"),
    ("unknown event loop", ["sessions", "ls"], {"CADENZA_EVENT_LOOP": "tokio"}, "use uvloop or asyncio"),
    ("bad gc threshold", ["sessions", "ls"], {"CADENZA_GC_THRESHOLD": "lots"}, "is not a whole number"),
]


@pytest.fixture(scope="module")
def installation(nats_server: Any) -> Iterator[tuple[str, str]]:
    """A prefix with its streams and buckets declared (as `cadenza setup` leaves them)."""
    prefix = unique_prefix()
    out = _run(["setup"], {"NATS_URL": nats_server.url, "CADENZA_PREFIX": prefix})
    assert out.returncode == 0, out.stderr
    yield nats_server.url, prefix


def _run(args: list[str], env: dict[str, str], cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CADENZA_", "OTEL_"))}
    full.update({k: v for k, v in env.items() if v})
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=60, env=full, stdin=subprocess.DEVNULL, cwd=cwd)  # fmt: skip


async def _state(url: str, prefix: str) -> dict[str, Any]:
    """Every stream's and bucket's message count and last sequence (any write moves the last)."""
    out: dict[str, Any] = {}
    async with bus.connect(url, prefix=prefix, name="snapshot", ensure_topology=False) as b:
        for _, name, _, _ in b.topology.table():
            if name.startswith("("):
                continue
            info = await b.js.stream_info(name)
            out[name] = (info.state.messages, info.state.last_seq)
    assert len(out) >= 9
    return out


@pytest.mark.parametrize(("args", "env", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_input_is_one_line_and_writes_nothing(
    installation: tuple[str, str], args: list[str], env: dict[str, str] | None, expected: str
) -> None:
    url, prefix = installation
    environment = {"NATS_URL": url, "CADENZA_PREFIX": prefix, **(env or {})}
    if environment["NATS_URL"] == "closed":
        environment["NATS_URL"] = _closed_port()
    before = await _state(url, prefix)
    out = _run(args, environment)
    after = await _state(url, prefix)
    lines = out.stderr.splitlines()
    assert out.returncode != 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    assert len(lines) == 1, out.stderr
    assert expected in lines[0], lines[0]
    assert after == before, "a bad command changed the streams or buckets"


async def test_a_read_of_an_unknown_session_leaves_no_record(installation: tuple[str, str]) -> None:
    url, prefix = installation
    env = {"NATS_URL": url, "CADENZA_PREFIX": prefix}
    assert _run(["sessions", "complete", "typo"], env).returncode == 1
    listed = _run(["sessions", "ls"], env)
    assert listed.returncode == 0 and "typo" not in listed.stdout
    assert listed.stderr == "", "a command that worked says nothing on stderr (no 'disconnected' line)"


async def test_a_session_id_prefix_is_accepted_when_unambiguous(installation: tuple[str, str]) -> None:
    from schemas import SessionRecord

    url, prefix = installation
    async with bus.connect(url, prefix=prefix, name="seed", ensure_topology=False) as b:
        kv = await b.kv("sessions")
        for sid in ("abc111", "abc222", "xyz999"):
            await kv.put(sid, SessionRecord(session_id=sid, tasklist="t").model_dump_json().encode())
    env = {"NATS_URL": url, "CADENZA_PREFIX": prefix}
    one = _run(["sessions", "get", "xyz", "--json"], env)
    assert one.returncode == 0 and '"session_id": "xyz999"' in one.stdout, one.stderr
    many = _run(["sessions", "get", "abc"], env)
    assert many.returncode == 1 and many.stderr.count("\n") == 1
    assert "abc111" in many.stderr and "abc222" in many.stderr


def test_version_and_help_on_every_option() -> None:
    out = _run(["--version"], {})
    assert out.returncode == 0 and out.stdout.startswith("cadenza ")
    from services.cli import build_parser

    missing = []

    def walk(parser: Any, path: str) -> None:
        for action in parser._actions:
            if action.help is None and action.dest not in ("help", "command") and not action.dest.endswith("_command"):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "cadenza")
    assert not missing, "options without help text: " + ", ".join(missing)


async def test_an_activity_id_prefix_is_resolved_by_the_recorder(installation: tuple[str, str]) -> None:
    import anyio

    from schemas import ActivityCompleted, ActivityStart, ActivityStatus, utcnow
    from services.recorder import Recorder

    url, prefix = installation
    env = {"NATS_URL": url, "CADENZA_PREFIX": prefix}
    async with bus.connect(url, prefix=prefix, name="seed", ensure_topology=False) as b:
        for aid in ("act-111", "act-222", "zzz-333"):
            start = ActivityStart(started_at=utcnow(), activity_type="t")
            await b.publish(ActivityCompleted(event_id=f"{aid}.completed", activity_id=aid,
                                              status=ActivityStatus.SUCCESS, start=start))  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(Recorder(b).run)
            many = await anyio.to_thread.run_sync(lambda: _run(["activities", "get", "act"], env))
            one = await anyio.to_thread.run_sync(lambda: _run(["activities", "get", "zzz"], env))
            tg.cancel_scope.cancel()
    assert many.returncode == 1 and many.stderr.count("\n") == 1
    assert "act-111" in many.stderr and "act-222" in many.stderr
    assert one.returncode == 0 and "zzz-333" in one.stdout and "success" in one.stdout, one.stderr


def test_schemas_export_without_dir_never_writes_into_the_package(tmp_path: Any) -> None:
    # The console script, as a user runs it (`python -m` would put tmp_path's schemas/ on the path).
    script = os.path.join(os.path.dirname(sys.executable), "cadenza")
    run = {"capture_output": True, "text": True, "timeout": 60, "cwd": str(tmp_path)}
    out = subprocess.run([script, "schemas", "export"], **run)  # type: ignore[call-overload]
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "pass --dir DIR" in out.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "schemas" / "json").mkdir(parents=True)
    out = subprocess.run([script, "schemas", "export"], **run)  # type: ignore[call-overload]
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "schemas" / "json" / "activity.started.json").is_file()


def test_worker_imports_the_project_from_the_current_directory(installation: tuple[str, str], tmp_path: Any) -> None:
    from bus.testing import ChildProcess

    url, prefix = installation
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "activities.py").write_text(
        "import bus\nregistry = bus.ActivityRegistry()\n\n@registry.activity()\nasync def hello() -> str:\n"
        "    return 'hi'\n"
    )
    # ChildProcess runs `python -m services.cli ...` from the test's directory; the worker must find
    # myapp from its own working directory, as `cadenza worker` run in the project would.
    proc = ChildProcess("services.cli", "worker", "myapp.activities:registry", "--prefix", prefix,
                        env={"NATS_URL": url, "PYTHONSAFEPATH": "1"})  # fmt: skip
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        proc.start(timeout=60)
    finally:
        os.chdir(here)
    try:
        assert "activities hello" in proc.ready_line
    finally:
        proc.stop(timeout=10)
