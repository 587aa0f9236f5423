"""Telemetry that reaches a pipeline: real service processes exporting OTLP/HTTP to a receiver here.

The caller, the broker, a worker and the recorder run as separate processes with
``OTEL_TRACES_EXPORTER=otlp`` pointing at a small OTLP/HTTP receiver this test runs on loopback; the
spans are decoded with the ``opentelemetry-proto`` messages. One trace must join all four, with the
span names, kinds and parent links of the messaging conventions. The services also serve Prometheus
metrics (``--metrics-port 0``), scraped after the scenario for the named metrics.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

import bus
from bus.testing import ExternalServer, ServiceProcess, eventually, unique_prefix

PRODUCER, CONSUMER = PbSpan.SPAN_KIND_PRODUCER, PbSpan.SPAN_KIND_CONSUMER


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class Receiver:
    """An OTLP/HTTP (protobuf) receiver on loopback: ``POST /v1/traces`` and ``/v1/metrics``."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.metric_names: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    receiver._add(body)
                elif self.path == "/v1/metrics":
                    receiver._add_metrics(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _add(self, body: bytes) -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span = Span(service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex())
                    with self._lock:
                        self.spans.append(span)

    def _add_metrics(self, body: bytes) -> None:
        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        with self._lock:
            self.metric_names |= {m.name for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _otel_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export batches every 0.1 s instead of 5 s
        **extra,
    }


def _metrics_url(proc: ServiceProcess) -> str:
    for line in list(proc.output):
        m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
        if m:
            return m[1]
    raise AssertionError("no 'metrics on' line in the output:\n" + "".join(proc.output[-20:]))


def _scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value, from a Prometheus text exposition."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))  # fmt: skip


def _kill_all(stack: ExitStack, *procs: ServiceProcess) -> None:
    for p in procs:
        stack.callback(p.kill)


async def test_one_trace_joins_caller_broker_worker_and_recorder(nats_server: Any, receiver: Receiver) -> None:
    if isinstance(nats_server, ExternalServer):
        pytest.skip("needs the embedded server")
    prefix, tasklist, url = unique_prefix(), "otel", nats_server.url
    env = _otel_env(receiver, CADENZA_TOKEN_KEY="k" * 32)
    metrics = ("--metrics-port", "0")
    with ExitStack() as stack:
        broker = ServiceProcess("services.broker", "--prefix", prefix, *metrics, url=url, env=env)
        recorder = ServiceProcess("services.recorder", "--prefix", prefix, *metrics, url=url, env=env)
        worker = ServiceProcess("services.cli", "worker", "services.demo.worker:activities", "--prefix", prefix,
                                "--tasklist", tasklist, "--heartbeat-interval", "0.5", *metrics, url=url,
                                env=env)  # fmt: skip
        _kill_all(stack, broker, recorder, worker)
        for proc in (broker, recorder, worker):
            await anyio.to_thread.run_sync(proc.start, 60.0)
        async with bus.connect(url, prefix=prefix, name="test") as b:
            # A bad input for the recorder: dead-lettered, counted per consumer.
            await b.js.publish(f"{prefix}.activity.garbage.started", b"not json")
        caller = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "tests.telemetry_caller", "--prefix", prefix, "--tasklist", tasklist],
            env={**os.environ, **_otel_env(receiver, OTEL_SERVICE_NAME="test-caller"), "NATS_URL": url},
            capture_output=True, text=True, timeout=120,
        ))  # fmt: skip
        assert caller.returncode == 0, caller.stdout + caller.stderr
        trace_id = caller.stdout.split("trace ", 1)[1].split()[0]

        def in_trace() -> list[Span]:
            return [s for s in receiver.snapshot() if s.trace_id == trace_id]

        def by(service: str, name: str, kind: int) -> list[Span]:
            return [s for s in in_trace() if s.service == service and re.fullmatch(name, s.name) and s.kind == kind]

        p = re.escape(prefix)
        await eventually(lambda: len(by("cadenza-recorder", rf"process {p}\.activity\.[^.]+\.completed", CONSUMER)) >= 2
                         and bool(by("cadenza-broker", rf"process {p}\.session\.[^.]+\.requested", CONSUMER)),
                         timeout=60, what="the recorder's and broker's spans in the caller's trace")  # fmt: skip
        assert {s.service for s in in_trace()} >= {"test-caller", "cadenza-broker", "cadenza-worker",
                                                   "cadenza-recorder"}  # fmt: skip

        def whole() -> bool:
            # Each process exports on its own schedule, and a span only once it ends: a parent can
            # arrive after its children (the broker's send of the closing notice after the worker's
            # process span of it; the cancelled task's process span after the sends made inside it).
            ids = {s.span_id for s in in_trace()}
            return all(s.parent_id in ids for s in in_trace() if s.parent_id)

        await eventually(whole, timeout=30, what="every span of the trace with its parent")
        spans = {s.span_id: s for s in in_trace()}

        # caller -> broker: the broker's process span is the child of the caller's send span.
        root = next(s for s in in_trace() if s.name == "caller scenario")
        assert root.parent_id == ""
        [request] = by("test-caller", rf"send {p}\.session\.[^.]+\.requested", PRODUCER)
        assert request.parent_id == root.span_id
        for span in by("cadenza-broker", rf"process {p}\.session\.[^.]+\.requested", CONSUMER):
            assert span.parent_id == request.span_id
        # caller -> worker: each task's process span is the child of the caller's send of the task.
        tasks = by("cadenza-worker", rf"process {p}\.task\.[^.]+\.inbox", CONSUMER)
        assert len(tasks) >= 2  # the two activities (and the broker's session-opened notice)
        for span in tasks:
            parent = spans[span.parent_id]
            assert parent.kind == PRODUCER and parent.name == span.name.replace("process", "send", 1)
        # worker -> recorder: the worker's events are sent inside its process span; the recorder's
        # process spans are their children.
        # (Every activity ends with a completion; a quick one is announced by it, not by `started`.)
        ended = by("cadenza-worker", rf"send {p}\.activity\.[^.]+\.completed", PRODUCER)
        assert len(ended) == 2
        for span in ended:
            assert spans[span.parent_id].service == "cadenza-worker"
            assert spans[span.parent_id].kind == CONSUMER
        folded = by("cadenza-recorder", rf"process {p}\.activity\.[^.]+\.completed", CONSUMER)
        assert {s.parent_id for s in folded} == {s.span_id for s in ended}

        # Prometheus: the named metrics, non-zero after the scenario.
        # (The cancelled activity's end is published by the worker after the caller left: waited for.)
        await eventually(lambda: _total(_scrape(_metrics_url(worker)), "cadenza_activity_outcomes_total",
                                        activity_type="transcode") >= 1, timeout=30, what="its end")  # fmt: skip
        w = _scrape(_metrics_url(worker))
        assert _total(w, "cadenza_activity_duration_seconds_count", activity_type="download") >= 1
        assert _total(w, "cadenza_activity_outcomes_total", activity_status="success") >= 1
        assert _total(w, "cadenza_activity_outcomes_total", activity_type="transcode", activity_status="success") == 0
        assert _total(w, "cadenza_cancel_latency_seconds_count") >= 1
        assert _total(w, "cadenza_messages_published_total") > 0
        r = _scrape(_metrics_url(recorder))
        assert _total(r, "cadenza_dead_letters_total") >= 1
        assert _total(r, "cadenza_messages_handled_total") > 0
        assert any(k.startswith("cadenza_consumer_pending{") for k in r)
        br = _scrape(_metrics_url(broker))
        assert _total(br, "cadenza_slots_free", tasklist=tasklist) > 0
        await eventually(lambda: _total(_scrape(_metrics_url(broker)), "cadenza_sessions_ended", tasklist=tasklist,
                                        state="completed") >= 1, timeout=30, what="the session's end")  # fmt: skip


