"""A batch's payloads apart from its records (core/sql/ddl/0018_payload_apart.sql): ``processing_payload``
holds the payloads of records added in batches, written once, so that a claim and a completion no longer copy
them into new row versions. Records added alone, flow steps and moved records keep theirs on the row; readers
take either. Safe while workers of the previous version drain the queue; stop them before producers of this
version add batches (they would read a NULL payload on the row).

Revision ID: 0018_payload_apart
Revises: 0017_flow_take
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0018_payload_apart"
down_revision: str | None = "0017_flow_take"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0018_payload_apart", _schema()))


def downgrade() -> None:
    op.execute(ddl("drop_payload_apart", _schema()))
    op.execute(ddl("0012_announce_own", _schema()))  # dp_add_records as 0012 left it (the script is repeatable)
