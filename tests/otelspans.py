"""The OpenTelemetry SDK's in-memory exporter for a test (a provider set as the global one, taken away after),
the ids of spans and stored contexts, and a flow whose records are made at its start, by its fan-out and by its
failure: shared by the tracing tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from core import tracing
from core.flows import Flow


class Spans:
    def __init__(self, exporter: InMemorySpanExporter, tracer: trace.Tracer) -> None:
        self.exporter = exporter
        self.tracer = tracer

    def finished(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if kind is None or s.kind == kind]

    def sends(self) -> list[ReadableSpan]:
        return self.finished(SpanKind.PRODUCER)


def provide(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    """The body of a test's ``spans`` fixture: an SDK provider for that test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield Spans(exporter, provider.get_tracer("tests"))
    provider.shutdown()


def ids_of(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.context
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def stored_ids(text: str | None) -> tuple[str, str]:
    """(trace id, span id) of a stored trace context."""
    assert text is not None
    version, trace_id, span_id, _flags = tracing.decode(text)["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id


# split fans out over [1, 2, 3]; element 2 fails, so merge is cancelled and undo runs: every way a run adds
# records (its start, a for_each, its on_failure step).
traced = Flow("traced", version=1)


@traced.step()
def split(record: Any) -> list[int]:
    return [1, 2, 3]


@traced.step(for_each="split", max_attempts=1)
def part(record: Any) -> int:
    if record.payload == 2:
        raise RuntimeError("planned failure of element 2")
    return int(record.payload)


@traced.step(after=[part])
def merge(record: Any) -> None:
    raise AssertionError("never runs: a part failed")


@traced.on_failure
def undo(record: Any) -> None:
    return None
