"""Claims that start from a floor; the events that lower it; autovacuum settings for a hot queue table.

While one snapshot older than the work stays open (a pg_dump, a report, an idle-in-transaction session), no
dead row version can be removed, and a claim scanning the pending index from its start steps over the entry
of every record claimed since: its cost grows with the work done. Claims now start their scan at a floor (a
position in claim order below which nothing claimable is known to wait), given as a row comparison that
the index can seek to. Its columns must run in one direction for that: the pending index orders by
``-priority`` (as bigint: ``-priority`` of the lowest int would overflow) instead of ``priority DESC``, the
same order. ``claim_floor_events`` is where statements that put a claimable record below the floors of
other instances' claimers (an insert, a recovery, a release, an operator's retry or cancel) say so; claims
read the events of their queues since their last claim (by the (queue, created_at) index) and lower their
floors.

Revision ID: 0005_claim_floor
Revises: 0004_lease_index_predicate
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_claim_floor"
down_revision: str | None = "0004_lease_index_predicate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A hot queue: vacuum after 2 % of the rows changed (the default, 20 %, lets a million-row table collect
# 200,000 dead versions first), analyze as often, and let vacuum work ten times faster than the default.
QUEUE_AUTOVACUUM = {
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_cost_limit": "2000",
}


def _table() -> str:
    """The queue table, schema-qualified (raw SQL gets no schema translation)."""
    schema = op.get_context().version_table_schema or "public"
    return '"' + schema.replace('"', '""') + '".processing_queue'


def _pending_index(*columns: sa.ColumnElement[object] | str) -> None:
    op.create_index("ix_processing_queue_pending", "processing_queue", list(columns),
                    postgresql_where=sa.text("status = 'pending'"))


def upgrade() -> None:
    op.drop_index("ix_processing_queue_pending", table_name="processing_queue")
    _pending_index("queue", "key_blocked", sa.text("(- priority::bigint)"), "run_at", "id")
    op.create_table(
        "claim_floor_events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("np", sa.BigInteger, nullable=False),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("clock_timestamp()")),
        sa.PrimaryKeyConstraint("id", name="pk_claim_floor_events"),
    )
    op.create_index("ix_claim_floor_events_queue", "claim_floor_events", ["queue", "created_at"])
    settings = ", ".join(f"{k} = {v}" for k, v in QUEUE_AUTOVACUUM.items())
    op.execute(f"ALTER TABLE {_table()} SET ({settings})")


def downgrade() -> None:
    op.execute(f"ALTER TABLE {_table()} RESET ({', '.join(QUEUE_AUTOVACUUM)})")
    op.drop_table("claim_floor_events")
    op.drop_index("ix_processing_queue_pending", table_name="processing_queue")
    _pending_index("queue", "key_blocked", sa.text("priority DESC"), "run_at", "id")
