"""The database schema, defined once as SQLAlchemy Core metadata.

Tables carry no schema name: the configured PostgreSQL schema is applied at run time through
``schema_translate_map`` (Alembic) and ``psycopg.sql.Identifier`` (hot-path statements).

Index design (why each exists):

* ``ix_processing_queue_pending``: the claim walks it in order, ``key_blocked = false`` only, so neither
  finished rows nor the backlog of a busy ordering key ever enter the scan. Partial on ``pending``. Its order
  is ``-priority`` (bigint), ``run_at``, ``id``: one direction, so a claim seeks straight to its floor with
  a row comparison (migration 0005) instead of stepping over the dead entries of everything claimed since the
  oldest open snapshot.
* ``ix_processing_queue_lease``: recovery by expired lease and by dead instance; partial on ``processing``
  so it holds only in-flight rows (migration 0002 dropped a separate claimed_by index: one index write less
  per claim, and the in-flight set is small enough to filter by instance).
* ``ix_processing_queue_ordering``: per-key FIFO checks (earlier pending, in-flight count, earlier failed).
* ``ux_processing_queue_dedupe``: the queueing lock; unique only while a record holds it.
* ``ix_processing_queue_finished``: retention purge in bounded, ordered batches.
* ``processing_payload`` (migration 0018): a batch's payloads, written once, coalesced with the record's own.
* ``flow_records`` (migration 0019): a run's records, one row each, instead of an index on the run that took an
  entry for every version of a flow record.
"""

from __future__ import annotations

from importlib import resources

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from core.constants import FINAL_STATUSES, INSTANCE_STATUSES, STATUSES
from core.flows import tables as flow_tables

__all__ = ["FINAL_STATUSES", "INSTANCE_STATUSES", "STATUSES", "metadata"]

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

TS = DateTime(timezone=True)


def _template(name: str) -> str:
    """The text of ``core/sql/ddl/<name>.sql``, its ``{schema}`` placeholders left for ``str.format``."""
    return resources.files("core").joinpath("sql").joinpath("ddl").joinpath(f"{name}.sql").read_text(encoding="utf-8")

