"""A flow run in the trace of the ``start_flow`` that started it (migration 0016): the ``send`` span, the context
stored on the run and every one of its records (the ones a ``for_each`` makes and the on_failure record
included), each step's ``process`` span in that trace; and migration 0016 down and up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry.trace import SpanKind

from core import DistributedProcessor, tracing
from core.flows.operations import start_request
from core.migrate import current_revision, downgrade, upgrade
from tests.otelspans import Spans, ids_of, provide, stored_ids, traced


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    yield from provide(monkeypatch)


def _stored(db: Any, run_id: int) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    rows = db.execute("SELECT step, trace_context FROM processing_queue WHERE flow_run_id = %s ORDER BY id",
                      (run_id,)).fetchall()
    assert sorted(r[0] for r in rows) == ["merge", "part", "part", "part", "split", "undo"]
    (run,) = db.execute("SELECT trace_context FROM flow_runs WHERE id = %s", (run_id,)).fetchone()
    return [stored_ids(r[1]) for r in rows], stored_ids(run)


def test_a_flow_run_and_all_its_records_are_in_the_trace_of_its_start(processor: DistributedProcessor, db: Any,
                                                                       spans: Spans) -> None:
    with spans.tracer.start_as_current_span("POST /orders") as request:
        run = processor.start_flow(traced, {"order": 7})
    (send,) = spans.sends()
    assert send.name == "send traced" and send.kind == SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id
    assert send.attributes is not None and send.attributes[tracing.FLOW_RUN] == str(run.id)
    assert send.attributes["messaging.batch.message_count"] == 3  # the records written at the start

    processor.run(traced, stop_when_empty=True, handle_signals=False, trace_parent="child")
    assert processor.flow_status(run.id)["status"] == "failed"
    records, stored_run = _stored(db, run.id)
    # Every record (the for_each's copies and the on_failure record made later included) and the run.
    assert records == [ids_of(send)] * 6 and stored_run == ids_of(send)
    process = spans.finished(SpanKind.CONSUMER)
    assert sorted(s.name for s in process) == ["process traced"] * 5  # split, 3 parts, undo (merge cancelled)
    for s in process:
        assert s.parent is not None and s.parent.span_id == send.context.span_id  # type: ignore[union-attr]
        assert ids_of(s)[0] == ids_of(send)[0]


def test_on_an_application_connection_and_on_shards(dsn: str, dp_shards: DistributedProcessor,
                                                    spans: Spans) -> None:
    with DistributedProcessor(dsn) as p, psycopg.connect(dsn) as conn:
        with spans.tracer.start_as_current_span("request"):
            run = p.start_flow(traced, {"order": 1}, conn=conn)
        conn.rollback()  # the run and its context go with the application's transaction
        assert conn.execute("SELECT count(*) FROM flow_runs").fetchone()[0] == 0
        with spans.tracer.start_as_current_span("request"):
            run = p.start_flow(traced, {"order": 2}, conn=conn)
        conn.commit()
        (_, send) = spans.sends()
        (stored,) = conn.execute("SELECT trace_context FROM flow_runs WHERE id = %s", (run.id,)).fetchone()
        assert stored_ids(stored) == ids_of(send)
    spans.exporter.clear()
    with spans.tracer.start_as_current_span("request"):
        started = [dp_shards.start_flow(traced, {"order": i}) for i in range(6)]
    assert len({r.shard for r in started}) > 1  # more than one shard took a run
    sends = {s.attributes[tracing.FLOW_RUN]: s for s in spans.sends()}  # type: ignore[index]
    claimed = dp_shards.claim_records(50, queues=["traced"])  # each run's first step, on its run's shard
    assert sorted(r.flow_run for r in claimed) == sorted(r.id for r in started)  # type: ignore[type-var]
    for r in claimed:
        assert stored_ids(r.trace_context) == ids_of(sends[str(r.flow_run)])


def test_without_a_span_nothing_is_stored(processor: DistributedProcessor, db: Any) -> None:
    run = processor.start_flow(traced, {"order": 3})
    assert {r[0] for r in db.execute("SELECT trace_context FROM processing_queue WHERE flow_run_id = %s",
                                     (run.id,))} == {None}


def test_migration_0016_downgrades_and_upgrades_again(empty_dsn: str) -> None:
    upgrade(empty_dsn)

    def shape() -> tuple[int, bool]:
        with psycopg.connect(empty_dsn) as conn:
            args = conn.execute("SELECT pronargs FROM pg_proc WHERE proname = 'dp_start_flow'").fetchone()[0]
            column = conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'flow_runs'"
                                  " AND column_name = 'trace_context'").fetchone()[0]
            return int(args), bool(column)

    assert shape() == (9, True)
    downgrade(empty_dsn, "0015_announce_at_commit")
    assert current_revision(empty_dsn) == "0015_announce_at_commit" and shape() == (8, False)
    with psycopg.connect(empty_dsn) as conn:  # a run as a worker of the previous version starts one: 8 arguments
        req = start_request(traced, {"order": 4}, None, 5, None)
        call = ("SELECT status FROM dp_start_flow(%s, %s, %s, %s::jsonb, %s::jsonb, NULL, %s::jsonb, NULL)")
        args = (req.flow, req.version, req.hash, json.dumps(req.definition), req.input_text, json.dumps(req.steps))
        assert conn.execute(call, args).fetchone()[0] == "ok"
        conn.commit()
        upgrade(empty_dsn)
        assert shape() == (9, True)
        assert conn.execute(call, args).fetchone()[0] == "ok"  # the previous version's call still works
        conn.commit()
    with DistributedProcessor(empty_dsn) as p:
        p.run(traced, stop_when_empty=True, handle_signals=False)
        assert sorted(r["status"] for r in p.list_flow_runs()) == ["failed", "failed"]
