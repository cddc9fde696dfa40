"""The outbox across real processes: an application row and 100 records in one transaction while 3 worker
processes run, through psycopg, a SQLAlchemy Session, a psycopg AsyncConnection and a SQLAlchemy AsyncSession;
a trigger on an application table adding a record per row from 4 concurrent sessions."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from core import AsyncDistributedProcessor, DistributedProcessor
from tests.procs.ledger import ensure_ledger
from tests.support import WorkerProcs, wait_running, wait_until

N = 100


@pytest.fixture
def workers(dsn: str, db: Any) -> Iterator[WorkerProcs]:
    ensure_ledger(db)
    db.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text NOT NULL)")
    procs = WorkerProcs()
    for i in range(3):
        procs.start(f"w{i}", ["-m", "tests.procs.ledger_worker", dsn, f"w{i}", "--poll", "1"])
    # every worker registered and listening: a record committed now would be started at once
    wait_running(db, 3)
    yield procs
    results = procs.terminate_all()
    procs.kill_all()
    for name, (code, _, err) in results.items():
        assert code == 0, f"{name} exited {code}: {err[-2000:]}"


def _clock(conn: Any) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[no-any-return]


def _payloads(tag: str) -> list[dict[str, Any]]:
    return [{"tag": tag, "n": i} for i in range(N)]


# Each way in: (add the records, holding the transaction open ~1 s) -> (ids, the server clock just before the
# commit); ``commit`` False rolls back instead.
def _psycopg(p: DistributedProcessor, dsn: str, commit: bool) -> tuple[list[int], datetime]:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO orders (note) VALUES ('psycopg')")
        ids = p.add_records(_payloads("psycopg"), conn=conn)
        time.sleep(1.0)  # the transaction stays open: workers poll and are notified of nothing meanwhile
        before = _clock(conn)
        conn.commit() if commit else conn.rollback()
    return list(ids), before


def _session(p: DistributedProcessor, dsn: str, commit: bool) -> tuple[list[int], datetime]:
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        with Session(engine) as session:
            session.execute(sa.text("INSERT INTO orders (note) VALUES ('session')"))
            ids = p.add_records(_payloads("session"), conn=session)
            time.sleep(1.0)
            before = session.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
            session.commit() if commit else session.rollback()
    finally:
        engine.dispose()
    return list(ids), before


def _async_psycopg(dsn: str, commit: bool) -> tuple[list[int], datetime]:
    async def main() -> tuple[list[int], datetime]:
        async with AsyncDistributedProcessor(dsn) as p, await psycopg.AsyncConnection.connect(dsn) as conn:
            await conn.execute("INSERT INTO orders (note) VALUES ('async psycopg')")
            ids = await p.add_records(_payloads("async-psycopg"), conn=conn)
            await asyncio.sleep(1.0)
            before = (await (await conn.execute("SELECT clock_timestamp()")).fetchone())[0]  # type: ignore[index]
            await (conn.commit() if commit else conn.rollback())
            return list(ids), before
    return asyncio.run(main())


def _async_session(dsn: str, commit: bool) -> tuple[list[int], datetime]:
    async def main() -> tuple[list[int], datetime]:
        engine = create_async_engine("postgresql+psycopg://",
                                     async_creator=lambda: psycopg.AsyncConnection.connect(dsn))
        try:
            async with AsyncDistributedProcessor(dsn) as p, AsyncSession(engine) as session:
                await session.execute(sa.text("INSERT INTO orders (note) VALUES ('async session')"))
                ids = await p.add_records(_payloads("async-session"), conn=session)
                await asyncio.sleep(1.0)
                before = (await session.execute(sa.text("SELECT clock_timestamp()"))).scalar_one()
                await (session.commit() if commit else session.rollback())
                return list(ids), before
        finally:
            await engine.dispose()
    return asyncio.run(main())


def _ways(p: DistributedProcessor, dsn: str) -> dict[str, Callable[[bool], tuple[list[int], datetime]]]:
    return {
        "psycopg": lambda commit: _psycopg(p, dsn, commit),
        "session": lambda commit: _session(p, dsn, commit),
        "async-psycopg": lambda commit: _async_psycopg(dsn, commit),
        "async-session": lambda commit: _async_session(dsn, commit),
    }


def test_records_of_an_application_transaction_run_after_its_commit_only(workers: WorkerProcs, dsn: str,
                                                                         db: Any) -> None:
    with DistributedProcessor(dsn) as p:
        for way, add in _ways(p, dsn).items():
            gone, _ = add(False)
            ids, before = add(True)
            after = _clock(db)
            wait_until(lambda ids=ids: db.execute(  # type: ignore[misc]
                "SELECT count(*) FROM processing_queue WHERE id = ANY(%s) AND status = 'completed'",
                (ids,)).fetchone()[0] == N, 60, interval=0.05, message=f"{way}: all completed")
            runs = db.execute("SELECT record_id, count(*), min(claimed_at), min(started_at) FROM ledger"
                              " WHERE record_id = ANY(%s) GROUP BY record_id", (ids,)).fetchall()
            assert len(runs) == N and all(n == 1 for _, n, _, _ in runs), way  # each processed once
            assert all(claimed > before for _, _, claimed, _ in runs), way  # none before the commit
            first = min(claimed for _, _, claimed, _ in runs)
            assert (first - after).total_seconds() < 1.0, (way, first, after)
            # the rolled-back records never existed, and none ran
            assert db.execute("SELECT count(*) FROM processing_queue WHERE id = ANY(%s)", (gone,)).fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM ledger WHERE record_id = ANY(%s)", (gone,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM orders").fetchone()[0] == 4


TRIGGER = """
CREATE TABLE signups (id serial PRIMARY KEY, account text NOT NULL, email text NOT NULL);
CREATE FUNCTION signup_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dp_add_record(payload => jsonb_build_object('signup', NEW.id, 'email', NEW.email),
                          queue => TG_ARGV[0], ordering_key => NEW.account, dedupe_key => 'signup-' || NEW.email);
    RETURN NEW;
