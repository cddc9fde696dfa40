"""Materialised key-head hint: ``key_blocked`` marks keyed records that have an earlier pending record of
their key, and the pending index leads with it so a claim never walks a busy key's backlog.

The claim still verifies per-key eligibility itself; the flag only lets it skip rows. A flag left wrongly set
by a crash is cleared by the periodic sweep in ``cleanup_orphaned_records``.

Revision ID: 0003_key_blocked
Revises: 0002_drop_claimed_by_index
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_key_blocked"
down_revision: str | None = "0002_drop_claimed_by_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # ALTER TABLE is not covered by the schema_translate_map env.py sets, so name the schema explicitly.
    return op.get_context().version_table_schema


def upgrade() -> None:
    op.add_column(
        "processing_queue",
        sa.Column("key_blocked", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        schema=_schema(),
    )
    op.create_index(
        "ix_processing_queue_pending",
        "processing_queue",
        ["queue", "key_blocked", sa.text("priority DESC"), "run_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_processing_queue_claim", table_name="processing_queue")


def downgrade() -> None:
    op.create_index(
        "ix_processing_queue_claim",
        "processing_queue",
        ["queue", sa.text("priority DESC"), "run_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_processing_queue_pending", table_name="processing_queue")
    op.drop_column("processing_queue", "key_blocked", schema=_schema())
