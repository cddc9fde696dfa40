"""How many controls are set (``queue_controls``: queues paused, queue rate slots, key rates), one row kept by
triggers on ``queue_state``, ``queue_rates`` and ``key_rates`` (core/sql/ddl/0014_control_counts.sql): the lean
claim statement's gate reads it instead of the three tables. Safe while workers of the previous version run
(they do not read it); the row is counted from the tables as they are.

Revision ID: 0014_control_counts
Revises: 0013_add_record_inline
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.schema import ddl

revision: str = "0014_control_counts"
down_revision: str | None = "0013_add_record_inline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.create_table(
        "queue_controls",
        sa.Column("id", sa.SmallInteger, nullable=False, server_default=sa.text("1")),
        sa.Column("paused", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("queue_rate_rows", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("key_rates", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("id", name="pk_queue_controls"),
        sa.CheckConstraint("id = 1", name="ck_queue_controls_one_row"),
    )
    op.execute(ddl("0014_control_counts", _schema()))


def downgrade() -> None:
    op.execute(ddl("drop_control_counts", _schema()))
    op.drop_table("queue_controls")
