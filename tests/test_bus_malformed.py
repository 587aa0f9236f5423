"""1,000 malformed payloads through a durable consumer: each is dead-lettered with a reason, the
consumer keeps working, and a valid event after them is still handled."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bus
from bus.testing import ExternalServer, eventually, unique_prefix
from bus.transport._codec import INPUT_ERRORS

from ._events import Ping
from ._helpers import dead_letters

VALID: dict[str, Any] = {"type": "session.ping", "key": "k1", "n": 1}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _mutations() -> st.SearchStrategy[bytes]:
    """A valid Ping with one thing wrong."""
    broken: list[st.SearchStrategy[dict[str, Any]]] = [
        st.just({k: v for k, v in VALID.items() if k != "n"}),  # required field missing
        st.text(max_size=20).map(lambda t: {**VALID, "n": t}),  # wrong type
        st.integers(max_value=-1).map(lambda n: {**VALID, "n": n}),  # out of range
        st.text(min_size=1, max_size=20).filter(lambda t: t not in VALID).map(lambda t: {**VALID, t: 1}),  # extra
        st.integers(min_value=2, max_value=10**9).map(lambda v: {**VALID, "schema_version": v}),  # unknown version
        st.text(max_size=30).filter(lambda t: t not in ("", "session.ping")).map(lambda t: {**VALID, "type": t}),
        st.text(max_size=30).filter(lambda t: not t.isalnum() or not t.islower()).map(lambda t: {**VALID, "key": t}),
    ]
    return st.one_of(broken).map(lambda d: json.dumps(d).encode())


def _huge() -> st.SearchStrategy[bytes]:
    return st.integers(bus.MAX_EVENT_BYTES + 1, 900_000).map(lambda n: json.dumps({**VALID, "key": "k" * n}).encode())


def _is_valid(data: bytes) -> bool:
    try:
        bus.decode(data, None, [Ping])
    except bus.ValidationError:
        return False
    return True


malformed = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(lambda v: json.dumps(v).encode()),
    _mutations(),
    _mutations(),
    _huge(),
).filter(lambda b: not _is_valid(b))


def test_1000_malformed_payloads_are_dead_lettered_and_the_consumer_keeps_working(
    nats_server: bus.EmbeddedServer | ExternalServer,
) -> None:
    handled: list[int] = []

    async def handler(ev: Ping, d: bus.Delivery) -> None:
        handled.append(ev.n)

    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(bus.connect(nats_server.url, prefix=unique_prefix())) as b:
            subject = b.subjects.build("session", "k1", "ping")
            spec = bus.ConsumerSpec("victim", b.subjects.filter("session"))
            future, _ = portal.start_task(b.consume, spec, [Ping], handler)
            sent: list[bytes] = []

            @settings(
                max_examples=1000,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            )
            @given(payload=malformed)
            def one(payload: bytes) -> None:
                before = b.stats.dead_letters
                portal.call(lambda: b.js.publish(subject, payload, timeout=5))
                sent.append(payload)
                portal.call(partial(eventually, lambda: b.stats.dead_letters == before + 1, interval=0.001,
                                    what=f"payload {payload[:80]!r} dead-lettered"))  # fmt: skip
                assert handled == []

            one()
            assert len(sent) >= 1000

            portal.call(b.publish, Ping(n=42))
            portal.call(partial(eventually, lambda: handled == [42], interval=0.001, what="the valid event handled"))
            assert b.stats.dead_letters == len(sent)

            letters = portal.call(dead_letters, b, "victim")
            future.cancel()

    assert len(letters) == len(sent)
    by_sha = {hashlib.sha256(p).hexdigest() for p in sent}
    for letter in letters:
        assert letter.reason.strip()
        assert letter.error_type in INPUT_ERRORS
        assert letter.subject == subject and letter.consumer == "victim" and letter.stream_seq > 0
        assert letter.payload_sha256 in by_sha
    kinds = {letter.error_type for letter in letters}
    assert {"bad_json", "bad_shape", "oversize"} <= kinds
