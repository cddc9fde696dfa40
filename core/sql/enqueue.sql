-- Inserting records: the enqueue functions (migration 0008), COPY for large batches, queue depth, NOTIFY.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: add_records
-- A batch in one round trip (migration 0008, core/sql/ddl/0008_enqueue.sql; its trace context since 0011): the
-- producers' locks, the key heads, the insert, the queue's limit, the announcement to the claimers and the
-- NOTIFY. A full queue or a key another shard owns is a status, not an error, so an application's transaction
-- stays usable.
SELECT status, ids, deduplicated, owner, queue_limit, depth, adding
  FROM {add_records_function}(%(queue)s, %(payloads)s::jsonb[], %(priority)s, %(run_at)s::timestamptz,
                              %(max_attempts)s, %(keys)s::text[], %(dedupes)s::text[], %(dedupe_while)s,
                              %(notify)s, %(expect_shard)s::int, %(key_gap)s, %(own)s, p_trace => %(trace)s::text);

-- name: add_one
-- One record without keys (migration 0015, core/sql/ddl/0015_announce_at_commit.sql): the queue's limit, the
-- insert, the announcement (at the commit, for an application's transaction that turns out long) and the
-- NOTIFY. status 'ok', 'full' (nothing written) or 'general' (a shard: add it through add_records).
SELECT status, id, queue_limit, depth
  FROM {add_one_function}(%(queue)s, %(payload)s::jsonb, %(priority)s, %(run_at)s::timestamptz,
                          %(max_attempts)s, %(notify)s, %(own)s, %(trace)s::text);

-- name: enqueue_prepare
-- Before a COPY: the shard's guard, the producers' locks, which keyed records go in blocked, the limit.
SELECT status, owner, blocked, queue_limit
  FROM {enqueue_prepare_function}(%(queue)s, %(priority)s, %(run_at)s::timestamptz, %(keys)s::text[],
                                  %(dedupes)s::text[], %(expect_shard)s::int, %(key_gap)s, %(own)s);

-- name: enqueue_key_checks
-- After a COPY in an application's transaction: its keys with records inserted blocked are checked at its commit.
SELECT {key_checks_function}(%(queue)s, %(keys)s::text[], %(blocked)s::bool[]);

-- name: enqueue_finish
-- After a COPY: the limit (with undo, the batch deleted again when over it), the announcement, the NOTIFY.
SELECT status, depth
  FROM {enqueue_finish_function}(%(queue)s, %(priority)s, %(run_at)s::timestamptz, %(ids)s::bigint[],
                                 %(limit)s::int, %(notify)s, %(undo)s);

-- name: records_sequence
SELECT pg_get_serial_sequence(%(table)s, 'id');

-- name: allocate_ids
-- Ids for a COPY batch, in order (the sequence name is resolved once per processor, by records_sequence), as one
-- array: one row to send and decode instead of one per id.
SELECT ARRAY(SELECT nextval(%(seq)s::regclass) FROM generate_series(1, %(n)s) g ORDER BY g);

-- name: copy_payloads
-- A batch's payloads, apart from its records (migration 0018): the records' rows carry none.
COPY {payloads} (id, payload) FROM STDIN;

-- name: copy_records
-- trace_context: the batch's (core/tracing.py), \N without one.
COPY {records} (id, queue, priority, max_attempts, trace_context, ordering_key, key_blocked) FROM STDIN;

-- name: copy_records_at
COPY {records} (id, queue, priority, max_attempts, run_at, trace_context, ordering_key, key_blocked) FROM STDIN;

-- name: pending_depth
SELECT count(*) FROM (
    SELECT 1 FROM {records} WHERE queue = %(queue)s AND status = 'pending' LIMIT %(cap)s
) d;

-- name: notify
SELECT pg_notify(%(channel)s, %(queue)s);
