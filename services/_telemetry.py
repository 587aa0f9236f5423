"""Logs and telemetry of a ``cadenza`` process: trace ids on log lines, text or JSON, the SDK on.

:func:`start` is called once per process by ``services/_runtime.py`` (every ``cadenza`` command, the
``python -m services.<name>`` entry points): it configures logging (``CADENZA_LOG`` level,
``--log-format text|json``) and the OpenTelemetry SDK from the ``OTEL_*`` variables
(:func:`bus.configure_telemetry`), and :func:`stop` flushes it on exit. :class:`TraceFilter` puts the
current ``trace_id`` / ``span_id`` on every log record, so a log line can be found from its trace.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

__all__ = ("TraceFilter", "configure_logging", "start", "stop")

_log = logging.getLogger("cadenza.telemetry")


class TraceFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, or empty outside a span) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id, record.span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        else:
            record.trace_id = record.span_id = ""
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        return f"{line} trace_id={trace_id} span_id={record.span_id}" if trace_id else line  # type: ignore[attr-defined]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            out["trace_id"], out["span_id"] = record.trace_id, record.span_id  # type: ignore[attr-defined]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``), with the trace ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(TraceFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level.upper())
    except ValueError:
        root.setLevel(logging.INFO)
        _log.warning("CADENZA_LOG=%s is not a log level (use debug, info, warning, error); using info", level)


# ---------------------------------------------------------------- the process


_current: Any = None


def start(command: str, *, log_format: str = "text", log_level: str = "INFO", metrics_port: int | None = None) -> Any:
    """Logging, then the SDK (once per process; a second call returns the first's telemetry)."""
    global _current
    configure_logging(log_level, log_format)
    if _current is None and (metrics_port is not None or _asked()):
        from bus.transport import configure_telemetry

        _current = configure_telemetry(command, metrics_port=metrics_port)
        if _current.metrics_url:
            _log.info("metrics on %s", _current.metrics_url)
    return _current


def _asked() -> bool:
    """Does any OTEL_* exporter variable ask for something? (If not, the SDK is never imported.)"""
    return any(os.environ.get(v, "none").strip().lower() not in ("", "none")
               for v in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"))  # fmt: skip


def stop() -> None:
    """Flush and stop what :func:`start` installed (safe to call twice, or without a start)."""
    if _current is not None:
        _current.shutdown()
