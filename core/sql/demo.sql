-- `dproc demo` (its own ledger table).
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: demo_setup
CREATE TABLE IF NOT EXISTS {demo_ledger} (
    record_id bigint NOT NULL,
    instance text NOT NULL,
    done_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- name: demo_reset
WITH gone AS (DELETE FROM {records} WHERE queue = 'demo' RETURNING 1)
DELETE FROM {demo_ledger};

-- name: demo_record
-- Written in the same transaction as the record's completion: executions that did not complete leave no row.
INSERT INTO {demo_ledger} (record_id, instance) VALUES (%(id)s, %(instance)s);

-- name: demo_progress
SELECT instance, count(*) FROM {demo_ledger} GROUP BY instance ORDER BY instance;

-- name: demo_proof
SELECT (SELECT count(*) FROM {demo_ledger}) AS executions,
       (SELECT count(DISTINCT record_id) FROM {demo_ledger}) AS distinct_records,
       (SELECT count(*) FROM {records} WHERE queue = 'demo' AND status = 'completed') AS completed,
       (SELECT count(*) FROM {records} WHERE queue = 'demo' AND status <> 'completed') AS not_completed,
       (SELECT extract(epoch FROM max(done_at) - min(done_at)) FROM {demo_ledger}) AS span_seconds;
