"""The tables of flows (migration 0010), defined on the schema's metadata by :mod:`core.schema`."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

TS = DateTime(timezone=True)


def define(metadata: MetaData) -> tuple[Table, Table, Table, Table]:
    """Add flow_templates, flow_runs, flow_edges and flow_records to ``metadata``."""
    # Flows (core/flows/, migration 0010). A template's definition is stored per (name, version) with its hash:
    # a run started with a different definition under the same version is refused.
    flow_templates = Table(
        "flow_templates",
        metadata,
        Column("name", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("def_hash", Text, nullable=False),
        Column("definition", JSONB, nullable=False),
        Column("created_at", TS, nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("name", "version"),
    )
    # A run: its id from the records' sequence (unique across shards); completed by the statement that
    # completes its last record (a sink, under the run's row lock), failed by the first that fails.
    flow_runs = Table(
        "flow_runs",
        metadata,
        Column("id", BigInteger, nullable=False),
        Column("flow", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("status", Text, nullable=False),
        Column("input", JSONB, nullable=False),
        Column("dedupe_key", Text),
        Column("failed_step", Text),
        Column("error", Text),
        Column("on_failure_id", BigInteger),
        Column("created_at", TS, nullable=False, server_default=func.now()),
        Column("updated_at", TS, nullable=False, server_default=func.now()),
        Column("finished_at", TS),
        Column("trace_context", Text),  # the start's (migration 0016)
        PrimaryKeyConstraint("id"),
        CheckConstraint("status IN ('running', 'completed', 'failed', 'cancelled')", name="status"),
    )
    Index("ux_flow_runs_dedupe", flow_runs.c.flow, flow_runs.c.dedupe_key, unique=True,
          postgresql_where=text("status = 'running' AND dedupe_key IS NOT NULL"))
    Index("ix_flow_runs_finished", flow_runs.c.finished_at, postgresql_where=text("finished_at IS NOT NULL"))
    Index("ix_flow_runs_created", flow_runs.c.flow, flow_runs.c.created_at)
    # One row per (parent, child): ``each`` the edge of a for_each step from its source, ``run_on_failure`` the
    # child's on_dependency_failure="run".
    flow_edges = Table(
        "flow_edges",
        metadata,
        Column("parent_id", BigInteger, nullable=False),
        Column("child_id", BigInteger, nullable=False),
        Column("run_id", BigInteger, nullable=False),
        Column("each", Boolean, nullable=False, server_default=text("false")),
        Column("run_on_failure", Boolean, nullable=False, server_default=text("false")),
        # The child's one parent, not a for_each (migration 0020): the settlement takes the child with the result
        # its parent's completion sent.
        Column("sole", Boolean, nullable=False, server_default=text("false")),
        PrimaryKeyConstraint("parent_id", "child_id"),
    )
    Index("ix_flow_edges_child", flow_edges.c.child_id)
    Index("ix_flow_edges_run", flow_edges.c.run_id)
    # A run's records (migration 0019), one row each, written where the record is added: what flow_status,
    # cancel_flow, a run's completion and retention read a run's records by (then each record by primary key).
    flow_records = Table(
        "flow_records",
        metadata,
        Column("flow_run_id", BigInteger, nullable=False),
        Column("record_id", BigInteger, nullable=False),
        # No step follows it (migration 0020; NULL: written before, not known): a run's completion looks at these.
        Column("sink", Boolean),
        PrimaryKeyConstraint("flow_run_id", "record_id"),
    )
    return flow_templates, flow_runs, flow_edges, flow_records
