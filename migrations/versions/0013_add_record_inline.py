"""``dp_add_record`` inserts the common record itself (core/sql/ddl/0013_add_record_inline.sql): with no ordering
key or dedupe key, on a database that is not a shard, for a queue without a limit, one INSERT ... VALUES, the
announcement when needed and the NOTIFY; everything else goes through ``dp_add_records`` as before. Same
signature; no table changes.

Revision ID: 0013_add_record_inline
Revises: 0012_announce_own
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0013_add_record_inline"
down_revision: str | None = "0012_announce_own"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0013_add_record_inline", _schema()))


def downgrade() -> None:
    # dp_add_record as migration 0008 created it: 0008's parts, then what 0011 and 0012 changed in them.
    op.execute(ddl("0008_enqueue", _schema()))
    op.execute(ddl("0011_trace_context", _schema()))
    op.execute(ddl("0012_announce_own", _schema()))
