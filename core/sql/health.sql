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
 GROUP BY queue
UNION ALL
-- Flow steps waiting for their parents, through their own partial index (none: nothing read).
SELECT queue, 'waiting', count(*), NULL, 0
  FROM {records}
 WHERE status = 'waiting'
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
 GROUP BY queue;

-- name: queue_status_finished
-- The finished counts, summed over their slots (see schema.py: queue_stats).
SELECT queue, status, sum(count)::bigint AS n
  FROM {stats}
 WHERE %(queue)s::text IS NULL OR queue = %(queue)s::text
 GROUP BY queue, status;

-- name: list_instances
SELECT instance_id, hostname, pid, version, started_at, last_heartbeat_at, stopped_at, status, metadata,
       (SELECT count(*) FROM {records} r
         WHERE r.status = 'processing' AND r.lease_expires_at IS NOT NULL AND r.claimed_by = i.instance_id)
           AS processing
  FROM {instances} i
 WHERE %(include_stopped)s OR status IN ('running', 'stopping')
 ORDER BY started_at;

-- name: horizon_holders
-- What holds back this database's MVCC horizon, oldest first: backends of this database with a snapshot or
-- a transaction id (and walsenders, whose hot_standby_feedback holds every database back), prepared
-- transactions, replication slots with an xmin (a logical slot's catalog_xmin holds back the catalogs
-- only, not the queue). Ages in seconds where the server knows them: a transaction's start, a prepared
-- transaction's time; a walsender's or a slot's is measured by the caller from when it first saw that xmin.
-- Catalog views only: the same cost at any table size.
SELECT kind, pid, application_name, name, age_seconds, xid_age, xmin FROM (
    SELECT CASE WHEN a.backend_type = 'walsender' THEN 'walsender' ELSE 'backend' END AS kind, a.pid,
           a.application_name, a.usename::text AS name,
           CASE WHEN a.backend_type = 'walsender' THEN NULL
                ELSE extract(epoch FROM now() - coalesce(a.xact_start, a.query_start)) END AS age_seconds,
           greatest(age(a.backend_xmin), age(a.backend_xid)) AS xid_age,
           coalesce(a.backend_xmin, a.backend_xid)::text AS xmin
      FROM pg_stat_activity a
     WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL) AND a.pid <> pg_backend_pid()
       AND (a.datname = current_database() OR a.backend_type = 'walsender')
    UNION ALL
    SELECT 'prepared', NULL, NULL, p.gid, extract(epoch FROM now() - p.prepared), age(p.transaction),
           p.transaction::text
      FROM pg_prepared_xacts p
     WHERE p.database = current_database()
    UNION ALL
    SELECT 'slot', s.active_pid, NULL, s.slot_name, NULL, age(s.xmin), s.xmin::text
      FROM pg_replication_slots s
     WHERE s.xmin IS NOT NULL
) h
 ORDER BY xid_age DESC, age_seconds DESC NULLS LAST
 LIMIT 5;

-- name: table_tuples
-- Live and dead row versions of the queue table, from the statistics collector (no scan).
SELECT n_live_tup, n_dead_tup, last_autovacuum, last_vacuum FROM pg_stat_user_tables
 WHERE relid = to_regclass(%(table)s);
