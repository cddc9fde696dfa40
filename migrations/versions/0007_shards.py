"""Shards: the shard's identity, the partition map, the log of moves, and the function that strides ids.

A sharded processor (``DistributedProcessor(shards=[...])``, docs/scale-out.md) writes the identity and the
map when it migrates; a single database leaves the tables empty and its ids as they were.

Revision ID: 0007_shards
Revises: 0006_stats_slots
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.schema import SHARD_FUNCTION_SQL, STATS_TRIGGER_SQL, STATS_TRIGGER_SQL_SLOTTED

revision: str = "0007_shards"
down_revision: str | None = "0006_stats_slots"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    schema = op.get_context().version_table_schema or "public"
    return '"' + schema.replace('"', '""') + '"'


def upgrade() -> None:
    op.create_table(
        "shard_identity",
        sa.Column("singleton", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("shard_no", sa.Integer, nullable=False),
        sa.Column("accepting", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("singleton", name="pk_shard_identity"),
        sa.CheckConstraint("singleton", name="ck_shard_identity_singleton"),
        sa.CheckConstraint("shard_no >= 0", name="ck_shard_identity_shard_no"),
    )
    op.create_table(
        "shard_map",
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("shard_no", sa.Integer, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
        sa.Column("moving", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.PrimaryKeyConstraint("partition", name="pk_shard_map"),
    )
    op.create_table(
        "shard_moves",
        sa.Column("move_id", sa.Text, nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("move_id", name="pk_shard_moves"),
    )
    op.execute(SHARD_FUNCTION_SQL.format(schema=_schema()))
    op.execute(STATS_TRIGGER_SQL_SLOTTED.format(schema=_schema()))


def downgrade() -> None:
    op.execute(STATS_TRIGGER_SQL.format(schema=_schema()))
    op.execute(f"DROP FUNCTION IF EXISTS {_schema()}.dp_raise_ids(bigint)")
    op.execute(f"DROP FUNCTION IF EXISTS {_schema()}.dp_set_shard_ids(integer, integer, bigint)")
    op.drop_table("shard_moves")
    op.drop_table("shard_map")
    op.drop_table("shard_identity")
