"""Migrations: both entry points reach head, twice in a row, and the result matches the metadata."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from core import DistributedProcessor
from core.errors import InvalidArgument
from core.migrate import alembic_config, current_revision, downgrade, upgrade
from core.schema import metadata
from tests.support import ROOT, run_cli


def _diff(dsn: str, schema: str = "public") -> list[object]:
    # Reflection reads the default schema, so point search_path at the one under test.
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, options=f"-c search_path={schema}"),
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        conn = conn.execution_options(schema_translate_map={None: schema})
        ctx = MigrationContext.configure(
            conn, opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": lambda name, type_, parent: name != "alembic_version",
            },
        )
        diffs = compare_metadata(ctx, metadata)
    engine.dispose()
    return list(diffs)


def test_cli_migrate_and_alembic_upgrade_both_reach_head_twice(empty_dsn: str) -> None:
    for _ in range(2):
        result = run_cli("migrate", env={"DATABASE_URL": empty_dsn})
        assert result.returncode == 0, result.stderr
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
            cwd=ROOT, env={**os.environ, "DATABASE_URL": empty_dsn}, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    newest = max(p.name[:4] for p in (ROOT / "migrations" / "versions").glob("[0-9]*.py"))
    assert head is not None and head.startswith(newest)
    assert current_revision(empty_dsn) == head


def test_migrated_database_matches_metadata(empty_dsn: str) -> None:
    upgrade(empty_dsn)
    assert _diff(empty_dsn) == []


def test_custom_schema_is_migrated_and_used(empty_dsn: str) -> None:
    upgrade(empty_dsn, schema="tenant_a")
    assert _diff(empty_dsn, "tenant_a") == []
    with DistributedProcessor(empty_dsn, schema="tenant_a") as p:
        ids = p.add_records([{"n": 1}])
        assert [r.id for r in p.claim_records()] == ids
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regclass('public.processing_queue')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM tenant_a.processing_queue").fetchone() == (1,)


def test_an_unknown_revision_is_a_typed_error_and_changes_nothing(empty_dsn: str) -> None:
    upgrade(empty_dsn, revision="0014_control_counts")
    for call in (lambda: upgrade(empty_dsn, revision="0099_nowhere"), lambda: downgrade(empty_dsn, "0099_nowhere")):
        with pytest.raises(InvalidArgument, match="revision '0099_nowhere'"):
            call()
        assert current_revision(empty_dsn) == "0014_control_counts"


def test_revisions_are_alembics_in_order() -> None:
    from core.revisions import needed_over, revisions

    script = ScriptDirectory.from_config(alembic_config())
    walked = [s.revision for s in script.walk_revisions()][::-1]  # walk_revisions goes from head down
    assert revisions() == walked
    assert needed_over(walked[-1]) is None
    assert needed_over(walked[0]) == walked[-1]
    assert needed_over("9999_a_later_version") is None and needed_over(None) is None


def test_a_run_against_an_older_schema_is_refused_before_it_claims(empty_dsn: str) -> None:
    from core.errors import SchemaNotMigrated

    upgrade(empty_dsn, revision="0019_flow_records")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO processing_queue (queue, payload) VALUES ('default', '{\"n\": 1}')")
    needs = f"'public' is at migration 0019_flow_records, this version needs {revisions_head()}"
    with DistributedProcessor(empty_dsn) as p, pytest.raises(SchemaNotMigrated, match=needs):
        p.run(lambda record: None, stop_when_empty=True, handle_signals=False)
    result = run_cli("run", "--handler", "tests.procs.handlers:noop", "--stop-when-empty",
                     env={"DATABASE_URL": empty_dsn})
    assert result.returncode == 1 and "is at migration 0019_flow_records" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(empty_dsn, autocommit=True) as conn:  # nothing claimed, no instance registered
        assert conn.execute("SELECT status, attempts FROM processing_queue").fetchall() == [("pending", 0)]
        assert conn.execute("SELECT count(*) FROM processor_instances").fetchone() == (0,)
    upgrade(empty_dsn)
    with DistributedProcessor(empty_dsn) as p:
        assert p.run(lambda record: None, stop_when_empty=True, handle_signals=False).processed == 1


def test_a_run_against_a_newer_schema_drains(empty_dsn: str) -> None:
    # A later version migrated the database: this one keeps draining (migrations are written for that, or say
    # to stop the previous version's processes: README, "Upgrading").
    upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_a_later_version'")
    with DistributedProcessor(empty_dsn) as p:
        p.add_records([{"n": 1}, {"n": 2}])
        assert p.run(lambda record: None, stop_when_empty=True, handle_signals=False).processed == 2


def revisions_head() -> str:
    from core.revisions import revisions

    return revisions()[-1]


def test_over_shards_one_at_an_older_migration_waits_and_the_others_are_worked(
        dp_shards: DistributedProcessor) -> None:
    import threading
    import time

    assert dp_shards.shards is not None
    older, *others = dp_shards.shards
    with psycopg.connect(older, autocommit=True) as conn:  # as if its migration had not run yet
        conn.execute("UPDATE alembic_version SET version_num = '0019_flow_records'")
    for i in range(3):  # a keyless call goes to the shards in turn
        dp_shards.add_records([{"n": i * 20 + j} for j in range(20)])

    def pending(dsn: str) -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return int(conn.execute("SELECT count(*) FROM processing_queue WHERE status <> 'completed'")
                       .fetchone()[0])

    held = pending(older)
    assert held > 0 and all(pending(d) > 0 for d in others)  # records on every shard
    stop = threading.Event()
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(dp_shards.run(
        lambda record: None, stop_event=stop, poll_interval=0.1, handle_signals=False).processed))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while any(pending(d) for d in others) and time.monotonic() < deadline:
            time.sleep(0.1)  # a bounded poll on the other shards' tables
        assert not any(pending(d) for d in others)
        assert pending(older) == held  # nothing taken from the shard at the older migration
        with psycopg.connect(older, autocommit=True) as conn:
            assert conn.execute("SELECT max(attempts) FROM processing_queue").fetchone() == (0,)
    finally:
        stop.set()
        worker.join(30)
    assert done == [60 - held]
