"""``AsyncDistributedProcessor``: the producer and operator API as coroutines, the same plans as the blocking
class; ``conn=`` with psycopg's and SQLAlchemy's asyncio connections; the event loop stays free while a call
waits on a lock."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from core import AsyncDistributedProcessor, DistributedProcessor, InvalidArgument, NotInTransaction, QueueFull
from core.plans import blocking

SHARED = ("add_records", "get_queue_status", "health_check", "list_instances", "cancel", "retry_failed", "purge",
          "set_key_concurrency", "set_queue_limit")


def test_the_async_methods_are_the_blocking_ones() -> None:
    for name in SHARED:
        sync, coro = getattr(DistributedProcessor, name), getattr(AsyncDistributedProcessor, name)
        assert inspect.iscoroutinefunction(coro), name
        assert inspect.signature(sync) == inspect.signature(coro), name
        assert sync.__doc__ == coro.__doc__ and sync.__doc__, name
        # one definition: both wrap the same plan of core.operations
        assert sync.__wrapped__ is coro.__wrapped__, name
    assert inspect.signature(AsyncDistributedProcessor) == inspect.signature(DistributedProcessor)
    assert callable(blocking)


def test_producer_and_operator_calls(dsn: str, db: Any) -> None:
    async def main() -> None:
        async with AsyncDistributedProcessor(dsn, max_attempts=1) as p:
            ids = await p.add_records([{"n": i} for i in range(5)], ordering_key="k")
            big = await p.add_records([{"n": i} for i in range(p.copy_threshold)])  # the COPY path
            assert len(big) == p.copy_threshold
            status = await p.get_queue_status()
            assert status["totals"]["pending"] == 5 + p.copy_threshold
            assert (await p.cancel([ids[0]])) == {ids[0]: "cancelled"}
            await p.set_key_concurrency("k", 2)
            await p.set_queue_limit("tiny", 1)
            await p.add_records([{}], queue="tiny")
            with pytest.raises(QueueFull):
                await p.add_records([{}], queue="tiny")
            with pytest.raises(InvalidArgument):
                await p.add_records([{}], queue="")
            assert (await p.health_check())["status"] == "healthy"
            assert await p.list_instances() == []
            assert await p.retry_failed() == 0
            assert await p.purge(0) == 1  # the cancelled record
    asyncio.run(main())
    assert db.execute("SELECT max_concurrency FROM key_concurrency WHERE pattern = 'k'").fetchone()[0] == 2


def test_async_connections_commit_and_roll_back_with_the_application(dsn: str, db: Any) -> None:
    db.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
    engine = create_async_engine("postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(dsn))

    async def main() -> list[int]:
        kept: list[int] = []
        async with AsyncDistributedProcessor(dsn) as p:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                await conn.execute("INSERT INTO orders (note) VALUES ('rolled back')")
                await p.add_records([{}], conn=conn)
                await conn.rollback()
                await conn.execute("INSERT INTO orders (note) VALUES ('kept')")
                kept += await p.add_records([{"via": "psycopg"}], conn=conn)
                await conn.commit()
            async with engine.connect() as conn:
                await conn.execute(text("INSERT INTO orders (note) VALUES ('sa')"))
                kept += await p.add_records([{"via": "sqlalchemy"}], conn=conn)
                await conn.commit()
            async with AsyncSession(engine) as session:
                await session.execute(text("INSERT INTO orders (note) VALUES ('session')"))
                kept += await p.add_records([{"via": "session"}], conn=session)
                await session.commit()
            async with AsyncSession(engine) as session:
                await p.add_records([{"via": "session"}], conn=session)
                await session.rollback()
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                with pytest.raises(NotInTransaction):
                    await p.add_records([{}], conn=conn)
            with psycopg.connect(dsn) as blocking_conn, pytest.raises(InvalidArgument, match="AsyncConnection"):
                await p.add_records([{}], conn=blocking_conn)
        await engine.dispose()
        return kept

    kept = asyncio.run(main())
    assert [r[0] for r in db.execute("SELECT id FROM processing_queue ORDER BY id").fetchall()] == kept
    assert db.execute("SELECT count(*) FROM orders").fetchone()[0] == 3


def test_the_event_loop_runs_while_a_call_waits_on_a_key(dsn: str, db: Any) -> None:
    async def main() -> tuple[int, int, list[int]]:
        async with AsyncDistributedProcessor(dsn) as p:
            holder = await psycopg.AsyncConnection.connect(dsn)
            (first,) = await p.add_records([{}], ordering_key="acct", conn=holder)  # holds the key's lock
            ticks: list[int] = []
            waiting = asyncio.ensure_future(p.add_records([{}], ordering_key="acct"))

            async def meanwhile() -> None:
                for i in range(20):
                    ticks.append(i)
                    await asyncio.sleep(0.02)

            await meanwhile()  # the other coroutine progresses while add_records waits on the lock
            assert not waiting.done()
            row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                             " AND datname = current_database()").fetchone()
            assert row[0] == 1  # the waiting add_records, on the key's producer lock
            await holder.commit()
            (second,) = await asyncio.wait_for(waiting, 10)
            await holder.close()
            return first, second, ticks

    first, second, ticks = asyncio.run(main())
    assert ticks == list(range(20)) and first < second


def test_async_over_shards_and_transaction_pooling(dp_shards: DistributedProcessor, dsn: str) -> None:
    async def main() -> None:
        async with AsyncDistributedProcessor(shards=dp_shards.shards, connect_timeout=5) as p:
            ids = await p.add_records([{"n": i} for i in range(6)], ordering_key=[f"k{i}" for i in range(6)])
            status = await p.get_queue_status()
            assert status["totals"]["pending"] == 6 and len(status["shards"]) == 3
            report = await p.health_check()
            assert report["status"] == "healthy" and len(report["shards"]) == 3
            assert sorted(await p.cancel(ids)) == sorted(ids)
        async with AsyncDistributedProcessor(dsn, pooling="transaction") as p:
            assert len(await p.add_records([{}, {}])) == 2
            assert (await p.get_queue_status())["totals"]["pending"] == 2
    asyncio.run(main())
