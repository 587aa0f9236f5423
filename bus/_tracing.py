"""OpenTelemetry for messages: producer and consumer spans, W3C context in headers.

Span names and attributes follow the messaging semantic conventions: ``send <destination>`` (kind
PRODUCER) and ``process <destination>`` (kind CONSUMER), ``messaging.system = "nats"``. cadenza only
uses the OpenTelemetry API; whether spans go anywhere is the application's choice, or
:func:`configure_tracing` reads the standard ``OTEL_*`` variables. Nothing is exported by default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace

__all__ = ("configure_tracing", "extract_context", "inject_headers", "instruments", "tracer")

_log = logging.getLogger("cadenza.tracing")
tracer = trace.get_tracer("cadenza")
meter = metrics.get_meter("cadenza")


class _Instruments:
    """The bus's metrics (OpenTelemetry API; recorded only if the application set a meter provider)."""

    def __init__(self) -> None:
        self.published = meter.create_counter("cadenza.messages.published", description="events stored")
        self.handled = meter.create_counter("cadenza.messages.handled", description="events handled and acked")
        self.retried = meter.create_counter("cadenza.messages.retried", description="handler failures naked")
        self.dead_letters = meter.create_counter("cadenza.dead_letters", description="inputs dead-lettered")


instruments = _Instruments()

SYSTEM = "nats"


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (``traceparent``, ``tracestate``) into ``headers``."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by a message's headers (empty context when none)."""
    return propagate.extract(dict(headers or {}))


def configure_tracing(service_name: str) -> bool:
    """Install an SDK tracer provider when ``OTEL_TRACES_EXPORTER`` asks for one.

    ``console`` prints spans; ``otlp`` needs ``opentelemetry-exporter-otlp`` installed (a warning
    says so when it is missing). ``none`` or unset leaves tracing to the application: nothing is
    exported. Returns True when a provider was installed.
    """
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if wanted in ("", "none"):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if wanted == "console":
        exporter = ConsoleSpanExporter()
    elif wanted == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            _log.warning("OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed")
            return False
        exporter = OTLPSpanExporter()
    else:
        _log.warning("OTEL_TRACES_EXPORTER=%s is not supported by cadenza (use console or otlp)", wanted)
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True
