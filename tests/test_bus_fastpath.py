"""The transport's fast paths change nothing a peer or a handler can see (tracing, acks, decoding)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bus.testing import unique_prefix


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
