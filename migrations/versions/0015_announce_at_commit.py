"""A record added alone in an application's transaction is announced to the claimers at the commit, only if the
transaction lasted longer than ``ANNOUNCE_AFTER`` (core/sql/ddl/0015_announce_at_commit.sql): a deferred
constraint trigger on ``processing_queue``, queued by one insert per queue and transaction, in place of a floor
event written and dated again by every such insert. ``dp_add_one`` adds add_records' single keyless record;
``dp_add_record`` takes the same rule. Safe while workers of the previous version run (they call neither new
function; the trigger queues nothing for their inserts). No table changes.

Revision ID: 0015_announce_at_commit
Revises: 0014_control_counts
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import ddl

revision: str = "0015_announce_at_commit"
down_revision: str | None = "0014_control_counts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return op.get_context().version_table_schema or "public"


def upgrade() -> None:
    op.execute(ddl("0015_announce_at_commit", _schema()))


def downgrade() -> None:
    op.execute(ddl("drop_announce_at_commit", _schema()))
    op.execute(ddl("0013_add_record_inline", _schema()))  # dp_add_record as 0013 left it
