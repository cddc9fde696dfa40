"""Trace context (core/tracing.py, extra [otel]): a nullable ``trace_context`` column on processing_queue (the W3C
traceparent of the span that added the record, then a space and its tracestate when it has one), written by the
inserts and returned by the claim; ``dp_add_records`` gains a trailing ``p_trace text DEFAULT NULL`` (the old
signature dropped, the new one created: core/sql/ddl/0011_trace_context.sql). Its callers (``dp_add_record``,
``dp_fire_schedule``, SQL) are unchanged: they pass no trace context.

Revision ID: 0011_trace_context
Revises: 0010_flows
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.schema import ddl

revision: str = "0011_trace_context"
down_revision: str | None = "0010_flows"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_SIGNATURE = ("dp_add_records(text, jsonb[], integer, timestamptz, integer, text[], text[], text, boolean, integer,"
                 " integer, boolean, boolean, text)")


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    # A nullable column without a default: a change of the catalog only, no rewrite of the table.
    op.add_column("processing_queue", sa.Column("trace_context", sa.Text), schema=_schema())
    op.execute(ddl("0011_trace_context", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.{NEW_SIGNATURE}")
    op.execute(ddl("0008_enqueue", _schema()))  # dp_add_records as migration 0008 created it (and its parts again)
    op.drop_column("processing_queue", "trace_context", schema=_schema())
