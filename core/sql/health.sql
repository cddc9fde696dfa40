-- Observation: counts per queue and status, the instance list.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: queue_status_active
-- Two branches so that each status is read through its own partial index, never the finished rows.
SELECT queue, 'pending' AS status, count(*) AS n,
       extract(epoch FROM now() - min(created_at)) AS oldest_pending_age,
       count(*) FILTER (WHERE run_at <= now()) AS due
  FROM {records}
 WHERE status = 'pending'
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
 GROUP BY queue
UNION ALL
SELECT queue, 'processing', count(*), NULL, 0
  FROM {records}
 WHERE status = 'processing'
   AND lease_expires_at IS NOT NULL  -- read through the lease index (every processing row has a lease)
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
 GROUP BY queue;

-- name: queue_status_finished
SELECT queue, status, count AS n
  FROM {stats}
 WHERE %(queue)s::text IS NULL OR queue = %(queue)s::text;

-- name: list_instances
SELECT instance_id, hostname, pid, version, started_at, last_heartbeat_at, stopped_at, status, metadata,
       (SELECT count(*) FROM {records} r
         WHERE r.status = 'processing' AND r.lease_expires_at IS NOT NULL AND r.claimed_by = i.instance_id)
           AS processing
  FROM {instances} i
 WHERE %(include_stopped)s OR status IN ('running', 'stopping')
 ORDER BY started_at;
