"""The claim statement that completes a flow step takes the children it releases
(core/sql/ddl/0017_flow_take.sql): ``dp_flow_settle_take`` counts a child's finished parents and, when the count
reaches zero and the caller can take it, makes it processing with the caller's token in that one update.
``dp_flow_settle`` (the statements that end records without claiming, and workers of the previous version) is
that function taking nothing, so it behaves as before. Safe while workers of the previous version run.

Revision ID: 0017_flow_take
Revises: 0016_flow_trace
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0017_flow_take"
down_revision: str | None = "0016_flow_trace"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0017_flow_take", _schema()))


def downgrade() -> None:
    op.execute(ddl("0016_flow_trace", _schema()))  # dp_flow_settle as 0016 left it (the script is repeatable)
    op.execute(ddl("drop_flow_take", _schema()))
