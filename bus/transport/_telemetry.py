"""The OpenTelemetry SDK from the standard ``OTEL_*`` variables, for the processes cadenza starts.

``bus`` records spans and metrics through the OpenTelemetry API only; this module installs the SDK
(once per process, on request: ``cadenza`` commands do, an application with its own set-up does not)
and shuts it down, flushing, so a one-shot command exports its span too. What it reads:

=================================  ==========================================================
``OTEL_TRACES_EXPORTER``           ``none`` (default), ``console``, ``otlp``; comma-separated
``OTEL_METRICS_EXPORTER``          ``none`` (default), ``console``, ``otlp``, ``prometheus``
``OTEL_EXPORTER_OTLP_ENDPOINT``    read by the OTLP exporters (``/v1/traces``, ``/v1/metrics`` added)
``OTEL_EXPORTER_OTLP_PROTOCOL``    ``http/protobuf`` (the one installed; the ``_TRACES_`` /
                                   ``_METRICS_`` variants win)
``OTEL_SERVICE_NAME``              default ``cadenza-<command>``
``OTEL_RESOURCE_ATTRIBUTES``       ``k=v,k=v`` added to the resource
``OTEL_METRIC_EXPORT_INTERVAL``    read by the periodic reader (ms, default 60000)
=================================  ==========================================================

A Prometheus scrape endpoint (``metrics_port``, or ``OTEL_METRICS_EXPORTER=prometheus`` with
``OTEL_EXPORTER_PROMETHEUS_PORT``) listens on ``127.0.0.1`` unless ``OTEL_EXPORTER_PROMETHEUS_HOST``
says otherwise. An unknown exporter or protocol is one warning line, never a crash. The SDK and the
exporters are imported only when asked for: a process without ``OTEL_*`` set pays nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ("Telemetry", "configure_telemetry")

_log = logging.getLogger("cadenza.telemetry")

_TRACE_EXPORTERS = ("console", "otlp", "none")
_METRIC_EXPORTERS = ("console", "otlp", "prometheus", "none")
_PROTOCOLS = ("http/protobuf",)


@dataclass
class Telemetry:
    """What :func:`configure_telemetry` installed; :meth:`shutdown` flushes and stops it (idempotent)."""

    service_name: str
    traces: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    metrics_url: str = ""
    _providers: list[Any] = field(default_factory=list, repr=False)
    _servers: list[Any] = field(default_factory=list, repr=False)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is buffered (bounded by ``timeout``) and stop the exporters and the endpoint."""
        providers, self._providers = self._providers, []
        for provider in providers:
            try:
                provider.force_flush(int(timeout * 1000))
                provider.shutdown()
            except Exception as exc:  # an exporter failing at exit must not turn the exit code
                _log.debug("telemetry shutdown: %r", exc)
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()


def _names(variable: str, known: tuple[str, ...]) -> list[str]:
    """The exporters named in ``variable`` (comma-separated), with one warning per unknown one."""
    wanted = [w.strip().lower() for w in os.environ.get(variable, "none").split(",") if w.strip()]
    out: list[str] = []
    for name in wanted:
        if name not in known:
            _log.warning("%s=%s is not supported by cadenza (use %s); ignored", variable, name, ", ".join(known))
        elif name != "none" and name not in out:
            out.append(name)
    return out


def _protocol(signal: str) -> bool:
    """True if the OTLP protocol for ``signal`` is one we have (one warning line if not)."""
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    protocol = os.environ.get(variable) or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol.strip().lower() in _PROTOCOLS:
        return True
    name = variable if os.environ.get(variable) else "OTEL_EXPORTER_OTLP_PROTOCOL"
    _log.warning("%s=%s is not supported by cadenza (use http/protobuf); %s are not exported", name, protocol, signal)
    return False


def _service_name(command: str) -> str:
    explicit = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if explicit:
        return explicit
    for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return f"cadenza-{command}"


def configure_telemetry(command: str, *, metrics_port: int | None = None) -> Telemetry:
    """Install tracer and meter providers as the ``OTEL_*`` variables ask (see the module's note).

    Args:
        command: the ``cadenza`` command (the default service name is ``cadenza-<command>``).
        metrics_port: serve Prometheus metrics on this loopback port (0: any free port).
    """
    telemetry = Telemetry(service_name=_service_name(command))
    traces = _names("OTEL_TRACES_EXPORTER", _TRACE_EXPORTERS)
    metric_names = _names("OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS)
    if metrics_port is not None and "prometheus" not in metric_names:
        metric_names.append("prometheus")
    if not traces and not metric_names:
        return telemetry
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": telemetry.service_name})
    if traces:
        _install_traces(telemetry, traces, resource)
    if metric_names:
        _install_metrics(telemetry, metric_names, resource, metrics_port)
    return telemetry


def _install_traces(telemetry: Telemetry, names: list[str], resource: Any) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    provider = TracerProvider(resource=resource)
    for name in names:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:
            if not _protocol("traces"):
                continue
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        telemetry.traces.append(name)
    if telemetry.traces:
        trace.set_tracer_provider(provider)
        telemetry._providers.append(provider)


def _install_metrics(telemetry: Telemetry, names: list[str], resource: Any, port: int | None) -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader

    readers: list[MetricReader] = []
    for name in names:
        if name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name == "otlp":
            if not _protocol("metrics"):
                continue
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        else:
            reader = _prometheus(telemetry, port)
            if reader is None:
                continue
            readers.append(reader)
        telemetry.metrics.append(name)
    if readers:
        provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(provider)
        telemetry._providers.append(provider)


def _prometheus(telemetry: Telemetry, port: int | None) -> Any:
    """A Prometheus reader with its scrape endpoint on loopback (None, with a warning, if it cannot bind)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    if port is None:
        try:
            port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
        except ValueError:
            _log.warning("OTEL_EXPORTER_PROMETHEUS_PORT is not a number; metrics are not served")
            return None
    # A registry of our own: the default one also holds the process collectors of whoever imported
    # prometheus_client, and two readers in one process (tests) would clash on it.
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        _log.warning("cannot serve metrics on %s:%d: %s", host, port, exc.strerror or exc)
        return None
    telemetry._servers.append(server)
    telemetry.metrics_url = f"http://{host}:{server.server_port}/metrics"
    return reader
