"""Adding records as SQL functions: ``dp_add_records`` (a batch, what ``add_records`` calls: one round trip on
any connection, the caller's transaction included), ``dp_add_record`` (one record, for SQL and triggers), and
their parts (``dp_enqueue_prepare``, ``dp_enqueue_finish``, ``dp_announce``, ``dp_partition_of``,
``dp_channel``, ``dp_key_checks``). Floor events written inside a transaction that goes on are dated at its
commit (a deferred trigger), since the records they announce become visible only then; an event naming an
ordering key makes that key's earliest pending record claimable at the commit of an application's
transaction that inserted records of the key blocked.

Revision ID: 0008_enqueue_functions
Revises: 0007_shards
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.schema import ddl

revision: str = "0008_enqueue_functions"
down_revision: str | None = "0007_shards"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = (
    "dp_add_record(jsonb, text, integer, timestamptz, text, text, integer)",
    "dp_add_records(text, jsonb[], integer, timestamptz, integer, text[], text[], text, boolean, integer, integer,"
    " boolean, boolean)",
    "dp_enqueue_finish(text, integer, timestamptz, bigint[], integer, boolean, boolean)",
    "dp_announce(text, integer, timestamptz)",
    "dp_enqueue_prepare(text, integer, timestamptz, text[], text[], integer, integer, boolean, boolean)",
    "dp_key_checks(text, text[], boolean[])",
    "dp_channel(text)",
    "dp_partition_of(text)",
)


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.add_column("claim_floor_events",
                  sa.Column("at_commit", sa.Boolean, nullable=False, server_default=sa.text("false")),
                  schema=_schema())
    op.add_column("claim_floor_events", sa.Column("ordering_key", sa.Text), schema=_schema())
    op.execute(ddl("0008_enqueue", _schema()))


def downgrade() -> None:
    quoted = '"' + _schema().replace('"', '""') + '"'
    op.execute(f"DROP TRIGGER IF EXISTS dp_floor_event_at_commit ON {quoted}.claim_floor_events")
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.dp_floor_event_at_commit()")
    for signature in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {quoted}.{signature}")
    op.drop_column("claim_floor_events", "ordering_key", schema=_schema())
    op.drop_column("claim_floor_events", "at_commit", schema=_schema())
