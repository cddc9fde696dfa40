-- Recovery of orphaned records and the registry's dead instances; the sweep of blocked keys.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: mark_dead_instances
-- Instances whose heartbeat is older than the threshold are dead; several cleaners may race, all harmless.
UPDATE {instances}
   SET status = 'dead', stopped_at = now()
 WHERE status IN ('running', 'stopping')
   AND last_heartbeat_at < now() - %(dead_after)s * interval '1 second'
RETURNING instance_id;

-- name: prune_instances
-- Registry rows of instances that ended long ago (every restart makes a new identity); none holds a record.
DELETE FROM {instances} i
 WHERE status IN ('stopped', 'dead')
   AND coalesce(stopped_at, last_heartbeat_at) < now() - %(retention)s * interval '1 second'
   AND NOT EXISTS (SELECT 1 FROM {records} r
                    WHERE r.status = 'processing' AND r.lease_expires_at IS NOT NULL
                      AND r.claimed_by = i.instance_id);

-- name: recover_orphans
-- One bounded batch: processing rows whose lease expired or whose instance is dead. SKIP LOCKED so that
-- every instance can run it at once; the status guard is re-checked on the locked row version.
-- A dead instance's record claimed less than dead_after ago is not recovered yet: the claim shows the
-- instance alive later than its last heartbeat (after a failover its claims can come back before its
-- heartbeats do), and a live instance revives with its next beat. The instance is dead once it showed no
-- sign of life, heartbeat or claim, for dead_after.
WITH orphan AS (
    -- Both conditions read the small partial index of in-flight rows, never the finished ones.
    SELECT id
      FROM {records}
     WHERE status = 'processing'
       AND lease_expires_at IS NOT NULL  -- every processing row has one; it names the lease index
       AND (lease_expires_at < now()
            OR (claimed_at < now() - %(dead_after)s * interval '1 second'
                AND claimed_by IN (SELECT instance_id FROM {instances} WHERE status = 'dead')))
     ORDER BY lease_expires_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
),
recovered AS (
UPDATE {records} t
   SET status = CASE
           WHEN t.cancel_requested THEN 'cancelled'
           WHEN t.attempts < t.max_attempts THEN 'pending'
           ELSE 'failed' END,
       finished_at = CASE
           WHEN t.attempts < t.max_attempts AND NOT t.cancel_requested THEN NULL
           ELSE now() END,
       run_at = now(),
       dedupe_held = t.dedupe_held AND t.attempts < t.max_attempts AND NOT t.cancel_requested,
       last_error = CASE
           WHEN t.lease_expires_at < now()
           THEN format('lease of %%s expired at %%s (attempt %%s of %%s)',
                       t.claimed_by, t.lease_expires_at, t.attempts, t.max_attempts)
           ELSE format('instance %%s was declared dead (attempt %%s of %%s)',
                       t.claimed_by, t.attempts, t.max_attempts) END,
       lease_token = NULL,
       lease_expires_at = NULL,
       updated_at = now()
  -- An id list, not a join with the table (a join planned on an empty table walks the primary key).
 WHERE t.id = ANY(ARRAY(SELECT id FROM orphan))
   AND t.status = 'processing'
RETURNING t.id, t.status, t.ordering_key, t.queue, t.priority, t.run_at, t.flow_run_id
),
-- A flow step recovered to failed or cancelled settles its run here (core/sql/ddl/0010_flows.sql).
settled AS (
    SELECT {flow_settle_function}(NULL, array_agg(f.id ORDER BY f.id)) AS n
      FROM recovered f
     WHERE f.flow_run_id IS NOT NULL AND f.status <> 'pending'
    HAVING count(*) > 0
),
-- Back in service: announced to every claimer (core/floors.py), the first record per queue in claim order.
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT DISTINCT ON (queue) queue, - priority::bigint, run_at, id FROM recovered WHERE status = 'pending'
     ORDER BY queue, - priority::bigint, run_at, id
)
SELECT id, status, ordering_key FROM recovered WHERE (SELECT count(*) FROM settled) >= 0;

-- name: unblock_sweep
-- Safety net for a key left blocked (a claimer gone between a claim and its unblock, a record recovered to
-- failed): every key's earliest pending record claimable. A bounded slice of keys per call, after the key
-- %(after)s (keys are never empty: '' starts from the first), found by a loose index scan of the key index,
-- so a sweep costs the same at 10 million pending records. SKIP LOCKED: a head someone holds is theirs to
-- move (the sweep never waits, so it cannot deadlock with a claim's unblock). Returns the slice's last key
-- (NULL when the slice reached the end) and how many heads it unblocked.
WITH RECURSIVE keys AS (
    (SELECT ordering_key AS k FROM {records}
      WHERE ordering_key > %(after)s AND status = 'pending' AND ordering_key IS NOT NULL
      ORDER BY ordering_key LIMIT 1)
    UNION ALL
    SELECT (SELECT r.ordering_key FROM {records} r
             WHERE r.ordering_key > keys.k AND r.status = 'pending' AND r.ordering_key IS NOT NULL
             ORDER BY r.ordering_key LIMIT 1)
      FROM keys
     WHERE keys.k IS NOT NULL
),
slice AS (
    SELECT k FROM keys WHERE k IS NOT NULL LIMIT %(keys)s
),
stuck AS (
    -- Heads by primary key from an id list: never a join with the table (see claim's completion).
    SELECT r.id
      FROM {records} r
     WHERE r.id = ANY(ARRAY(SELECT h.id
                      FROM slice
                     CROSS JOIN LATERAL (
                        SELECT n.id, n.key_blocked FROM {records} n
                         WHERE n.ordering_key = slice.k AND n.status = 'pending'
                         ORDER BY n.id LIMIT 1) h
                     WHERE h.key_blocked))
       AND r.key_blocked
       AND r.status = 'pending'
       FOR UPDATE SKIP LOCKED
),
unblocked AS (
    UPDATE {records} t SET key_blocked = false WHERE t.id = ANY(ARRAY(SELECT id FROM stuck))
    RETURNING t.id, t.queue, t.priority, t.run_at
),
-- Claimable now, and old: below the claimers' floors. Announced (core/floors.py).
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT DISTINCT ON (queue) queue, - priority::bigint, run_at, id FROM unblocked
     ORDER BY queue, - priority::bigint, run_at, id
)
SELECT CASE WHEN (SELECT count(*) FROM slice) < %(keys)s THEN NULL ELSE (SELECT max(k) FROM slice) END,
       (SELECT count(*) FROM unblocked);

-- name: prune_floor_events
-- Floor events are read for a few seconds after they are written; a bounded batch of old ones goes, the
-- oldest first, found by primary key from where the last prune stopped (so the dead entries an old snapshot
-- keeps are not walked again).
WITH gone AS (
    DELETE FROM {floor_events}
     WHERE id = ANY(ARRAY(SELECT id FROM {floor_events}
                           WHERE id > %(after)s AND created_at < now() - %(older_than)s * interval '1 second'
                           ORDER BY id LIMIT %(batch)s))
    RETURNING id
)
SELECT max(id), count(*) FROM gone;
