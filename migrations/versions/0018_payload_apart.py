"""A batch's payloads apart from its records (core/sql/ddl/0018_payload_apart.sql): ``processing_payload``
holds the payloads of records added by ``dp_add_records`` and the COPY path, written once, so that a claim
and a completion no longer copy them into new row versions. A keyless record added alone, flow steps and moved
records keep theirs on the row; readers take either. Not safe while processes of the previous version run
(they read the payload on the row, and the enqueue function they call writes it apart from here on): stop
them before migrating.

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
