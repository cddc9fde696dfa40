-- Inserting records: key and dedupe locks, key heads, INSERT and COPY, queue limits, NOTIFY.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: key_heads
-- Under the producers' key locks: which keys already have a pending record. The earliest one is locked
-- FOR SHARE so that a claim of it in progress finishes first (then the next pending one is found instead).
-- And each key's latest pending record: a new record far enough behind it may be inserted claimable when
-- claims reach it after that one (same queue, not a lower priority, not due later) and it is claimable
-- itself; with the highest id so far, a lower bound of the new ids, to tell how far (see KEY_GAP).
SELECT u.k, h.id IS NOT NULL, t.id, t.follows, (SELECT max(m.id) FROM {records} m)
  FROM unnest(%(keys)s::text[]) AS u(k)
  LEFT JOIN LATERAL (
        SELECT id FROM {records}
         WHERE ordering_key = u.k AND status = 'pending'
         ORDER BY id
         LIMIT 1
           FOR SHARE
  ) h ON true
  LEFT JOIN LATERAL (
        SELECT l.id, NOT l.key_blocked AND l.queue = %(queue)s AND l.priority >= %(priority)s
                     AND l.run_at <= coalesce(%(run_at)s::timestamptz, now()) AS follows
          FROM {records} l
         WHERE l.ordering_key = u.k AND l.status = 'pending'
         ORDER BY l.ordering_key DESC, l.status DESC, l.id DESC
         LIMIT 1
  ) t ON true;

-- name: lock_queue_limit
SELECT max_pending FROM {queue_limits} WHERE queue = %(queue)s FOR UPDATE;

-- name: lock_ordering_keys
-- Producers of one key serialise so that id order equals commit order within the key.
SELECT count(pg_advisory_xact_lock(7117, hashtext(k)))
  FROM (SELECT DISTINCT k FROM unnest(%(keys)s::text[]) AS u(k) ORDER BY k) s;

-- name: lock_dedupe_keys
-- Producers of one dedupe key serialise in sorted order: unique-index waits between batches that list the
-- same keys in different orders would otherwise deadlock.
SELECT count(pg_advisory_xact_lock(7118, hashtext(%(queue)s || chr(31) || k)))
  FROM (SELECT DISTINCT k FROM unnest(%(keys)s::text[]) AS u(k) WHERE k IS NOT NULL ORDER BY k) s;

-- name: insert_records
-- One statement for the whole batch; ids follow input order. Duplicates of a held dedupe key are skipped.
-- With announce, the first record is announced to the claimers (core/floors.py: must_announce).
WITH ins AS (
INSERT INTO {records} (queue, payload, priority, run_at, max_attempts, ordering_key, dedupe_key,
                       dedupe_while, dedupe_held, key_blocked)
SELECT %(queue)s, u.p, %(priority)s, coalesce(%(run_at)s::timestamptz, now()), %(max_attempts)s, u.k, u.d,
       CASE WHEN u.d IS NULL THEN NULL ELSE %(dedupe_while)s END, u.d IS NOT NULL, u.b
  FROM unnest(%(payloads)s::jsonb[], %(keys)s::text[], %(dedupes)s::text[], %(blocked)s::bool[])
       WITH ORDINALITY AS u(p, k, d, b, ord)
 ORDER BY u.ord
    ON CONFLICT DO NOTHING
RETURNING id, dedupe_key, run_at
),
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT %(queue)s, - %(priority)s::bigint, run_at, id FROM ins WHERE %(announce)s ORDER BY id LIMIT 1
)
SELECT id, dedupe_key FROM ins;

-- name: announce_floor
-- A batch whose first record claims may have passed (a COPY batch with a priority or an earlier run_at, a
-- long transaction): announced to the claimers in the inserting transaction, before its commit.
INSERT INTO {floor_events} (queue, np, run_at, record_id)
SELECT %(queue)s, - %(priority)s::bigint, coalesce(%(run_at)s::timestamptz, now()), %(id)s;

-- name: existing_dedupe
SELECT dedupe_key, id FROM {records}
 WHERE queue = %(queue)s AND dedupe_key = ANY(%(dedupes)s::text[]) AND dedupe_held;

-- name: records_sequence
SELECT pg_get_serial_sequence(%(table)s, 'id');

-- name: allocate_ids
-- Ids for a COPY batch, in order (the sequence name is resolved once per processor, by records_sequence).
SELECT nextval(%(seq)s::regclass) FROM generate_series(1, %(n)s) g ORDER BY g;

-- name: copy_records
COPY {records} (id, queue, priority, max_attempts, ordering_key, key_blocked, payload) FROM STDIN;

-- name: copy_records_at
COPY {records} (id, queue, priority, max_attempts, run_at, ordering_key, key_blocked, payload) FROM STDIN;

-- name: pending_depth
SELECT count(*) FROM (
    SELECT 1 FROM {records} WHERE queue = %(queue)s AND status = 'pending' LIMIT %(cap)s
) d;

-- name: notify
SELECT pg_notify(%(channel)s, %(queue)s);
