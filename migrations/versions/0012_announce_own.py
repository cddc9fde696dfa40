"""An insert in our own one-statement transaction no longer announces its records to the claimers
(core/sql/ddl/0012_announce_own.sql): ``dp_add_records`` and ``dp_enqueue_finish`` test "a transaction that goes
on after this statement" only when the caller's ``p_own`` is false. The test they used, statement_timestamp() >
now(), held for every statement sent with the extended protocol or after a BEGIN, so each of the pool's
single-statement inserts wrote a floor event that every claim then read. ``dp_enqueue_finish`` gains a trailing
``p_own boolean DEFAULT false`` (old signature dropped, new one created); no table changes.

Revision ID: 0012_announce_own
Revises: 0011_trace_context
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0012_announce_own"
down_revision: str | None = "0011_trace_context"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_FINISH = "dp_enqueue_finish(text, integer, timestamptz, bigint[], integer, boolean, boolean, boolean)"


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0012_announce_own", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.{NEW_FINISH}")
    # The functions as migration 0011 left them: 0008's parts (dp_enqueue_finish with seven arguments), then
    # 0011's dp_add_records (which drops the 13-argument one that 0008 recreates).
    op.execute(ddl("0008_enqueue", _schema()))
    op.execute(ddl("0011_trace_context", _schema()))
