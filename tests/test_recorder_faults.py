"""The recorder and the handlers as real processes: SIGKILL, restart, replicas, bad input, the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bus
from bus.testing import ServiceProcess, eventually, unique_prefix
from schemas import ActivityStatus, DeadLetter
from tests._helpers import terminal, wait_record

RECORDER_ARGS = ("--sweep-interval", "0.1")


def recorder(prefix: str, url: str) -> ServiceProcess:
    return ServiceProcess("services.recorder", "--prefix", prefix, *RECORDER_ARGS, url=url)


def host(prefix: str, url: str, *args: str) -> ServiceProcess:
    return ServiceProcess("tests.activity_host", "--prefix", prefix, *args, url=url)


def _activity_of(proc: ServiceProcess) -> str:
    return next(line.split()[1] for line in proc.output if line.startswith("activity "))


async def test_handler_process_killed_with_sigkill_ends_failed_host_lost_never_stays_running(
    nats_server: Any,
) -> None:
    prefix, interval = unique_prefix(), 0.3
    async with bus.connect(nats_server.url, prefix=prefix) as b:
        with recorder(prefix, nats_server.url), host(prefix, nats_server.url, "--interval", str(interval)) as h:
            activity_id = _activity_of(h)
            got, _ = await wait_record(b, activity_id, lambda r: True)
            assert got.status is ActivityStatus.RUNNING
            h.kill()
            t0 = time.monotonic()
            got, msgs = await wait_record(b, activity_id, terminal)
            took = time.monotonic() - t0
    assert got.status is ActivityStatus.FAILED and got.error and "host lost" in got.error
    assert msgs[-1].message == got.error
    # documented bound: 3 x the heartbeat interval after the last beat, plus one sweep and the fold
    assert took < 3 * interval + 1.5, f"took {took:.2f}s"


async def test_recorder_killed_and_restarted_mid_stream_loses_nothing_duplicates_nothing(nats_server: Any) -> None:
    prefix, n = unique_prefix(), 20_000
    async with bus.connect(nats_server.url, prefix=prefix) as b:
        first = recorder(prefix, nats_server.url).start()
        try:
            with host(prefix, nats_server.url, "--mode", "lines", "--lines", str(n)) as h:
                activity_id = _activity_of(h)
                await wait_record(b, activity_id, lambda r: r.message_count > 2000, timeout=30)
                first.kill()  # mid-stream, no goodbye
                assert not any("completed" in line for line in h.output)
                with recorder(prefix, nats_server.url):
                    got, _ = await wait_record(b, activity_id, terminal, timeout=60)
                    got, tail = await wait_record(b, activity_id, lambda r: r.message_count == n + 1, timeout=30)
        finally:
            first.kill()
        messages = (await bus.read_activity_messages(b, activity_id)).messages
    assert got.status is ActivityStatus.SUCCESS and got.last_seq == n + 1
    assert [m.seq for m in messages] == list(range(1, n + 2))  # gap-free, each once
    assert [m.message for m in messages[:n]] == [f"line {i}" for i in range(n)]
    assert tail[-1].message == "done"


async def test_two_recorder_replicas_never_double_apply_an_event(nats_server: Any) -> None:
    prefix = unique_prefix()
    async with bus.connect(nats_server.url, prefix=prefix) as b:
        with recorder(prefix, nats_server.url), recorder(prefix, nats_server.url):
            async with bus.BusActivityService(b) as svc:
                ids = []
                for i in range(20):
                    rec = await svc.start_activity(bus.StartRequest(type="t"))
                    for j in range(10):
                        await svc.append_message(rec.id, bus.AppendMessageRequest(message=f"{i}.{j}", progress=j * 10))
                    await svc.complete_activity(rec.id, ActivityStatus.SUCCESS, "done")
                    ids.append(rec.id)
                for activity_id in ids:
                    got, msgs = await wait_record(b, activity_id, lambda r: r.terminal and r.message_count == 11)
                    assert got.last_seq == 11 and [m.seq for m in msgs] == list(range(1, 12))
                    assert got.progress == 100 and got.latest_message == "done"
            # Either replica answers a list from its own cache (fed by the bucket's watcher), so
            # the two may differ for a moment: poll until the one that answers has caught up.
            client = bus.ActivityClient(b)
            listed = await client.list(limit=500)

            async def all_succeeded() -> bool:
                nonlocal listed
                listed = await client.list(limit=500)
                return listed.total == 20 and all(a.status is ActivityStatus.SUCCESS for a in listed.items)

            await eventually(all_succeeded, interval=0.05, what=lambda: f"20 listed, all succeeded: {listed}")
    assert listed.total == 20 and all(a.status is ActivityStatus.SUCCESS for a in listed.items)


async def test_recorder_process_prints_ready_and_stops_gracefully_on_sigterm(nats_server: Any) -> None:
    proc = recorder(unique_prefix(), nats_server.url).start()
    assert any("cadenza: ready" in line for line in proc.output)
    assert proc.stop(timeout=15) == 0


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_input_recorder(nats_server: Any) -> Iterator[tuple[str, str]]:
    prefix = unique_prefix()
    with recorder(prefix, nats_server.url):
        yield prefix, nats_server.url


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_bad_payloads = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["activity_id", "seq", "entries", "status", "limit"]), _json_values, max_size=3
    ).map(lambda d: json.dumps({**d, "type": "activity.message", "seq": -1}).encode()),
    st.just(b"x" * (300 * 1024)),  # oversize
)

_SUBJECTS = [
    ("activity", "started", "recorder"),
    ("activity", "updated", "recorder"),
    ("activity", "message", "recorder"),
    ("activity", "completed", "recorder"),
    ("worker", "heartbeat", "recorder-workers"),
    ("worker", "stopped", "recorder-workers"),
]


async def _dead_lettered(b: bus.Bus, consumer: str, data: bytes) -> bool:
    subject = b.subjects.build("dlq", consumer, "rejected")
    digest = hashlib.sha256(data).hexdigest()
    try:
        msg = await b.js.get_last_msg(b.topology.stream_name("dlq"), subject)
    except Exception:
        return False
    return bool(DeadLetter.model_validate_json(msg.data or b"").payload_sha256 == digest)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=_bad_payloads, where=st.sampled_from(_SUBJECTS), endpoint=st.sampled_from(["list", "get", "tail", "cancel"])
)
def test_bad_input_on_every_subject_and_request_is_refused_dead_lettered_and_the_recorder_keeps_serving(
    bad_input_recorder: tuple[str, str], payload: bytes, where: tuple[str, str, str], endpoint: str
) -> None:
    prefix, url = bad_input_recorder

    async def check() -> None:
        async with bus.connect(url, prefix=prefix, ensure_topology=False) as b:
            domain, event, consumer = where
            subject = b.subjects.build(domain, "bad-" + hashlib.sha1(payload).hexdigest()[:8], event)
            if len(payload) > 1024 * 1024 - 1024:
                return
            await b.js.publish(subject, payload)  # stored: straight to the stream, no validation
            await eventually(
                lambda: _dead_lettered(b, consumer, payload), interval=0.02, what=f"dead-lettered by {consumer}"
            )
            if endpoint != "list" or payload[:1] != b"{":
                msg = await b.nc.request(b.rpc_subject("recorder", endpoint), payload, timeout=5)
                reply = json.loads(msg.data)
                assert reply["ok"] is False and reply["error"]["code"] == "validation", reply
                assert reply["error"]["message"]
                await eventually(
                    lambda: _dead_lettered(b, f"recorder-{endpoint}", payload), interval=0.02,
                    what=f"dead-lettered by recorder-{endpoint}",
                )  # fmt: skip
            listed = await bus.ActivityClient(b).list()  # still serving
            assert listed.total >= 0

    anyio.run(check)


# ---------------------------------------------------------------- the command line


def _cli(url: str, prefix: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--server", url, "--prefix", prefix],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


async def test_cli_activities_ls_get_tail_cancel_readable_and_json(nats_server: Any) -> None:
    prefix = unique_prefix()
    url = nats_server.url
    async with bus.connect(url, prefix=prefix) as b:
        # A heartbeat a second (host timeout 3 s): this test is about the CLI, and on a loaded machine
        # a 0.3 s heartbeat once came late enough for the host-lost sweep to end the activity first.
        with recorder(prefix, url), host(prefix, url, "--interval", "1.0") as h:
            activity_id = _activity_of(h)
            await wait_record(b, activity_id, lambda r: True)
            ls = await anyio.to_thread.run_sync(lambda: _cli(url, prefix, "activities", "ls"))
            assert ls.returncode == 0 and activity_id in ls.stdout and "running" in ls.stdout
            ls_json = await anyio.to_thread.run_sync(lambda: _cli(url, prefix, "activities", "ls", "--json"))
            assert json.loads(ls_json.stdout)["items"][0]["id"] == activity_id
            tail = await anyio.to_thread.run_sync(
                lambda: subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "services.cli",
                        "activities",
                        "tail",
                        activity_id,
                        "--server",
                        url,
                        "--prefix",
                        prefix,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            try:
                cancel = await anyio.to_thread.run_sync(
                    lambda: _cli(url, prefix, "activities", "cancel", activity_id, "--who", "frank")
                )
                assert cancel.returncode == 0 and "requested" in cancel.stdout
                await wait_record(b, activity_id, terminal)
                out, err = await anyio.to_thread.run_sync(lambda: tail.communicate(timeout=30))
            finally:
                if tail.poll() is None:
                    tail.kill()
                    tail.communicate(timeout=5)
            assert tail.returncode == 0, err
            assert "Cancellation requested by frank" in out and "Cancelled by user" in out and "cancelled" in err
            get = await anyio.to_thread.run_sync(lambda: _cli(url, prefix, "activities", "get", activity_id))
            assert get.returncode == 0 and "status      cancelled" in get.stdout
            get_json = await anyio.to_thread.run_sync(
                lambda: _cli(url, prefix, "activities", "get", activity_id, "--json")
            )
            assert json.loads(get_json.stdout)["activity"]["status"] == "cancelled"
            again = await anyio.to_thread.run_sync(lambda: _cli(url, prefix, "activities", "cancel", activity_id))
            assert again.returncode == 1 and "not_cancellable" in again.stderr
            missing = await anyio.to_thread.run_sync(lambda: _cli(url, prefix, "activities", "get", "nope"))
            assert missing.returncode == 1 and "not found" in missing.stderr


def test_cli_dev_starts_the_recorder_beside_the_embedded_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "dev", "--port", "0", "--duration", "1"],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert "recorder: running" in out.stdout, out.stdout + out.stderr
