"""Traces on every backend (the in-memory processor, one database, three shards, the asyncio API): a record added
inside a span carries its ``send`` span's context to the handler, and a flow run's records (the ones a
``for_each`` makes later and the on_failure record included) all belong to the trace of the ``start_flow`` that
started it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.trace import SpanKind

from core.api import ProcessorAPI
from core.record import Record
from tests.conformance.test_flows import start, status
from tests.otelspans import Spans, ids_of, provide, stored_ids, traced


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    yield from provide(monkeypatch)


def test_a_record_carries_the_context_of_the_send_span_that_added_it(processor: ProcessorAPI,
                                                                      spans: Spans) -> None:
    with spans.tracer.start_as_current_span("POST /orders"):
        added = processor.add_records([{"n": 1}, {"n": 2}], queue="traced")
    (send,) = spans.sends()
    claimed = processor.claim_records(10, queues=["traced"])
    assert sorted(r.id for r in claimed) == sorted(added)
    assert [stored_ids(r.trace_context) for r in claimed] == [ids_of(send)] * 2
    # An operator's retry keeps it: every attempt belongs to the trace that added the record.
    assert processor.mark_completed(claimed[1:]) == 1
    assert processor.mark_failed(claimed[:1], "gave up", retry=False) == 1
    assert processor.retry_failed(queue="traced") == 1
    seen: list[Record] = []
    processor.run(seen.append, queues=["traced"], stop_when_empty=True, handle_signals=False)
    assert [stored_ids(r.trace_context) for r in seen] == [ids_of(send)]
    process = spans.finished(SpanKind.CONSUMER)
    assert [s.name for s in process] == ["process traced"]
    assert [link.context.span_id for link in process[0].links] == [send.context.span_id]  # type: ignore[union-attr]


def test_every_record_of_a_flow_run_is_in_the_trace_of_its_start(processor: ProcessorAPI, spans: Spans) -> None:
    with spans.tracer.start_as_current_span("POST /orders") as request:
        run = start(processor, traced, {"order": 7})
    (send,) = spans.sends()
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id
    processor.run(traced, stop_when_empty=True, handle_signals=False, trace_parent="child")
    assert status(processor, run.id)["status"] == "failed"
    process = spans.finished(SpanKind.CONSUMER)
    # split, the three parts (two made by the fan-out, after the start) and undo (made when the run failed);
    # merge was cancelled.
    assert sorted(s.name for s in process) == [f"process {traced.name}"] * 5
    for s in process:
        assert s.parent is not None and s.parent.span_id == send.context.span_id  # type: ignore[union-attr]
        assert ids_of(s)[0] == ids_of(send)[0]
