"""The claim reads claimable rows through the partial index, whatever the number of finished rows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from core import DistributedProcessor
from core.floors import start_params
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


def _plan(p: DistributedProcessor, db: Any, queues: list[str], name: str = "claim") -> dict[str, Any]:
    params = {
        "queues": queues, "batch": 100, "instance_id": "explain", "lease_seconds": 30, "token": None,
        "done_ids": "{}", "done_tokens": "{}", "done_results": None, "unblock_keys": "{}",
        "channels": [], "nqueues": [],
        "default_key_concurrency": 1, "default_block_on_failure": False, "announce": False,
        **start_params(queues),
    }
    stmt = getattr(p.q, name)
    row = db.execute("EXPLAIN (FORMAT JSON) " + stmt, params).fetchone()
    return row[0][0]["Plan"]  # type: ignore[no-any-return]


def _assert_pending_index_use(nodes: list[tuple[str | None, dict[str, Any]]], text: str) -> None:
    """The pending index serves the claim's scan, under its row locks, and the floor's peek (the first
    pending record from the floor, one row under a Limit, seeking with the row comparison); never a per-key
    probe."""
    scans = [(parent, n) for parent, n in nodes if n.get("Index Name") == "ix_processing_queue_pending"]
    assert [p for p, _ in scans].count("LockRows") >= 1, text
    for parent, n in scans:
        # (under a Result when the peek is off: its one-time filter skips the scan)
        assert parent == "LockRows" or (parent in ("Limit", "Result") and "ROW(" in n.get("Index Cond", "")), text


def _nodes(plan: dict[str, Any], parent: str | None = None) -> list[tuple[str | None, dict[str, Any]]]:
    out = [(parent, plan)]
    for child in plan.get("Plans", []):
        out += _nodes(child, plan["Node Type"])
    return out


@pytest.mark.parametrize("name", ["claim", "claim_lean", "claim_flow"])
@pytest.mark.parametrize("queues", [["default"], ["default", "q2", "q3"]])
def test_claim_uses_the_partial_index_under_lockrows(
    big_table: DistributedProcessor, db: Any, queues: list[str], name: str
) -> None:
    plan = _plan(big_table, db, queues, name)
    nodes = _nodes(plan)
    text = json.dumps(plan)
    assert "Seq Scan" not in {n["Node Type"] for _, n in nodes if n.get("Relation Name") == "processing_queue"}, text
    _assert_pending_index_use(nodes, text)
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
    stmt = big_table.q.queue_status_active
    row = db.execute("EXPLAIN (FORMAT JSON) " + stmt, {"queue": None}).fetchone()
    nodes = _nodes(row[0][0]["Plan"])
    assert not [n for _, n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "processing_queue"]
    status = big_table.get_queue_status()
    assert status["queues"]["default"]["completed"] == 1_000_000
    assert status["totals"]["pending"] + status["totals"]["processing"] == 10_000


def test_recovery_reads_only_in_flight_rows(big_table: DistributedProcessor, db: Any) -> None:
    stmt = big_table.q.recover_orphans
    with db.transaction():
        row = db.execute("EXPLAIN (FORMAT JSON) " + stmt, {"batch": 1000, "dead_after": 30}).fetchone()
    nodes = _nodes(row[0][0]["Plan"])
    seq = [n for _, n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "processing_queue"]
    assert not seq, json.dumps(row[0][0]["Plan"])


# The processor's own connections run with plan_cache_mode=force_generic_plan (core.processor): a prepared
# statement is planned once, without its parameters' values. These plans must walk the same indexes.

_STATEMENT_PARAMS: dict[str, dict[str, Any]] = {
    "claim": {
        "queues": ["default", "q2", "q3"], "batch": 100, "instance_id": "explain", "lease_seconds": 30,
        "token": "00000000-0000-0000-0000-000000000001", "done_ids": "{1,2,3}",
        "done_tokens": "{00000000-0000-0000-0000-000000000001,00000000-0000-0000-0000-000000000001,"
                       "00000000-0000-0000-0000-000000000001}",
        "done_results": None,
        "unblock_keys": '{"k1","k2"}', "channels": ["c"], "nqueues": ["default"],
        "default_key_concurrency": 1, "default_block_on_failure": False, "announce": True,
        # a claimer's floors: the seek the index scans start from, and the events since its last claim
        "floor_np": [0, 0, 0], "floor_at": ["2026-01-01T00:00:00+00:00"] * 3, "floor_id": [100, 200, 300],
        "since": "2026-01-01T00:00:00+00:00", "peek": True,
    },
    "heartbeat": {"instance_id": "explain", "registered": True, "lease_seconds": 30, "ids": [1, 2],
                  "tokens": ["00000000-0000-0000-0000-000000000001"] * 2},
    "fail": {"ids": [1], "tokens": ["00000000-0000-0000-0000-000000000001"], "delays": [1.0], "retry": True,
             "error": "x", "default_block_on_failure": True},
    "release": {"ids": [1], "tokens": ["00000000-0000-0000-0000-000000000001"], "reason": "x"},
    "recover_orphans": {"batch": 1000, "dead_after": 30},
    "unblock_sweep": {"after": "", "keys": 1000},
    "prune_floor_events": {"after": 0, "older_than": 60, "batch": 5000},
    "prune_instances": {"retention": 86400},
    "list_instances": {"include_stopped": True},
    "queue_status_active": {"queue": None},
    "cancel": {"ids": [1, 2]},
    "purge": {"older_than": 3600, "batch": 5000},
    "flow_records": {"run": 1},
    "flow_defects": {"after": 0, "limit": 1000},
    "any_due": {"queues": ["default"]},
}
# The lean claim statement (no queue control, no flow settlement) takes the same parameters, and so does the one
# that takes flow children (with flow results). Only the statement's own plan: the settlement function's inner
# statements are planned when they run, not by EXPLAIN.
_STATEMENT_PARAMS["claim_lean"] = _STATEMENT_PARAMS["claim"]
_STATEMENT_PARAMS["claim_flow"] = {**_STATEMENT_PARAMS["claim"], "done_results": '{"1","2","3"}'}


# Partial indexes of unfinished rows only: pending, in flight, flow steps waiting for their parents.
_LIVE_ROW_INDEXES = ("ix_processing_queue_pending", "ix_processing_queue_lease", "ix_processing_queue_waiting")


def _prepare(db: Any, name: str, stmt: str, params: dict[str, Any]) -> str:
    """PREPARE ``stmt`` as ``name`` (its %(x)s placeholders numbered); return its EXECUTE argument list."""
    names: list[str] = []

    def placeholder(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", placeholder, stmt).replace("%%", "%")
    db.execute(f"PREPARE {name} AS {text}")
    return ", ".join(sql.Literal(params[n]).as_string(db) for n in names)


def _generic_plan(db: Any, stmt: str, params: dict[str, Any]) -> dict[str, Any]:
    db.execute("DEALLOCATE ALL")
    args = _prepare(db, "dp_explain", stmt, params)
    with db.transaction():
        db.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        row = db.execute(f"EXPLAIN (FORMAT JSON) EXECUTE dp_explain({args})").fetchone()
        db.execute("ROLLBACK")  # the EXPLAIN did not execute, but leave nothing behind either way
    return row[0][0]["Plan"]  # type: ignore[no-any-return]


def _assert_on_the_indexes(name: str, plan: dict[str, Any]) -> None:
    text = json.dumps(plan)
    for parent, n in _nodes(plan):
        if n.get("Relation Name") != "processing_queue":
            continue
        assert n["Node Type"] != "Seq Scan", text
        # An index over every row walked from one end to the other (a merge join's input, a join's outer
        # side) is a scan of the table too. The partial indexes of live rows (pending, in flight) may be
        # walked whole: they hold the backlog and the records in flight, never the finished rows. Under a
        # Limit with no filter the walk stops at the first rows (max(id) read from the end of the primary
        # key: PostgreSQL 15 shows it with an "id IS NOT NULL" condition, 17 and later without).
        if n["Node Type"] in ("Index Scan", "Index Only Scan") and n.get("Index Name") not in _LIVE_ROW_INDEXES:
            assert "Index Cond" in n or (parent == "Limit" and "Filter" not in n), text
    if name in ("claim", "claim_lean", "claim_flow"):
        # the pending index only for the claim itself, under its row locks (never for the per-key probes)
        _assert_pending_index_use(_nodes(plan), text)


@pytest.mark.parametrize("name", sorted(_STATEMENT_PARAMS))
def test_generic_plans_use_the_indexes(big_table: DistributedProcessor, db: Any, name: str) -> None:
    stmt = getattr(big_table.q, name)
    _assert_on_the_indexes(name, _generic_plan(db, stmt, _STATEMENT_PARAMS[name]))


@pytest.mark.parametrize("name", sorted(_STATEMENT_PARAMS))
def test_plans_cached_on_an_empty_table_still_use_the_indexes(dsn: str, name: str) -> None:
    # A worker started before the first record caches its plans while the table is empty (after a VACUUM:
    # no pages at all), where a sequential scan, a sort or a walk of a whole index costs nothing. Cached,
    # such a plan sorted the whole backlog on every claim (200 ms at 200,000 pending), and the completion's
    # join walked the whole primary key (20 ms), until an ANALYZE replaced them.
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("VACUUM ANALYZE processing_queue")
    with DistributedProcessor(dsn) as p, p.connection(internal=True) as conn:
        args = _prepare(conn, "dp_empty", getattr(p.q, name), _STATEMENT_PARAMS[name])
        conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE dp_empty({args})")  # the generic plan, made and cached now
        conn.execute("INSERT INTO processing_queue (queue, payload, ordering_key)"
                     " SELECT (ARRAY['default', 'q2', 'q3'])[1 + g % 3], '{}',"
                     "        CASE WHEN g % 2 = 0 THEN 'k' || (g % 100) END"
                     " FROM generate_series(1, 20000) g")
        plan = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE dp_empty({args})").fetchone()[0][0]["Plan"]
        conn.execute("DEALLOCATE dp_empty")
    _assert_on_the_indexes(name, plan)


def _nested_plans(conn: Any, statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The generic plans of every statement a call runs inside our SQL functions (auto_explain, sent to the
    client as notices)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting, value in (("auto_explain.log_min_duration", "0"), ("auto_explain.log_nested_statements", "on"),
                           ("auto_explain.log_level", "notice"), ("auto_explain.log_format", "json"),
                           ("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")):
        conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
    for _ in range(2):  # PL/pgSQL caches its plans: the second call runs the cached ones
        notices.clear()
        with conn.transaction():
            conn.execute(statement, params)
            conn.execute("ROLLBACK")
    return [json.loads(n[n.index("{"):]) for n in notices if "plan:" in n]


def test_the_enqueue_functions_read_the_queue_table_through_its_indexes(big_dsn: str) -> None:
    # dp_add_records runs the producers' statements on the server (key heads, dedupe holders, the queue's
    # depth): beside a million finished rows each must seek an index, never walk the table.
    with DistributedProcessor(big_dsn) as p, p.connection(internal=True) as conn:
        conn.execute("INSERT INTO queue_limits (queue, max_pending) VALUES ('default', 1000000)"
                     " ON CONFLICT (queue) DO NOTHING")
        params = {"queue": "default", "payloads": ['{"n": 1}', '{"n": 2}', '{"n": 3}'], "priority": 0,
                  "run_at": None, "max_attempts": 5, "keys": ["k1", "k1", None], "dedupes": ["d1", None, "d1"],
                  "dedupe_while": "pending", "notify": True, "expect_shard": None, "key_gap": 1000, "own": True,
                  "trace": None}
        plans = _nested_plans(conn, p.q.add_records, params)
    texts = [pl["Query Text"] for pl in plans]
    assert any("LATERAL" in t and "processing_queue" in t for t in texts), texts  # the key heads ran
    assert any("dedupe_held" in t for t in texts), texts  # and the dedupe holders
    assert any("LIMIT p_limit" in t for t in texts), texts  # and the queue's depth
    for pl in plans:
        _assert_on_the_indexes("enqueue", pl["Plan"])
