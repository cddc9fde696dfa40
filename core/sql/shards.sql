-- Shards (core/sharding.py, core/sharded.py, core/shardmove.py; docs/scale-out.md).
-- Blocks: "-- name: <name>".

-- name: shard_identity
SELECT shard_no, accepting FROM {shard_identity};

-- name: shard_identity_claim
-- Written once, when a sharded processor first migrates this database; a later one reads what is here
-- (nothing returned: another set-up numbered it first).
INSERT INTO {shard_identity} (shard_no) VALUES (%(shard_no)s)
ON CONFLICT (singleton) DO NOTHING
RETURNING shard_no;

-- name: shard_setup_lock
-- One set-up at a time (taken on the first configured shard, for the set-up's transaction).
SELECT count(pg_advisory_xact_lock(7120, 0));

-- name: shard_key_limits
SELECT pattern, max_concurrency, block_on_failure FROM {key_limits} ORDER BY pattern;

-- name: shard_queue_limits
SELECT queue, max_pending FROM {queue_limits} ORDER BY queue;

-- name: shard_set_ids
SELECT {shard_ids_function}(%(shard_no)s, %(stride)s, %(above)s);

-- name: shard_max_id
SELECT coalesce(max(id), 0) FROM {records};

-- name: shard_raise_ids
SELECT {raise_ids_function}(%(above)s);

-- name: shard_map_read
SELECT partition, shard_no, version, moving FROM {shard_map} ORDER BY partition;

-- name: shard_guard_partitions
-- Inside an insert's transaction: the partitions the batch was routed by, locked against a move until the
-- insert commits (a move updates these rows first), read as they are now.
SELECT partition, shard_no, moving FROM {shard_map}
 WHERE partition = ANY(%(partitions)s::int[])
 ORDER BY partition
   FOR SHARE;

-- name: shard_guard_identity
-- Inside an insert's transaction: which shard this is and whether it takes new records (a retiring shard
-- does not), locked against a retirement until the insert commits.
SELECT shard_no, accepting FROM {shard_identity} FOR SHARE;

-- name: shard_map_put
-- One partition's entry at a version; an older version never overwrites a newer one.
INSERT INTO {shard_map} AS m (partition, shard_no, version, moving)
VALUES (%(partition)s, %(shard_no)s, %(version)s, %(moving)s)
ON CONFLICT (partition) DO UPDATE
   SET shard_no = EXCLUDED.shard_no, version = EXCLUDED.version, moving = EXCLUDED.moving
 WHERE m.version <= EXCLUDED.version;

-- name: shard_set_accepting
UPDATE {shard_identity} SET accepting = %(accepting)s;

