-- Migration 0017: the claim statement that completes a flow step takes the children it releases (issue 24's
-- chain). Before, a child whose count reached zero became pending (a new row version with its index entries)
-- and a claim made it processing (another); now a claim statement's settlement makes it processing with the
-- caller's token and lease in the one update that counts it, and returns it with the records the statement
-- claims. dp_flow_settle_take is 0016's dp_flow_settle with that added: the children taken are those due, in one
-- of the caller's queues, without an ordering key, up to the room the caller asked for, and only while no
-- queue is paused and no rate is set anywhere. dp_flow_settle (the fail, recovery and cancel statements, and
-- workers of the previous version) is that function taking nothing: it behaves as before.
-- {schema} is the quoted schema name.

-- The end of flow records, in the statement that ended them (their ids come from its RETURNING, so only
-- records whose fenced update succeeded count: a stale instance settles nothing): p_done completed (their
-- results already on their rows, written by the same statement), p_ended failed or cancelled. Children count a completed parent (all of
-- a batch's parents of one child at once); a failed or cancelled parent cancels its waiting children
-- (on_dependency_failure 'cancel', with an error naming the step) or counts as finished ('run'); a child whose
-- count reaches zero becomes pending, or processing when the caller takes it. Each statement that changes waiting records locks them first, in id
-- order, so two transactions settling parents of one child take turns (the later sees the earlier's count)
-- and never wait for each other in a cycle; the runs are locked last, in id order. Set-based: a batch of
-- completions costs a few statements, not a few per record. Returns the children it took (with p_room > 0),
-- as the claim statement returns the records it claims.
CREATE OR REPLACE FUNCTION {schema}.dp_flow_settle_take(
    p_done bigint[], p_ended bigint[], p_queues text[], p_room integer, p_token uuid, p_instance text,
    p_lease_seconds double precision)
RETURNS TABLE (id bigint, queue text, payload jsonb, priority integer, attempts integer, max_attempts integer,
               claimed_at timestamptz, lease_expires_at timestamptz, run_at timestamptz, created_at timestamptz,
               ordering_key text, dedupe_key text, cancel_requested boolean, flow_run_id bigint, step text,
               trace_context text, parents jsonb)
-- Custom plans for its statements (the processor's sessions force generic ones, planned without the arrays'
-- sizes: measured, the settling of a batch took twice as long with them). ROWS: the claim statement sorts
-- these rows with the ones it claims; the default estimate of a set-returning function (1,000) would make
-- that sort look larger than any batch.
LANGUAGE plpgsql ROWS 10 SET plan_cache_mode = 'auto' AS $fn$
#variable_conflict use_column
DECLARE
    v_done bigint[] := coalesce(p_done, '{}');
    v_ended bigint[] := coalesce(p_ended, '{}');
    v_failed bigint[] := coalesce(p_ended, '{}');  -- the records whose end fails their run
    v_release bigint[] := '{}';
    v_next_done bigint[];
    v_next_ended bigint[];
    v_zero bigint[];
    v_empty bigint[];
    v_cids bigint[];
    v_ks integer[];
    v_sinks bigint[] := '{}';
    v_runs bigint[];
    ph record;
    n integer;
    released integer := 0;
    run record;
    v_handler jsonb;
    v_fid bigint;
    v_room integer := coalesce(p_room, 0);
    v_take bigint[] := '{}';
    v_taken bigint[] := '{}';
    v_open boolean;
BEGIN
    IF cardinality(v_done) + cardinality(v_ended) = 0 THEN
        RETURN;
    END IF;
    -- Children are taken only while no queue is paused and no rate is set anywhere (the lean claim's gate,
    -- migration 0014): a taken child skips the pause test and the tokens that the claim's scan applies.
    IF v_room > 0 THEN
        SELECT c.paused = 0 AND c.queue_rate_rows = 0 AND c.key_rates = 0 INTO v_open
          FROM {schema}.queue_controls c WHERE c.id = 1;
        IF NOT coalesce(v_open, false) THEN
            v_room := 0;
        END IF;
    END IF;
    LOOP
        v_next_done := '{}';
        v_next_ended := '{}';
        -- A completed source fans out its for_each placeholders (each has one source: no other transaction
        -- expands it).
        FOR ph IN
            SELECT e.child_id, e.parent_id
              FROM {schema}.flow_edges e
             WHERE e.parent_id = ANY(v_done) AND e.each
               AND (SELECT c.flow_index FROM {schema}.processing_queue c
                     WHERE c.id = e.child_id AND c.status = 'waiting') = -1
             ORDER BY e.child_id
        LOOP
            n := {schema}.dp_flow_expand(ph.child_id, (SELECT src.result FROM {schema}.processing_queue src
                                                       WHERE src.id = ph.parent_id));
            IF n = 0 THEN
                v_next_done := v_next_done || ph.child_id;
            ELSIF n < 0 THEN
                v_next_ended := v_next_ended || ph.child_id;
                v_failed := v_failed || ph.child_id;
            END IF;
        END LOOP;
        -- Children of a failed or cancelled parent that do not run without it: cancelled, naming the step.
        IF cardinality(v_ended) > 0 THEN
            WITH x AS (
                SELECT DISTINCT ON (e.child_id) e.child_id,
                       format('dependency %s %s', p.step, p.status) AS why
                  FROM {schema}.flow_edges e
                  JOIN {schema}.processing_queue p ON p.id = e.parent_id
                 WHERE e.parent_id = ANY(v_ended) AND NOT e.run_on_failure
                 ORDER BY e.child_id, e.parent_id
            ),
            locked AS (
                SELECT c.id FROM {schema}.processing_queue c
                 WHERE c.id = ANY(ARRAY(SELECT x.child_id FROM x)) AND c.status = 'waiting'
                 ORDER BY c.id
                   FOR UPDATE
            ),
            cancelled AS (
                UPDATE {schema}.processing_queue c
                   SET status = 'cancelled', finished_at = now(), updated_at = now(), waiting_on = 0,
                       last_error = x.why
                  FROM x
                 WHERE c.id = ANY(ARRAY(SELECT locked.id FROM locked)) AND c.id = x.child_id AND c.status = 'waiting'
                RETURNING c.id
            )
            SELECT v_next_ended || coalesce(array_agg(cancelled.id), '{}') INTO v_next_ended FROM cancelled;
        END IF;
        -- The others count their finished parents, every one of this round at once: one at zero becomes
        -- pending in the same update (run_at now: it queues behind what is due already), a for_each
        -- placeholder at zero (its source failed, it runs without it) finishes with no element. The children
        -- go by their sorted ids through the primary key, so two transactions settling parents of the same
        -- children lock them in the same order (a deadlock the server would still break is retried by the
        -- caller, as any). Each child's count by width_bucket over the sorted ids: no join. The completed
        -- records without children (sinks) may be their run's last.
        WITH pairs AS (
            SELECT e.parent_id, e.child_id FROM {schema}.flow_edges e WHERE e.parent_id = ANY(v_done)
            UNION ALL
            SELECT e.parent_id, e.child_id FROM {schema}.flow_edges e
             WHERE e.parent_id = ANY(v_ended) AND e.run_on_failure
        ),
        x AS (SELECT pairs.child_id, count(*)::integer AS k FROM pairs GROUP BY pairs.child_id)
        SELECT coalesce((SELECT array_agg(x.child_id ORDER BY x.child_id) FROM x), '{}'),
               coalesce((SELECT array_agg(x.k ORDER BY x.child_id) FROM x), '{}'),
               v_sinks || ARRAY(SELECT d.id FROM unnest(v_done) AS d(id)
                                 WHERE NOT EXISTS (SELECT 1 FROM pairs WHERE pairs.parent_id = d.id))
          INTO v_cids, v_ks, v_sinks;
        -- The children this round releases that the caller takes itself (migration 0017): due now, in one of
        -- the caller's queues, without an ordering key (their key's order is the claim's to keep), up to its
        -- room, the smallest ids first. Read without a lock: a count only goes down, so a child found at zero
        -- here is at zero in the update below, which locks it and tests it again (a child another transaction
        -- cancelled meanwhile is no longer waiting and is left alone).
        IF v_room > 0 THEN
            v_take := ARRAY(SELECT c.id FROM {schema}.processing_queue c
                             WHERE c.id = ANY(v_cids) AND c.status = 'waiting'
                               AND c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                               AND c.flow_index IS DISTINCT FROM -1 AND c.ordering_key IS NULL
                               AND c.queue = ANY(p_queues)
                             ORDER BY c.id
                             LIMIT v_room);
        ELSE
            v_take := '{}';
        END IF;
        WITH counted AS (
            UPDATE {schema}.processing_queue c
               SET waiting_on = c.waiting_on - v_ks[width_bucket(c.id, v_cids)],
                   status = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                      AND c.flow_index IS DISTINCT FROM -1
                                 THEN CASE WHEN c.id = ANY(v_take) THEN 'processing' ELSE 'pending' END
                                 ELSE 'waiting' END,
                   run_at = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0 THEN now()
                                 ELSE c.run_at END,
                   key_blocked = false,
                   updated_at = now(),
                   -- A child taken: claimed here as the claim statement's own update claims (the caller's token,
                   -- lease and instance; clock_timestamp() for the same reason), in this one write.
                   claimed_by = CASE WHEN c.id = ANY(v_take) THEN p_instance ELSE c.claimed_by END,
                   claimed_at = CASE WHEN c.id = ANY(v_take) THEN clock_timestamp() ELSE c.claimed_at END,
                   lease_expires_at = CASE WHEN c.id = ANY(v_take)
                                           THEN clock_timestamp() + p_lease_seconds * interval '1 second'
                                           ELSE c.lease_expires_at END,
                   lease_token = CASE WHEN c.id = ANY(v_take) THEN p_token ELSE c.lease_token END,
                   attempts = c.attempts + CASE WHEN c.id = ANY(v_take) THEN 1 ELSE 0 END
             WHERE c.id = ANY(v_cids) AND c.status = 'waiting'
            RETURNING c.id, c.status, c.flow_index, c.waiting_on
        )
        SELECT coalesce(array_agg(counted.id) FILTER (WHERE counted.status = 'pending'), '{}'),
               coalesce(array_agg(counted.id) FILTER (WHERE counted.status = 'processing'), '{}'),
               coalesce(array_agg(counted.id) FILTER (WHERE counted.status = 'waiting' AND counted.flow_index = -1
                                                            AND counted.waiting_on <= 0), '{}')
          INTO v_zero, v_take, v_empty
          FROM counted;
        v_release := v_release || v_zero;
        v_taken := v_taken || v_take;
        v_room := v_room - cardinality(v_take);
        -- A placeholder whose source failed and which runs without it: no element, finished with [].
        IF cardinality(v_empty) > 0 THEN
            UPDATE {schema}.processing_queue SET status = 'completed', finished_at = now(), updated_at = now()
             WHERE id = ANY(v_empty);
            v_next_done := v_next_done || v_empty;
        END IF;
        EXIT WHEN cardinality(v_next_done) + cardinality(v_next_ended) = 0;
        v_done := v_next_done;
        v_ended := v_next_ended;
    END LOOP;
    released := {schema}.dp_flow_announce(v_release);
    -- The runs. The first failure fails its run (its ended time) and makes its on_failure step claimable
    -- (once: only the transaction that moves the run from running does it). A run completes with its last
    -- record, which is a sink: the runs of the sinks completed here are locked in id order, then (a new
    -- snapshot: whoever finished another of their records before us has committed) those with no unfinished
    -- record left are completed. Two transactions finishing a run's last two sinks take turns on its row, and
    -- the later one sees the earlier's.
    IF cardinality(v_failed) > 0 THEN
        v_runs := ARRAY(SELECT fr.id FROM {schema}.flow_runs fr
                         WHERE fr.id = ANY(ARRAY(SELECT r.flow_run_id FROM {schema}.processing_queue r
                                                  WHERE r.id = ANY(v_failed)))
                           AND fr.status = 'running'
                         ORDER BY fr.id
                           FOR UPDATE);
        FOR run IN
            SELECT fr.id, fr.flow, fr.version, fr.input, fr.trace_context, min(r.id) AS failed_id
              FROM {schema}.processing_queue r
              JOIN {schema}.flow_runs fr ON fr.id = r.flow_run_id
             WHERE r.id = ANY(v_failed) AND fr.id = ANY(v_runs) AND fr.status = 'running'
             GROUP BY fr.id
             ORDER BY fr.id
        LOOP
            UPDATE {schema}.flow_runs fr
               SET status = 'failed', failed_step = r.step, finished_at = now(),
                   error = coalesce(r.last_error, 'step ' || r.step || ' ' || r.status), updated_at = now()
              FROM {schema}.processing_queue r
             WHERE fr.id = run.id AND r.id = run.failed_id;
            SELECT t.definition -> 'on_failure' INTO v_handler
              FROM {schema}.flow_templates t WHERE t.name = run.flow AND t.version = run.version;
            IF v_handler IS NOT NULL AND jsonb_typeof(v_handler) = 'object' THEN
                INSERT INTO {schema}.processing_queue (queue, payload, status, priority, max_attempts, flow_run_id,
                                                      step, waiting_on, trace_context)
                VALUES (v_handler ->> 'queue', run.input, 'waiting', (v_handler ->> 'priority')::integer,
                        (v_handler ->> 'max_attempts')::integer, run.id, v_handler ->> 'name', 0, run.trace_context)
                RETURNING id INTO v_fid;
                UPDATE {schema}.flow_runs SET on_failure_id = v_fid WHERE id = run.id;
                released := released + {schema}.dp_flow_release(ARRAY[v_fid]);
            END IF;
        END LOOP;
    END IF;
    IF cardinality(v_sinks) > 0 THEN
        v_runs := ARRAY(SELECT fr.id FROM {schema}.flow_runs fr
                         WHERE fr.id = ANY(ARRAY(SELECT r.flow_run_id FROM {schema}.processing_queue r
                                                  WHERE r.id = ANY(v_sinks)))
                           AND fr.status = 'running'
                         ORDER BY fr.id
                           FOR UPDATE);
        IF cardinality(v_runs) > 0 THEN
            UPDATE {schema}.flow_runs fr
               SET status = 'completed', finished_at = now(), updated_at = now()
             WHERE fr.id = ANY(v_runs) AND fr.status = 'running'
               AND NOT EXISTS (SELECT 1 FROM {schema}.processing_queue r
                                WHERE r.flow_run_id = fr.id AND r.status IN ('waiting', 'pending', 'processing'));
        END IF;
    END IF;
    -- The children taken, as the claim statement returns its records, with their parents' results (completed in
    -- this statement, so visible here), read as the claim statement reads them (core/sql/claims.sql, parents:
    -- dp_flow_parents, a SQL function with a WITH, would plan its body again for every child).
    IF cardinality(v_taken) > 0 THEN
        RETURN QUERY
            SELECT r.id, r.queue, r.payload, r.priority, r.attempts, r.max_attempts, r.claimed_at, r.lease_expires_at,
                   r.run_at, r.created_at, r.ordering_key, r.dedupe_key, r.cancel_requested, r.flow_run_id, r.step,
                   r.trace_context,
                   coalesce(
                       (SELECT jsonb_object_agg(g.step, g.val)
                          FROM (SELECT p.step,
                                       CASE WHEN bool_and(p.flow_index IS NULL) THEN (array_agg(p.result))[1]
                                            ELSE coalesce(jsonb_agg(CASE WHEN p.status = 'completed' THEN p.result END
                                                                    ORDER BY p.flow_index)
                                                              FILTER (WHERE p.flow_index >= 0),
                                                          '[]'::jsonb) END AS val
                                  FROM {schema}.flow_edges e
                                 CROSS JOIN LATERAL (SELECT x.step, x.flow_index, x.status, x.result
                                                       FROM {schema}.processing_queue x
                                                      WHERE x.id = e.parent_id LIMIT 1) p
                                 WHERE e.child_id = r.id AND (p.status = 'completed' OR p.flow_index IS NOT NULL)
                                 GROUP BY p.step) g
                        HAVING count(*) > 0),
                       '{}'::jsonb)
              FROM {schema}.processing_queue r
             WHERE r.id = ANY(v_taken) AND r.status = 'processing' AND r.lease_token = p_token
             ORDER BY r.id;
    END IF;
END
$fn$;

-- The end of flow records settled, nothing taken (the statements that end records without claiming: fail,
-- recovery, cancel). Returns 0 (no caller reads it: they only make the statement run it).
CREATE OR REPLACE FUNCTION {schema}.dp_flow_settle(p_done bigint[], p_ended bigint[])
RETURNS integer
LANGUAGE sql AS $fn$
    SELECT count(*)::integer FROM {schema}.dp_flow_settle_take(p_done, p_ended, NULL, 0, NULL, NULL, NULL)
$fn$;
