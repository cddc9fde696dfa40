"""A run's records listed in ``flow_records`` (core/sql/ddl/0019_flow_records.sql), one pair per record written
where the record is added, instead of found through ``ix_processing_queue_flow``, which took an index entry for
every new version of a flow record; the functions and statements that read a run's records read the pairs and
the records by primary key. The pairs of existing runs are filled before the index is dropped, with the table
locked against writes. Not safe while processes of the previous version run: a flow function call of theirs
in progress when the migration commits goes on with its old body and adds records without their pairs, and
their own reads of a run's records scan the table. Stop them (workers, producers that start runs, dashboards)
before migrating.

Revision ID: 0019_flow_records
Revises: 0018_payload_apart
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0019_flow_records"
down_revision: str | None = "0018_payload_apart"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0019_flow_records", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    op.execute(f"CREATE INDEX IF NOT EXISTS ix_processing_queue_flow ON {quoted}.processing_queue (flow_run_id, id)"
               " WHERE flow_run_id IS NOT NULL")
    # The functions as 0010, 0016 and 0017 left them, in that order (each script is repeatable; 0016's drops
    # the overload 0010's dp_start_flow makes).
    for name in ("0010_flows", "0016_flow_trace", "0017_flow_take"):
        op.execute(ddl(name, _schema()))
    op.execute(f"DROP TABLE {quoted}.flow_records")
