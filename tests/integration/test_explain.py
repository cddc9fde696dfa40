"""The claim reads claimable rows through the partial index, whatever the number of finished rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from core import DistributedProcessor
from tests.support import Server, unique_name


@pytest.fixture(scope="module")
def big_dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    """One database for the module: 1 million finished rows and 10,000 pending ones (keyed, several queues)."""
    name = unique_name("dp_big")
    dsn = pg_server.create_database(name, template=template_db)
    with psycopg.connect(dsn, autocommit=True) as db:
        _fill(db)
    yield dsn
    pg_server.drop_database(name)


@pytest.fixture
def db(big_dsn: str) -> Iterator[Any]:
    with psycopg.connect(big_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def big_table(big_dsn: str) -> Iterator[DistributedProcessor]:
    with DistributedProcessor(big_dsn) as p:
        yield p


def _fill(db: Any) -> None:
    db.execute(
        "INSERT INTO processing_queue (queue, payload, status, attempts, finished_at)"
        " SELECT 'default', '{}', 'completed', 1, now() - interval '1 hour' FROM generate_series(1, 1000000)"
    )
    db.execute(
        "INSERT INTO processing_queue (queue, payload, ordering_key)"
        " SELECT (ARRAY['default', 'q2', 'q3'])[1 + g % 3], '{}', CASE WHEN g % 2 = 0 THEN 'k' || (g % 100) END"
        " FROM generate_series(1, 10000) g"
    )
    db.execute("ANALYZE processing_queue")


def _plan(p: DistributedProcessor, db: Any, queues: list[str]) -> dict[str, Any]:
    params = {
        "queues": queues, "batch": 100, "instance_id": "explain", "lease_seconds": 30, "token": None,
        "done_ids": "{}", "done_tokens": "{}", "unblock_keys": [], "channels": [], "nqueues": [],
        "default_key_concurrency": 1, "default_block_on_failure": False,
    }
    stmt = p.q.claim.as_string(db)
    row = db.execute("EXPLAIN (FORMAT JSON) " + stmt, params).fetchone()
    return row[0][0]["Plan"]  # type: ignore[no-any-return]


def _nodes(plan: dict[str, Any], parent: str | None = None) -> list[tuple[str | None, dict[str, Any]]]:
    out = [(parent, plan)]
    for child in plan.get("Plans", []):
        out += _nodes(child, plan["Node Type"])
    return out


@pytest.mark.parametrize("queues", [["default"], ["default", "q2", "q3"]])
def test_claim_uses_the_partial_index_under_lockrows(
    big_table: DistributedProcessor, db: Any, queues: list[str]
) -> None:
    plan = _plan(big_table, db, queues)
    nodes = _nodes(plan)
    text = json.dumps(plan)
    assert "Seq Scan" not in {n["Node Type"] for _, n in nodes if n.get("Relation Name") == "processing_queue"}, text
    claim_scans = [(parent, n) for parent, n in nodes if n.get("Index Name") == "ix_processing_queue_pending"]
    assert claim_scans and all(parent == "LockRows" for parent, _ in claim_scans), text
    # the only sort is over the k*batch candidates, above the per-queue limits, never over the backlog
    for _parent, n in nodes:
        if n["Node Type"] == "Sort":
            assert n["Plan Rows"] <= 100 * len(queues), text


def test_claim_is_fast_and_correct_with_a_million_finished_rows(big_table: DistributedProcessor) -> None:
    records = big_table.claim_records(100, queues=["default", "q2", "q3"])
    assert len(records) == 100
    keyed = [r.ordering_key for r in records if r.ordering_key]
    assert len(keyed) == len(set(keyed)), "at most one record per key in flight"


def test_status_queries_avoid_the_finished_rows(big_table: DistributedProcessor, db: Any) -> None:
    stmt = big_table.q.queue_status_active.as_string(db)
    row = db.execute("EXPLAIN (FORMAT JSON) " + stmt, {"queue": None}).fetchone()
    nodes = _nodes(row[0][0]["Plan"])
    assert not [n for _, n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "processing_queue"]
    status = big_table.get_queue_status()
    assert status["queues"]["default"]["completed"] == 1_000_000
    assert status["totals"]["pending"] + status["totals"]["processing"] == 10_000


def test_recovery_reads_only_in_flight_rows(big_table: DistributedProcessor, db: Any) -> None:
    stmt = big_table.q.recover_orphans.as_string(db)
    with db.transaction():
        row = db.execute("EXPLAIN (FORMAT JSON) " + stmt, {"batch": 1000}).fetchone()
    nodes = _nodes(row[0][0]["Plan"])
    seq = [n for _, n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "processing_queue"]
    assert not seq, json.dumps(row[0][0]["Plan"])
