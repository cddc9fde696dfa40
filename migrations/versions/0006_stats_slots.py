"""Finished counts split into slots: concurrent completions no longer queue on one counter row.

Every completion's statement trigger adds to ``queue_stats`` for its queue and status. With one row per queue
and status, every completing transaction held that row's lock until its commit, so transactional handlers
(whose completions commit with their own work, later) completed one at a time: over a 200 ms round trip,
a few records per second, and statement timeouts. Each transaction now adds to the row of its backend's slot
(``pg_backend_pid() % 16``); readers sum the slots.

Revision ID: 0006_stats_slots
Revises: 0005_claim_floor
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from core.schema import STATS_TRIGGER_SQL

revision: str = "0006_stats_slots"
down_revision: str | None = "0005_claim_floor"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The function as 0001 installed it (one row per queue and status), for the downgrade.
V1_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.dp_track_finished() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO {schema}.queue_stats AS s (queue, status, count)
        SELECT queue, status, sum(delta) FROM (
            SELECT queue, status, 1 AS delta FROM dp_new
             WHERE status IN ('completed', 'failed', 'cancelled')
            UNION ALL
            SELECT queue, status, -1 FROM dp_old
             WHERE status IN ('completed', 'failed', 'cancelled')
        ) d
        GROUP BY queue, status HAVING sum(delta) <> 0
        ORDER BY queue, status
        ON CONFLICT (queue, status) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.queue_stats AS s (queue, status, count)
        SELECT queue, status, -count(*) FROM dp_old
         WHERE status IN ('completed', 'failed', 'cancelled')
        GROUP BY queue, status
        ORDER BY queue, status
        ON CONFLICT (queue, status) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSE
        INSERT INTO {schema}.queue_stats AS s (queue, status, count)
        SELECT queue, status, count(*) FROM dp_new
         WHERE status IN ('completed', 'failed', 'cancelled')
        GROUP BY queue, status
        ORDER BY queue, status
        ON CONFLICT (queue, status) DO UPDATE SET count = s.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END
$fn$;
"""


def _schema() -> str:
    schema = op.get_context().version_table_schema or "public"
    return '"' + schema.replace('"', '""') + '"'


def upgrade() -> None:
    s = _schema()
    op.execute(f"ALTER TABLE {s}.queue_stats ADD COLUMN slot smallint NOT NULL DEFAULT 0")
    op.execute(f"ALTER TABLE {s}.queue_stats DROP CONSTRAINT pk_queue_stats")
    op.execute(f"ALTER TABLE {s}.queue_stats ADD CONSTRAINT pk_queue_stats PRIMARY KEY (queue, status, slot)")
    op.execute(STATS_TRIGGER_SQL.format(schema=s))


def downgrade() -> None:
    s = _schema()
    op.execute(f"CREATE TEMP TABLE dp_stats AS SELECT queue, status, sum(count) AS count FROM {s}.queue_stats"
               " GROUP BY 1, 2")
    op.execute(f"DELETE FROM {s}.queue_stats")
    op.execute(f"ALTER TABLE {s}.queue_stats DROP CONSTRAINT pk_queue_stats")
    op.execute(f"ALTER TABLE {s}.queue_stats DROP COLUMN slot")
    op.execute(f"ALTER TABLE {s}.queue_stats ADD CONSTRAINT pk_queue_stats PRIMARY KEY (queue, status)")
    op.execute(f"INSERT INTO {s}.queue_stats (queue, status, count) SELECT queue, status, count FROM dp_stats")
    op.execute(V1_FUNCTION.format(schema=s))
