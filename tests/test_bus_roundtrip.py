"""Typed publish and consume over a real nats-server: tracing, dedupe, retries, dead letters."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pydantic
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import bus
from bus.testing import eventually

from ._events import Ping, Pong
from ._helpers import dead_letters

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process; our tracer is a proxy that follows it.
    trace.set_tracer_provider(_PROVIDER)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def spec(b: bus.Bus, name: str = "c", **kw: object) -> bus.ConsumerSpec:
    return bus.ConsumerSpec(name, b.subjects.filter("session"), **kw)  # type: ignore[arg-type]


async def test_typed_event_round_trips_with_its_trace_joined(cadenza_bus: bus.Bus, spans: InMemorySpanExporter) -> None:
    got: list[tuple[Ping, bus.Delivery]] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        got.append((ev, d))

    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler)
        sent = Ping(n=7)
        await cadenza_bus.publish(sent)
        await eventually(lambda: len(got) == 1)
        tg.cancel_scope.cancel()

    event, delivery = got[0]
    assert event == sent.model_copy(update={"source": cadenza_bus.source})
    assert delivery.headers["Nats-Msg-Id"] == sent.event_id
    assert delivery.headers["Cadenza-Schema-Version"] == "1"
    assert "traceparent" in delivery.headers
    subject = cadenza_bus.subjects.build("session", "k1", "ping")
    await eventually(lambda: any(s.name == f"process {subject}" for s in spans.get_finished_spans()))
    by_name = {s.name: s for s in spans.get_finished_spans()}
    send, process = by_name[f"send {subject}"], by_name[f"process {subject}"]
    assert send.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert send.attributes is not None and send.attributes["messaging.system"] == "nats"
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id


async def test_same_event_published_twice_is_consumed_once(cadenza_bus: bus.Bus) -> None:
    got: list[str] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        got.append(ev.event_id)

    event = Ping(n=1)
    first = await cadenza_bus.publish(event)
    second = await cadenza_bus.publish(event)
    assert (first.duplicate, second.duplicate) == (False, True)
    assert first.seq == second.seq
    marker = Ping(n=2)
    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler)
        await cadenza_bus.publish(marker)
        await eventually(lambda: marker.event_id in got)
        tg.cancel_scope.cancel()
    assert got == [event.event_id, marker.event_id]


async def test_handler_error_is_retried_with_backoff_then_succeeds(cadenza_bus: bus.Bus) -> None:
    calls: list[int] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        calls.append(d.deliveries)
        if d.deliveries < 3:
            raise RuntimeError("transient")

    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus, backoff=(0.05, 0.05)), [Ping], handler)
        await cadenza_bus.publish(Ping(n=1))
        await eventually(lambda: cadenza_bus.stats.handled == 1)
        tg.cancel_scope.cancel()
    assert calls == [1, 2, 3]
    assert cadenza_bus.stats.retried == 2


async def test_after_max_deliver_the_message_goes_to_the_dead_letter_subject(cadenza_bus: bus.Bus) -> None:
    calls = 0

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("always broken")

    event = Ping(n=1)
    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus, max_deliver=3, backoff=(0.01,)), [Ping], handler)
        await cadenza_bus.publish(event)
        await eventually(lambda: cadenza_bus.stats.dead_letters == 1)
        tg.cancel_scope.cancel()
    assert calls == 3
    [letter] = await dead_letters(cadenza_bus, "c")
    assert letter.error_type == "max_deliver"
    assert "always broken" in letter.reason and "3 deliveries" in letter.reason
    assert letter.deliveries == 3
    assert letter.headers["Nats-Msg-Id"] == event.event_id


async def test_non_retryable_error_is_dead_lettered_at_once(cadenza_bus: bus.Bus) -> None:
    calls = 0

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        nonlocal calls
        calls += 1
        raise bus.CadenzaError("cannot ever work", non_retryable=True)

    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler)
        await cadenza_bus.publish(Ping(n=1))
        await eventually(lambda: cadenza_bus.stats.dead_letters == 1)
        tg.cancel_scope.cancel()
    assert calls == 1
    [letter] = await dead_letters(cadenza_bus, "c")
    assert "cannot ever work" in letter.reason


async def test_cancelled_handler_is_never_acked_and_is_redelivered(cadenza_bus: bus.Bus) -> None:
    started = anyio.Event()
    seen: list[int] = []

    async def slow(ev: Ping, d: bus.Delivery) -> None:
        seen.append(d.deliveries)
        started.set()
        await anyio.sleep(60)

    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], slow)
        await cadenza_bus.publish(Ping(n=1))
        with anyio.fail_after(10):
            await started.wait()
        tg.cancel_scope.cancel()
    assert cadenza_bus.stats.handled == 0

    async def fast(ev: Ping, d: bus.Delivery) -> None:
        seen.append(d.deliveries)

    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], fast)
        await eventually(lambda: cadenza_bus.stats.handled == 1)
        tg.cancel_scope.cancel()
    assert seen == [1, 2]


async def test_consumer_takes_only_the_event_types_it_accepts(cadenza_bus: bus.Bus) -> None:
    got: list[str] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        got.append(ev.type)

    async with anyio.create_task_group() as tg:
        await tg.start(cadenza_bus.consume, spec(cadenza_bus), [Ping], handler)
        await cadenza_bus.publish(Pong(text="not for you"))
        await cadenza_bus.publish(Ping(n=1))
        await eventually(lambda: got == ["session.ping"] and cadenza_bus.stats.dead_letters == 1)
        tg.cancel_scope.cancel()
    [letter] = await dead_letters(cadenza_bus, "c")
    assert letter.error_type == "unknown_type"


async def test_broadcast_listen_reaches_every_listener(cadenza_bus: bus.Bus) -> None:
    a: list[int] = []
    b: list[int] = []

    async def on_a(ev: Ping, subject: str) -> None:
        a.append(ev.n)

    async def on_b(ev: Ping, subject: str) -> None:
        b.append(ev.n)

    flt = cadenza_bus.subjects.filter("session", event="ping")
    async with anyio.create_task_group() as tg:
        await tg.start(lambda **kw: cadenza_bus.listen(flt, [Ping], on_a, name="a", **kw))
        await tg.start(lambda **kw: cadenza_bus.listen(flt, [Ping], on_b, name="b", **kw))
        await cadenza_bus.publish(Ping(n=5))
        await cadenza_bus.nc.publish(cadenza_bus.subjects.build("session", "k1", "ping"), b"\xff garbage")
        await eventually(lambda: a == [5] and b == [5] and cadenza_bus.stats.dead_letters == 2)
        tg.cancel_scope.cancel()
    assert {d.consumer for d in await dead_letters(cadenza_bus, "a")} == {"a"}


class Echo(pydantic.BaseModel):
    text: str = pydantic.Field(max_length=10)


async def test_request_reply_with_typed_errors(cadenza_bus: bus.Bus) -> None:
    subject = cadenza_bus.rpc_subject("echo", "say")

    async def handler(req: Echo) -> Echo:
        if req.text == "missing":
            raise bus.RemoteError("no such thing", code="not_found")
        if req.text == "boom":
            raise RuntimeError("kaput")
        return Echo(text=req.text.upper())

    async with anyio.create_task_group() as tg:
        await tg.start(lambda **kw: cadenza_bus.serve(subject, Echo, handler, name="echo", **kw))
        assert await cadenza_bus.request(subject, Echo(text="hi"), Echo) == Echo(text="HI")
        with pytest.raises(bus.RemoteError) as err:
            await cadenza_bus.request(subject, Echo(text="missing"), Echo)
        assert err.value.remote_code == "not_found" and "no such thing" in str(err.value)
        with pytest.raises(bus.RemoteError) as err:
            await cadenza_bus.request(subject, Echo(text="boom"), Echo)
        assert err.value.remote_code == "internal" and "kaput" in str(err.value)
        msg = await cadenza_bus.nc.request(subject, b'{"text": 5}', timeout=5)
        assert b'"validation"' in msg.data and b"text" in msg.data
        assert await cadenza_bus.request(subject, Echo(text="still"), Echo) == Echo(text="STILL")
        tg.cancel_scope.cancel()
    [letter] = await dead_letters(cadenza_bus, "echo")
    assert letter.error_type == "bad_request"


async def test_request_without_a_service_fails_fast_with_a_clear_error(cadenza_bus: bus.Bus) -> None:
    with anyio.fail_after(5), pytest.raises(bus.RequestError, match="no service answers"):
        await cadenza_bus.request(cadenza_bus.rpc_subject("nobody", "home"), Echo(text="x"), Echo, timeout=2)


async def test_publish_rejects_an_event_too_large(cadenza_bus: bus.Bus) -> None:
    with pytest.raises(bus.ValidationError, match="allowed") as err:
        await cadenza_bus.publish(Pong(text="x" * (bus.MAX_EVENT_BYTES + 1)))
    assert err.value.kind == "oversize"