def _cadenza(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_one_shot_publish_exports_its_span_and_metrics(nats_server: Any, receiver: Receiver) -> None:
    prefix = unique_prefix()
    env = _otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000", OTEL_METRICS_EXPORTER="otlp",
                    OTEL_METRIC_EXPORT_INTERVAL="60000")  # fmt: skip
    out = _cadenza("publish", "worker.heartbeat", '{"worker_id": "w1", "seq": 1}', "--server", nats_server.url,
                   "--prefix", prefix, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    # The batch and the metric reader would wait a minute: both are here because the command
    # flushed on exit.
    sends = [s for s in receiver.snapshot() if s.name == f"send {prefix}.worker.w1.heartbeat"]
    assert [(s.service, s.kind) for s in sends] == [("cadenza-publish", PRODUCER)]
    assert "cadenza.messages.published" in receiver.metric_names


@pytest.mark.parametrize("variable", ["OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"])
def test_an_unknown_exporter_is_one_warning_line(variable: str) -> None:
    out = _cadenza("subjects", env={variable: "bogus"})
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and f"{variable}=bogus is not supported" in lines[0], out.stderr


def test_service_name_and_resource_attributes_come_from_the_environment(receiver: Receiver) -> None:
    from bus.transport._telemetry import _service_name

    old = dict(os.environ)
    try:
        os.environ.pop("OTEL_SERVICE_NAME", None)
        os.environ["OTEL_RESOURCE_ATTRIBUTES"] = "deployment.environment=test"
        assert _service_name("broker") == "cadenza-broker"
        os.environ["OTEL_RESOURCE_ATTRIBUTES"] = "service.name=from-attrs"
        assert _service_name("broker") == "from-attrs"
        os.environ["OTEL_SERVICE_NAME"] = "explicit"
        assert _service_name("broker") == "explicit"
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_log_lines_carry_the_trace_id_in_json() -> None:
    code = (
        "import logging; from opentelemetry import trace; from opentelemetry.sdk.trace import TracerProvider;"
        "trace.set_tracer_provider(TracerProvider());"
        "from services._telemetry import configure_logging; configure_logging('INFO', 'json');"
        "t = trace.get_tracer('x');\n"
        "with t.start_as_current_span('s') as s:\n"
        "    logging.getLogger('cadenza.t').warning('hello'); print(format(s.get_span_context().trace_id, '032x'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    line = json.loads(out.stderr.strip())
    assert line["message"] == "hello" and line["trace_id"] == out.stdout.strip() and len(line["span_id"]) == 16
