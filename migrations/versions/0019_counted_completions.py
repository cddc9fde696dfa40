"""Finished counts kept by the statements that finish records (core/sql/ddl/0019_counted_completions.sql): the
claim statements' completions and the fail statement add to ``queue_stats`` themselves and flip
``finish_counted`` on the rows they finish; a row-level trigger, whose condition the executor tests without a
call, counts every other change and skips flipped rows. Replaces the statement-level UPDATE trigger, whose
transition tables copied every updated row. Safe while workers of the previous version drain (their updates do
not flip the flag, so the trigger counts them); start this version's workers after it.

Revision ID: 0019_counted_completions
Revises: 0018_payload_apart
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0019_counted_completions"
down_revision: str | None = "0018_payload_apart"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0019_counted_completions", _schema()))


def downgrade() -> None:
    op.execute(ddl("drop_counted_completions", _schema()))
