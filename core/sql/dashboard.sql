-- The web dashboard's reads (core/web/pgsource.py), and its purge of chosen finished records.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".
-- Every page must answer within 100 ms beside 10 million finished records: each statement reads through an
-- index, counts are capped, and nothing counts finished rows (their counts are queue_stats').

-- name: dashboard_begin
-- The first statement of every dashboard transaction: a time limit, custom plans (an empty filter then
-- folds away and a partial index still matches), no JIT (compiling costs more than these statements), and
-- for a page read-only, so that a GET cannot change anything whatever it runs.
SELECT set_config('statement_timeout', %(ms)s, true),
       set_config('plan_cache_mode', 'force_custom_plan', true),
       set_config('jit', 'off', true),
       CASE WHEN %(read_only)s THEN set_config('transaction_read_only', 'on', true) END;

-- name: dashboard_queue_names
-- Every queue with records or settings. The queues with pending records by a loose scan of the pending
-- index (one probe per queue), those with processing ones through the lease index (a small set).
WITH RECURSIVE pending_queues AS (
    (SELECT queue FROM {records} WHERE status = 'pending' ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT r.queue FROM {records} r WHERE r.status = 'pending' AND r.queue > p.queue
             ORDER BY r.queue LIMIT 1)
      FROM pending_queues p WHERE p.queue IS NOT NULL
)
SELECT queue FROM (
    SELECT queue FROM pending_queues WHERE queue IS NOT NULL
    UNION
    SELECT DISTINCT queue FROM {records} WHERE status = 'processing' AND lease_expires_at IS NOT NULL
    UNION
    SELECT queue FROM {stats} WHERE count <> 0
    UNION
    SELECT queue FROM {queue_limits}
) q
 ORDER BY queue
 LIMIT %(limit)s;

-- name: dashboard_queue_counts
-- Per queue: pending and processing counted up to a cap (the pending index, the lease index), the age of
-- the oldest due record at the head of each priority (a loose scan of the claim order, at most 20
-- priorities), and the finished counts of queue_stats.
SELECT q.queue,
       (SELECT count(*) FROM (SELECT 1 FROM {records} r
                               WHERE r.status = 'pending' AND r.queue = q.queue LIMIT %(cap)s) c) AS pending,
       (SELECT count(*) FROM (SELECT 1 FROM {records} r
                               WHERE r.status = 'processing' AND r.lease_expires_at IS NOT NULL
                                 AND r.queue = q.queue LIMIT %(cap)s) c) AS processing,
       (WITH RECURSIVE heads AS (
            (SELECT - r.priority::bigint AS np, r.run_at FROM {records} r
              WHERE r.status = 'pending' AND r.queue = q.queue AND NOT r.key_blocked
              ORDER BY - r.priority::bigint, r.run_at, r.id LIMIT 1)
            UNION ALL
            SELECT n.np, n.run_at FROM heads h CROSS JOIN LATERAL (
                SELECT - r.priority::bigint AS np, r.run_at FROM {records} r
                 WHERE r.status = 'pending' AND r.queue = q.queue AND NOT r.key_blocked
                   AND - r.priority::bigint > h.np
                 ORDER BY - r.priority::bigint, r.run_at, r.id LIMIT 1) n
        )
        SELECT extract(epoch FROM now() - min(run_at)) FROM (SELECT run_at FROM heads LIMIT 20) h
         WHERE run_at <= now()) AS oldest_due_age,
       (SELECT coalesce(sum(s.count), 0) FROM {stats} s
         WHERE s.queue = q.queue AND s.status = 'completed')::bigint AS completed,
       (SELECT coalesce(sum(s.count), 0) FROM {stats} s
         WHERE s.queue = q.queue AND s.status = 'failed')::bigint AS failed,
       (SELECT coalesce(sum(s.count), 0) FROM {stats} s
         WHERE s.queue = q.queue AND s.status = 'cancelled')::bigint AS cancelled,
       (SELECT l.max_pending FROM {queue_limits} l WHERE l.queue = q.queue) AS max_pending
  FROM unnest(%(queues)s::text[]) AS q(queue)
 ORDER BY q.queue;

-- name: dashboard_waiting_counts
-- Flow steps waiting for their parents, per queue, among the first %(cap)s of them (an index-only scan of the
-- waiting index, which includes the queue): exact below the cap, "at least" at it.
SELECT queue, count(*) FROM (SELECT queue FROM {records} WHERE status = 'waiting' LIMIT %(cap)s) w
 GROUP BY queue
 ORDER BY queue;

-- name: dashboard_estimate_pending
-- The planner's estimate of a queue's pending records, shown (as such) where the count passed its cap.
EXPLAIN (FORMAT JSON) SELECT 1 FROM {records} WHERE status = 'pending' AND queue = %(queue)s::text;

-- name: dashboard_finished_recent
-- The latest finished records since a moment, at most a cap, bucketed: a walk back along the finished_at
-- index, so a busy hour costs the cap and no more (the chart then covers the hour's latest part only,
-- each bucket it shows exact). Bucket 0 is the latest.
SELECT floor(extract(epoch FROM %(now)s::timestamptz - finished_at) / %(bucket)s)::int AS bucket,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       min(finished_at) AS earliest
  FROM (SELECT finished_at, status FROM {records}
         WHERE status IN ('completed', 'failed', 'cancelled')
           AND finished_at >= %(since)s::timestamptz AND finished_at <= %(now)s::timestamptz
         ORDER BY finished_at DESC
         LIMIT %(cap)s) f
 GROUP BY 1
 ORDER BY 1;

-- name: dashboard_id_range
SELECT min(id), max(id) FROM {records};

-- name: dashboard_records
-- One window of ids [floor, after), newest first, filtered (an empty filter is NULL and folds away). The
-- window bounds the rows a rare filter reads; the caller walks down window by window within a time budget.
-- The ordering index serves a key with active states, the lease index processing records, a flow run's list
-- of records (flow_records, read once) its records and the waiting index waiting ones (both by id: the caller
-- reads them in one window).
SELECT id, queue, status, priority, attempts, max_attempts, ordering_key, dedupe_key, left(last_error, 300),
       run_at, created_at, updated_at, finished_at, claimed_by, flow_run_id, step
  FROM {records}
 WHERE id < %(after)s AND id >= %(floor)s
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
   AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
   AND (%(processing_only)s IS NOT TRUE OR (status = 'processing' AND lease_expires_at IS NOT NULL))
   AND (%(key)s::text IS NULL OR ordering_key = %(key)s::text)
   AND (%(dedupe)s::text IS NULL OR dedupe_key = %(dedupe)s::text)
   AND (%(error)s::text IS NULL OR strpos(lower(last_error), lower(%(error)s::text)) > 0)
   AND (%(run)s::bigint IS NULL OR id = ANY(ARRAY(SELECT f.record_id FROM {flow_records} f
                                                   WHERE f.flow_run_id = %(run)s::bigint
                                                     AND f.record_id < %(after)s AND f.record_id >= %(floor)s)))
 ORDER BY id DESC
 LIMIT %(limit)s;

-- name: dashboard_finished_end
-- Where a window of finished records below a moment ends: the finished_at of the %(window)s-th one, read
-- from the finished_at index alone (NULL: fewer are left). The window then holds every record finished
-- from that moment on, ties included, so the next one starts strictly before it (strict: nothing finished
-- at the position's moment is left to read, so the window ends below it and the walk always moves on).
SELECT finished_at FROM {records}
 WHERE status IN ('completed', 'failed', 'cancelled')
   AND (%(at)s::timestamptz IS NULL OR finished_at < %(at)s::timestamptz
        OR (NOT %(strict)s AND finished_at = %(at)s::timestamptz))
 ORDER BY finished_at DESC
 OFFSET %(window)s - 1
 LIMIT 1;

-- name: dashboard_finished_records
-- Finished records most recently finished first, below the position (at, after) in (finished_at, id)
-- order, within the window down to %(end)s: the filter on finished states walks the finished_at index and
-- never the pending or processing rows (a backlog of a million pending records above the failures costs
-- nothing here).
SELECT id, queue, status, priority, attempts, max_attempts, ordering_key, dedupe_key, left(last_error, 300),
       run_at, created_at, updated_at, finished_at, claimed_by, flow_run_id, step
  FROM {records}
 WHERE status IN ('completed', 'failed', 'cancelled')
   AND (%(end)s::timestamptz IS NULL OR finished_at >= %(end)s::timestamptz)
   AND (%(at)s::timestamptz IS NULL OR finished_at < %(at)s::timestamptz
        OR (finished_at = %(at)s::timestamptz AND id < %(after)s))
   AND (%(at)s::timestamptz IS NULL OR finished_at <= %(at)s::timestamptz)
   AND (%(upto)s::bigint IS NULL OR id <= %(upto)s::bigint)
   AND status = ANY(%(statuses)s::text[])
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
   AND (%(key)s::text IS NULL OR ordering_key = %(key)s::text)
   AND (%(dedupe)s::text IS NULL OR dedupe_key = %(dedupe)s::text)
   AND (%(error)s::text IS NULL OR strpos(lower(last_error), lower(%(error)s::text)) > 0)
   AND (%(run)s::bigint IS NULL OR id = ANY(ARRAY(SELECT f.record_id FROM {flow_records} f
                                                   WHERE f.flow_run_id = %(run)s::bigint)))
 ORDER BY finished_at DESC, id DESC
 LIMIT %(limit)s;

-- name: dashboard_record
SELECT id, queue, status, priority, attempts, max_attempts, ordering_key, dedupe_key, dedupe_while, dedupe_held,
       key_blocked, cancel_requested, last_error, run_at, created_at, updated_at, finished_at, claimed_by,
       claimed_at, lease_expires_at, CASE WHEN %(payload)s THEN jsonb_pretty(coalesce(payload, (
           SELECT a.payload FROM {payloads} a WHERE a.id = %(id)s))) END AS payload,
       flow_run_id, step, flow_index, waiting_on, CASE WHEN %(payload)s THEN jsonb_pretty(result) END AS result
  FROM {records}
 WHERE id = %(id)s;

-- name: dashboard_key_neighbours
-- The records of a key around one of them that its ordering rules look at (pending, processing, failed):
-- per state the nearest few on each side, through the ordering index.
SELECT n.id, n.status, n.attempts, n.created_at
  FROM unnest(ARRAY['pending', 'processing', 'failed']) AS s(status)
 CROSS JOIN LATERAL (
    (SELECT r.id, r.status, r.attempts, r.created_at FROM {records} r
      WHERE r.ordering_key = %(key)s::text AND r.status = s.status
        AND r.status IN ('pending', 'processing', 'failed') AND r.id < %(id)s
      ORDER BY r.id DESC LIMIT %(n)s)
    UNION ALL
    (SELECT r.id, r.status, r.attempts, r.created_at FROM {records} r
      WHERE r.ordering_key = %(key)s::text AND r.status = s.status
        AND r.status IN ('pending', 'processing', 'failed') AND r.id > %(id)s
      ORDER BY r.id LIMIT %(n)s)
 ) n;

-- name: dashboard_settings
-- The admission settings: queue limits and key concurrency rules.
SELECT 'queue' AS kind, queue AS name, max_pending AS n, false AS block_on_failure, updated_at
  FROM {queue_limits}
UNION ALL
SELECT 'key', pattern, max_concurrency, block_on_failure, updated_at FROM {key_limits}
 ORDER BY 1, 2
 LIMIT %(limit)s;

-- name: dashboard_shard
-- One shard's identity, its share of the partition map, and its pending and processing records up to a cap.
SELECT (SELECT shard_no FROM {shard_identity}) AS shard_no,
       (SELECT accepting FROM {shard_identity}) AS accepting,
       (SELECT count(*) FILTER (WHERE m.shard_no = (SELECT shard_no FROM {shard_identity})) FROM {shard_map} m)
           AS partitions,
       (SELECT count(*) FILTER (WHERE m.moving) FROM {shard_map} m) AS moving,
       (SELECT count(*) FROM (SELECT 1 FROM {records} WHERE status = 'pending' LIMIT %(cap)s) c) AS pending,
       (SELECT count(*) FROM (SELECT 1 FROM {records}
                               WHERE status = 'processing' AND lease_expires_at IS NOT NULL LIMIT %(cap)s) c)
           AS processing,
       (SELECT count(*) FROM (SELECT 1 FROM {records} WHERE status = 'waiting' LIMIT %(cap)s) c) AS waiting,
       (SELECT count(*) FROM pg_prepared_xacts
         WHERE database = current_database() AND gid LIKE %(prefix)s) AS in_doubt;

-- name: dashboard_purge
-- Chosen finished records deleted (the trigger takes them off queue_stats); others are left alone.
DELETE FROM {records}
 WHERE id = ANY(%(ids)s::bigint[])
   AND status IN ('completed', 'failed', 'cancelled')
RETURNING id;

-- name: dashboard_flow_runs_end
-- Flows. Where a window of runs below a run id ends: the id of the %(window)s-th run, read from the primary
-- key alone (NULL: fewer are left). Only a status filter needs it (without one, every run read matches).
SELECT id FROM {flow_runs}
 WHERE (%(after)s::bigint IS NULL OR id < %(after)s::bigint)
 ORDER BY id DESC
 OFFSET %(window)s - 1
 LIMIT 1;

-- name: dashboard_flow_runs
-- The latest runs below a run id, newest first, down the primary key, within the window down to %(end)s.
SELECT id, flow, version, status, failed_step, left(error, 300), created_at, finished_at
  FROM {flow_runs}
 WHERE (%(after)s::bigint IS NULL OR id < %(after)s::bigint)
   AND (%(end)s::bigint IS NULL OR id >= %(end)s::bigint)
   AND (%(status)s::text IS NULL OR status = %(status)s::text)
 ORDER BY id DESC
 LIMIT %(limit)s;

-- name: dashboard_flow_runs_by_flow_end
-- One flow's window below the position (at, after): the created_at of its %(window)s-th run, read from the
-- (flow, created_at) index alone (NULL: fewer are left). The window holds every run of the flow started from
-- then on, ties included (runs started at the position's own moment with a higher id are counted in it too,
-- which only makes the window a little shorter).
SELECT created_at FROM {flow_runs}
 WHERE flow = %(flow)s::text
   AND (%(at)s::timestamptz IS NULL OR created_at <= %(at)s::timestamptz)
 ORDER BY created_at DESC
 OFFSET %(window)s - 1
 LIMIT 1;

-- name: dashboard_flow_runs_by_flow
-- One flow's latest runs below the position, newest first, by the (flow, created_at) index, within the
-- window down to end_at (every run started then included).
SELECT id, flow, version, status, failed_step, left(error, 300), created_at, finished_at
  FROM {flow_runs}
 WHERE flow = %(flow)s::text
   AND (%(at)s::timestamptz IS NULL OR created_at <= %(at)s::timestamptz)
   AND (%(at)s::timestamptz IS NULL OR created_at < %(at)s::timestamptz OR id < %(after)s::bigint)
   AND (%(end_at)s::timestamptz IS NULL OR created_at >= %(end_at)s::timestamptz)
   AND (%(status)s::text IS NULL OR status = %(status)s::text)
 ORDER BY created_at DESC, id DESC
 LIMIT %(limit)s;

-- name: dashboard_flow_run
-- A run by its primary key, with its version's stored definition (the steps' parents: the graph).
SELECT fr.id, fr.flow, fr.version, fr.status, CASE WHEN %(payload)s THEN jsonb_pretty(fr.input) END,
       fr.dedupe_key, fr.failed_step, fr.error, fr.on_failure_id, fr.created_at, fr.updated_at, fr.finished_at,
       (SELECT t.definition FROM {flow_templates} t WHERE t.name = fr.flow AND t.version = fr.version)
  FROM {flow_runs} fr
 WHERE fr.id = %(run)s::bigint;

-- name: dashboard_flow_counts
-- A run's records by step and state, among its first %(cap)s (its list of records in id order, each by primary
-- key); whether a step's for_each placeholder (its elements not known yet) is among them.
SELECT step, status, count(*), bool_or(flow_index = -1)
  FROM (SELECT x.step, x.status, x.flow_index
          FROM (SELECT f.record_id FROM {flow_records} f
                 WHERE f.flow_run_id = %(run)s::bigint
                 ORDER BY f.flow_run_id, f.record_id
                 LIMIT %(cap)s) f
         CROSS JOIN LATERAL (SELECT r.step, r.status, r.flow_index FROM {records} r
                              WHERE r.id = f.record_id LIMIT 1) x) r
 GROUP BY step, status;

