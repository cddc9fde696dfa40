"""Run the Alembic migrations programmatically (``python -m core migrate`` and ``DistributedProcessor.migrate``)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from psycopg import sql
from sqlalchemy import create_engine, pool

from core.dsn import redact
from core.errors import DatabaseUnavailable, InvalidArgument
from core.queries import Queries
from core.revisions import migrations_dir


def alembic_config(schema: str = "public") -> Config:
    cfg = Config()
    location = migrations_dir()
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("version_locations", str(location / "versions"))
    cfg.attributes["schema"] = schema
    return cfg


def upgrade(dsn: str, schema: str = "public", revision: str = "head", connect_timeout: float = 10.0) -> None:
    """Bring the database to ``revision``; safe to run twice and from several instances at once. An unknown
    revision raises ``InvalidArgument`` naming it (nothing is changed)."""
    _run(dsn, schema, connect_timeout, revision, lambda cfg: command.upgrade(cfg, revision))


def downgrade(dsn: str, revision: str, schema: str = "public", connect_timeout: float = 10.0) -> None:
    """Take the database back to ``revision`` (each migration's downgrade in turn); stop the workers of the
    newer version first: their statements may need what the downgrade removes. An unknown revision raises
    ``InvalidArgument`` naming it (nothing is changed)."""
    _run(dsn, schema, connect_timeout, revision, lambda cfg: command.downgrade(cfg, revision))


def _run(dsn: str, schema: str, connect_timeout: float, revision: str,
         action: Callable[[Config], None]) -> None:
    def connect() -> psycopg.Connection[tuple[object, ...]]:
        try:
            # No prepared statements: migrations may run through PgBouncer's transaction pooling too.
            return psycopg.connect(dsn, connect_timeout=max(1, int(connect_timeout)), prepare_threshold=None)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {exc}") from None

    engine = create_engine("postgresql+psycopg://", creator=connect, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            cfg = alembic_config(schema)
            cfg.attributes["connection"] = connection
            try:
                action(cfg)
            except CommandError as exc:  # Alembic resolves the revision before it runs any migration
                raise InvalidArgument(f"revision {revision!r}: {exc}") from None
            connection.commit()
    finally:
        engine.dispose()


def current_revision(dsn: str, schema: str = "public") -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    q = Queries(schema)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(q.has_table, {"table": sql.Identifier(schema, "alembic_version").as_string()}).fetchone()
        if not row or not row[0]:
            return None
        version = conn.execute(q.alembic_revision).fetchone()
        return str(version[0]) if version else None
