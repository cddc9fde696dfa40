"""Records added in the application's transaction (``add_records(conn=...)``): they commit or roll back with
its writes, on a psycopg connection, a SQLAlchemy Connection or Session; the transaction stays usable after a
full queue; concurrent transactions on one key or one dedupe key."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from core import DistributedProcessor, InvalidArgument, NotInTransaction, QueueFull, WrongShard
from core.testing import InMemoryProcessor, NoDatabase
from tests.support import wait_until

APP_DDL = "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, note text NOT NULL)"


@pytest.fixture
def app_db(dsn: str) -> Iterator[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(APP_DDL)
    yield dsn


@pytest.fixture
def engine(app_db: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(app_db))
    yield eng
    eng.dispose()


def _count(db: Any, sql: str, *args: Any) -> int:
    return int(db.execute(sql, args).fetchone()[0])


def _records(db: Any) -> list[int]:
    return [r[0] for r in db.execute("SELECT id FROM processing_queue ORDER BY id").fetchall()]


def test_psycopg_records_commit_and_roll_back_with_the_application(processor: DistributedProcessor, app_db: str,
                                                                    db: Any) -> None:
    with psycopg.connect(app_db) as conn:  # autocommit off: the first statement opens the transaction
        conn.execute("INSERT INTO orders (note) VALUES ('rolled back')")
        ids = processor.add_records([{"n": i} for i in range(3)], conn=conn)
        assert _records(db) == []  # invisible to everyone else before the commit
        conn.rollback()
    assert _records(db) == [] and _count(db, "SELECT count(*) FROM orders") == 0
    with psycopg.connect(app_db, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO orders (note) VALUES ('kept')")
        ids = processor.add_records([{"n": i} for i in range(3)], conn=conn)
        assert _records(db) == []
    assert _records(db) == list(ids) and _count(db, "SELECT count(*) FROM orders") == 1
    assert [r.id for r in processor.claim_records(10)] == list(ids)


def test_an_autocommit_connection_outside_a_transaction_is_refused(processor: DistributedProcessor, app_db: str,
                                                                  db: Any) -> None:
    with psycopg.connect(app_db, autocommit=True) as conn:
        with pytest.raises(NotInTransaction, match="autocommit"):
            processor.add_records([{}], conn=conn)
        with pytest.raises(NotInTransaction):
            processor.add_records([], conn=conn)  # refused even with nothing to add
    with psycopg.connect(app_db) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(NotInTransaction, match="failed transaction"):
            processor.add_records([{}], conn=conn)
    assert _records(db) == []
    with pytest.raises(InvalidArgument, match="conn must be"):
        processor.add_records([{}], conn="postgresql://nope")


def test_a_full_queue_leaves_the_application_transaction_usable(processor: DistributedProcessor, app_db: str,
                                                                 db: Any) -> None:
    processor.set_queue_limit("mail", 2)
    (first,) = processor.add_records([{}], queue="mail")
    with psycopg.connect(app_db) as conn:
        conn.execute("INSERT INTO orders (note) VALUES ('before')")
        with pytest.raises(QueueFull) as caught:
            processor.add_records([{}, {}], queue="mail", conn=conn)
        assert (caught.value.limit, caught.value.depth, caught.value.adding) == (2, 1, 2)
        # the large-batch path (COPY) too
        with pytest.raises(QueueFull):
            processor.add_records([{} for _ in range(processor.copy_threshold)], queue="mail", conn=conn)
        conn.execute("INSERT INTO orders (note) VALUES ('after')")  # the transaction is still usable
        (second,) = processor.add_records([{}], queue="mail", conn=conn)  # and there is room for one
        conn.commit()
    assert _count(db, "SELECT count(*) FROM orders") == 2
    assert _records(db) == [first, second]


def test_a_single_record_into_a_full_queue_leaves_the_transaction_usable(processor: DistributedProcessor,
                                                                         app_db: str, db: Any) -> None:
    """One record alone takes dp_add_one (migration 0015): the same limit, the same numbers, nothing raised
    inside the application's transaction; on the pool too."""
    processor.set_queue_limit("mail", 2)
    with psycopg.connect(app_db) as conn:
        (first,) = processor.add_records([{}], queue="mail", conn=conn)
        (second,) = processor.add_records([{}], queue="mail", conn=conn)
        with pytest.raises(QueueFull) as caught:
            processor.add_records([{}], queue="mail", conn=conn)
        assert (caught.value.queue, caught.value.limit, caught.value.depth, caught.value.adding) == ("mail", 2, 2, 1)
        conn.execute("INSERT INTO orders (note) VALUES ('still usable')")
        conn.commit()
    with pytest.raises(QueueFull):
        processor.add_records([{}], queue="mail")
    assert _count(db, "SELECT count(*) FROM orders") == 1
    assert _records(db) == [first, second]


