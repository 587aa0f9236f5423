"""Bad input on every subject the broker and the session worker consume, through real processes.

Hypothesis sends random bytes, JSON of the wrong shape, wrong types, huge strings and valid events
with one thing wrong to ``session.<id>.requested`` / ``.complete`` (broker), ``task.<tasklist>.queued``
/ ``task.<worker_id>.inbox`` (worker) and ``worker.<id>.heartbeat`` (the worker stream the broker
follows). Each payload ends up in ``<prefix>.dlq.<consumer>.rejected`` with a reason, and the broker
and worker keep serving: a session opens and runs an activity afterwards. Then well-formed but
meaningless requests: a bad recreate token, an unknown activity, a task for a session the worker
does not hold.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bus
from bus.testing import ExternalServer, ServiceProcess, eventually, unique_prefix
from bus.transport._codec import INPUT_ERRORS
from schemas import (
    ActivityResult,
    ActivityTask,
    SessionClosed,
    SessionCompleteRequested,
    SessionOpened,
    SessionRequested,
    SessionState,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
)
from tests._helpers import broker, dead_letter_count, dead_letters, started, worker, worker_id

TASKLIST = "bad-input"
EXAMPLES = 150  # per subject: enough shapes to matter, short enough for CI


@dataclass
class Rig:
    """A broker and a session worker (processes) and the test's own bus, driven through a portal."""

    portal: anyio.from_thread.BlockingPortal
    b: bus.Bus
    broker: ServiceProcess
    worker: ServiceProcess
    worker_id: str
    sent: dict[str, list[bytes]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def rig(nats_server: Any) -> Iterator[Rig]:
    if isinstance(nats_server, ExternalServer):
        pytest.skip("needs the embedded server (starts service processes)")
    prefix, url = unique_prefix(), nats_server.url
    with ExitStack() as stack:
        brk = started(stack, broker(prefix, url))
        wrk = started(stack, worker(prefix, url, slots=10, tasklist=TASKLIST))
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(bus.connect(url, prefix=prefix)) as b:
                yield Rig(portal, b, brk, wrk, worker_id(wrk))


def _opts(**kw: Any) -> bus.SessionOptions:
    return bus.SessionOptions(execution_timeout=60, creation_timeout=kw.pop("creation_timeout", 10),
                              heartbeat_timeout=2.0, tasklist=TASKLIST, **kw)  # fmt: skip


# ---------------------------------------------------------------- payloads


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_wrong_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20), st.floats(),
    st.text(max_size=40), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                max_size=2),
    st.integers(min_value=100_000, max_value=400_000).map(lambda n: "h" * n),  # huge string
)  # fmt: skip


def _valid(kind: str, wid: str) -> dict[str, Any]:
    """A valid event of each consumed subject, as a JSON dict."""
    sid = str(uuid.uuid4())
    event: Any
    if kind == "requested":
        event = SessionRequested(session_id=sid, tasklist=TASKLIST, creation_timeout=1, execution_timeout=1)
    elif kind == "complete":
        event = SessionCompleteRequested(session_id=sid)
    elif kind == "queued":
        event = ActivityTask(activity_id=sid, name="echo", args=[1], tasklist=TASKLIST)
    elif kind == "inbox":
        event = ActivityTask(activity_id=sid, name="echo", args=[1], tasklist=TASKLIST, worker_id=wid,
                             session_id="none")  # fmt: skip
    else:
        event = WorkerHeartbeat(worker_id=f"bad-{sid[:8]}", interval=1.0)
    data: dict[str, Any] = json.loads(event.model_dump_json())
    return data


def _mutations(kind: str, wid: str) -> st.SearchStrategy[bytes]:
    """A valid event with one thing wrong: a field missing, of the wrong type or huge, an extra field."""
    base = _valid(kind, wid)
    keys = sorted(base)
    return st.one_of(
        st.sampled_from(keys).map(lambda k: {x: v for x, v in base.items() if x != k}),
        st.tuples(st.sampled_from(keys), _wrong_values).map(lambda kv: {**base, kv[0]: kv[1]}),
        st.text(min_size=1, max_size=20).filter(lambda t: t not in base).map(lambda t: {**base, t: 1}),
        st.integers(min_value=2, max_value=10**6).map(lambda v: {**base, "schema_version": v}),
    ).map(lambda d: json.dumps(d).encode())


