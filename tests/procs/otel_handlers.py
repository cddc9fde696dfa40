"""A handler module for ``dproc run --handler tests.procs.otel_handlers:handle`` that configures the OpenTelemetry
SDK at import (before the run starts, as an application's entry point would): every span ended in the worker is
written as one JSON line to the file ``DP_OTEL_SPANS`` names, for the test to read (tests/integration/
test_tracing.py)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    """What the test looks at of a span, as JSON (ids in W3C hex)."""
    ctx = span.context
    assert ctx is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "links": [{"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
                  for link in span.links],
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "description": span.status.description,
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            for span in spans:
                out.write(json.dumps(span_dict(span)) + "\n")
        return SpanExportResult.SUCCESS


_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["DP_OTEL_SPANS"])))
trace.set_tracer_provider(_provider)


def handle(record: Any) -> None:
    """``{"fail": "always"}`` fails every attempt; ``{"fail": "first"}`` fails its first attempt only."""
    fail = record.payload.get("fail")
    if fail == "always" or (fail == "first" and record.attempts == 1):
        raise RuntimeError(f"planned failure of record {record.id}, attempt {record.attempts}")
