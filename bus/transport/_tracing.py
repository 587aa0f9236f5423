"""OpenTelemetry for messages: producer and consumer spans, W3C context in headers, the bus's metrics.

Span names and attributes follow the messaging semantic conventions: ``send <destination>`` (kind
PRODUCER) and ``process <destination>`` (kind CONSUMER, started in the context carried by the
message's headers, so it is the producer's child), ``messaging.system = "nats"``. Whatever a handler
publishes is a child of its ``process`` span. cadenza only uses the OpenTelemetry API: whether spans
and metrics go anywhere is the application's choice; processes started by the ``cadenza`` command
install the SDK from the standard ``OTEL_*`` variables (``services/_telemetry.py``). Nothing is
exported by default.

Metrics recorded here (by every process that uses the bus):

=====================================  =========  ====================================================
``cadenza.messages.published``         counter    events stored, by event type
``cadenza.messages.handled``           counter    events handled and acked, by consumer
``cadenza.messages.retried``           counter    handler failures naked, by consumer
``cadenza.dead_letters``               counter    inputs dead-lettered, by consumer and error type
``cadenza.activity.duration``          histogram  seconds from an activity's start to its end, by
                                                  type and status (recorded by the host that ran it)
``cadenza.activity.outcomes``          counter    activities ended, by type and status
``cadenza.cancel.latency``             histogram  seconds from a cancel request to the work it targets
                                                  being cancelled in this process
``cadenza.consumer.pending``           gauge      messages the server still holds for a consumer (as
                                                  of its last delivery here), by consumer
``cadenza.consumer.in_flight``         gauge      messages this process is handling, by consumer
=====================================  =========  ====================================================
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.environment_variables import OTEL_PYTHON_METER_PROVIDER
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.metrics import _internal as metrics_internal

__all__ = (
    "NO_SPAN",
    "configure_tracing",
    "extract_context",
    "inject_headers",
    "instruments",
    "process_span",
    "traced_receive",
    "traced_send",
    "tracer",
)

tracer = trace.get_tracer("cadenza")
meter = metrics.get_meter("cadenza")

#: Explicit bucket bounds (seconds) for durations from milliseconds to hours.
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class _Instruments:
    """The bus's metrics (OpenTelemetry API; recorded only if the application set a meter provider)."""

    def __init__(self) -> None:
        self.published = meter.create_counter("cadenza.messages.published", description="events stored")
        self.handled = meter.create_counter("cadenza.messages.handled", description="events handled and acked")
        self.retried = meter.create_counter("cadenza.messages.retried", description="handler failures naked")
        self.dead_letters = meter.create_counter("cadenza.dead_letters", description="inputs dead-lettered")
        self.activity_duration = meter.create_histogram(
            "cadenza.activity.duration", unit="s", description="an activity's start to its end",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )  # fmt: skip
        self.activity_outcomes = meter.create_counter("cadenza.activity.outcomes", description="activities ended")
        self.cancel_latency = meter.create_histogram(
            "cadenza.cancel.latency", unit="s", description="a cancel request to the work being cancelled",
            explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS,
        )  # fmt: skip
        # Consumer lag as last seen: num_pending of the newest delivery, the handlers in flight.
        self.pending: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        meter.create_observable_gauge(
            "cadenza.consumer.pending", [self._observe_pending], description="messages the server holds for a consumer"
        )
        meter.create_observable_gauge(
            "cadenza.consumer.in_flight", [self._observe_in_flight], description="messages being handled"
        )
        # Activity start times of this process (bounded): the duration is measured by the host.
        self._started: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def _observe_pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"consumer": c}) for c, n in list(self.pending.items())]

    def _observe_in_flight(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"consumer": c}) for c, n in list(self.in_flight.items())]

    def on_published(self, event: Any) -> None:
        """Count a stored event; an activity's start and end give its duration and outcome (nothing
        while no meter provider is set: the API's instruments would record nothing)."""
        if not (_metering or meter_installed()):
            return
        kind = getattr(event, "type", "")
        self.published.add(1, {"messaging.destination.name": kind})
        if kind == "activity.started":
            self._started[event.activity_id] = (time.monotonic(), event.activity_type)
            if len(self._started) > 100_000:
                self._started.popitem(last=False)
        elif kind == "activity.completed":
            start = self._started.pop(event.activity_id, None)
            status = getattr(event.status, "value", str(event.status))
            attrs = {"activity.type": start[1] if start else "", "activity.status": status}
            self.activity_outcomes.add(1, attrs)
            if start is not None:
                self.activity_duration.record(time.monotonic() - start[0], attrs)

    def on_cancel_delivered(self, requested_at: datetime, target: str) -> None:
        """A cancel requested at ``requested_at`` reached running work in this process."""
        if not (_metering or meter_installed()):
            return
        seconds = (datetime.now(UTC) - requested_at).total_seconds()
        self.cancel_latency.record(max(seconds, 0.0), {"cancel.target": target})


