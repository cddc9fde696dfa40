"""Initial schema: records, finished-count stats, key and queue limits, instance registry.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from core.schema import DROP_STATS_TRIGGER_SQL

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


# The finished-count trigger as this revision installed it (one row per queue and status; 0006 splits the
# counts into slots). {schema} is replaced by the quoted schema name.
STATS_TRIGGER_SQL = """
CREATE OR REPLACE FUNCTION {schema}.dp_track_finished() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO {schema}.queue_stats AS s (queue, status, count)
        SELECT queue, status, sum(delta) FROM (
            SELECT queue, status, 1 AS delta FROM dp_new
             WHERE status IN ('completed', 'failed', 'cancelled')
            UNION ALL
            SELECT queue, status, -1 FROM dp_old
             WHERE status IN ('completed', 'failed', 'cancelled')
        ) d
        GROUP BY queue, status HAVING sum(delta) <> 0
        ORDER BY queue, status
        ON CONFLICT (queue, status) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.queue_stats AS s (queue, status, count)
        SELECT queue, status, -count(*) FROM dp_old
         WHERE status IN ('completed', 'failed', 'cancelled')
        GROUP BY queue, status
        ORDER BY queue, status
        ON CONFLICT (queue, status) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSE
        INSERT INTO {schema}.queue_stats AS s (queue, status, count)
        SELECT queue, status, count(*) FROM dp_new
         WHERE status IN ('completed', 'failed', 'cancelled')
        GROUP BY queue, status
        ORDER BY queue, status
        ON CONFLICT (queue, status) DO UPDATE SET count = s.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER dp_track_finished_update AFTER UPDATE ON {schema}.processing_queue
    REFERENCING OLD TABLE AS dp_old NEW TABLE AS dp_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_track_finished();
CREATE TRIGGER dp_track_finished_delete AFTER DELETE ON {schema}.processing_queue
    REFERENCING OLD TABLE AS dp_old
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_track_finished();
CREATE TRIGGER dp_track_finished_insert AFTER INSERT ON {schema}.processing_queue
    REFERENCING NEW TABLE AS dp_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_track_finished();
"""


def _quoted_schema() -> str:
    schema = op.get_context().version_table_schema or "public"
    return '"' + schema.replace('"', '""') + '"'


def upgrade() -> None:
    op.create_table(
        "processing_queue",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("queue", sa.Text(), server_default=sa.text("'default'"), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("run_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("claimed_by", sa.Text()),
        sa.Column("claimed_at", TS),
        sa.Column("lease_expires_at", TS),
        sa.Column("lease_token", postgresql.UUID(as_uuid=True)),
        sa.Column("last_error", sa.Text()),
        sa.Column("ordering_key", sa.Text()),
        sa.Column("dedupe_key", sa.Text()),
        sa.Column("dedupe_while", sa.Text()),
        sa.Column("dedupe_held", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", TS),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processing_queue")),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_processing_queue_status"),
        ),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_processing_queue_max_attempts")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_processing_queue_attempts")),
        sa.CheckConstraint(
            "dedupe_while IS NULL OR dedupe_while IN ('pending', 'active')",
            name=op.f("ck_processing_queue_dedupe_while"),
        ),
        sa.CheckConstraint("length(queue) BETWEEN 1 AND 200", name=op.f("ck_processing_queue_queue_name")),
    )
    op.create_index(
        "ix_processing_queue_claim",
        "processing_queue",
        ["queue", sa.text("priority DESC"), "run_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_processing_queue_lease",
        "processing_queue",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.create_index(
        "ix_processing_queue_claimed_by",
        "processing_queue",
        ["claimed_by"],
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.create_index(
        "ix_processing_queue_ordering",
        "processing_queue",
        ["ordering_key", "status", "id"],
        postgresql_where=sa.text("ordering_key IS NOT NULL AND status IN ('pending', 'processing', 'failed')"),
    )
    op.create_index(
        "ux_processing_queue_dedupe",
        "processing_queue",
        ["queue", "dedupe_key"],
        unique=True,
        postgresql_where=sa.text("dedupe_held"),
    )
    op.create_index(
        "ix_processing_queue_finished",
        "processing_queue",
        ["finished_at"],
        postgresql_where=sa.text("status IN ('completed', 'failed', 'cancelled')"),
    )

    op.create_table(
        "queue_stats",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("queue", "status", name=op.f("pk_queue_stats")),
    )
    op.create_table(
        "key_concurrency",
        sa.Column("pattern", sa.Text(), nullable=False),
        sa.Column("like_pattern", sa.Text(), nullable=False),
        sa.Column("is_exact", sa.Boolean(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("block_on_failure", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("pattern", name=op.f("pk_key_concurrency")),
        sa.CheckConstraint("max_concurrency >= 1", name=op.f("ck_key_concurrency_max_concurrency")),
    )
    op.create_table(
        "queue_limits",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("max_pending", sa.Integer(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_queue_limits")),
        sa.CheckConstraint("max_pending >= 0", name=op.f("ck_queue_limits_max_pending")),
    )
    op.create_table(
        "processor_instances",
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("started_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("last_heartbeat_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("stopped_at", TS),
        sa.Column("status", sa.Text(), server_default=sa.text("'running'"), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_processor_instances")),
        sa.CheckConstraint(
            "status IN ('running', 'stopping', 'stopped', 'dead')", name=op.f("ck_processor_instances_status")
        ),
    )
    op.create_index(
        "ix_processor_instances_heartbeat",
        "processor_instances",
        ["last_heartbeat_at"],
        postgresql_where=sa.text("status IN ('running', 'stopping')"),
    )
    op.execute(STATS_TRIGGER_SQL.format(schema=_quoted_schema()))


def downgrade() -> None:
    op.execute(DROP_STATS_TRIGGER_SQL.format(schema=_quoted_schema()))
    op.drop_table("processor_instances")
    op.drop_table("queue_limits")
    op.drop_table("key_concurrency")
    op.drop_table("queue_stats")
    op.drop_table("processing_queue")
