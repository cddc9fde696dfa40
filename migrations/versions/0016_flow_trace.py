"""A flow run carries the trace context of the ``start_flow`` that started it (core/sql/ddl/0016_flow_trace.sql):
``flow_runs.trace_context``, and ``dp_start_flow`` (a trailing ``p_trace``, NULL by default), ``dp_flow_expand``
and ``dp_flow_settle`` storing it on the run's records, the records a ``for_each`` makes and the on_failure
record. Safe while workers of the previous version run: they call ``dp_start_flow`` with 8 arguments, which
the new signature takes (no trace context stored for their runs).

Revision ID: 0016_flow_trace
Revises: 0015_announce_at_commit
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0016_flow_trace"
down_revision: str | None = "0015_announce_at_commit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0016_flow_trace", _schema()))


def downgrade() -> None:
    op.execute(ddl("drop_flow_trace", _schema()))
    op.execute(ddl("0010_flows", _schema()))  # dp_start_flow, dp_flow_expand and dp_flow_settle as 0010 left them
