"""The lease index covers processing rows *with a lease*: the same rows, a predicate no per-key query implies.

The processor's statements run with generic plans (planned once per connection). A generic plan of the
claim's per-key in-flight count (``ordering_key = $k AND status = 'processing'``) could pick the lease index,
whose predicate that query implied, and filter every in-flight record of every key through it. Recovery and
the status queries name ``lease_expires_at IS NOT NULL`` explicitly; the per-key count can only use the
ordering index.

Revision ID: 0004_lease_index_predicate
Revises: 0003_key_blocked
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_lease_index_predicate"
down_revision: str | None = "0003_key_blocked"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _create(where: str) -> None:
    op.create_index(
        "ix_processing_queue_lease",
        "processing_queue",
        ["lease_expires_at"],
        postgresql_where=sa.text(where),
    )


def upgrade() -> None:
    op.drop_index("ix_processing_queue_lease", table_name="processing_queue")
    _create("status = 'processing' AND lease_expires_at IS NOT NULL")


def downgrade() -> None:
    op.drop_index("ix_processing_queue_lease", table_name="processing_queue")
    _create("status = 'processing'")