def test_a_single_record_on_a_shards_database_takes_the_shards_guard(processor: DistributedProcessor,
                                                                      db: Any) -> None:
    """dp_add_one leaves a shard's records to dp_add_records (its guard): a processor without shards pointed at
    a shard's database adds a keyless record there, and is refused by a retiring shard like a batch is."""
    db.execute("INSERT INTO shard_identity (shard_no, accepting) VALUES (0, true)")
    (rid,) = processor.add_records([{}])
    db.execute("UPDATE shard_identity SET accepting = false")
    for batch in ([{}], [{}, {}]):
        with pytest.raises(WrongShard, match="retiring"):
            processor.add_records(batch)
    assert _records(db) == [rid]


def test_copy_batches_on_the_application_connection(processor: DistributedProcessor, app_db: str, db: Any) -> None:
    n = processor.copy_threshold + 5
    with psycopg.connect(app_db) as conn:
        ids = processor.add_records([{"n": i} for i in range(n)], conn=conn, ordering_key="big")
        conn.rollback()
    assert _records(db) == []
    with psycopg.connect(app_db) as conn:
        ids = processor.add_records([{"n": i} for i in range(n)], conn=conn, ordering_key="big")
        conn.commit()
    assert _records(db) == list(ids) and len(ids) == n
    assert _count(db, "SELECT count(*) FROM processing_queue WHERE key_blocked") == n - 1


def test_sqlalchemy_connection_and_session(processor: DistributedProcessor, engine: sa.Engine, db: Any) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO orders (note) VALUES ('sa rolled back')"))
        processor.add_records([{"via": "connection"}], conn=conn)
        conn.rollback()
    assert _records(db) == []
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO orders (note) VALUES ('sa')"))
        (a,) = processor.add_records([{"via": "connection"}], conn=conn)
        assert conn.in_transaction()
    with Session(engine) as session:
        session.execute(sa.text("INSERT INTO orders (note) VALUES ('session')"))
        (b,) = processor.add_records([{"via": "session"}], conn=session, dedupe_key="once")
        again = processor.add_records([{"via": "session"}], conn=session, dedupe_key="once")
        assert list(again) == [b] and again.deduplicated == [0]
        session.commit()
    with Session(engine) as session:  # the session's transaction begins with our statement
        processor.add_records([{"via": "session"}], conn=session)
        session.rollback()
    assert _records(db) == [a, b] and _count(db, "SELECT count(*) FROM orders") == 2


def test_an_autocommit_sqlalchemy_connection_is_refused(processor: DistributedProcessor, engine: sa.Engine,
                                                        db: Any) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn, \
            pytest.raises(NotInTransaction):
        processor.add_records([{}], conn=conn)
    assert _records(db) == []


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported to the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _waiting_on_a_lock(db: Any, pid: int) -> bool:
    row = db.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0] == "Lock")


def test_two_transactions_on_one_key_follow_their_commit_order(make_processor: Any, app_db: str, db: Any) -> None:
    p = make_processor()
    with psycopg.connect(app_db) as first, psycopg.connect(app_db) as second:
        (a,) = p.add_records([{"n": "first"}], ordering_key="acct", conn=first)
        t, out = _in_thread(lambda: p.add_records([{"n": "second"}], ordering_key="acct", conn=second))
        wait_until(lambda: _waiting_on_a_lock(db, second.info.backend_pid), 10, message="second producer waits")
        first.commit()
        t.join(10)
        (b,) = out["value"]
        second.commit()
    assert a < b  # id order is commit order within the key
    order = []
    for _ in range(3):
        batch = p.claim_records(10)
        order += [r.id for r in batch]
        p.mark_completed(batch)
    assert order == [a, b]


def test_a_dedupe_key_held_by_a_transaction_that_rolls_back_is_not_lost(make_processor: Any, app_db: str,
                                                                        db: Any) -> None:
    p = make_processor()
    with psycopg.connect(app_db) as holder, psycopg.connect(app_db) as other:
        p.add_records([{"n": "holder"}], dedupe_key="invoice-7", conn=holder)
        t, out = _in_thread(lambda: p.add_records([{"n": "other"}], dedupe_key="invoice-7", conn=other))
        wait_until(lambda: _waiting_on_a_lock(db, other.info.backend_pid), 10, message="second producer waits")
        holder.rollback()
        t.join(10)
        result = out["value"]
        assert result.deduplicated == []  # the key was free after all
        other.commit()
    (rid,) = result
    assert _records(db) == [rid]
    (claimed,) = p.claim_records(10)
    assert claimed.id == rid and claimed.payload == {"n": "other"}
    # and a holder that commits makes the next producer find its record
    with psycopg.connect(app_db) as holder:
        (held,) = p.add_records([{}], dedupe_key="invoice-8", conn=holder)
        holder.commit()
    again = p.add_records([{}], dedupe_key="invoice-8")
    assert list(again) == [held] and again.deduplicated == [0]


def test_the_in_memory_processor_refuses_a_connection() -> None:
    with pytest.raises(NoDatabase):
        InMemoryProcessor().add_records([{}], conn=object())
