-- The claim statement for queues with no control set, and completions of records outside flows.
-- Placeholders as in claims.sql. Blocks: "-- name: <name>".

-- name: claim_lean
-- The claim statement of claims.sql (read its comments: every part here is the same text) without the parts
-- that only queue control and flows use: no token bucket read or charged, no key rate, no pause test per queue,
-- no flow settlement, no parents' results read ahead. PostgreSQL sets up every part of a statement on every
-- execution, used or not; those parts cost the drain with nothing configured several per cent (measured:
-- docs/hot-path.md). The caller sends this statement only with no flow record among the completed (their
-- settlement is in the full statement) and goes back to the full one when the gate below is shut.
-- The gate: no queue paused, no queue rate, no key rate (queue_controls: one row that triggers keep counting
-- them, migration 0014; one row is cheaper to read than the three tables). Read in this statement's snapshot,
-- as the full statement reads the tables: a pause committed before it is seen by it. Shut, it claims nothing
-- (the completion still runs) and says so (lean = false): the caller claims again with the full one.
WITH gate AS MATERIALIZED (
    SELECT coalesce((SELECT c.paused = 0 AND c.queue_rate_rows = 0 AND c.key_rates = 0
                       FROM {queue_controls} c WHERE c.id = 1), false) AS open
),
done AS (
    UPDATE {records} d
       SET status = CASE WHEN d.cancel_requested THEN 'cancelled' ELSE 'completed' END,
           finished_at = now(),
           updated_at = now(),
           lease_expires_at = NULL,
           dedupe_held = false
     WHERE d.id = ANY(%(done_ids)s::bigint[])
       AND d.lease_token = (%(done_tokens)s::uuid[])[width_bucket(d.id, %(done_ids)s::bigint[])]
       AND d.status = 'processing'
    RETURNING d.ordering_key
),
unblocked AS (
    UPDATE {records} b
       SET key_blocked = false
     WHERE b.id = ANY(ARRAY(
               SELECT h.id
                 FROM unnest(%(unblock_keys)s::text[]) AS u(k)
                CROSS JOIN LATERAL (
                    SELECT n.id, n.key_blocked FROM {records} n
                     WHERE n.ordering_key = u.k AND n.status = 'pending'
                     ORDER BY n.ordering_key, n.status, n.id LIMIT 1) h
                WHERE h.key_blocked))
       AND b.key_blocked
    RETURNING b.queue, b.priority, b.run_at, b.id
),
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT queue, - priority::bigint, run_at, id FROM unblocked WHERE %(announce)s
),
notified AS (
    SELECT pg_notify(w.channel, w.queue)
      FROM unnest(%(channels)s::text[], %(nqueues)s::text[]) AS w(channel, queue)
),
picked AS (
    SELECT c.id, qn.name AS queue, fs.np AS fs_np, fs.run_at AS fs_at, fs.id AS fs_id
      FROM unnest(%(queues)s::text[], %(floor_np)s::bigint[], %(floor_at)s::timestamptz[], %(floor_id)s::bigint[])
           AS qn(name, np, at, id)
     CROSS JOIN LATERAL (
        SELECT * FROM (SELECT qn.np, qn.at, qn.id
                 UNION ALL
                SELECT e.np, e.run_at, e.record_id FROM {floor_events} e
                 WHERE e.queue = qn.name AND e.created_at > %(since)s) f
         ORDER BY 1, 2, 3 LIMIT 1) fl
     LEFT JOIN LATERAL (
        SELECT - r.priority::bigint AS np, r.run_at, r.id
          FROM {records} r
         WHERE %(peek)s AND r.queue = qn.name AND r.status = 'pending' AND NOT r.key_blocked
           AND r.run_at <= now() AND (- r.priority::bigint, r.run_at, r.id) >= (fl.np, fl.at, fl.id)
         ORDER BY - r.priority::bigint, r.run_at, r.id
         LIMIT 1) fs ON true
     CROSS JOIN LATERAL (
        SELECT l.id, l.priority, l.run_at
          FROM (SELECT r.id, r.priority, r.run_at, r.ordering_key
                  FROM {records} r
                 WHERE r.queue = qn.name
                   AND r.status = 'pending'
                   AND NOT r.key_blocked
                   AND r.run_at <= now()
                   AND (- r.priority::bigint, r.run_at, r.id) >= (fl.np, fl.at, fl.id)
                 ORDER BY - r.priority::bigint, r.run_at, r.id
                   FOR UPDATE OF r SKIP LOCKED) l
         WHERE l.ordering_key IS NULL OR (
                (SELECT e.id FROM {records} e
                  WHERE e.ordering_key = l.ordering_key AND e.status = 'pending' AND e.id < l.id
                  ORDER BY e.ordering_key, e.status, e.id LIMIT 1) IS NULL
                AND (SELECT count(*) FROM (
                        SELECT 1 FROM {records} p
                         WHERE p.ordering_key = l.ordering_key AND p.status = 'processing'
                         ORDER BY p.ordering_key, p.status, p.id
                         LIMIT 1000) inflight)
                    < coalesce(CASE WHEN (SELECT EXISTS (SELECT 1 FROM {key_limits})) THEN
                               (SELECT k.max_concurrency FROM {key_limits} k
                                 WHERE l.ordering_key LIKE k.like_pattern
                                 ORDER BY k.is_exact DESC, length(k.pattern) DESC LIMIT 1) END,
                               %(default_key_concurrency)s)
                AND NOT (
                    coalesce(CASE WHEN (SELECT EXISTS (SELECT 1 FROM {key_limits})) THEN
                             (SELECT k.block_on_failure FROM {key_limits} k
                               WHERE l.ordering_key LIKE k.like_pattern
                               ORDER BY k.is_exact DESC, length(k.pattern) DESC LIMIT 1) END,
                             %(default_block_on_failure)s)
                    AND (SELECT f.id FROM {records} f
                          WHERE f.ordering_key = l.ordering_key AND f.status = 'failed' AND f.id < l.id
                          ORDER BY f.ordering_key, f.status, f.id LIMIT 1) IS NOT NULL)
           )
         LIMIT %(batch)s
     ) c
     -- The gate: one test per statement (an InitPlan), before any row is read or locked.
     WHERE (SELECT g.open FROM gate g)
     ORDER BY c.priority DESC, c.run_at, c.id
     LIMIT %(batch)s
),
claimed AS (
    UPDATE {records} t
       SET status = 'processing',
           claimed_by = %(instance_id)s,
           claimed_at = clock_timestamp(),
           lease_expires_at = clock_timestamp() + %(lease_seconds)s * interval '1 second',
           lease_token = %(token)s::uuid,
           attempts = t.attempts + 1,
           dedupe_held = t.dedupe_held AND t.dedupe_while = 'active',
           updated_at = now()
     WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING t.id, t.queue, coalesce(t.payload, (SELECT a.payload FROM {payloads} a WHERE a.id = t.id)) AS payload,
              t.priority, t.attempts, t.max_attempts, t.claimed_at,
              t.lease_expires_at, t.run_at, t.created_at, t.ordering_key, t.dedupe_key, t.cancel_requested,
              t.flow_run_id, t.step, t.trace_context
)
-- The full statement's columns. A flow step claimed here gets its parents' results as the full statement reads
-- them ahead (the same subquery, per flow row, evaluated for flow rows only; an on_failure step's from
-- dp_flow_parents: a SQL function with a WITH is never inlined, and called it parses and plans its body again
-- in every statement).
SELECT claimed.id, claimed.queue, claimed.payload, claimed.priority, claimed.attempts, claimed.max_attempts,
       claimed.claimed_at, claimed.lease_expires_at, claimed.run_at, claimed.created_at, claimed.ordering_key,
       claimed.dedupe_key, claimed.cancel_requested, claimed.flow_run_id, claimed.step,
       CASE WHEN claimed.flow_run_id IS NOT NULL
            THEN coalesce(
                (SELECT jsonb_object_agg(g.step, g.val)
                   FROM (SELECT p.step,
                                CASE WHEN bool_and(p.flow_index IS NULL) THEN (array_agg(p.result))[1]
                                     ELSE coalesce(jsonb_agg(CASE WHEN p.status = 'completed' THEN p.result END
                                                             ORDER BY p.flow_index) FILTER (WHERE p.flow_index >= 0),
                                                   '[]'::jsonb) END AS val
                           FROM {flow_edges} e
                          CROSS JOIN LATERAL (SELECT x.step, x.flow_index, x.status, x.result FROM {records} x
                                               WHERE x.id = e.parent_id LIMIT 1) p
                          WHERE e.child_id = claimed.id AND (p.status = 'completed' OR p.flow_index IS NOT NULL)
                          GROUP BY p.step) g
                 HAVING count(*) > 0),
                CASE WHEN EXISTS (SELECT 1 FROM {flow_runs} fr
                                   WHERE fr.id = claimed.flow_run_id AND fr.on_failure_id = claimed.id)
                     THEN {flow_parents_function}(claimed.id, claimed.flow_run_id)
                     ELSE '{{}}'::jsonb END) END AS parents,
       NULL::text AS result,
       claimed.trace_context,
       picked.fs_np, picked.fs_at, picked.fs_id,
       (SELECT count(*) FROM done) + 0 * (SELECT count(*) FROM notified) AS completed,
       NULL::float8 AS rate_wait,
       (SELECT g.open FROM gate g) AS lean
  FROM (SELECT 1) AS one
  LEFT JOIN claimed ON true
  LEFT JOIN (SELECT DISTINCT ON (p.queue) p.* FROM picked p ORDER BY p.queue, p.id) picked
         ON picked.id = claimed.id
 ORDER BY claimed.priority DESC, claimed.run_at, claimed.id;
