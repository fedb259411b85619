"""OpenTelemetry tracing for the services: one trace per request, carried in NATS headers.

The exporter is chosen by the standard ``OTEL_TRACES_EXPORTER`` variable:

* ``none`` (default): spans are created (so context still propagates) but not exported;
* ``console``: spans printed to stderr as JSON;
* ``otlp``: OTLP over the standard ``OTEL_EXPORTER_OTLP_*`` variables (needs the
  ``opentelemetry-exporter-otlp`` package);
* ``file``: FlowKV's own: one JSON object per span appended to ``FLOWKV_TRACE_FILE``
  (several processes may share one file; used by the tests and handy on a laptop).

``OTEL_SERVICE_NAME`` overrides the service name. Context travels between services in
the W3C ``traceparent``/``tracestate`` NATS message headers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

log = logging.getLogger(__name__)

_configured = False


class JsonLinesFileExporter(SpanExporter):
    """Appends each finished span as one JSON line (O_APPEND: safe across processes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name", ""),
                        "instance": span.resource.attributes.get("service.instance.id", ""),
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_span_id": format(parent.span_id, "016x") if parent else None,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                    }
                )
            )
        data = ("\n".join(lines) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS


def setup_tracing(service: str, instance: str = "") -> None:
    """Install the tracer provider for this process once, from the OTEL_* environment.

    Args:
        service: the ``service.name`` resource attribute (``flowkv-gateway``, ...);
            ``OTEL_SERVICE_NAME`` overrides it.
        instance: the ``service.instance.id`` (a node id), empty for none.
    """
    global _configured
    if _configured:
        return
    _configured = True
    name = os.environ.get("OTEL_SERVICE_NAME", service)
    attributes = {"service.name": name}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes))
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if kind == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif kind == "file":
        path = os.environ.get("FLOWKV_TRACE_FILE", "flowkv-traces.jsonl")
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesFileExporter(path)))
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.error("OTEL_TRACES_EXPORTER=otlp needs `pip install opentelemetry-exporter-otlp`; tracing not exported")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind not in ("none", ""):
        log.warning("unknown OTEL_TRACES_EXPORTER=%r; spans are not exported", kind)
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    """Flush and stop the exporters (call once at process exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers for an outgoing NATS message carrying the current trace context."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context an incoming NATS message carries (empty context if none)."""
    return propagate.extract(dict(headers or {}))