-- name: dashboard_flow_step_records
-- The records a run's page shows per step: its first %(firsts)s and its first %(hots)s failed or processing
-- ones (each limit at most the step's count, so that no walk looks for records that are not there), along the
-- run's list of records in id order, each by primary key; results pretty-printed and cut (not with hidden
-- payloads), errors cut.
SELECT s.step, r.id, r.status, r.attempts, r.max_attempts, r.flow_index, r.last_error, r.result, r.queue,
       r.finished_at, r.waiting_on
  FROM unnest(%(steps)s::text[], %(firsts)s::int[], %(hots)s::int[]) AS s(step, firsts, hots)
 CROSS JOIN LATERAL (
    (SELECT x.id, x.status, x.attempts, x.max_attempts, x.flow_index, left(x.last_error, %(error_chars)s) AS last_error,
            CASE WHEN %(payload)s THEN left(jsonb_pretty(x.result), %(result_chars)s) END AS result, x.queue,
            x.finished_at, x.waiting_on
       FROM {flow_records} f
      CROSS JOIN LATERAL (SELECT * FROM {records} y WHERE y.id = f.record_id LIMIT 1) x
      WHERE f.flow_run_id = %(run)s::bigint AND x.step = s.step
      ORDER BY f.flow_run_id, f.record_id
      LIMIT s.firsts)
    UNION
    (SELECT x.id, x.status, x.attempts, x.max_attempts, x.flow_index, left(x.last_error, %(error_chars)s),
            CASE WHEN %(payload)s THEN left(jsonb_pretty(x.result), %(result_chars)s) END, x.queue,
            x.finished_at, x.waiting_on
       FROM {flow_records} f
      CROSS JOIN LATERAL (SELECT * FROM {records} y WHERE y.id = f.record_id LIMIT 1) x
      WHERE f.flow_run_id = %(run)s::bigint AND x.step = s.step AND x.status IN ('failed', 'processing')
      ORDER BY f.flow_run_id, f.record_id
      LIMIT s.hots)
 ) r;

-- name: dashboard_flow_failed_recent
-- Runs failed in the last hour among the latest %(cap)s finished then (the finished_at index), and how many
-- finished runs that read (at the cap the count is "at least").
SELECT count(*) FILTER (WHERE status = 'failed'), count(*)
  FROM (SELECT status FROM {flow_runs}
         WHERE finished_at >= now() - interval '1 hour'
         ORDER BY finished_at DESC
         LIMIT %(cap)s) f;

-- name: dashboard_flow_names
-- The flows that have run (their templates are stored per name and version: a small table).
SELECT DISTINCT name FROM {flow_templates} ORDER BY name LIMIT %(limit)s;
