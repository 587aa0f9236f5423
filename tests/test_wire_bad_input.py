"""Malformed messages to every subject a cadenza service consumes, through real processes.

A recorder, a broker and a session worker run as processes; the test's own bus holds a session
client. Every message sent is bad for every consumer of its subject (not JSON, the wrong shape or
types, oversize, empty, a wrong version in the header or the body, a header that contradicts the
body), so by construction each consumer must store exactly one dead-letter entry per message it
reads, and each request must get an error reply as well. Afterwards every service still serves:
the recorder answers, a session opens and runs an activity, the worker answers a ping.

CI sends 10,000 messages; the slow variant 100,000.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import pydantic
import pytest

import bus
from bus.sessions._client import client_of
from bus.testing import ExternalServer, ServiceProcess, eventually, unique_prefix
from bus.transport._codec import MAX_EVENT_BYTES
from schemas import (
    ENDPOINTS,
    ActivityCompleted,
    ActivityMessage,
    ActivityResult,
    ActivityStarted,
    ActivityTask,
    ActivityUpdated,
    CancelCause,
    CancelKind,
    CancelRequested,
    Event,
    GetActivityReply,
    GetActivityRequest,
    ListActivitiesReply,
    ListActivitiesRequest,
    MessageEntry,
    SessionAssigned,
    SessionCompleted,
    SessionCompleteRequested,
    SessionRequested,
    WorkerHeartbeat,
    WorkerPing,
    WorkerPong,
    utcnow,
)
from tests._helpers import worker_id

TASKLIST = "wire-bad"


@dataclass
class Rig:
    portal: anyio.from_thread.BlockingPortal
    b: bus.Bus
    procs: list[ServiceProcess]
    worker_id: str
    inbox: str = ""


@pytest.fixture(scope="module")
def rig(nats_server: Any) -> Iterator[Rig]:
    if isinstance(nats_server, ExternalServer):
        pytest.skip("needs the embedded server (starts service processes)")
    prefix, url = unique_prefix(), nats_server.url
    procs = [
        ServiceProcess("services.recorder", "--prefix", prefix, url=url),
        ServiceProcess("services.broker", "--prefix", prefix, url=url, env={"CADENZA_TOKEN_KEY": "k" * 32}),
        ServiceProcess(
            "tests.session_worker", "--prefix", prefix, "--tasklist", TASKLIST, "--interval", "0.5", url=url
        ),
    ]
    try:
        for p in procs:
            p.start(timeout=40)
        wid = worker_id(procs[2])
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(bus.connect(url, prefix=prefix, name="wire-test")) as b:
                r = Rig(portal, b, procs, wid)
                portal.call(_still_serving, r)  # also starts this process's session client
                r.inbox = portal.call(client_of, b).inbox
                yield r
    finally:
        for p in procs:
            p.kill()


# ---------------------------------------------------------------- targets: each subject and who reads it


@dataclass(frozen=True)
class Target:
    """One consumed subject: how to build it, what a valid message is, and which consumers read it."""

    name: str
    subject: Callable[[Rig, int], str]
    valid: Callable[[Rig, int], dict[str, Any]]
    consumers: Callable[[Rig], tuple[str, ...]]
    #: How it travels: "stream" (JetStream publish), "core" (plain publish) or "request" (error reply expected).
    mode: str = "stream"
    accept: tuple[type[Event], ...] = ()
    request: type[pydantic.BaseModel] | None = None


def _ev(event: Event) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event.model_dump_json())
    return data


def _sid(n: int) -> str:
    return f"bad-{n}-{uuid.uuid4().hex[:6]}"


def _subject(domain: str, event: str) -> Callable[[Rig, int], str]:
    return lambda r, n: r.b.subjects.build(domain, _sid(n), event)


def _recorder_endpoint(method: str, name: str, request: type[pydantic.BaseModel]) -> Target:
    return Target(name, lambda r, n: r.b.rpc_subject("recorder", method), lambda r, n: {},
                  lambda r: (f"recorder-{method}",), mode="request", request=request)  # fmt: skip


_CAUSE = CancelCause(kind=CancelKind.USER, who="t")
TARGETS: tuple[Target, ...] = (
    Target("session.requested", _subject("session", "requested"),
           lambda r, n: _ev(SessionRequested(session_id=_sid(n), tasklist=TASKLIST, creation_timeout=1,
                                             execution_timeout=1)),
           lambda r: ("broker-requests",), accept=(SessionRequested,)),
    Target("session.complete", _subject("session", "complete"),
           lambda r, n: _ev(SessionCompleteRequested(session_id=_sid(n))),
           lambda r: ("broker-control",), accept=(SessionCompleteRequested,)),
    Target("session.assigned", _subject("session", "assigned"),
           lambda r, n: _ev(SessionAssigned(session_id=_sid(n), tasklist=TASKLIST, worker_id=r.worker_id,
                                            expires_at=utcnow(), recreate_token="t")),
           lambda r: ("session-client",), accept=(SessionAssigned,)),
    Target("session.completed", _subject("session", "completed"),
           lambda r, n: _ev(SessionCompleted(session_id=_sid(n))),
           lambda r: ("session-client",), accept=(SessionCompleted,)),
    Target("task.queued", lambda r, n: r.b.subjects.build("task", TASKLIST, "queued"),
           lambda r, n: _ev(ActivityTask(activity_id=_sid(n), name="echo", tasklist=TASKLIST)),
           lambda r: (f"tasks-{TASKLIST}",), accept=(ActivityTask,)),
    Target("task.inbox", lambda r, n: r.b.subjects.build("task", r.worker_id, "inbox"),
           lambda r, n: _ev(ActivityTask(activity_id=_sid(n), name="echo", tasklist=TASKLIST, worker_id=r.worker_id,
                                         session_id="none")),
           lambda r: (f"inbox-{r.worker_id}",), accept=(ActivityTask,)),
    Target("worker.heartbeat", _subject("worker", "heartbeat"),
           lambda r, n: _ev(WorkerHeartbeat(worker_id=_sid(n))),
           lambda r: ("broker-workers", "recorder-workers"), accept=(WorkerHeartbeat,)),
    Target("activity.started", _subject("activity", "started"),
           lambda r, n: _ev(ActivityStarted(activity_id=_sid(n), activity_type="t")),
           lambda r: ("recorder",), accept=(ActivityStarted,)),
    Target("activity.updated", _subject("activity", "updated"),
           lambda r, n: _ev(ActivityUpdated(activity_id=_sid(n), progress=1)),
           lambda r: ("recorder",), accept=(ActivityUpdated,)),
    Target("activity.message", _subject("activity", "message"),
           lambda r, n: _ev(ActivityMessage(activity_id=_sid(n), seq=1, entries=[MessageEntry(message="m")])),
           lambda r: ("recorder",), accept=(ActivityMessage,)),
    Target("activity.completed", _subject("activity", "completed"),
           lambda r, n: _ev(ActivityCompleted(activity_id=_sid(n), status="success")),
           lambda r: ("recorder",), accept=(ActivityCompleted,)),
    Target("cancel.requested", _subject("cancel", "requested"),
           lambda r, n: _ev(CancelRequested(target="activity", target_id=_sid(n), cause=_CAUSE)),
           lambda r: ("cancel-router",), accept=(CancelRequested,)),
    Target("task.result", lambda r, n: f"{r.inbox}.{_sid(n)}",
           lambda r, n: _ev(ActivityResult(activity_id=_sid(n), ok=True)),
           lambda r: ("session-client",), mode="core", accept=(ActivityResult,)),
    *(_recorder_endpoint(ep.method, ep.name, ep.request) for ep in ENDPOINTS if ep.served_by == "recorder"),
    Target("rpc.worker.ping", lambda r, n: r.b.rpc_subject(r.worker_id, "ping"), lambda r, n: {},
           lambda r: (f"ping-{r.worker_id}",), mode="request", request=WorkerPing),
)  # fmt: skip


# ---------------------------------------------------------------- bad messages, by construction


def _bad_event(kind: int, valid: dict[str, Any], rnd: random.Random) -> tuple[bytes, dict[str, str]]:
    """The ``kind``-th way of being bad (each always bad, whatever the event type)."""
    body = dict(valid)
    hdrs: dict[str, str] = {}
    match kind:
        case 0:
            return b"", hdrs  # empty body
        case 1:
            return bytes(rnd.randrange(128, 256) for _ in range(rnd.randrange(1, 60))), hdrs  # not UTF-8
        case 2:
            return rnd.choice([b"{", b"not json", b"{'a': 1}", b"{" * 3000, b"[1,"]), hdrs  # not JSON
        case 3:
            return json.dumps(rnd.choice([[1, 2], 5, "text", None, True, [valid]])).encode(), hdrs  # wrong shape
        case 4:
            body["type"] = "other.thing"  # another event type
        case 5:
            body[rnd.choice(["event_id", "source"])] = rnd.choice([[1], {"a": 1}, 7, None])  # wrong types
        case 6:
            body["time"] = rnd.choice(["yesterday", [1], {"t": 1}, ""])
        case 7:
            body["zz_unknown_field"] = 1  # extra field
        case 8:
            # A version in the body no consumer knows (3: newer than any type's).
            body["schema_version"] = rnd.choice([3, 999, "v-one", 0, -1, 1.5, "1", None])
        case 9:
            hdrs["Cadenza-Schema-Version"] = rnd.choice(["999", "v-one", "0", "", "3", "-1", "1.0"])  # in the header
        case 10:
            hdrs["Cadenza-Event-Type"] = "other.thing"  # the header contradicts the body
        case 11:
            hdrs["Nats-Msg-Id"] = f"not-{body['event_id']}"  # not the body's event id
        case _:
            body["source"] = "s" * (MAX_EVENT_BYTES + 1)  # oversize
    return json.dumps(body).encode(), hdrs


def _bad_request(i: int, rnd: random.Random) -> bytes:
    if i % 200 == 199:
        return b'{"a": "' + b"x" * (MAX_EVENT_BYTES + 1) + b'"}'  # oversize (rarely: its copy is large)
    match i % 6:
        case 0:
            return b""
        case 1:
            return bytes(rnd.randrange(128, 256) for _ in range(rnd.randrange(1, 60)))
        case 2:
            return rnd.choice([b"{", b"nope", b"[1,"])
        case 3:
            return json.dumps(rnd.choice([[1], 5, "x", None])).encode()
        case 4:
            return json.dumps({"zz_unknown_field": 1}).encode()
        case _:
            bad = rnd.choice([5, [1], None, "has space", "x" * 300])
            return json.dumps({"activity_id": bad, "limit": "many"}).encode()


_KINDS = 13  # _bad_event's kinds; the oversize one (the last) is sent rarely: its copy is large


def _kind_for(i: int, rnd: random.Random) -> int:
    return _KINDS - 1 if i % 500 == 499 else rnd.randrange(_KINDS - 1)


# ---------------------------------------------------------------- sending and counting


@dataclass
class Sent:
    expected: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)


async def _send(r: Rig, total: int, seed: int) -> Sent:
    rnd = random.Random(seed)
    out = Sent()
    n = len(TARGETS)
    nc, js = r.b.nc, r.b.js

    async def one(target: Target, i: int) -> None:
        subject = target.subject(r, i)
        if target.mode == "request":
            data = _bad_request(i, rnd)
            assert target.request is not None
            with pytest.raises(pydantic.ValidationError):
                target.request.model_validate_json(data)
            msg = await nc.request(subject, data, timeout=30)
            reply = json.loads(msg.data)
            assert reply["ok"] is False and reply["error"]["code"] == "validation", reply
            out.replies[target.name] += 1
        else:
            kind = _kind_for(i, rnd)
            data, hdrs = _bad_event(kind, target.valid(r, i), rnd)
            with pytest.raises(bus.ValidationError):
                bus.decode(data, hdrs, target.accept)
            if target.mode == "core":
                await nc.publish(subject, data, headers=hdrs or None)
            else:
                ack = await js.publish(subject, data, headers=hdrs or None, timeout=30)
                assert not ack.duplicate
            out.kinds[str(kind)] += 1
        for consumer in target.consumers(r):
            out.expected[consumer] += 1

    for index, target in enumerate(TARGETS):
        per = total // n + (1 if index < total % n else 0)
        for start in range(0, per, 64):
            async with anyio.create_task_group() as tg:
                for i in range(start, min(per, start + 64)):
                    tg.start_soon(one, target, i)
    await nc.flush()
    return out


async def _dlq_counts(b: bus.Bus) -> Counter[str]:
    stream = b.topology.stream_name("dlq")
    info = await b.js.stream_info(stream, subjects_filter=b.subjects.filter("dlq", event="rejected"))
    counts: Counter[str] = Counter()
    for subject, n in (info.state.subjects or {}).items():
        counts[b.subjects.parse(subject).id] += n
    return counts


async def _wait_dead_letters(r: Rig, before: Counter[str], sent: Sent, timeout: float) -> Counter[str]:
    want = {c: before[c] + n for c, n in sent.expected.items()}
    got: Counter[str] = Counter()

    async def all_stored() -> bool:
        got.clear()
        got.update(await _dlq_counts(r.b))
        return all(got[c] >= n for c, n in want.items())

    def short() -> str:
        missing = {c: (got[c] - before[c], sent.expected[c]) for c in want if got[c] < want[c]}
        return f"dead letters (stored, expected) short of the rejections: {missing}"

    await eventually(all_stored, timeout=timeout, interval=0.2, what=short)
    return Counter({c: got[c] - before[c] for c in want})


async def _still_serving(r: Rig) -> None:
    """Every process lives; the recorder answers, a session runs an activity, the worker answers a ping."""
    for p in r.procs:
        assert p.proc is not None and p.proc.poll() is None, f"{p.module} died"
    page = await r.b.request(r.b.rpc_subject("recorder", "list"), ListActivitiesRequest(), ListActivitiesReply)
    assert page.total >= 0
    opts = bus.SessionOptions(execution_timeout=60, creation_timeout=20, heartbeat_timeout=5.0, tasklist=TASKLIST)
    async with bus.session(r.b.context(), opts) as sctx:
        assert await bus.execute_activity(sctx, "echo", [1, "x"], start_to_close_timeout=20) == [1, "x"]
    pong = await r.b.request(r.b.rpc_subject(r.worker_id, "ping"), WorkerPing(), WorkerPong)
    assert pong.worker_id == r.worker_id


def _run(r: Rig, total: int, timeout: float) -> None:
    before = r.portal.call(_dlq_counts, r.b)
    sent = r.portal.call(_send, r, total, total)
    stored = r.portal.call(_wait_dead_letters, r, before, sent, timeout)
    # Exactly one entry per consumer and rejection: none lost (colliding ids), none doubled.
    assert stored == sent.expected, {c: (stored[c], sent.expected[c]) for c in sent.expected}
    assert set(sent.kinds) == {str(k) for k in range(_KINDS)}, sent.kinds
    assert all(sent.replies[t.name] > 0 for t in TARGETS if t.mode == "request"), sent.replies
    r.portal.call(_still_serving, r)


def test_every_rejection_of_every_consumer_is_one_dead_letter_and_services_keep_serving(rig: Rig) -> None:
    _run(rig, 10_000, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_rejection_is_one_dead_letter_100k(rig: Rig) -> None:
    _run(rig, 100_000, timeout=1500)


def test_a_dead_letter_entry_names_the_reason_and_keeps_the_original(rig: Rig) -> None:
    async def go() -> None:
        b = rig.b
        subject = b.subjects.build("activity", "hdr-check", "updated")
        body = ActivityUpdated(activity_id="hdr-check", progress=5).model_dump_json().encode()
        await b.js.publish(subject, body, headers={"Cadenza-Schema-Version": "v-one"}, timeout=10)
        dlq = b.subjects.build("dlq", "recorder", "rejected")
        sub = await b.js.subscribe(dlq, stream=b.topology.stream_name("dlq"), ordered_consumer=True)
        try:
            with anyio.fail_after(30):
                while True:
                    msg = await sub.next_msg(timeout=10)
                    letter = json.loads(msg.data)
                    if letter["subject"] == subject:
                        break
        finally:
            await sub.unsubscribe()
        assert letter["error_type"] == "bad_version"
        assert "Cadenza-Schema-Version" in letter["reason"] and "v-one" in letter["reason"]
        assert letter["headers"]["Cadenza-Schema-Version"] == "v-one"
        assert letter["payload"] == body.decode() and letter["consumer"] == "recorder"
        assert letter["event_id"] == f"dlq-recorder-{letter['stream']}-{letter['stream_seq']}"

    rig.portal.call(go)


def _cadenza(r: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    where = ("--server", r.b.url, "--prefix", r.b.subjects.prefix)
    return subprocess.run([sys.executable, "-m", "services", *args, *where],
                          capture_output=True, text=True, timeout=60, env=env, check=False)  # fmt: skip


def test_cadenza_publish_of_an_update_without_rev_is_applied_not_dropped(rig: Rig) -> None:
    aid = f"cli-{uuid.uuid4().hex[:8]}"
    for event, body in (("activity.started", {"activity_id": aid, "activity_type": "cli", "rev": 3}),
                        ("activity.updated", {"activity_id": aid, "progress": 42, "step": "half"})):  # fmt: skip
        out = _cadenza(rig, "publish", event, json.dumps(body))
        assert out.returncode == 0 and out.stdout.startswith("published"), out.stdout + out.stderr

    async def applied() -> bool:
        try:
            got = await rig.b.request(rig.b.rpc_subject("recorder", "get"),
                                      GetActivityRequest(activity_id=aid), GetActivityReply)  # fmt: skip
        except bus.RemoteError:
            return False
        return (got.activity.progress, got.activity.step) == (42, "half")

    rig.portal.call(partial(eventually, applied, timeout=30, interval=0.05, what="the update without rev applied"))


def test_workers_ls_shows_each_workers_activities_with_their_parameters(rig: Rig) -> None:
    out = _cadenza(rig, "workers", "ls")
    assert out.returncode == 0, out.stderr
    assert rig.worker_id in out.stdout
    assert "echo(x: object)" in out.stdout and "sleep(seconds: float)" in out.stdout, out.stdout
    listed = json.loads(_cadenza(rig, "workers", "ls", "--json").stdout)
    mine = next(w for w in listed if w["worker_id"] == rig.worker_id)
    assert {a["name"] for a in mine["activities"]} == {"echo", "where", "sleep", "boom"}
