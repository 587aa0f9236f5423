"""The process of tests/test_bus_fastpath.py's tracing cases (no tests here).

``python -m tests.tracing_probe URL PREFIX`` starts with no tracer provider, as a process that never
configures OpenTelemetry does, and prints one JSON object saying what went on the wire and what the
handler saw in three steps: a plain publish and consume; a message that arrives carrying a
``traceparent`` and whose handler publishes an answer; the same after an SDK provider is installed
(after import and after the first sends, as an application may do); then the same for a meter
provider (nothing counted before it, every stored publish after).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from opentelemetry import trace

import bus
from bus.testing import eventually
from tests._events import Ping, Pong

_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _main(url: str, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with bus.connect(url, prefix=prefix, name="probe") as b:
        pings: list[tuple[Ping, dict[str, str], bool]] = []
        pongs: list[dict[str, str]] = []

        async def on_ping(ev: Ping, d: bus.Delivery) -> None:
            pings.append((ev, dict(d.headers), trace.get_current_span().get_span_context().is_valid))
            await b.publish(Pong(text=str(ev.n)))

        async def on_pong(ev: Pong, d: bus.Delivery) -> None:
            pongs.append(dict(d.headers))

        async def until(n: int) -> None:
            await eventually(lambda: len(pongs) >= n, timeout=30, what=f"{n} pongs")

        async with anyio.create_task_group() as tg:
            pings_spec = bus.ConsumerSpec("pings", b.subjects.filter("session", event="ping"))
            pongs_spec = bus.ConsumerSpec("pongs", b.subjects.filter("session", event="pong"))
            await tg.start(b.consume, pings_spec, [Ping], on_ping)
            await tg.start(b.consume, pongs_spec, [Pong], on_pong)

            await b.publish(Ping(n=1))
            await until(1)
            out["plain"] = {"ping_headers": pings[0][1], "handler_span_valid": pings[0][2], "pong_headers": pongs[0]}

            # A message from a traced producer: its trace context travels on through the handler.
            ping = Ping(n=2, source="elsewhere")
            body, hdrs = bus.encode(ping)
            await b.js.publish(b.subject_of(ping), body, headers={**hdrs, "traceparent": _PARENT})
            await until(2)
            out["carried"] = {"handler_span_valid": pings[1][2], "pong_headers": pongs[1]}

            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            await b.publish(Ping(n=3))
            await until(3)
            out["provider"] = {
                "ping_headers": pings[2][1],
                "handler_span_valid": pings[2][2],
                "spans": sorted({s.name.split(" ")[0] for s in exporter.get_finished_spans()}),
            }
            # The same for metrics: none recorded (nor built) until a meter provider is set, then counted.
            from opentelemetry import metrics
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            from bus.transport._tracing import meter_installed

            before = meter_installed()
            reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            await b.publish(Ping(n=4))
            await until(4)
            data = reader.get_metrics_data()
            published = [
                point.value
                for rm in (data.resource_metrics if data else [])
                for sm in rm.scope_metrics
                for metric in sm.metrics
                if metric.name == "cadenza.messages.published"
                for point in metric.data.data_points
            ]
            out["metrics"] = {"installed_before": before, "installed_after": meter_installed(),
                              "published": sum(published)}  # fmt: skip
            tg.cancel_scope.cancel()
    return out


if __name__ == "__main__":
    print(json.dumps(anyio.run(_main, sys.argv[1], sys.argv[2])))
