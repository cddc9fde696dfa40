"""OpenTelemetry traces (core/tracing.py, extra [otel]): a record added inside a span is processed, by a worker
process (the real CLI), in a ``process`` span linked to (or the child of) the ``send`` span that added it, with
the messaging attributes; a failed attempt's span carries the error; a retried record's later attempt links the
same original context; every insert path stores the context (the statement, COPY, ``conn=`` with psycopg and
SQLAlchemy, the asyncio API, shards); without an SDK nothing is stored and no span is opened.

The test process's spans go to the SDK's in-memory exporter (a provider set for one test and taken away after,
so no other test runs traced); the worker process configures its own SDK (tests/procs/otel_handlers.py) and
writes its spans to a file as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from sqlalchemy.orm import Session

from core import AsyncDistributedProcessor, DistributedProcessor, tracing
from tests.otelspans import Spans, ids_of, provide, stored_ids
from tests.support import run_cli

SYSTEM = "distributed-processor"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    """An SDK provider for this test only (set as the global one, taken away after)."""
    yield from provide(monkeypatch)


def contexts(db_dsn: str) -> list[str | None]:
    with psycopg.connect(db_dsn) as conn:
        return [r[0] for r in conn.execute("SELECT trace_context FROM processing_queue ORDER BY id").fetchall()]


# ---------------------------------------------------------------------------------------------- a worker process


@pytest.mark.parametrize("mode", ["link", "child"])
def test_a_record_added_in_a_span_is_processed_in_its_trace_by_a_worker_process(
        mode: str, dsn: str, spans: Spans, tmp_path: Path) -> None:
    with DistributedProcessor(dsn) as p, spans.tracer.start_as_current_span("POST /orders") as request:
        ok = p.add_records([{"n": 1}], queue="orders")[0]
        flaky = p.add_records([{"fail": "first"}], queue="orders")[0]
        bad = p.add_records([{"fail": "always"}], queue="orders", max_attempts=1)[0]
    send = {s.attributes["messaging.message.id"]: s for s in spans.sends()}  # type: ignore[index]
    assert sorted(send) == sorted(str(i) for i in (ok, flaky, bad))
    for span in send.values():  # the producer's spans: children of the request, in its trace
        assert span.name == "send orders" and span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
        assert span.attributes is not None and span.attributes["messaging.system"] == SYSTEM
        assert span.attributes["messaging.destination.name"] == "orders"
        assert span.attributes["messaging.operation.type"] == "send"

    out = tmp_path / "spans.jsonl"
    result = run_cli("run", "--handler", "tests.procs.otel_handlers:handle", "--queue", "orders", "--stop-when-empty",
                     "--retry-base-delay", "0", "--retry-max-delay", "0", "--concurrency", "2",
                     "--trace-parent", mode, env={"DATABASE_URL": dsn, "DP_OTEL_SPANS": str(out)}, timeout=120)
    assert result.returncode == 0, result.stderr
    processed = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(s["kind"] == "CONSUMER" and s["name"] == "process orders" for s in processed), processed
    by_record: dict[str, list[dict[str, Any]]] = {}
    for s in processed:
        by_record.setdefault(s["attributes"]["messaging.message.id"], []).append(s)
    assert {k: len(v) for k, v in by_record.items()} == {str(ok): 1, str(flaky): 2, str(bad): 1}

    for record_id, attempts in by_record.items():
        trace_id, send_span_id = ids_of(send[record_id])
        for n, s in enumerate(sorted(attempts, key=lambda s: s["attributes"][tracing.ATTEMPT]), start=1):
            a = s["attributes"]
            assert a["messaging.system"] == SYSTEM and a["messaging.destination.name"] == "orders"
            assert a["messaging.operation.type"] == "process" and a[tracing.ATTEMPT] == n and a[tracing.SHARD] == 0
            # Every attempt (a retry too) in the original context: linked to the send span, or its child.
            if mode == "link":
                assert s["links"] == [{"trace_id": trace_id, "span_id": send_span_id}]
                assert s["trace_id"] != trace_id and s["parent_span_id"] is None
            else:
                assert s["links"] == [] and s["trace_id"] == trace_id and s["parent_span_id"] == send_span_id

    assert by_record[str(ok)][0]["status"] == "UNSET"
    first, second = sorted(by_record[str(flaky)], key=lambda s: s["attributes"][tracing.ATTEMPT])
    for failed in (first, by_record[str(bad)][0]):  # a failed attempt's span carries the error
        assert failed["status"] == "ERROR" and "planned failure" in failed["description"]
        (event,) = failed["events"]
        assert event["name"] == "exception" and event["attributes"]["exception.type"] == "RuntimeError"
    assert "attempt 1" in first["description"] and second["status"] == "UNSET" and second["events"] == []
    # The stored context was never rewritten by the attempts.
    assert [stored_ids(c) for c in contexts(dsn)] == [ids_of(send[str(i)]) for i in (ok, flaky, bad)]


# ---------------------------------------------------------------------------------------------- insert paths


def _one_send(spans: Spans, n: int) -> ReadableSpan:
    (send,) = spans.sends()
    assert send.attributes is not None
    assert send.attributes.get("messaging.batch.message_count", 1) == n
    return send


def test_the_statement_and_the_copy_path_store_the_send_spans_context(dsn: str, spans: Spans) -> None:
    with DistributedProcessor(dsn, copy_threshold=3) as p:
        with spans.tracer.start_as_current_span("job"):
            p.add_records([{"n": i} for i in range(5)], queue="bulk")  # COPY
        copy_send = _one_send(spans, 5)
        spans.exporter.clear()
        with spans.tracer.start_as_current_span("job"):
            p.add_records([{"n": 1}, {"n": 2}], queue="bulk", dedupe_key=["d1", "d2"])  # the statement
        statement_send = _one_send(spans, 2)
        records = p.claim_records(10, queues=["bulk"])
    assert [stored_ids(r.trace_context) for r in records] == [ids_of(copy_send)] * 5 + [ids_of(statement_send)] * 2


def test_without_a_span_active_add_records_opens_its_send_span_as_a_root(processor: DistributedProcessor,
                                                                        spans: Spans) -> None:
    (rid,) = processor.add_records([{"n": 1}], queue="mail")
    send = _one_send(spans, 1)
    assert send.parent is None and send.name == "send mail" and send.kind == SpanKind.PRODUCER
    assert send.attributes is not None and send.attributes["messaging.message.id"] == str(rid)
    (record,) = processor.claim_records(1, queues=["mail"])
    assert stored_ids(record.trace_context) == ids_of(send)


def test_a_failed_insert_ends_its_send_span_with_the_error(processor: DistributedProcessor, spans: Spans) -> None:
    from core import QueueFull

    processor.set_queue_limit("tiny", 0)
    with pytest.raises(QueueFull):
        processor.add_records([{"n": 1}], queue="tiny")
    send = _one_send(spans, 1)
    assert send.status.status_code == trace.StatusCode.ERROR and "QueueFull" in (send.status.description or "")
    assert [e.name for e in send.events] == ["exception"]


def test_conn_with_psycopg_and_sqlalchemy_stores_the_context(processor: DistributedProcessor, dsn: str,
                                                             spans: Spans) -> None:
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        with spans.tracer.start_as_current_span("psycopg"), psycopg.connect(dsn) as conn:
            processor.add_records([{"via": "psycopg"}], conn=conn)
        with spans.tracer.start_as_current_span("sqlalchemy"), engine.begin() as connection:
            processor.add_records([{"via": "connection"}], conn=connection)
        with spans.tracer.start_as_current_span("session"), Session(engine) as session, session.begin():
            processor.add_records([{"via": "session"}], conn=session)
    finally:
        engine.dispose()
    sends = spans.sends()
    assert len(sends) == 3
    records = processor.claim_records(10)
    assert [stored_ids(r.trace_context) for r in records] == [ids_of(s) for s in sends]
    assert all(s.parent is not None for s in sends)  # each the child of its application span


def test_the_asyncio_api_stores_the_context(dsn: str, spans: Spans) -> None:
    async def main() -> None:
        async with AsyncDistributedProcessor(dsn) as p:
            with spans.tracer.start_as_current_span("async request"):
                await p.add_records([{"n": 1}], queue="aio")
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                with spans.tracer.start_as_current_span("async outbox"):
                    await p.add_records([{"n": 2}], queue="aio", conn=conn)

    asyncio.run(main())
    sends = spans.sends()
    assert [s.name for s in sends] == ["send aio", "send aio"]
    assert [stored_ids(c) for c in contexts(dsn)] == [ids_of(s) for s in sends]


def test_every_shard_stores_the_calls_context(dp_shards: DistributedProcessor, spans: Spans) -> None:
    keys = [f"customer-{i}" for i in range(12)]
    with spans.tracer.start_as_current_span("fan out"):
        dp_shards.add_records([{"k": k} for k in keys] + [{}, {}], ordering_key=[*keys, None, None])
    send = _one_send(spans, 14)
    records = dp_shards.claim_records(50)
    assert len(records) == 14 and len({r.shard for r in records}) > 1
    assert {stored_ids(r.trace_context) for r in records} == {ids_of(send)}


def test_from_sql_dp_add_records_takes_a_context_with_its_tracestate(processor: DistributedProcessor, db: Any) -> None:
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 vendor=a b,other=c"
    db.execute("SELECT dp_add_records('sql', ARRAY['{}'::jsonb], p_trace => %s)", (stored,))
    db.execute("SELECT dp_add_record('{}', queue => 'sql')")  # the one-record function: no context
    first, second = processor.claim_records(2, queues=["sql"])
    assert first.trace_context == stored and second.trace_context is None
    assert tracing.decode(stored) == {"traceparent": stored.split(" ")[0], "tracestate": "vendor=a b,other=c"}


def test_a_parents_tracestate_is_stored_with_the_traceparent(processor: DistributedProcessor, spans: Spans) -> None:
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "x")]))
    with spans.tracer.start_as_current_span("child", context=trace.set_span_in_context(NonRecordingSpan(remote))):
        processor.add_records([{}])
    send = _one_send(spans, 1)
    (record,) = processor.claim_records(1)
    assert record.trace_context is not None and record.trace_context.endswith(" vendor=x")
    assert stored_ids(record.trace_context) == ids_of(send)


# ---------------------------------------------------------------------------------------------- no SDK


def test_without_an_sdk_nothing_is_stored_and_no_process_span_is_opened(processor: DistributedProcessor) -> None:
    assert trace.get_tracer_provider().__class__.__name__ == "ProxyTracerProvider"
    processor.add_records([{"n": 1}])
    # A context propagated into the process (valid without an SDK: e.g. read from a request's header) is passed on.
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
    try:
        processor.add_records([{"n": 2}])
    finally:
        otel_context.detach(token)
    plain, propagated = processor.claim_records(2)
    assert plain.trace_context is None
    assert propagated.trace_context == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    processor.mark_completed([plain, propagated])
    assert tracing.traced_handler(print, is_async=False, trace_parent="link", instance_id="x") is None


# ---------------------------------------------------------------------------------------------- in-process runs


def test_async_and_transactional_handlers_get_their_process_spans(processor: DistributedProcessor,
                                                                  spans: Spans) -> None:
    with spans.tracer.start_as_current_span("request"):
        processor.add_records([{"n": i} for i in range(3)], queue="a")
        processor.add_records([{"n": i} for i in range(2)], queue="t")
    send_a, send_t = spans.sends()
    seen: list[Any] = []

    async def handler(record: Any) -> None:
        seen.append(trace.get_current_span().get_span_context())  # the process span is current in the handler

    processor.run(handler, queues=["a"], stop_when_empty=True, handle_signals=False)

    def transactional(record: Any, conn: Any) -> None:
        conn.execute("SELECT 1")

    processor.run(transactional, queues=["t"], transactional=True, stop_when_empty=True, handle_signals=False,
                  trace_parent="child")
    process = spans.finished(SpanKind.CONSUMER)
    assert sorted(s.name for s in process) == ["process a"] * 3 + ["process t"] * 2
    for s in process:
        if s.name == "process a":
            assert [link.context.span_id for link in s.links] == [send_a.context.span_id]  # type: ignore[union-attr]
            assert s.context is not None and s.context.span_id in {c.span_id for c in seen}
        else:
            assert s.parent is not None and s.parent.span_id == send_t.context.span_id  # type: ignore[union-attr]
            assert s.links == ()