#: What each consumer accepts (a payload one of these takes is not bad input).
_ACCEPTS: dict[str, list[type[Any]]] = {
    "requested": [SessionRequested],
    "complete": [SessionCompleteRequested],
    "queued": [ActivityTask],
    "inbox": [ActivityTask, SessionOpened, SessionClosed],
    "heartbeat": [WorkerStarted, WorkerHeartbeat, WorkerStopped],
}


def _is_valid(kind: str, data: bytes) -> bool:
    try:
        bus.decode(data, None, _ACCEPTS[kind])
    except bus.ValidationError:
        return False
    return True


def _payloads(kind: str, wid: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        _json_values.map(lambda v: json.dumps(v).encode()),
        _mutations(kind, wid),
        _mutations(kind, wid),
        st.just(b"{" * 5000),
        st.just(json.dumps({**_valid(kind, wid), "source": "s" * 600_000}).encode()),  # oversize
    ).filter(lambda data: not _is_valid(kind, data))


# ---------------------------------------------------------------- subjects


def _where(kind: str, r: Rig, data: bytes) -> tuple[str, str]:
    """(subject to publish on, consumer expected to dead-letter it)."""
    s = r.b.subjects
    tag = "bad-" + hashlib.sha1(data).hexdigest()[:10]
    if kind == "requested":
        return s.build("session", tag, "requested"), "broker-requests"
    if kind == "complete":
        return s.build("session", tag, "complete"), "broker-control"
    if kind == "queued":
        return s.build("task", TASKLIST, "queued"), f"tasks-{TASKLIST}"
    if kind == "inbox":
        return s.build("task", r.worker_id, "inbox"), f"inbox-{r.worker_id}"
    return s.build("worker", tag, "heartbeat"), "broker-workers"


async def _publish_and_wait_dead_letter(r: Rig, kind: str, data: bytes) -> None:
    subject, consumer = _where(kind, r, data)
    before = await dead_letter_count(r.b, consumer)
    await r.b.js.publish(subject, data, timeout=5)  # straight to the stream: no validation on the way

    async def dead_lettered() -> bool:
        return await dead_letter_count(r.b, consumer) >= before + 1

    await eventually(dead_lettered, interval=0.005, what=f"{kind}: payload {data[:80]!r} dead-lettered by {consumer}")
    r.sent.setdefault(consumer, []).append(data)


async def _still_serving(r: Rig) -> None:
    """A valid session opens on the worker and runs an activity there; the processes are alive."""
    assert r.broker.proc is not None and r.broker.proc.poll() is None
    assert r.worker.proc is not None and r.worker.proc.poll() is None
    async with bus.session(r.b.context(), _opts()) as sctx:
        info = bus.get_session_info(sctx)
        assert info is not None and info.worker_id == r.worker_id
        assert await bus.execute_activity(sctx, "echo", {"ok": [1, 2]}, start_to_close_timeout=15) == {"ok": [1, 2]}
        assert await bus.execute_activity(sctx, "where", start_to_close_timeout=15) == r.worker_id


def _run_kind(r: Rig, kind: str) -> None:
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )  # fmt: skip
    @given(data=_payloads(kind, r.worker_id))
    def one(data: bytes) -> None:
        r.portal.call(_publish_and_wait_dead_letter, r, kind, data)

    one()
    _, consumer = _where(kind, r, b"")
    sent = r.sent.get(consumer, [])
    assert len(sent) >= EXAMPLES // 2
    letters = r.portal.call(dead_letters, r.b, consumer)
    assert len(letters) == len(sent)
    digests = {hashlib.sha256(p).hexdigest() for p in sent}
    assert {letter.payload_sha256 for letter in letters} == digests
    for letter in letters:
        assert letter.reason.strip() and letter.consumer == consumer
        assert letter.error_type in INPUT_ERRORS, letter
    kinds = {letter.error_type for letter in letters}
    assert {"bad_json", "bad_shape"} <= kinds, kinds
    r.portal.call(_still_serving, r)


@pytest.mark.parametrize("kind", ["requested", "complete", "queued", "inbox", "heartbeat"])
def test_bad_payloads_are_dead_lettered_with_a_reason_and_broker_and_worker_keep_serving(rig: Rig, kind: str) -> None:
    _run_kind(rig, kind)


# ---------------------------------------------------------------- well-formed but meaningless


