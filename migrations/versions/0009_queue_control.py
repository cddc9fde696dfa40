"""Queue control: pause and resume (``queue_state``), rate limits (``queue_rates``, ``key_rates`` and their
``key_buckets``, charged by the claim statement; ``dp_key_token``), and schedules (``schedules``, whose ticks
``dp_fire_schedule`` fires once each, by a compare and swap on ``next_fire``).

Revision ID: 0009_queue_control
Revises: 0008_enqueue_functions
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from core.schema import ddl

revision: str = "0009_queue_control"
down_revision: str | None = "0008_enqueue_functions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.create_table(
        "queue_state",
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("paused_at", TS),
        sa.Column("resume_at", TS),
        sa.Column("reason", sa.Text),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("queue", name="pk_queue_state"),
    )
    op.create_table(
        "queue_rates",
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("slot", sa.SmallInteger, nullable=False),
        sa.Column("n", sa.Float, nullable=False),
        sa.Column("per", sa.Float, nullable=False),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.PrimaryKeyConstraint("queue", "slot", name="pk_queue_rates"),
        sa.CheckConstraint("n > 0 AND per > 0", name="ck_queue_rates_positive"),
    )
    op.create_table(
        "key_rates",
        sa.Column("pattern", sa.Text, nullable=False),
        sa.Column("like_pattern", sa.Text, nullable=False),
        sa.Column("is_exact", sa.Boolean, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("per", sa.Float, nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("pattern", name="pk_key_rates"),
        sa.CheckConstraint("n > 0 AND per > 0", name="ck_key_rates_positive"),
    )
    op.create_table(
        "key_buckets",
        sa.Column("ordering_key", sa.Text, nullable=False),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.PrimaryKeyConstraint("ordering_key", name="pk_key_buckets"),
    )
    op.create_table(
        "schedules",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("cron", sa.Text),
        sa.Column("every_seconds", sa.Float),
        sa.Column("timezone", sa.Text, nullable=False, server_default=sa.text("'UTC'")),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("options", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("misfire", sa.Text, nullable=False, server_default=sa.text("'latest'")),
        sa.Column("backfill_seconds", sa.Float),
        sa.Column("overlap", sa.Text, nullable=False, server_default=sa.text("'allow'")),
        sa.Column("flow", sa.Text),
        sa.Column("definition", sa.Text, nullable=False),
        sa.Column("next_fire", TS, nullable=False),
        sa.Column("last_fire", TS),
        sa.Column("last_record_id", sa.BigInteger),
        sa.Column("fired", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("name", name="pk_schedules"),
        sa.CheckConstraint("(cron IS NULL) <> (every_seconds IS NULL)", name="ck_schedules_cron_or_every"),
        sa.CheckConstraint("misfire IN ('skip', 'latest', 'all')", name="ck_schedules_misfire"),
        sa.CheckConstraint("overlap IN ('allow', 'skip_if_running')", name="ck_schedules_overlap"),
    )
    op.create_index("ix_schedules_next_fire", "schedules", ["next_fire"])
    op.execute(ddl("0009_queue_control", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.dp_fire_schedule(text, timestamptz, timestamptz, timestamptz[],"
               " boolean)")
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.dp_key_token(text)")
    for table in ("schedules", "key_buckets", "key_rates", "queue_rates", "queue_state"):
        op.drop_table(table)
