"""``dp_add_record``: adding a record from SQL (a psql session, any language, a trigger), with the semantics of
``add_records``; and ``conn=`` on a shard's connection."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import DistributedProcessor, WrongShard
from core.enqueue import KEY_GAP, inserted_blocked
from core.queries import channel_for
from core.sharding import partition_of


def test_dp_add_record_with_named_arguments(processor: DistributedProcessor, db: Any) -> None:
    rid = db.execute("SELECT dp_add_record(payload => %s, queue => 'mail', priority => 3, ordering_key => 'k',"
                     " max_attempts => 2)", (json.dumps({"to": "a@b"}),)).fetchone()[0]
    (rec,) = processor.claim_records(10, queues=["mail"])
    assert (rec.id, rec.payload, rec.priority, rec.max_attempts, rec.ordering_key) == (rid, {"to": "a@b"}, 3, 2, "k")
    default = db.execute("SELECT dp_add_record('{}'::jsonb)").fetchone()[0]
    (rec,) = processor.claim_records(10)
    assert rec.id == default and rec.queue == "default" and rec.max_attempts == 5


def test_dp_add_record_dedupe_returns_the_existing_id(db: Any) -> None:
    first = db.execute("SELECT dp_add_record('{}', dedupe_key => 'once')").fetchone()[0]
    again = db.execute("SELECT dp_add_record('{\"x\": 1}', dedupe_key => 'once')").fetchone()[0]
    assert again == first
    assert db.execute("SELECT count(*) FROM processing_queue").fetchone()[0] == 1


def test_dp_add_record_refuses_bad_input_and_a_full_queue(processor: DistributedProcessor, db: Any) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="JSON object"):
        db.execute("SELECT dp_add_record('[1, 2]'::jsonb)")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_attempts"):
        db.execute("SELECT dp_add_record('{}', max_attempts => 0)")
    with pytest.raises(psycopg.errors.NullValueNotAllowed):
        db.execute("SELECT dp_add_record('{}', queue => NULL)")
    processor.set_queue_limit("small", 1)
    db.execute("SELECT dp_add_record('{}', queue => 'small')")
    with pytest.raises(psycopg.Error, match="queue 'small' is full") as caught:
        db.execute("SELECT dp_add_record('{}', queue => 'small')")
    assert caught.value.sqlstate == "DP001"
    assert db.execute("SELECT count(*) FROM processing_queue WHERE queue = 'small'").fetchone()[0] == 1


COLUMNS = ("queue, (SELECT p.payload FROM record_payloads p WHERE p.id = processing_queue.id), status, priority, "
           "run_at = created_at AS at_now, "
           "CASE WHEN run_at <> created_at THEN run_at END AS run_at, attempts, max_attempts, ordering_key, "
           "dedupe_key, dedupe_while, dedupe_held, key_blocked, trace_context")
GENERAL = ("SELECT (dp_add_records(%s, ARRAY[%s::jsonb], %s, %s::timestamptz, %s, ARRAY[NULL]::text[],"
           " ARRAY[NULL]::text[])).ids[1]")


@pytest.mark.parametrize(("queue", "priority", "run_at", "max_attempts"), [
    ("default", 0, None, None),
    ("mail", 3, None, 2),
    ("default", 0, "2000-01-01T00:00:00Z", None),
    ("default", 0, "2999-01-01T00:00:00Z", 7),
])
def test_dp_add_record_inline_writes_what_dp_add_records_writes(dsn: str, queue: str, priority: int,
                                                                 run_at: str | None, max_attempts: int | None) -> None:
    """A record with no key takes dp_add_record's inline insert (migration 0013); the same record through
    dp_add_records with key arrays of one NULL (its general path) is the same row, announced (but see below)
    and notified the same way, in an application's transaction."""
    payload = json.dumps({"n": 1})
    inline = ("SELECT dp_add_record(%s::jsonb, queue => %s, priority => %s, max_attempts => %s"
              + (", run_at => %s::timestamptz)" if run_at else ")"))
    rows, events, notices = [], [], []
    for general in (False, True):
        with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as conn:
            listener.execute(f'LISTEN "{channel_for("public", queue)}"')
            conn.execute("TRUNCATE processing_queue, claim_floor_events")
            conn.commit()
            if general:
                args: tuple[Any, ...] = (queue, payload, priority, run_at, max_attempts or 5)
                rid = conn.execute(GENERAL, args).fetchone()[0]
            else:
                args = (payload, queue, priority, max_attempts) + ((run_at,) if run_at else ())
                rid = conn.execute(inline, args).fetchone()[0]
            conn.commit()
            rows.append(conn.execute(f"SELECT {COLUMNS} FROM processing_queue WHERE id = %s", (rid,)).fetchone())
            events.append(conn.execute("SELECT count(*) FROM claim_floor_events WHERE NOT at_commit").fetchone()[0])
            conn.commit()
            notices.append(len(list(listener.notifies(timeout=2.0, stop_after=1))))
    assert rows[0] == rows[1]
    assert rows[0][0:4] == (queue, {"n": 1}, "pending", priority) and rows[0][7] == (max_attempts or 5)
    # In a transaction block: announced, dated at the commit; since migration 0015 the inline insert of the
    # commonest record (priority 0, run_at now) only when its transaction lasts longer than ANNOUNCE_AFTER
    # (tests/integration/test_announce.py), which this short one did not.
    assert events == [0 if (priority, run_at) == (0, None) else 1, 1]
    assert notices == [1, 1]