processing_queue = Table(
    "processing_queue",
    metadata,
    Column("id", BigInteger, Identity(always=False), nullable=False),
    Column("queue", Text, nullable=False, server_default=text("'default'")),
    Column("payload", JSONB),  # NULL: in processing_payload (migration 0018)
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("run_at", TS, nullable=False, server_default=func.now()),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("5")),
    Column("claimed_by", Text),
    Column("claimed_at", TS),
    Column("lease_expires_at", TS),
    Column("lease_token", UUID(as_uuid=True)),
    Column("last_error", Text),
    Column("ordering_key", Text),
    Column("dedupe_key", Text),
    Column("dedupe_while", Text),
    Column("dedupe_held", Boolean, nullable=False, server_default=text("false")),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    # A hint: an earlier record of the same ordering key is pending, so this one cannot start yet.
    Column("key_blocked", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", TS, nullable=False, server_default=func.now()),
    Column("updated_at", TS, nullable=False, server_default=func.now()),
    Column("finished_at", TS),
    # Flows (migration 0010, core/flows/): the run, the step, the element of a for_each step (-1: its
    # placeholder until its source completes), and, while waiting, how many parents have not finished.
    Column("flow_run_id", BigInteger),
    Column("step", Text),
    Column("flow_index", Integer),
    Column("waiting_on", Integer),
    # A flow step's result, written by the statement that completes it (NULL outside flows).
    Column("result", JSONB),
    # The W3C trace context of the span that added it (migration 0011, core/tracing.py; NULL without one).
    Column("trace_context", Text),
    PrimaryKeyConstraint("id"),
    CheckConstraint("status IN ('pending', 'processing', 'completed', 'failed', 'cancelled', 'waiting')",
                    name="status"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
    CheckConstraint("attempts >= 0", name="attempts"),
    CheckConstraint("dedupe_while IS NULL OR dedupe_while IN ('pending', 'active')", name="dedupe_while"),
    CheckConstraint("length(queue) BETWEEN 1 AND 200", name="queue_name"),
)

Index(
    "ix_processing_queue_pending",
    processing_queue.c.queue,
    processing_queue.c.key_blocked,
    text("(- priority::bigint)"),
    processing_queue.c.run_at,
    processing_queue.c.id,
    postgresql_where=text("status = 'pending'"),
)
Index(
    "ix_processing_queue_lease",
    processing_queue.c.lease_expires_at,
    # Not implied by a per-key query (status and ordering_key only): those must use the ordering index.
    postgresql_where=text("status = 'processing' AND lease_expires_at IS NOT NULL"),
)
Index(
    "ix_processing_queue_ordering",
    processing_queue.c.ordering_key,
    processing_queue.c.status,
    processing_queue.c.id,
    postgresql_where=text(
        "ordering_key IS NOT NULL AND status IN ('pending', 'processing', 'failed')"
    ),
)
Index(
    "ux_processing_queue_dedupe",
    processing_queue.c.queue,
    processing_queue.c.dedupe_key,
    unique=True,
    postgresql_where=text("dedupe_held"),
)
Index(
    "ix_processing_queue_finished",
    processing_queue.c.finished_at,
    postgresql_where=text("status IN ('completed', 'failed', 'cancelled')"),
)
# The waiting records (counts, the health check of a waiting record whose parents all finished). A run's records
# are listed in flow_records (core/flows/tables.py, migration 0019), not indexed here: an index on the run took
# an entry for every version of a flow record.
Index(
    "ix_processing_queue_waiting",
    processing_queue.c.id,
    postgresql_include=["queue"],
    postgresql_where=text("status = 'waiting'"),
)

processing_payload = Table("processing_payload", metadata, Column("id", BigInteger, nullable=False,
                           autoincrement=False), Column("payload", JSONB, nullable=False), PrimaryKeyConstraint("id"))

# Where statements that put a claimable record below other instances' claim floors say so (an insert, a
# recovery, a release, an operator's retry or cancel): insert-only, read per queue from a claimer's last claim
# on, pruned by the maintainer. ``np`` is ``-priority``, the first column of the claim order.
claim_floor_events = Table(
    "claim_floor_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), nullable=False),
    Column("queue", Text, nullable=False),
    Column("np", BigInteger, nullable=False),
    Column("run_at", TS, nullable=False),
    Column("record_id", BigInteger, nullable=False),
    # The clock when written, not the transaction's start: claims read the events of the last few seconds.
    Column("created_at", TS, nullable=False, server_default=text("clock_timestamp()")),
    # Dated again at the commit of the transaction that wrote it (one that goes on after the insert).
    Column("at_commit", Boolean, nullable=False, server_default=text("false")),
    # A key check: at that commit, the key's earliest pending record is made claimable if it is blocked.
    Column("ordering_key", Text),
    PrimaryKeyConstraint("id"),
)
Index("ix_claim_floor_events_queue", claim_floor_events.c.queue, claim_floor_events.c.created_at)

# Running totals of finished records per queue and status, kept by a statement-level trigger so that
# health probes and stats never count millions of finished rows. Split into STATS_SLOTS rows per queue and
# status (a transaction adds to its backend's slot): one row would be locked by every completing transaction
# until its commit, and transactional handlers, whose completions commit with their own work, queued on it.
STATS_SLOTS = 16
queue_stats = Table(
    "queue_stats",
    metadata,
    Column("queue", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("slot", SmallInteger, nullable=False, server_default=text("0")),
    Column("count", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("queue", "status", "slot"),
)

# Per-key concurrency limits; ``pattern`` is a glob (``*``, ``?``), ``like_pattern`` its LIKE form.
key_concurrency = Table(
    "key_concurrency",
    metadata,
    Column("pattern", Text, nullable=False),
    Column("like_pattern", Text, nullable=False),
    Column("is_exact", Boolean, nullable=False),
    Column("max_concurrency", Integer, nullable=False),
    Column("block_on_failure", Boolean, nullable=False, server_default=text("false")),
    Column("updated_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("pattern"),
    CheckConstraint("max_concurrency >= 1", name="max_concurrency"),
)

queue_limits = Table(
    "queue_limits",
    metadata,
    Column("queue", Text, nullable=False),
    Column("max_pending", Integer, nullable=False),
    Column("updated_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("queue"),
    CheckConstraint("max_pending >= 0", name="max_pending"),
)

processor_instances = Table(
    "processor_instances",
    metadata,
    Column("instance_id", Text, nullable=False),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", Text, nullable=False),
    Column("started_at", TS, nullable=False, server_default=func.now()),
    Column("last_heartbeat_at", TS, nullable=False, server_default=func.now()),
    Column("stopped_at", TS),
    Column("status", Text, nullable=False, server_default=text("'running'")),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    PrimaryKeyConstraint("instance_id"),
    CheckConstraint("status IN ('running', 'stopping', 'stopped', 'dead')", name="status"),
)
Index(
    "ix_processor_instances_heartbeat",
    processor_instances.c.last_heartbeat_at,
    postgresql_where=text("status IN ('running', 'stopping')"),
)

# Shards (docs/scale-out.md): which shard this database is (one row, written when a sharded processor first
# migrates it), and the partition map every shard carries a copy of. A record with an ordering or dedupe key
# lives on the shard its key's partition maps to; ``version`` orders the copies (the highest wins), ``moving``
# stops producers of the partition while its records move.
shard_identity = Table(
    "shard_identity",
    metadata,
    Column("singleton", Boolean, nullable=False, server_default=text("true")),
    Column("shard_no", Integer, nullable=False),
    Column("accepting", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("singleton"),
    CheckConstraint("singleton", name="singleton"),
    CheckConstraint("shard_no >= 0", name="shard_no"),
)

shard_map = Table(
    "shard_map",
    metadata,
    Column("partition", Integer, nullable=False),
    Column("shard_no", Integer, nullable=False),
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    Column("moving", Boolean, nullable=False, server_default=text("false")),
    PrimaryKeyConstraint("partition"),
)

# Moves between shards committed on their target (core/shardmove.py): what resolves a move's in-doubt
# prepared transaction on the source after a crash.
shard_moves = Table(
    "shard_moves",
    metadata,
    Column("move_id", Text, nullable=False),
    Column("records", Integer, nullable=False),
    Column("created_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("move_id"),
)

# Queue control (migration 0009). A paused queue gives nothing to any claim; with resume_at it resumes then.
queue_state = Table(
    "queue_state",
    metadata,
    Column("queue", Text, nullable=False),
    Column("paused_at", TS),
    Column("resume_at", TS),
    Column("reason", Text),
    Column("updated_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("queue"),
)

# Rate limits: a token bucket per queue (at most n starts per ``per`` seconds, bursts up to n), charged by the
# claim under the bucket's row lock; per ordering key (exact or glob) with one bucket per key (key_buckets).
queue_rates = Table(
    "queue_rates",
    metadata,
    Column("queue", Text, nullable=False),
    # A queue's bucket is striped over up to RATE_SLOTS rows of n / slots each: a claim charges one it can lock
    # at once (SKIP LOCKED), so claimers of a rate-limited queue never wait for each other.
    Column("slot", SmallInteger, nullable=False),
    Column("n", Float, nullable=False),
    Column("per", Float, nullable=False),
    Column("tokens", Float, nullable=False),
    Column("updated_at", TS, nullable=False, server_default=text("clock_timestamp()")),
    PrimaryKeyConstraint("queue", "slot"),
    CheckConstraint("n > 0 AND per > 0", name="positive"),
)
RATE_SLOTS = 8
# How many pauses and rates are set (migration 0014: one row kept by triggers), the lean claim's gate.
queue_controls = Table(
    "queue_controls",
    metadata,
    Column("id", SmallInteger, nullable=False, server_default=text("1")),
    Column("paused", Integer, nullable=False, server_default=text("0")),
    Column("queue_rate_rows", Integer, nullable=False, server_default=text("0")),
    Column("key_rates", Integer, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("id"),
    CheckConstraint("id = 1", name="one_row"),
)
key_rates = Table(
    "key_rates",
    metadata,
    Column("pattern", Text, nullable=False),
    Column("like_pattern", Text, nullable=False),
    Column("is_exact", Boolean, nullable=False),
    Column("n", Integer, nullable=False),
    Column("per", Float, nullable=False),
    Column("updated_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("pattern"),
    CheckConstraint("n > 0 AND per > 0", name="positive"),
)
key_buckets = Table(
    "key_buckets",
    metadata,
    Column("ordering_key", Text, nullable=False),
    Column("tokens", Float, nullable=False),
    Column("updated_at", TS, nullable=False, server_default=text("clock_timestamp()")),
    PrimaryKeyConstraint("ordering_key"),
)

# Schedules (core/schedules.py): a tick fires once, however many instances see it due, by one statement that
# moves next_fire on from the value it read (compare and swap) and adds the tick's record.
schedules = Table(
    "schedules",
    metadata,
    Column("name", Text, nullable=False),
    Column("cron", Text),
    Column("every_seconds", Float),
    Column("timezone", Text, nullable=False, server_default=text("'UTC'")),
    Column("queue", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("options", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("misfire", Text, nullable=False, server_default=text("'latest'")),
    Column("backfill_seconds", Float),
    Column("overlap", Text, nullable=False, server_default=text("'allow'")),
    Column("flow", Text),
    Column("definition", Text, nullable=False),
    Column("next_fire", TS, nullable=False),
    Column("last_fire", TS),
    Column("last_record_id", BigInteger),
    Column("fired", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", TS, nullable=False, server_default=func.now()),
    Column("updated_at", TS, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("name"),
    CheckConstraint("(cron IS NULL) <> (every_seconds IS NULL)", name="cron_or_every"),
    CheckConstraint("misfire IN ('skip', 'latest', 'all')", name="misfire"),
    CheckConstraint("overlap IN ('allow', 'skip_if_running')", name="overlap"),
)
Index("ix_schedules_next_fire", schedules.c.next_fire)

# Flows (core/flows/tables.py, migration 0010): templates, runs, edges.
flow_templates, flow_runs, flow_edges, flow_records = flow_tables.define(metadata)

# dp_set_shard_ids: a new shard's ids are congruent to its number modulo the stride and above every id it
# holds and ``above`` (unique across shards; a moved record keeps its id). dp_raise_ids takes ids until the
# next is above ``above`` (moved records stay before the shard's later ones), as inserts take them.
SHARD_FUNCTION_SQL = _template("shard_ids")

# The function of queue_stats' triggers (statement-level, after insert, update and delete; created by 0001):
# this version, with slots, is installed by 0006. {schema}: the quoted schema name.
STATS_TRIGGER_SQL = _template("stats_trigger")

# Migration 0007: the slot may be set for a transaction (``dp.stats_slot``): a move between shards counts its
# rows in a slot of its own, so a prepared move left by a killed mover locks no row that completions write.
STATS_TRIGGER_SQL_SLOTTED = STATS_TRIGGER_SQL.replace(
    "pg_backend_pid() % 16",
    "coalesce(nullif(current_setting('dp.stats_slot', true), '')::int, pg_backend_pid() % 16)")

DROP_STATS_TRIGGER_SQL = _template("drop_stats_trigger")


def ddl(name: str, schema: str) -> str:
    """The DDL script ``core/sql/ddl/<name>.sql`` for ``schema``: ``{schema}`` becomes the quoted schema name,
    ``{schema_literal}`` the name as a string literal (the functions that name NOTIFY channels)."""
    text_ = _template(name)
    quoted = '"' + schema.replace('"', '""') + '"'
    literal = "'" + schema.replace("'", "''") + "'"
    return text_.replace("{schema}", quoted).replace("{schema_literal}", literal)
