"""Alembic environment: connects with psycopg 3 and applies the configured schema to every table."""

from __future__ import annotations

import os

import psycopg
from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from core.schema import metadata

config = context.config
x_args = context.get_x_argument(as_dictionary=True)


def _schema() -> str:
    return str(config.attributes.get("schema") or x_args.get("schema") or os.environ.get("DP_SCHEMA") or "public")


def _run(connection: Connection) -> None:
    schema = _schema()
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    connection.commit()
    connection = connection.execution_options(schema_translate_map={None: schema})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        include_schemas=False,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        # Two instances migrating at once must not race: serialise on an advisory lock.
        connection.execute(text("SELECT pg_advisory_xact_lock(4242, hashtext(:s))"), {"s": schema})
        context.run_migrations()


def run_migrations_online() -> None:
    existing = config.attributes.get("connection")
    if existing is not None:
        _run(existing)
        return
    dsn = x_args.get("dsn") or os.environ.get("DATABASE_URL")
    if not dsn:
        raise SystemExit("no database: pass -x dsn=... or set DATABASE_URL")
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run against a database")
run_migrations_online()