def test_dp_add_record_notifies_at_the_commit(db: Any, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel_for("public", "default")}"')
        with psycopg.connect(dsn) as producer:
            producer.execute("SELECT dp_add_record('{}')")
            assert list(listener.notifies(timeout=0.3, stop_after=1)) == []  # not before the commit
            producer.commit()
        got = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.payload for n in got] == ["default"]


def test_the_sql_partition_and_channel_agree_with_python(db: Any) -> None:
    keys = ["acct-42", "", "ünïcødé", "a" * 300, "emoji-😀", "tab\tkey"]
    got = db.execute("SELECT k, dp_partition_of(k), dp_channel(k) FROM unnest(%s::text[]) k", (keys,)).fetchall()
    assert [(p, c) for _, p, c in got] == [(partition_of(k), channel_for("public", k)) for k in keys]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=12),
       earlier=st.lists(st.sampled_from(["a", "b"]), max_size=3), gap=st.sampled_from([2, 5, 1000]))
def test_the_sql_blocking_rule_is_the_reference_rule(dsn: str, keys: list[str | None], earlier: list[str],
                                                     gap: int) -> None:
    # dp_enqueue_prepare decides which keyed records go in blocked; inserted_blocked is the rule's reference.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE processing_queue")
        prior: dict[str, int | None] = {}
        for k in earlier:  # pending records of the keys before the batch (claimable: they may be followed)
            rid = conn.execute("INSERT INTO processing_queue (payload, ordering_key) VALUES ('{}', %s)"
                               " RETURNING id", (k,)).fetchone()[0]
            prior[k] = rid  # the latest pending record of its key, claimable: a later one may follow it
        first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM processing_queue").fetchone()[0]
        blocked = conn.execute("SELECT blocked FROM dp_enqueue_prepare('default', 0, NULL, %s::text[],"
                               " NULL::text[], NULL, %s, true)", (keys, gap)).fetchone()[0]
    expected = inserted_blocked(keys, prior, first, gap)
    assert (blocked or [False] * len(keys)) == expected


def test_the_reference_rule_uses_the_key_gap() -> None:
    assert KEY_GAP == 1000


def _shard_of(p: DistributedProcessor, key: str) -> int:
    return p.store.topology.shard_map().owner[partition_of(key)]  # type: ignore[union-attr]


def test_a_connection_to_one_shard_refuses_another_shards_key(dp_shards: DistributedProcessor) -> None:
    p = dp_shards
    stores = p.store.stores  # type: ignore[union-attr]
    first = p.store.topology.number(0)  # type: ignore[union-attr]
    other = next(k for k in (f"key-{i}" for i in range(1000)) if _shard_of(p, k) != first)
    mine = next(k for k in (f"key-{i}" for i in range(1000)) if _shard_of(p, k) == first)
    with psycopg.connect(stores[0].db.dsn) as conn:
        with pytest.raises(WrongShard) as caught:
            p.add_records([{"n": 1}, {"n": 2}], ordering_key=[mine, other], conn=conn)
        assert caught.value.shard == _shard_of(p, other) and f"shard {caught.value.shard}" in str(caught.value)
        kept = p.add_records([{"n": 3}, {"n": 4}], ordering_key=[mine, None], conn=conn)
        conn.commit()
    with psycopg.connect(stores[0].db.dsn) as conn:
        rows = conn.execute("SELECT id, ordering_key FROM processing_queue ORDER BY id").fetchall()
    assert rows == [(kept[0], mine), (kept[1], None)]  # nothing of the refused batch; keyless stay here
    with psycopg.connect(stores[0].db.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match=f"belongs to shard {_shard_of(p, other)}") as sql_caught:
            conn.execute("SELECT dp_add_record('{}', ordering_key => %s)", (other,))
        assert sql_caught.value.sqlstate == "DP002"
        conn.execute("SELECT dp_add_record('{}', ordering_key => %s)", (mine,))
