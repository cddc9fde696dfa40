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
    from core import DistributedProcessor

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