END $$;
CREATE TRIGGER signup_record AFTER INSERT ON signups FOR EACH ROW EXECUTE FUNCTION signup_record('{queue}');
"""


def test_a_trigger_adds_a_record_for_every_row(workers: WorkerProcs, dsn: str, db: Any) -> None:
    db.execute(TRIGGER.format(queue="default"))
    sessions, rows_each = 4, 2500

    def insert(s: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for start in range(0, rows_each, 250):  # transactions of 250 rows, 10 accounts shared by all
                with conn.transaction():
                    conn.execute("INSERT INTO signups (account, email)"
                                 " SELECT 'acct-' || (g %% 10), %s::text || '-' || g"
                                 " || '@example.com' FROM generate_series(%s::int, %s::int) g",
                                 (f"s{s}", start, start + 249))

    errors: list[BaseException] = []

    def session(s: int) -> None:
        try:
            insert(s)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(s,)) for s in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [repr(e) for e in errors] == []
    total = sessions * rows_each
    assert db.execute("SELECT count(*) FROM signups").fetchone()[0] == total
    wait_until(lambda: db.execute("SELECT count(*) FROM processing_queue WHERE status = 'completed'")
               .fetchone()[0] == total, 180, interval=0.2, message="every signup's record completed")
    assert db.execute("SELECT count(*), count(DISTINCT record_id) FROM ledger").fetchone() == (total, total)
    # per account, the records started in id order (one at a time: the key's limit is 1)
    for (key,) in db.execute("SELECT DISTINCT ordering_key FROM ledger").fetchall():
        started = [r[0] for r in db.execute("SELECT record_id FROM ledger WHERE ordering_key = %s"
                                            " ORDER BY started_at, seq", (key,)).fetchall()]
        assert started == sorted(started), key


def test_trigger_records_keep_key_order_and_dedupe(dsn: str, db: Any) -> None:
    db.execute(TRIGGER.format(queue="welcome"))
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO signups (account, email) VALUES ('acct-1', 'a@x'), ('acct-1', 'b@x')")
        conn.commit()
    first = db.execute("SELECT id FROM record_payloads WHERE payload->>'email' = 'a@x'").fetchone()[0]
    again = db.execute("SELECT dp_add_record('{}', queue => 'welcome', dedupe_key => 'signup-a@x')").fetchone()[0]
    assert again == first
    with DistributedProcessor(dsn) as p:
        p.set_queue_limit("welcome", 2)
        with psycopg.connect(dsn) as conn:
            with pytest.raises(psycopg.Error, match="is full"):
                conn.execute("INSERT INTO signups (account, email) VALUES ('acct-2', 'c@x')")
            conn.rollback()
    assert db.execute("SELECT count(*) FROM signups").fetchone()[0] == 2  # the row went with its record
    ordered = db.execute("SELECT id FROM processing_queue WHERE ordering_key = 'acct-1' ORDER BY id").fetchall()
    assert ordered[0][0] == first
