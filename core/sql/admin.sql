-- Operator actions (cancel, retry, purge), admission settings and the instance registry.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: cancel
-- Pending (and waiting) records are cancelled at once; processing ones are flagged, and their outcome becomes
-- cancelled. A failed record may be cancelled too: that is how an operator unblocks a key stopped by
-- block_on_failure. A flow step cancelled here settles its run in the same statement.
-- The status before (a failed flow step settled its run when it failed: it must not again), the rows locked
-- in id order; then the update by id list (no join a plan made on an empty table could turn into a walk).
WITH before AS (
    SELECT o.id, o.status FROM {records} o
     WHERE o.id = ANY(%(ids)s::bigint[]) AND o.status IN ('pending', 'processing', 'failed', 'waiting')
     ORDER BY o.id
       FOR UPDATE
),
cancelled AS (
UPDATE {records} t
   SET status = CASE WHEN status = 'processing' THEN status ELSE 'cancelled' END,
       finished_at = CASE WHEN status = 'processing' THEN finished_at ELSE now() END,
       dedupe_held = CASE WHEN status = 'processing' THEN dedupe_held ELSE false END,
       waiting_on = CASE WHEN status = 'waiting' THEN 0 ELSE waiting_on END,
       cancel_requested = true,
       updated_at = now()
 WHERE t.id = ANY(ARRAY(SELECT id FROM before))
   AND t.status IN ('pending', 'processing', 'failed', 'waiting')
RETURNING t.id, t.status, t.ordering_key, t.flow_run_id
),
settled AS (
    SELECT {flow_settle_function}(NULL, array_agg(c.id ORDER BY c.id)) AS n
      FROM cancelled c
     WHERE c.flow_run_id IS NOT NULL AND c.status = 'cancelled'
       AND c.id IN (SELECT b.id FROM before b WHERE b.status IN ('pending', 'waiting'))
    HAVING count(*) > 0
)
SELECT id, status, ordering_key FROM cancelled WHERE (SELECT count(*) FROM settled) >= 0;

-- name: retry_failed
-- Back to pending, announced to the claimers (core/floors.py).
WITH retried AS (
UPDATE {records}
   SET status = 'pending', run_at = now(), finished_at = NULL, attempts = 0, cancel_requested = false,
       updated_at = now()
 -- An id list, not IN (subquery): a semi-join may rescan the locking subquery, each rescan skipping the
 -- rows already updated, and so take more than the batch.
 WHERE id = ANY(ARRAY(
    SELECT id FROM {records}
     WHERE status = 'failed'
       AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
       AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
       AND (%(pattern)s::text IS NULL OR last_error ~ %(pattern)s::text)
     ORDER BY id
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED))
   AND status = 'failed'
RETURNING id, queue, priority, run_at
),
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT DISTINCT ON (queue) queue, - priority::bigint, run_at, id FROM retried
     ORDER BY queue, - priority::bigint, run_at, id
)
SELECT id FROM retried;

-- name: purge
-- One bounded, ordered batch of finished rows older than the cutoff. A flow step's record stays while a record
-- of its run is unfinished (a child's parents and the run's status read it).
DELETE FROM {records}
 WHERE id = ANY(ARRAY(  -- an id list: see retry_failed
    SELECT r.id FROM {records} r
     WHERE r.status IN ('completed', 'failed', 'cancelled')
       AND r.finished_at < now() - %(older_than)s * interval '1 second'
       -- (a subquery per row, by the run's list of records and each by primary key: an anti-join could be
       -- planned as a scan of the table)
       AND (r.flow_run_id IS NULL OR (SELECT 1 FROM {flow_records} f
                                       CROSS JOIN LATERAL (SELECT x.status FROM {records} x
                                                            WHERE x.id = f.record_id LIMIT 1) x
                                       WHERE f.flow_run_id = r.flow_run_id
                                         AND x.status IN ('waiting', 'pending', 'processing')
                                       LIMIT 1) IS NULL)
     ORDER BY r.finished_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED))
-- (no status test here: the rows are locked finished by the subquery, and a test the finished index implies
-- let a plan made on an empty table walk that index for the ids)
RETURNING id;

-- name: set_key_concurrency
INSERT INTO {key_limits} (pattern, like_pattern, is_exact, max_concurrency, block_on_failure, updated_at)
VALUES (%(pattern)s, %(like_pattern)s, %(is_exact)s, %(n)s, %(block_on_failure)s, now())
ON CONFLICT (pattern) DO UPDATE
   SET like_pattern = EXCLUDED.like_pattern, is_exact = EXCLUDED.is_exact,
       max_concurrency = EXCLUDED.max_concurrency, block_on_failure = EXCLUDED.block_on_failure,
       updated_at = now();

-- name: delete_key_concurrency
DELETE FROM {key_limits} WHERE pattern = %(pattern)s;

-- name: set_queue_limit
INSERT INTO {queue_limits} (queue, max_pending, updated_at) VALUES (%(queue)s, %(n)s, now())
ON CONFLICT (queue) DO UPDATE SET max_pending = EXCLUDED.max_pending, updated_at = now();

-- name: delete_queue_limit
DELETE FROM {queue_limits} WHERE queue = %(queue)s;

-- name: register_instance
INSERT INTO {instances} (instance_id, hostname, pid, version, started_at, last_heartbeat_at, status, metadata)
VALUES (%(instance_id)s, %(hostname)s, %(pid)s, %(version)s, now(), now(), 'running', %(metadata)s)
ON CONFLICT (instance_id) DO UPDATE
   SET last_heartbeat_at = now(), status = 'running', stopped_at = NULL, metadata = EXCLUDED.metadata;

-- name: heartbeat_instance
UPDATE {instances} SET last_heartbeat_at = now()
 WHERE instance_id = %(instance_id)s AND status IN ('running', 'stopping')
RETURNING status;

-- name: set_instance_status
UPDATE {instances}
   SET status = %(status)s,
       stopped_at = CASE WHEN %(status)s IN ('stopped', 'dead') THEN now() ELSE stopped_at END,
       last_heartbeat_at = now()
 WHERE instance_id = %(instance_id)s;
