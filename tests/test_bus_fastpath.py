"""The transport's fast paths change nothing a peer or a handler can see (tracing, acks, decoding)."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import itertools
import json
import os
import string
import subprocess
import sys
import uuid
from typing import Any

import anyio
import anyio.lowlevel
import nats.errors
import nats.js.api
import nats.js.errors
import pydantic_core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

import bus
from bus.sessions._client import client_of
from bus.testing import eventually, unique_prefix
from bus.transport import _codec, _consume, _direct
from schemas import Event, new_event_id

from ._events import Ping, Pong


def test_without_a_tracer_provider_nothing_is_traced_but_carried_context_travels_on(nats_server: Any) -> None:
    # In a process of its own: the tracer provider can be set once per process, and other tests set it.
    out = subprocess.run([sys.executable, "-m", "tests.tracing_probe", nats_server.url, unique_prefix()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)

    plain = got["plain"]
    assert "traceparent" not in plain["ping_headers"] and "traceparent" not in plain["pong_headers"]
    assert plain["ping_headers"]["Cadenza-Event-Type"] == "session.ping"
    assert plain["handler_span_valid"] is False

    # A traceparent that came in goes out again with what its handler sends (same trace, same parent).
    carried = got["carried"]
    assert carried["handler_span_valid"] is True
    assert carried["pong_headers"]["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    # A provider installed late (after the first sends) is used from then on.
    provider = got["provider"]
    assert provider["ping_headers"]["traceparent"].startswith("00-")
    assert provider["handler_span_valid"] is True
    assert provider["spans"] == ["process", "send"]

    # Metrics likewise: nothing built while no meter provider is set; counted from when one is.
    assert got["metrics"]["installed_before"] is False and got["metrics"]["installed_after"] is True
    assert got["metrics"]["published"] == 2  # the ping and its handler's pong, after the provider


# ---------------------------------------------------------------- handlers run as a task group's children would


def spec(b: bus.Bus, name: str = "c") -> bus.ConsumerSpec:
    return bus.ConsumerSpec(name, b.subjects.filter("session"))


async def test_consume_ends_after_its_cancelled_handlers_finish_their_shielded_cleanup(cadenza_bus: bus.Bus) -> None:
    started = anyio.Event()
    events: list[str] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            events.append("cancelled")
            try:
                await anyio.sleep(60)  # still cancelled: the scope stays cancelled (level-triggered)
            except anyio.get_cancelled_exc_class():
                events.append("cancelled again")
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.05)  # a shield is honoured
                    events.append("cleaned up")
                raise

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler)
            await cadenza_bus.publish(Ping(n=1))
            await started.wait()
            tg.cancel_scope.cancel()
    assert events == ["cancelled", "cancelled again", "cleaned up"]
    assert cadenza_bus.stats.handled == 0


_VAR: contextvars.ContextVar[int] = contextvars.ContextVar("fastpath_test", default=0)


async def test_each_handler_starts_in_a_copy_of_the_consumers_context(cadenza_bus: bus.Bus) -> None:
    seen: list[int] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        seen.append(_VAR.get())
        _VAR.set(ev.n)  # never reset: must not leak into the next message's handler

    token = _VAR.set(7)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler, concurrency=1))
            for n in (1, 2, 3):
                await cadenza_bus.publish(Ping(n=n))
            await eventually(lambda: len(seen) == 3)
            tg.cancel_scope.cancel()
    finally:
        _VAR.reset(token)
    assert seen == [7, 7, 7]


class _Boom(BaseException):
    """Not an Exception: the consumer does not treat it as a handler failure."""


async def test_what_escapes_a_handler_crashes_the_consumer_as_a_failed_child_would(cadenza_bus: bus.Bus) -> None:
    async def handler(ev: Ping, d: bus.Delivery) -> None:
        raise _Boom("out")

    with anyio.fail_after(20), pytest.raises(BaseExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler)
            await cadenza_bus.publish(Ping(n=1))
            await anyio.sleep_forever()
    assert info.group_contains(_Boom)


# ---------------------------------------------------------------- decode: the at-a-glance path agrees with the rules


def _outcome(data: bytes, headers: dict[str, str] | None, accept: list[type[Event]]) -> str:
    try:
        event = bus.decode(data, headers, accept)
    except bus.ValidationError as exc:
        return f"error {exc.kind}: {exc.message}"
    return f"ok {event!r}"


_ABSENT = object()


def test_decode_answers_as_the_full_rules_do_for_every_mix_of_body_and_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    versions: list[object] = [_ABSENT, 1, 2, "1", 1.0, True, 0, -1, None]
    header_versions: list[object] = [_ABSENT, "1", "01", " 1", "2", "x", ""]
    types: list[object] = [_ABSENT, "session.ping", "", "session.pong", None, 5]
    header_types: list[object] = [_ABSENT, "session.ping", "session.pong", ""]
    ids: list[object] = [_ABSENT, "same", "other"]
    cases: list[tuple[bytes, dict[str, str], list[type[Event]]]] = []
    mixes = itertools.product(versions, header_versions, types, header_types, ids)
    for version, hversion, kind, hkind, msg_id in mixes:
        body: dict[str, object] = {"event_id": "same", "time": "2026-12-02T00:00:00Z", "n": 1}
        if version is not _ABSENT:
            body["schema_version"] = version
        if kind is not _ABSENT:
            body["type"] = kind
        headers = {name: str(value) for name, value in (("Cadenza-Schema-Version", hversion),
                   ("Cadenza-Event-Type", hkind), ("Nats-Msg-Id", msg_id)) if value is not _ABSENT}  # fmt: skip
        # As another publisher lays it out (spaces, any key order), and as cadenza's encoder does:
        # compact, the id first and the type second (the layout decode validates in one pass).
        laid = {"event_id": body["event_id"], **({"type": body["type"]} if "type" in body else {}), **body}
        for data in (json.dumps(body).encode(), json.dumps(laid, separators=(",", ":")).encode()):
            cases += [(data, headers, accept) for accept in ([Ping], [Ping, Pong])]
    base = '{"event_id": "same", "time": "2026-12-02T00:00:00Z", "n": 1}'
    cases += [(b"\xef\xbb\xbf" + base.encode(), {}, [Ping]),  # a UTF-8 byte-order mark
              (base.encode("utf-16"), {}, [Ping]),  # UTF-16, which json.loads takes
              (b'{"n": 1, "key": "\\ud800"}', {}, [Ping]), (b'{"n": NaN}', {}, [Ping]), (b"null", {}, [Ping]),
              (b'{"n": 1}\xff', {}, [Ping]), (b"[" * 100_000, {}, [Ping])]  # fmt: skip
    # The one pass's own edges: an escaped quote in the id, an empty or unknown type, the type twice
    # (the last one counts, as in a parsed object), a version that is a JSON float, no closing quote.
    t = '"time":"2026-12-02T00:00:00Z"'
    laid_out = ['{"event_id":"a\\"b","type":"session.ping","n":1,%s}', '{"event_id":"same","type":"","n":1,%s}',
                '{"event_id":"same","type":"session.ping","n":1,"type":"session.pong",%s}',
                '{"event_id":"same","type":"session.pong","n":1,"type":"session.ping",%s}',
                '{"event_id":"same","type":"session.ping","n":1,"schema_version":1.0,%s}',
                '{"event_id":"same","type":"session.ping","n":1,"schema_version":true,%s}',
                '{"event_id":"same","type":"session.pin%s', '{"event_id":"same","type":"session.ping","n":-1,%s}']
    laid_out = [body % t for body in laid_out]
    cases += [(body.encode(), {}, accept) for body in laid_out for accept in ([Ping], [Ping, Pong])]
    by_bytes = {b"session.ping": Ping, b"session.pong": Pong}
    assert sum(_codec._laid_out(data, by_bytes) is not None for data, _, _ in cases) > 500  # the one pass is tried
    fast = [_outcome(*case) for case in cases]
    monkeypatch.setattr(_codec, "_plain", lambda *args: False)  # every message through the full checks
    monkeypatch.setattr(_codec, "_laid_out", lambda *args: None)  # and the long way: parsed, then validated
    full = [_outcome(*case) for case in cases]
    assert fast == full

    def refuse(data: object) -> object:
        raise ValueError("pydantic-core's parser left out")

    monkeypatch.setattr(pydantic_core, "from_json", refuse)  # json.loads alone, as before
    assert [_outcome(*case) for case in cases] == full
    assert sum(o.startswith("ok") for o in fast) > 50 and sum(o.startswith("error") for o in fast) > 500


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(value=_JSON, ascii=st.booleans(), noise=st.binary(max_size=3), at=st.integers(0, 64))
def test_pydantic_cores_parser_agrees_with_json_loads_wherever_it_parses(
    value: object, ascii: bool, noise: bytes, at: int
) -> None:
    # decode parses with pydantic-core first and takes json.loads' answer for what that refuses, so
    # every body either parses the same in both or is json.loads' alone (lone surrogates, NaN, noise).
    text = json.dumps(value, ensure_ascii=ascii)
    for data in (text.encode(errors="surrogatepass"), text.encode(errors="surrogatepass")[:at] + noise):
        try:
            fast = pydantic_core.from_json(data)
        except ValueError:
            continue
        assert repr(fast) == repr(json.loads(data))


# ---------------------------------------------------------------- CancelToken.scope (a class now, not a generator)


_CAUSE = bus.CancelCause(kind=bus.CancelKind.USER, who="test", reason="test")


async def test_a_token_scope_is_cancelled_at_once_when_the_token_is_and_when_it_becomes_so() -> None:
    token = bus.CancelToken()
    token.cancel(_CAUSE)
    with token.scope() as scope:
        await anyio.sleep(10)
    assert scope.cancelled_caught

    live = bus.CancelToken()
    entered = anyio.Event()
    scopes: list[anyio.CancelScope] = []

    async def work() -> None:
        with live.child().scope() as scope:
            scopes.append(scope)
            entered.set()
            await anyio.sleep(10)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await entered.wait()
            live.cancel(_CAUSE)
    assert scopes[0].cancelled_caught


async def test_a_token_scope_lets_errors_through_and_forgets_its_scope_on_exit() -> None:
    token = bus.CancelToken()
    with pytest.raises(KeyError), token.scope():
        raise KeyError("x")
    with token.scope() as scope:
        await anyio.lowlevel.checkpoint()
    token.cancel(_CAUSE)  # the ended scopes are no longer the token's: nothing to cancel
    assert not scope.cancel_called


def test_event_ids_are_fresh_uuid4_strings() -> None:
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert Ping(n=1).event_id != Ping(n=1).event_id


def test_event_ids_stay_fresh_across_threads_and_in_a_forked_child() -> None:
    # Drawn from a pool of random bytes: threads racing on it, and a child forked with some of it
    # left, must still never make an id another made.
    import threading

    new_event_id()  # the pool is part used: a child would inherit the rest
    made: list[list[str]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=lambda out=out: out.extend(new_event_id() for _ in range(3000))) for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [i for out in made for i in out]
    assert len(ids) == 12_000 and len(set(ids)) == len(ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out at once
        os.write(write, ",".join(new_event_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    ours = [new_event_id() for _ in range(300)]
    assert len(child) == 300 and not set(child) & set(ours)


# ---------------------------------------------------------------- stored publishes: nats-py's answers, our own inbox


async def test_a_stored_publish_says_what_the_server_said(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    first, again = await b.publish(ping := Ping(n=1)), await b.publish(ping)
    assert (first.stream, first.duplicate) == (b.topology.stream_name("session"), False)
    assert (again.seq, again.duplicate) == (first.seq, True)
    many = [await b.publish(Ping(n=n)) for n in range(2, 12)]
    assert [r.seq for r in many] == list(range(first.seq + 1, first.seq + 11))


async def test_a_publish_the_stream_refuses_fails_at_once_and_says_so(cadenza_bus: bus.Bus) -> None:
    # The server's error reply (here: the stream is not the one the publisher expects) is not retried.
    with anyio.fail_after(10), pytest.raises(bus.PublishError, match="refused") as err:
        await cadenza_bus.publish(Ping(n=1), headers={"Nats-Expected-Stream": "not-this-one"})
    assert err.value.non_retryable


async def test_a_publish_no_stream_takes_or_nobody_answers_is_retried_then_fails(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    quick = dataclasses.replace(b.timeouts, publish_retries=1)
    b.timeouts = quick
    # No stream takes the subject: the server answers "no responders" at once, every attempt.
    with anyio.fail_after(20), pytest.raises(bus.PublishError, match="does a stream take this subject"):
        await b.publish(Ping(n=1), subject=f"{b.subjects.prefix}-nostream.x", timeout=0.2)
    # Something listens but no acknowledgement comes: each attempt times out.
    silent = await b.nc.subscribe(f"{b.subjects.prefix}-silent.x")
    try:
        with anyio.fail_after(20), pytest.raises(bus.PublishError, match="TimeoutError"):
            await b.publish(Ping(n=2), subject=f"{b.subjects.prefix}-silent.x", timeout=0.2)
    finally:
        await silent.unsubscribe()
    assert (await b.publish(Ping(n=3))).seq >= 1  # and the bus goes on


async def test_key_value_writes_answer_as_nats_py_does(cadenza_bus: bus.Bus) -> None:
    # nats-py's KeyValue writes go through the bus's JetStream context, hence through its publish.
    kv = await cadenza_bus.kv("sessions")
    first = await kv.put("fastpath", b"1")
    second = await kv.update("fastpath", b"2", last=first)
    assert second > first and (await kv.get("fastpath")).value == b"2"
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.update("fastpath", b"3", last=first)  # a stale revision: the compare-and-set fails
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.create("fastpath", b"4")  # it exists
    await kv.delete("fastpath")
    assert await kv.create("fastpath", b"5") > second  # created again after the delete


_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=20)
_COUNT = st.integers(min_value=0, max_value=2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(stream=_TOKEN, consumer=_TOKEN, domain=st.one_of(st.just("_"), _TOKEN), account=_TOKEN, delivered=_COUNT,
       sseq=_COUNT, cseq=_COUNT, ts=_COUNT, pending=_COUNT, v2=st.booleans(), tail=st.one_of(st.none(), _TOKEN))
def test_the_ack_subject_is_read_as_nats_py_reads_it(
    stream: str, consumer: str, domain: str, account: str, delivered: int, sseq: int, cseq: int, ts: int,
    pending: int, v2: bool, tail: str | None,
) -> None:  # fmt: skip
    # The consume loop reads a delivery's sequence, delivery count and pending count from its ack
    # subject itself (nats-py's metadata costs two dataclasses and a datetime per task): the same.
    counts = f"{delivered}.{sseq}.{cseq}.{ts}.{pending}"
    if v2:
        reply = f"$JS.ACK.{domain}.{account}.{stream}.{consumer}.{counts}" + (f".{tail}" if tail else "")
    else:
        reply = f"$JS.ACK.{stream}.{consumer}.{counts}"
    msg = Msg(_client=None, subject="x", reply=reply)  # type: ignore[arg-type]
    meta = Msg(_client=None, subject="x", reply=reply).metadata  # type: ignore[arg-type]
    assert _consume._ack_fields(msg) == (meta.sequence.stream, meta.num_delivered, meta.num_pending)


def test_a_reply_that_is_no_ack_subject_is_refused_as_nats_py_refuses_it() -> None:
    for reply in ("", "_INBOX.abc", "$JS.ACK.s.c.1.2.3", "$JS.ACK.s.c.x.2.3.4.5"):
        with pytest.raises((nats.errors.Error, ValueError)):
            _consume._ack_fields(Msg(_client=None, subject="x", reply=reply))  # type: ignore[arg-type]


async def test_a_direct_subscription_takes_each_message_in_order_and_outlives_a_taker_that_fails(
    cadenza_bus: bus.Bus, caplog: pytest.LogCaptureFixture
) -> None:
    # Hot subscriptions (a worker's pull consumer, a caller's results, the recorder's follower) take
    # messages in nats-py's read loop, without a task: in order, and an exception there must not
    # reach the read loop (which would drop the connection), nor stop the messages after it.
    subject = f"{cadenza_bus.topology.prefix}.direct.check"
    got: list[bytes] = []
    tasks: set[object] = set()

    def take(msg: Msg) -> None:
        tasks.add(asyncio.current_task())
        if msg.data == b"boom":
            raise RuntimeError("the taker failed")
        got.append(msg.data)

    sub = await _direct.subscribe_direct(cadenza_bus.nc, subject, take)
    try:
        sent = [str(i).encode() for i in range(200)]
        for i, data in enumerate(sent):
            await cadenza_bus.nc.publish(subject, data)
            if i == 100:
                await cadenza_bus.nc.publish(subject, b"boom")
        await cadenza_bus.nc.flush()
        await eventually(lambda: len(got) == len(sent), timeout=30, what="every message taken")
        assert got == sent
        assert "the taker failed" in caplog.text and cadenza_bus.nc.is_connected
        assert sub.pending_msgs == 0  # nothing waits in nats-py's queue
        # All taken by the one task that reads the connection (none started per message).
        assert len(tasks) == 1
    finally:
        await sub.unsubscribe()


# ------------------------------------------------------- work started now, a scope's hook, a cancel sent at once


_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


async def test_start_now_runs_up_to_the_first_wait_before_returning_and_the_rest_in_a_task() -> None:
    steps: list[str] = []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> str:
        steps.append("before")
        _SEEN.set("mine")
        got = await gate
        steps.append(f"after {got} {_SEEN.get()}")
        await anyio.lowlevel.checkpoint()  # a bare yield to the loop, then on
        return "done"

    started = _direct.start_now(work())
    assert steps == ["before"] and not started.done()  # nothing awaited yet: ran in this frame
    assert _SEEN.get() == ""  # its context is a copy: the caller's is untouched
    gate.set_result(7)
    with anyio.fail_after(5):
        assert await started == "done"
    assert steps == ["before", "after 7 mine"]  # the same context after the wait

    async def at_once() -> int:
        return 3

    async def fails() -> None:
        raise KeyError("x")

    assert (quick := _direct.start_now(at_once())).done() and quick.result() == 3
    failed = _direct.start_now(fails())
    assert failed.done() and isinstance(failed.exception(), KeyError)


async def test_a_task_started_now_is_cancelled_where_it_waits_and_cleans_up() -> None:
    cleaned = anyio.Event()

    async def waits_long() -> None:
        try:
            await anyio.sleep(60)
        finally:
            cleaned.set()

    started = _direct.start_now(waits_long())
    started.cancel()
    with anyio.fail_after(5):
        await cleaned.wait()
        with pytest.raises(asyncio.CancelledError):
            await started


async def test_a_token_sleeps_hook_runs_in_the_cancel_before_the_sleeper_wakes_never_on_a_deadline() -> None:
    loop = asyncio.get_running_loop()
    token = bus.CancelToken()
    calls: list[tuple[str, bool]] = []
    wakes: list[asyncio.Future[None]] = []
    ended: list[str] = []

    def hook(cause: bus.CancelCause) -> None:
        calls.append((cause.who, wakes[0].done()))
        raise RuntimeError("a failing hook")  # logged; the cancel goes on

    async def sleeper() -> None:
        wakes.append(loop.create_future())
        entered.set()
        await token.sleep(wakes[0], loop.time() + 60, hook)
        ended.append("woken")

    entered = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            await entered.wait()
            child = token.child()
            token.cancel(_CAUSE)
            assert calls == [("test", False)]  # in token.cancel itself, before the sleeper is woken
    assert ended == ["woken"] and child.cancelled  # the failing hook stopped nothing
    assert token._scopes == []  # the sleeper left its token's list

    # A deadline wakes it and is no cancel of the token; nor is a cancel after it ended.
    other = bus.CancelToken()
    with anyio.fail_after(5):
        await other.sleep(loop.create_future(), loop.time() + 0.01, hook)
    other.cancel(_CAUSE)
    assert calls == [("test", False)] and other._scopes == []

    # Whoever completes the future wakes it; a token cancelled before returns at once, no hook.
    third, wake = bus.CancelToken(), loop.create_future()
    loop.call_soon(wake.set_result, None)
    with anyio.fail_after(5):
        await third.sleep(wake, loop.time() + 60, hook)
    third.cancel(_CAUSE)
    with anyio.fail_after(5):
        await third.sleep(loop.create_future(), loop.time() + 60, hook)
    assert calls == [("test", False)]

    # Cancelling the sleeping task itself (an enclosing scope) raises, and leaves the list too.
    fourth = bus.CancelToken()
    with anyio.move_on_after(0.01) as scope:
        await fourth.sleep(loop.create_future(), loop.time() + 60, hook)
    assert scope.cancelled_caught and fourth._scopes == [] and calls == [("test", False)]


async def test_a_cancelled_call_sends_its_cancel_inside_token_cancel_once(cadenza_bus: bus.Bus) -> None:
    # The session client's cancel of a remote activity goes out in the cancel itself (a scope
    # hook), before the waiting task wakes; the waiting task then waits for that publish's
    # acknowledgement instead of publishing again.
    b = cadenza_bus
    await b.publish(Ping(n=0))  # the acknowledgement inbox is open
    heard: list[dict[str, Any]] = []

    async def on_cancel(msg: Msg) -> None:
        heard.append(json.loads(msg.data))

    sub = await b.nc.subscribe(b.subjects.filter("cancel", event="requested"), cb=on_cancel)
    client = await client_of(b)
    call = b.context().child()
    outcome: list[BaseException] = []

    async def execute() -> None:
        try:
            # No worker takes the shared queue here: the call waits until cancelled.
            await bus.execute_activity(call, "never-taken", start_to_close_timeout=60)
        except bus.ActivityCancelledError as exc:
            outcome.append(exc)

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(execute)
                await eventually(lambda: len(client.calls) == 1, timeout=30, what="the call waiting")
                (aid,) = client.calls
                before = b.nc.stats["out_msgs"]
                call.token.cancel(_CAUSE)
                assert b.nc.stats["out_msgs"] == before + 1  # sent before this task gave the loop a turn
                assert b.nc._pending_data_size == 0  # and written to the socket, not left for the flusher
        assert len(outcome) == 1 and outcome[0].cause == _CAUSE
        await eventually(lambda: len(heard) == 1, timeout=30, what="the cancel heard")
        assert b.nc.stats["out_msgs"] == before + 1  # and not published again by the waiting task
        assert heard[0]["target_id"] == aid and heard[0]["cause"]["who"] == "test"
    finally:
        await sub.unsubscribe()


#: Subjects, header names and values as they come: cadenza's own and what nats-py changes or refuses.
_SUBJECT_TEXT = st.text(alphabet=string.ascii_letters + string.digits + ".$_->*\t \r\né\x00", max_size=24)
_HEADER_NAMES = st.one_of(
    st.sampled_from(["Nats-Msg-Id", "Cadenza-Task-Ack", "Cadenza-Store-Ack-To", "traceparent", "", " X", "a b", "é"]),
    st.sampled_from(list(nats.js.api.Header)),  # nats-py's own (a str enum: KV writes send them)
    st.text(alphabet=string.ascii_letters + "-_ :\t", max_size=8),
)
_HEADER_VALUES = st.text(alphabet=string.ascii_letters + string.digits + "$.-_ :\t\r\né\x7f\u2028", max_size=24)


async def _as_nats_py_buffers(subject: str, body: bytes, reply: str, headers: dict[str, str] | None) -> bytes:
    """The command ``nc.publish`` puts on a connection's buffer (a client never connected: its
    buffer is all there is)."""
    from nats.aio.client import Client, _validate_subject

    _validate_subject(subject)
    if reply:
        _validate_subject(reply)
    client = Client()
    await client._send_publish(subject, reply, body, len(body), headers)
    assert len(client._pending) == 1
    return bytes(client._pending[0])


@settings(max_examples=400, deadline=None)
@given(subject=_SUBJECT_TEXT, reply=_SUBJECT_TEXT, body=st.binary(max_size=40),
       headers=st.one_of(st.none(), st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=3)))  # fmt: skip
def test_a_message_sent_directly_is_the_bytes_nats_py_would_send(
    subject: str, reply: str, body: bytes, headers: dict[str, str] | None
) -> None:
    ours = _direct.publish_command(subject, body, reply, headers)
    if ours is not None:  # taken here: exactly what nats-py would buffer (and nats-py takes it)
        assert ours == asyncio.run(_as_nats_py_buffers(subject, body, reply, headers))


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.s.0123456789abcdef"])
def test_the_messages_of_every_activity_are_sent_directly(reply: str) -> None:
    # What a task, a result, a completion and a task's ack carry: none is left to nats-py's publish.
    for headers in (None, {}, {"Nats-Msg-Id": new_event_id(), "Cadenza-Store-Ack-To": "_INBOX.a.s.b"},
                    {"Cadenza-Task-Ack": "$JS.ACK.p_task.inbox-worker-w1.1.7.7.1765000000000000000.0"}):  # fmt: skip
        body = b'{"ok":true}'
        subject = "p.task.worker.w1.run"
        ours = _direct.publish_command(subject, body, reply, headers)
        assert ours is not None and ours == asyncio.run(_as_nats_py_buffers(subject, body, reply, headers))
    # What nats-py would change goes to nats-py.
    assert _direct.publish_command("p.x", b"", "", {"A": "line\r\nbreak"}) is None
    assert _direct.publish_command("p.x", b"", "", {"A": " padded"}) is None
    assert _direct.publish_command("p x", b"") is None and _direct.publish_command("", b"") is None


async def test_a_direct_send_arrives_as_nats_py_sends_it_and_falls_back_when_it_cannot_buffer(
    cadenza_bus: bus.Bus,
) -> None:
    nc = cadenza_bus.nc
    subject = f"{cadenza_bus.topology.prefix}.direct.send"
    got: list[Msg] = []
    sub = await _direct.subscribe_direct(nc, subject + ".*", got.append)
    try:
        headers = {"Nats-Msg-Id": "m-1", "Cadenza-Task-Ack": "$JS.ACK.x.y.1.2.3.4.0"}
        sent_before = nc.stats["out_msgs"]
        await _direct.send(nc, subject + ".direct", b"body", "reply.to", dict(headers))
        assert nc.stats["out_msgs"] == sent_before + 1  # counted as nats-py counts
        await nc.publish(subject + ".nats", b"body", reply="reply.to", headers=dict(headers))
        # A value nats-py changes (its line break into a space): sent by nats-py, changed so.
        await _direct.send(nc, subject + ".changed", b"x", "", {"A": "two\nlines"})
        await eventually(lambda: len(got) == 3, timeout=10)
    finally:
        await sub.unsubscribe()
    direct, plain, changed = got
    assert (direct.reply, direct.data, direct.headers) == (plain.reply, plain.data, plain.headers)
    assert direct.headers == headers
    assert changed.headers == {"A": "two lines"}


def _header_blocks() -> st.SearchStrategy[bytes]:
    piece = st.one_of(
        st.sampled_from([b"Nats-Msg-Id", b"Cadenza-Task-Ack", b"a b", b" X ", b"\x1cY", b"\xff", b"", b":"]),
        st.binary(max_size=6),
    )
    line = st.tuples(piece, st.sampled_from([b":", b": ", b"", b"::"]), st.one_of(piece, st.binary(max_size=6)))
    return st.lists(line.map(b"".join), max_size=4).map(b"\r\n".join)


@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(_header_blocks(), st.binary(max_size=40)))
def test_headers_are_read_as_nats_py_reads_them(raw: bytes) -> None:
    from nats.aio.client import Client

    assert _direct.parse_header_lines(raw) == Client._parse_header_lines(raw)


async def test_cadenzas_connection_reads_headers_with_the_quicker_parser(cadenza_bus: bus.Bus) -> None:
    assert cadenza_bus.nc._parse_header_lines is _direct.parse_header_lines


async def test_a_direct_send_that_would_overfill_the_buffer_is_nats_pys_forced_flush(cadenza_bus: bus.Bus) -> None:
    nc = cadenza_bus.nc
    subject = f"{cadenza_bus.topology.prefix}.direct.full"
    got: list[Msg] = []
    sub = await _direct.subscribe_direct(nc, subject, got.append)
    limit = nc._max_pending_size
    nc._max_pending_size = 8  # any message overfills it: nats-py's publish flushes and waits for it
    try:
        await _direct.send(nc, subject, b"past the limit", "", {"Nats-Msg-Id": "m-2"})
        assert not any(b"past the limit" in bytes(c) for c in nc._pending)  # written by nats-py's forced flush
    finally:
        nc._max_pending_size = limit
    try:
        await eventually(lambda: len(got) == 1, timeout=10)
    finally:
        await sub.unsubscribe()
    assert got[0].data == b"past the limit" and got[0].headers == {"Nats-Msg-Id": "m-2"}