instruments = _Instruments()

SYSTEM = "nats"


# ---------------------------------------------------------------- the no-provider fast path
#
# Without a tracer provider (the API's default proxy, or its no-op one) a span records nothing, and
# with an empty current context there is no trace context to write into headers either: a send or a
# receive would build a span, its attribute dict and a context for nothing. Those are skipped then;
# what goes on the wire and what handlers see are the same (``get_current_span()`` is the invalid
# span either way). A message that carries trace context still takes the span path without a
# provider, so that context travels on through what its handler sends.

_MISSING = object()
_installed = False
_fields: tuple[object, tuple[str, ...]] = (None, ())


_metering = False
#: Whether the environment names a meter provider: read once (``in os.environ`` raises and catches a
#: KeyError when it does not: 6% of a loaded worker's CPU when asked per stored publish).
_meter_in_env: bool | None = None


def meter_installed() -> bool:
    """True once the process has a meter provider (set, or named by ``OTEL_PYTHON_METER_PROVIDER``):
    until then the API's instruments record nothing, so the bus does not build their attributes. A
    True answer is kept; until then the check is one attribute look-up, as for the tracer (the
    environment is read on the first call)."""
    global _metering, _meter_in_env
    if _metering:
        return True
    provider = getattr(metrics_internal, "_METER_PROVIDER", _MISSING)
    if provider is None:
        if _meter_in_env is None:
            _meter_in_env = OTEL_PYTHON_METER_PROVIDER in os.environ
        if not _meter_in_env:
            return False
    if isinstance(provider, metrics.NoOpMeterProvider):
        return False
    _metering = True  # a provider, one named in the environment, or an API without that global
    return True


def tracer_installed() -> bool:
    """True once the process has a tracer provider that records spans (not the API's proxy or no-op).

    The provider can be set once per process, at any time: a True answer is kept, and until then the
    check is one attribute look-up (the public ``get_tracer_provider()`` reads the environment on
    every call while none is set).
    """
    global _installed
    if _installed:
        return True
    provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
    if provider is _MISSING:  # an API without that global: ask it the public way
        provider = trace.get_tracer_provider()
    if provider is None or isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return False
    _installed = True
    return True


def _propagated_fields() -> tuple[str, ...]:
    """The header names the global propagator reads (``traceparent``, ``tracestate``, ``baggage``)."""
    global _fields
    textmap = propagate.get_global_textmap()
    if _fields[0] is not textmap:
        _fields = (textmap, tuple(textmap.fields))
    return _fields[1]


def traced_send() -> bool:
    """Whether a send opens its producer span and writes trace context into its headers: a provider
    records spans, or the current context holds a span or baggage to carry."""
    return _installed or tracer_installed() or bool(otel_context.get_current())


def traced_receive(headers: Mapping[str, str]) -> bool:
    """Whether the handling of a message with ``headers`` runs in a consumer/server span: a provider
    records spans, the headers carry trace context, or the current context is not empty."""
    if _installed or tracer_installed() or otel_context.get_current():
        return True
    for name in _propagated_fields():
        if name in headers:
            return True
    return False


class _NoSpan:
    """Stands for the span of a send or receive the fast path does not trace (a no-op span)."""

    __slots__ = ()

    def __enter__(self) -> trace.Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


#: ``with (tracer.start_as_current_span(...) if traced_send() else NO_SPAN) as span:``
NO_SPAN = _NoSpan()


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (``traceparent``, ``tracestate``) into ``headers``."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by a message's headers (empty context when none)."""
    return propagate.extract(dict(headers or {}))


def process_span(subject: str, headers: Mapping[str, str], kind: trace.SpanKind) -> AbstractContextManager[trace.Span]:
    """The span of a core message's processing (a broadcast, a request), in the trace its headers carry.

    ``with process_span(subject, headers, SpanKind.CONSUMER) if traced_receive(headers) else NO_SPAN:``
    """
    return tracer.start_as_current_span(
        f"process {subject}", context=extract_context(headers), kind=kind,
        attributes={"messaging.system": SYSTEM, "messaging.destination.name": subject,
                    "messaging.operation.type": "process"},
    )  # fmt: skip


def configure_tracing(service_name: str) -> bool:
    """Install the SDK's providers as the ``OTEL_*`` variables ask (what the ``cadenza`` command does).

    ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``console``, ``otlp`` (OTLP over
    http/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``none``; an unknown name is one warning.
    ``OTEL_SERVICE_NAME`` wins over ``service_name``. Returns True when a provider was installed; the
    SDK flushes it at exit. An application with its own OpenTelemetry set-up does not call this.
    """
    from ._telemetry import configure_telemetry

    telemetry = configure_telemetry(service_name.removeprefix("cadenza-"))
    return bool(telemetry.traces or telemetry.metrics)
