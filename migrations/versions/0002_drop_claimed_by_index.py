"""Drop the claimed_by index: recovery reads in-flight rows through the lease index.

One index write less per claim; the partial lease index already holds every processing row, and there are
only as many of those as records in flight.

Revision ID: 0002_drop_claimed_by_index
Revises: 0001_initial
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_drop_claimed_by_index"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_processing_queue_claimed_by", table_name="processing_queue")


def downgrade() -> None:
    op.create_index(
        "ix_processing_queue_claimed_by",
        "processing_queue",
        ["claimed_by"],
        postgresql_where=sa.text("status = 'processing'"),
    )
