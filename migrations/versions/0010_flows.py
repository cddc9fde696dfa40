"""Flows: records that go through the steps of a template (core/flows/). Flow columns on processing_queue and
the status ``waiting`` (a step whose parents have not all finished: outside the claim's index), a step's
``result``, the tables flow_templates, flow_runs and flow_edges, and the functions that start a run and settle its
records' ends (core/sql/ddl/0010_flows.sql).

Revision ID: 0010_flows
Revises: 0009_queue_control
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from core.schema import ddl

revision: str = "0010_flows"
down_revision: str | None = "0009_queue_control"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
FUNCTIONS = (
    "dp_flow_repair(bigint[])", "dp_cancel_flow(bigint)",
    "dp_start_flow(text, integer, text, jsonb, jsonb, text, jsonb, integer)", "dp_flow_parents(bigint, bigint)",
    "dp_flow_settle(bigint[], bigint[])", "dp_flow_expand(bigint, jsonb)", "dp_flow_release(bigint[])",
    "dp_flow_announce(bigint[])",
)


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    # New nullable columns without defaults: a change of the catalog only, no rewrite of the table.
    for name, type_ in (("flow_run_id", sa.BigInteger), ("step", sa.Text), ("flow_index", sa.Integer),
                        ("waiting_on", sa.Integer), ("result", JSONB)):
        op.add_column("processing_queue", sa.Column(name, type_), schema=_schema())
    # The new check is added NOT VALID and validated after: validation reads the table without blocking writes.
    quoted = '"' + _schema().replace('"', '""') + '"'
    op.execute(f"ALTER TABLE {quoted}.processing_queue DROP CONSTRAINT ck_processing_queue_status")
    op.execute(f"ALTER TABLE {quoted}.processing_queue ADD CONSTRAINT ck_processing_queue_status CHECK (status IN "
               "('pending', 'processing', 'completed', 'failed', 'cancelled', 'waiting')) NOT VALID")
    op.execute(f"ALTER TABLE {quoted}.processing_queue VALIDATE CONSTRAINT ck_processing_queue_status")
    op.create_index("ix_processing_queue_flow", "processing_queue", ["flow_run_id", "id"],
                    postgresql_where=sa.text("flow_run_id IS NOT NULL"))
    op.create_index("ix_processing_queue_waiting", "processing_queue", ["id"], postgresql_include=["queue"],
                    postgresql_where=sa.text("status = 'waiting'"))
    op.create_table(
        "flow_templates",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("def_hash", sa.Text, nullable=False),
        sa.Column("definition", JSONB, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("name", "version", name="pk_flow_templates"),
    )
    op.create_table(
        "flow_runs",
        sa.Column("id", sa.BigInteger, nullable=False),
        sa.Column("flow", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("input", JSONB, nullable=False),
        sa.Column("dedupe_key", sa.Text),
        sa.Column("failed_step", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("on_failure_id", sa.BigInteger),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_flow_runs"),
        sa.CheckConstraint("status IN ('running', 'completed', 'failed', 'cancelled')", name="ck_flow_runs_status"),
    )
    op.create_index("ux_flow_runs_dedupe", "flow_runs", ["flow", "dedupe_key"], unique=True,
                    postgresql_where=sa.text("status = 'running' AND dedupe_key IS NOT NULL"))
    op.create_index("ix_flow_runs_finished", "flow_runs", ["finished_at"],
                    postgresql_where=sa.text("finished_at IS NOT NULL"))
    op.create_index("ix_flow_runs_created", "flow_runs", ["flow", "created_at"])
    op.create_table(
        "flow_edges",
        sa.Column("parent_id", sa.BigInteger, nullable=False),
        sa.Column("child_id", sa.BigInteger, nullable=False),
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("each", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("run_on_failure", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.PrimaryKeyConstraint("parent_id", "child_id", name="pk_flow_edges"),
    )
    op.create_index("ix_flow_edges_child", "flow_edges", ["child_id"])
    op.create_index("ix_flow_edges_run", "flow_edges", ["run_id"])
    op.execute(ddl("0010_flows", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    for signature in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {quoted}.{signature}")
    for table in ("flow_edges", "flow_runs", "flow_templates"):
        op.drop_table(table)
    op.execute(f"DELETE FROM {quoted}.processing_queue WHERE status = 'waiting'")
    op.execute(f"ALTER TABLE {quoted}.processing_queue DROP CONSTRAINT ck_processing_queue_status")
    op.execute(f"ALTER TABLE {quoted}.processing_queue ADD CONSTRAINT ck_processing_queue_status CHECK (status IN "
               "('pending', 'processing', 'completed', 'failed', 'cancelled'))")
    op.drop_index("ix_processing_queue_waiting", "processing_queue")
    op.drop_index("ix_processing_queue_flow", "processing_queue")
    for name in ("result", "waiting_on", "flow_index", "step", "flow_run_id"):
        op.drop_column("processing_queue", name, schema=_schema())