def test_invalid_recreate_tokens_are_rejected_bad_token_and_take_no_slot(rig: Rig) -> None:
    async def check() -> None:
        ctx = rig.b.context()
        for token in (b"abc.def", b"eyJ3IjoieCJ9.c2ln", b"x" * 300 + b".y"):
            t0 = time.monotonic()
            with pytest.raises(bus.SessionCreationError) as caught:
                await bus.recreate_session(ctx, token, _opts(creation_timeout=30))
            assert caught.value.reason == "bad_token", caught.value
            assert time.monotonic() - t0 < 30  # refused by the broker, not timed out
        for token in (b"", b"no-dot-at-all", b"\xff\xfe.\x00"):
            with pytest.raises(bus.SessionCreationError) as caught:
                await bus.recreate_session(ctx, token, _opts())
            assert caught.value.reason == "bad_token"
        # A raw request with a forged token, straight onto the subject the broker consumes.
        sid = str(uuid.uuid4())
        await rig.b.publish(SessionRequested(session_id=sid, tasklist=TASKLIST, creation_timeout=5,
                                             execution_timeout=5, recreate_token="Zm9yZ2Vk.Zm9yZ2Vk"))  # fmt: skip
        kv = await rig.b.kv("sessions")
        stored: list[bytes] = []

        async def rejected() -> bool:
            try:
                entry = await kv.get(sid)
            except Exception:  # not there yet
                return False
            stored[:] = [entry.value or b""]
            return b'"rejected"' in stored[0]

        await eventually(rejected, interval=0.02, what="the forged request stored as rejected")
        assert b"bad_token" in stored[0]
        await _still_serving(rig)

    rig.portal.call(check)


def test_unknown_activity_in_a_session_and_on_the_shared_queue_fails_activity_not_registered(rig: Rig) -> None:
    async def check() -> None:
        async with bus.session(rig.b.context(), _opts()) as sctx:
            with pytest.raises(bus.ActivityFailedError) as caught:
                await bus.execute_activity(sctx, "no_such_activity", 1, start_to_close_timeout=15)
            assert caught.value.type == "ActivityNotRegisteredError"
            assert "no_such_activity" in str(caught.value)
            # The session is unaffected by the activity's error.
            info = bus.get_session_info(sctx)
            assert info is not None and info.state is SessionState.OPEN
            assert await bus.execute_activity(sctx, "echo", 2, start_to_close_timeout=15) == 2
        with pytest.raises(bus.ActivityFailedError) as caught:
            await bus.execute_activity(
                rig.b.context(), "no_such_activity", tasklist=TASKLIST, start_to_close_timeout=15
            )
        assert caught.value.type == "ActivityNotRegisteredError"

    rig.portal.call(check)


def test_task_for_a_session_the_worker_does_not_hold_fails_session_failed(rig: Rig) -> None:
    async def check() -> None:
        ctx = rig.b.context()
        # A session id the worker never held, sent to its inbox.
        never = bus.SessionInfo(session_id=str(uuid.uuid4()), worker_id=rig.worker_id, tasklist=TASKLIST)
        with pytest.raises(bus.SessionFailedError, match="session has failed") as caught:
            await bus.execute_activity(ctx.derive(session=never), "echo", 1, start_to_close_timeout=15)
        assert "not open on worker" in str(caught.value)
        # A stale snapshot of a session completed since: this process knows it completed, so the
        # activity goes to the shared queue of the session's tasklist, like one outside a session.
        async with bus.session(ctx, _opts()) as sctx:
            snapshot = bus.get_session_info(sctx)
        assert snapshot is not None
        stale = snapshot.model_copy(update={"state": SessionState.OPEN})
        assert await bus.execute_activity(ctx.derive(session=stale), "echo", 3, start_to_close_timeout=15) == 3
        # The raw task, answered on our own inbox with the session-failed flag.
        inbox = rig.b.nc.new_inbox()
        sub = await rig.b.nc.subscribe(inbox)
        try:
            task = ActivityTask(activity_id=str(uuid.uuid4()), name="echo", args=[1], tasklist=TASKLIST,
                                worker_id=rig.worker_id, session_id="not-open", reply_to=inbox)  # fmt: skip
            await rig.b.publish(task)
            msg = await sub.next_msg(timeout=10)
        finally:
            await sub.unsubscribe()
        reply = bus.decode(msg.data, msg.headers, [ActivityResult])
        assert not reply.ok and reply.error is not None and reply.error.session_failed
        assert reply.error.type == "SessionFailedError"
        await _still_serving(rig)

    rig.portal.call(check)
