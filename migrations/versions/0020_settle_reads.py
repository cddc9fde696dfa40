"""The chain's settlement with fewer reads (core/sql/ddl/0020_settle_reads.sql): a child whose one parent is not a
``for_each`` (``flow_edges.sole``, set by ``dp_start_flow``) is taken with the ``{step: result}`` its parent's
completion sent, without reading its edges and its parent again; the caller sends each completed record's run;
a run's completion looks for an unfinished record among its sinks only (``flow_records.sink``);
the completed records' edges are read once per round; the children taken are chosen in the update that counts
them. Safe while workers of the previous version run: their claim statement calls the settlement by 0017's
signature, which runs this one, reading what they do not send. The downgrade runs 0019's script again, which
locks ``processing_queue`` against writes while it refills ``flow_records`` from the table (a scan of it): claims
and completions wait for it.

Revision ID: 0020_settle_reads
Revises: 0019_flow_records
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0020_settle_reads"
down_revision: str | None = "0019_flow_records"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0020_settle_reads", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    # 0019's functions again (its script is repeatable: its pairs are there, its index is gone), then the column.
    op.execute(f"DROP FUNCTION {quoted}.dp_flow_settle_take(bigint[], bigint[], text[], integer, uuid, text,"
               " double precision, bigint[], jsonb[])")
    op.execute(ddl("0019_flow_records", _schema()))
    op.execute(f"ALTER TABLE {quoted}.flow_edges DROP COLUMN sole")
    op.execute(f"ALTER TABLE {quoted}.flow_records DROP COLUMN sink")
