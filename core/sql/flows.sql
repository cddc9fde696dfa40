-- Flows (core/flows/): starting a run, observing and cancelling it, the health check of waiting records and
-- its repair, the retention of finished runs. The functions are in core/sql/ddl/0010_flows.sql (dp_start_flow,
-- dp_flow_expand and dp_flow_settle as redefined by 0016_flow_trace.sql; dp_flow_settle again, and
-- dp_flow_settle_take, by 0017_flow_take.sql).
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: start_flow
-- A run in one round trip: template check, dedupe, its records and edges, the roots claimable; the trace
-- context of the start on the run and its records (migration 0016).
SELECT status, run_id, ids, owner
  FROM {start_flow_function}(%(flow)s, %(version)s, %(hash)s, %(definition)s::jsonb, %(input)s::jsonb,
                             %(dedupe)s::text, %(steps)s::jsonb, %(expect_shard)s::int, %(trace)s::text);

-- name: flow_run
SELECT id, flow, version, status, input, dedupe_key, failed_step, error, on_failure_id, created_at,
       updated_at, finished_at
  FROM {flow_runs}
 WHERE id = %(run)s;

-- name: flow_records
-- A run's records (listed in flow_records, read by primary key; migration 0019), in id order, each with its result.
SELECT r.id, r.step, r.flow_index, r.status, r.attempts, r.max_attempts, r.last_error,
       r.result, r.queue, r.waiting_on,
       r.created_at, r.finished_at
  FROM {records} r
 WHERE r.id = ANY(ARRAY(SELECT f.record_id FROM {flow_records} f WHERE f.flow_run_id = %(run)s))
 ORDER BY r.id;

-- name: cancel_flow
SELECT {cancel_flow_function}(%(run)s);

-- name: flow_defects
-- A slice of the waiting records (by the waiting index, after the id %(after)s): the last id of the slice (NULL:
-- none left) and those none of whose parents is unfinished, a defect (the settle of their last parent is
-- missing). A sweep goes through them all slice by slice; the health check reads the oldest slice.
SELECT max(s.id), count(*), coalesce(array_agg(s.id ORDER BY s.id) FILTER (WHERE s.defect), '{{}}')
  FROM (SELECT w.id,
               -- each parent by primary key (never a join a plan could turn into a walk of the table)
               NOT EXISTS (SELECT 1 FROM {flow_edges} e
                            WHERE e.child_id = w.id
                              AND (SELECT p.status FROM {records} p WHERE p.id = e.parent_id)
                                  NOT IN ('completed', 'failed', 'cancelled'))
                   AS defect
          FROM {records} w
         WHERE w.status = 'waiting' AND w.id > %(after)s
         ORDER BY w.id
         LIMIT %(limit)s) s;

-- name: flow_repair
SELECT {flow_repair_function}(%(ids)s::bigint[]);

-- name: purge_flow_runs
-- Runs ended before the cutoff and with no record left unfinished, with their edges and their list of records,
-- in one bounded, ordered batch (their records, which hold the results, go by the records' own retention).
WITH gone AS (
    DELETE FROM {flow_runs}
     WHERE id = ANY(ARRAY(SELECT fr.id FROM {flow_runs} fr
                           WHERE fr.finished_at < now() - %(older_than)s * interval '1 second'
                             -- each record by primary key (LIMIT: never a join a plan could make a walk)
                             AND (SELECT 1 FROM {flow_records} f
                                   CROSS JOIN LATERAL (SELECT r.status FROM {records} r
                                                        WHERE r.id = f.record_id LIMIT 1) r
                                   WHERE f.flow_run_id = fr.id AND r.status IN ('waiting', 'pending', 'processing')
                                   LIMIT 1) IS NULL
                           ORDER BY fr.finished_at
                           LIMIT %(batch)s))
    RETURNING id
),
edges AS (
    DELETE FROM {flow_edges} e WHERE e.run_id = ANY(ARRAY(SELECT id FROM gone))
),
listed AS (
    DELETE FROM {flow_records} f WHERE f.flow_run_id = ANY(ARRAY(SELECT id FROM gone))
)
SELECT count(*) FROM gone;

-- name: list_flow_runs
-- The latest runs (the dashboard, the CLI), newest first, by the (flow, created_at) index when a flow is named.
SELECT id, flow, version, status, failed_step, error, created_at, finished_at
  FROM {flow_runs}
 WHERE (%(flow)s::text IS NULL OR flow = %(flow)s::text)
   AND (%(status)s::text IS NULL OR status = %(status)s::text)
 ORDER BY created_at DESC, id DESC
 LIMIT %(limit)s;

-- name: flow_template_put
-- A template's definition stored for its version unless one is already (then that one's hash): over shards,
-- a processor checks a template on every shard before its first run (core/flows/sharded.py), so a changed
-- definition is refused whichever shard the run would go to.
WITH ins AS (
    INSERT INTO {flow_templates} (name, version, def_hash, definition)
    VALUES (%(flow)s, %(version)s, %(hash)s, %(definition)s::jsonb)
    ON CONFLICT (name, version) DO NOTHING
    RETURNING def_hash
)
SELECT def_hash FROM ins
UNION ALL
SELECT t.def_hash FROM {flow_templates} t WHERE t.name = %(flow)s AND t.version = %(version)s
LIMIT 1;