-- name: move_routing_keys
-- The routing keys of this shard's records, once each (the mover hashes them to partitions). A flow run's
-- records never move (a run lives on one shard, whatever its steps' keys): none of the move statements
-- reads them.
SELECT DISTINCT coalesce(ordering_key, dedupe_key) FROM {records}
 WHERE coalesce(ordering_key, dedupe_key) IS NOT NULL AND flow_run_id IS NULL;

-- name: move_lock_keys
-- The records of these keys (pending and finished: a key's history moves with it), locked, never waiting
-- (a wait could deadlock with a claim's unblock): a row someone else holds is skipped, and its key then
-- counts as busy (move_pending_counts). Rows as JSON, for the other shard's insert, each with its payload on it
-- (a batch's record has its payload apart, migration 0018; the moved row carries it, and the source's payload
-- row goes with the source's record).
SELECT id, coalesce(ordering_key, dedupe_key),
       (to_jsonb(t) || jsonb_build_object('payload', coalesce(t.payload, (
           SELECT a.payload FROM {payloads} a WHERE a.id = t.id))))::text
  FROM {records} t
 WHERE status <> 'processing' AND flow_run_id IS NULL
   AND (ordering_key = ANY(%(keys)s::text[]) OR (ordering_key IS NULL AND dedupe_key = ANY(%(keys)s::text[])))
 ORDER BY id
   FOR UPDATE SKIP LOCKED;

-- name: move_pending_counts
-- How many records each key has now, running ones aside: a key whose count differs from the rows locked
-- has a row someone holds (a claim under way), and waits for a later round.
SELECT coalesce(ordering_key, dedupe_key), count(*) FROM {records}
 WHERE status <> 'processing' AND flow_run_id IS NULL
   AND (ordering_key = ANY(%(keys)s::text[]) OR (ordering_key IS NULL AND dedupe_key = ANY(%(keys)s::text[])))
 GROUP BY 1;

-- name: move_busy_keys
-- Which of these keys has a record running here (a key moves only while none of its records runs).
SELECT DISTINCT coalesce(ordering_key, dedupe_key) FROM {records}
 WHERE status = 'processing' AND flow_run_id IS NULL
   AND (ordering_key = ANY(%(keys)s::text[]) OR (ordering_key IS NULL AND dedupe_key = ANY(%(keys)s::text[])));

-- name: move_lock_keyless
-- As move_lock_keys, its payload on each row.
SELECT id, NULL::text,
       (to_jsonb(t) || jsonb_build_object('payload', coalesce(t.payload, (
           SELECT a.payload FROM {payloads} a WHERE a.id = t.id))))::text
  FROM {records} t
 WHERE status = 'pending' AND ordering_key IS NULL AND dedupe_key IS NULL AND flow_run_id IS NULL
 ORDER BY id
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED;

-- name: move_delete
DELETE FROM {records} WHERE id = ANY(%(ids)s::bigint[]) AND status <> 'processing';

-- name: move_insert
-- The rows as the source shard had them (same schema: the row type is the table's). A dedupe key this shard
-- already holds (a record of another routing key, which the same dedupe key may have) stays with that
-- record: the moved one comes without its hold.
INSERT INTO {records}
SELECT (jsonb_populate_record(NULL::{records}, r || CASE
        WHEN (r->>'dedupe_held')::boolean AND EXISTS (
             SELECT 1 FROM {records} h
              WHERE h.dedupe_held AND h.queue = r->>'queue' AND h.dedupe_key = r->>'dedupe_key')
        THEN jsonb_build_object('dedupe_held', false) ELSE jsonb_build_object() END)).*
  FROM jsonb_array_elements(%(rows)s::jsonb) AS r;

-- name: move_stats_slot
-- The finished counts of a move's transaction in a queue_stats slot of its own (see dp_track_finished).
SELECT set_config('dp.stats_slot', %(slot)s, true);

-- name: move_announce
-- Moved records are claimable below this shard's claimers' floors (core/floors.py): announced.
INSERT INTO {floor_events} (queue, np, run_at, record_id)
SELECT DISTINCT ON (queue) queue, - priority::bigint, run_at, id FROM {records}
 WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending' AND NOT key_blocked
 ORDER BY queue, - priority::bigint, run_at, id;

-- name: move_log
INSERT INTO {shard_moves} (move_id, records) VALUES (%(move_id)s, %(records)s);

-- name: move_logged
SELECT count(*) FROM {shard_moves} WHERE move_id = %(move_id)s;

-- name: move_prepared
-- Moves' prepared transactions in this database (a mover that died between its two commits leaves them).
SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE %(prefix)s ORDER BY gid;

-- name: move_lock
-- One mover at a time per deployment: a session lock on every shard it touches.
SELECT pg_try_advisory_lock(%(key)s::bigint);

-- name: move_unlock
SELECT pg_advisory_unlock(%(key)s::bigint);

-- name: move_unfinished
-- How many records of these keys this shard still has (a flow run's stay: not counted).
SELECT count(*) FROM {records}
 WHERE flow_run_id IS NULL
   AND (ordering_key = ANY(%(keys)s::text[]) OR (ordering_key IS NULL AND dedupe_key = ANY(%(keys)s::text[])));

-- name: move_unfinished_keyless
-- What keeps a retiring shard in service: its keyless records not moved yet, and its flow runs' unfinished
-- records (runs never move: a shard retires once they finished).
SELECT count(*) FROM {records}
 WHERE (status IN ('pending', 'processing') AND ordering_key IS NULL AND dedupe_key IS NULL
        AND flow_run_id IS NULL)
    OR (flow_run_id IS NOT NULL AND status IN ('pending', 'processing', 'waiting'));

-- name: shard_queue_limit_value
SELECT max_pending FROM {queue_limits} WHERE queue = %(queue)s;

-- name: shard_queue_limit_turn
-- On the queue's home shard (the lowest-numbered): producers of a limited queue take turns (a lock class of
-- its own, apart from the row each shard's insert locks), and read the limit as it is now.
SELECT count(pg_advisory_xact_lock(7119, hashtext(%(queue)s))),
       (SELECT max_pending FROM {queue_limits} WHERE queue = %(queue)s);

-- name: shard_peek
-- The claim order's first due, claimable-looking positions of these queues (read, not locked; key rules
-- not applied): how many of a sharded claim each shard should give.
SELECT - priority::bigint, run_at, id FROM {records}
 WHERE status = 'pending' AND queue = ANY(%(queues)s::text[]) AND NOT key_blocked AND run_at <= now()
 ORDER BY - priority::bigint, run_at, id
 LIMIT %(n)s;

-- name: shard_no_statement_timeout
-- For one transaction of the mover's: raising a shard's ids takes as long as the gap it closes.
SELECT set_config('statement_timeout', '0', true);
