-- Migration 0019: a run's records listed in flow_records, written once per record (by dp_start_flow, by
-- dp_flow_expand for a for_each's elements, by the settlement for an on_failure step), instead of found through
-- ix_processing_queue_flow, which took an entry for every new version of a flow record: three per record, each
-- claim and completion of a flow step paying for one more index insertion than a plain record's (sized in
-- docs/hot-path.md, "Third reading": about a tenth of a chain's drain). Every statement that read a run's records
-- through that index reads its pairs here and the records by primary key: the functions below (0010's, 0016's
-- and 0017's with only that changed, and the pairs written where records are added) and the named statements
-- (flows.sql, admin.sql's purge, the dashboard's). The pairs of existing runs are filled before the index goes,
-- with the table locked against writes.
-- {schema} is the quoted schema name.

CREATE TABLE IF NOT EXISTS {schema}.flow_records (
    flow_run_id bigint NOT NULL,
    record_id bigint NOT NULL,
    CONSTRAINT pk_flow_records PRIMARY KEY (flow_run_id, record_id)
);

-- No record is added or changed while the pairs are filled (the migration's transaction holds the lock until it
-- commits, with the functions replaced): workers of the previous version are stopped first (see the migration),
-- and this keeps a straggler from adding a record the fill would not see.
LOCK TABLE {schema}.processing_queue IN SHARE ROW EXCLUSIVE MODE;

INSERT INTO {schema}.flow_records (flow_run_id, record_id)
SELECT r.flow_run_id, r.id FROM {schema}.processing_queue r WHERE r.flow_run_id IS NOT NULL
ON CONFLICT DO NOTHING;

-- A run in one call (in the caller's transaction when it is an application's): the template checked against
-- the stored definition of its version, the dedupe key (one running run per flow and key), the records of
-- p_steps (in the template's order: name, queue, priority, max_attempts, ordering_key, after, each, policy),
-- their edges, and the roots released. status: 'ok', 'deduplicated' (run_id the running run's), 'changed' (the
-- version's stored definition differs: nothing written), 'rerouted', 'elsewhere', 'moving', 'retiring' (a
-- shard's guard, as dp_enqueue_prepare's). ids: {step: id}, a for_each step's placeholder id.
CREATE OR REPLACE FUNCTION {schema}.dp_start_flow(
    p_flow text, p_version integer, p_hash text, p_definition jsonb, p_input jsonb, p_dedupe text, p_steps jsonb,
    p_expect_shard integer DEFAULT NULL, p_trace text DEFAULT NULL,
    OUT status text, OUT run_id bigint, OUT ids jsonb, OUT owner integer)
LANGUAGE plpgsql SET plan_cache_mode = 'auto' AS $fn$
#variable_conflict use_column
DECLARE
    v_hash text;
    v_shard integer;
    v_accepting boolean;
    v_moving boolean;
    v_ids bigint[];
BEGIN
    status := 'ok';
    SELECT i.shard_no, i.accepting INTO v_shard, v_accepting FROM {schema}.shard_identity i FOR SHARE;
    IF FOUND THEN
        IF p_expect_shard IS NOT NULL AND v_shard <> p_expect_shard THEN
            status := 'rerouted';
            RETURN;
        END IF;
        IF p_dedupe IS NOT NULL THEN  -- a run with a dedupe key lives on the shard the key routes to
            SELECT m.shard_no, m.moving INTO owner, v_moving
              FROM {schema}.shard_map m WHERE m.partition = {schema}.dp_partition_of(p_dedupe) FOR SHARE;
            IF NOT FOUND OR v_moving OR owner <> v_shard THEN
                status := CASE WHEN v_moving THEN 'moving' WHEN owner IS NULL THEN 'rerouted' ELSE 'elsewhere' END;
                RETURN;
            END IF;
            owner := NULL;
        ELSIF NOT v_accepting THEN
            status := 'retiring';
            owner := v_shard;
            RETURN;
        END IF;
    END IF;
    INSERT INTO {schema}.flow_templates (name, version, def_hash, definition)
    VALUES (p_flow, p_version, p_hash, p_definition)
    ON CONFLICT (name, version) DO NOTHING;
    SELECT t.def_hash INTO v_hash FROM {schema}.flow_templates t WHERE t.name = p_flow AND t.version = p_version;
    IF v_hash <> p_hash THEN
        status := 'changed';
        RETURN;
    END IF;
    run_id := nextval(pg_get_serial_sequence('{schema}.processing_queue', 'id'));
    INSERT INTO {schema}.flow_runs (id, flow, version, status, input, dedupe_key, trace_context)
    VALUES (run_id, p_flow, p_version, 'running', p_input, p_dedupe, p_trace)
    ON CONFLICT (flow, dedupe_key) WHERE status = 'running' AND dedupe_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        status := 'deduplicated';
        SELECT fr.id INTO run_id FROM {schema}.flow_runs fr
         WHERE fr.flow = p_flow AND fr.dedupe_key = p_dedupe AND fr.status = 'running';
        SELECT jsonb_object_agg(x.step, x.id) INTO ids
          FROM (SELECT r.step, min(r.id) AS id FROM {schema}.processing_queue r
                 WHERE r.id = ANY(ARRAY(SELECT f.record_id FROM {schema}.flow_records f
                                         WHERE f.flow_run_id = run_id))
                   AND r.id <> coalesce(
                       (SELECT fr.on_failure_id FROM {schema}.flow_runs fr WHERE fr.id = run_id), 0)
                 GROUP BY r.step) x;
        RETURN;
    END IF;
    WITH ins AS (
        INSERT INTO {schema}.processing_queue AS r (queue, payload, status, priority, max_attempts, ordering_key,
                                                    flow_run_id, step, flow_index, waiting_on, trace_context)
        SELECT s.v ->> 'queue', p_input, 'waiting', (s.v ->> 'priority')::integer, (s.v ->> 'max_attempts')::integer,
               s.v ->> 'ordering_key', run_id, s.v ->> 'name',
               CASE WHEN s.v ->> 'each' IS NOT NULL THEN -1 END,
               jsonb_array_length(s.v -> 'after') + CASE WHEN s.v ->> 'each' IS NOT NULL THEN 1 ELSE 0 END,
               p_trace
          FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, ord)
         ORDER BY s.ord
        RETURNING r.id
    )
    SELECT array_agg(ins.id ORDER BY ins.id) INTO v_ids FROM ins;
    INSERT INTO {schema}.flow_records (flow_run_id, record_id) SELECT run_id, x.id FROM unnest(v_ids) AS x(id);
    -- ids are taken in the steps' order (INSERT ... SELECT ... ORDER BY ordinality): the k-th id is step k's
    SELECT jsonb_object_agg(s.v ->> 'name', v_ids[s.ord]) INTO ids
      FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, ord);
    INSERT INTO {schema}.flow_edges (child_id, parent_id, run_id, each, run_on_failure)
    SELECT v_ids[s.ord], (ids ->> p.name)::bigint, run_id, p.name = coalesce(s.v ->> 'each', ''),
           coalesce(s.v ->> 'policy', 'cancel') = 'run'
      FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, ord)
     CROSS JOIN LATERAL (
            SELECT a.name FROM jsonb_array_elements_text(s.v -> 'after') AS a(name)
            UNION
            SELECT s.v ->> 'each' WHERE s.v ->> 'each' IS NOT NULL) p;
    PERFORM {schema}.dp_flow_release(ARRAY(
        SELECT v_ids[s.ord] FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, ord)
         WHERE jsonb_array_length(s.v -> 'after') = 0 AND s.v ->> 'each' IS NULL));
END
$fn$;

-- A for_each placeholder (locked by the caller) given its source's result: one record per element, in element
-- order (flow_index), each with the placeholder's parents and children (whose counts grow by the copies).
-- Returns the number of elements; 0: the placeholder is completed with no element (its children count it as
-- a finished parent whose result is []); -1: the result is not a list, the placeholder failed.
CREATE OR REPLACE FUNCTION {schema}.dp_flow_expand(p_id bigint, p_list jsonb) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    n integer;
    ph record;
    v_new bigint[];
BEGIN
    SELECT * INTO ph FROM {schema}.processing_queue WHERE id = p_id;
    IF p_list IS NULL OR jsonb_typeof(p_list) <> 'array' THEN
        UPDATE {schema}.processing_queue
           SET status = 'failed', finished_at = now(), updated_at = now(),
               last_error = format('for_each: the result its source gave is %s, not a list',
                                   coalesce(jsonb_typeof(p_list), 'missing'))
         WHERE id = p_id;
        RETURN -1;
    END IF;
    n := jsonb_array_length(p_list);
    IF n = 0 THEN
        UPDATE {schema}.processing_queue
           SET status = 'completed', finished_at = now(), updated_at = now(), waiting_on = 0
         WHERE id = p_id;
        RETURN 0;
    END IF;
    UPDATE {schema}.processing_queue SET payload = p_list -> 0, flow_index = 0, updated_at = now() WHERE id = p_id;
    IF n = 1 THEN
        RETURN 1;
    END IF;
    WITH ins AS (
        INSERT INTO {schema}.processing_queue AS r (queue, payload, status, priority, run_at, max_attempts,
                                                    ordering_key, flow_run_id, step, flow_index, waiting_on,
                                                    trace_context)
        SELECT ph.queue, p_list -> (e.i::integer), 'waiting', ph.priority, ph.run_at, ph.max_attempts,
               ph.ordering_key, ph.flow_run_id, ph.step, e.i::integer, ph.waiting_on, ph.trace_context
          FROM generate_series(1, n - 1) AS e(i)
         ORDER BY e.i
        RETURNING r.id
    )
    SELECT array_agg(ins.id ORDER BY ins.id) INTO v_new FROM ins;
    INSERT INTO {schema}.flow_records (flow_run_id, record_id)
    SELECT ph.flow_run_id, x.id FROM unnest(v_new) AS x(id);
    INSERT INTO {schema}.flow_edges (child_id, parent_id, run_id, each, run_on_failure)
    SELECT c.id, e.parent_id, e.run_id, e.each, e.run_on_failure
      FROM {schema}.flow_edges e CROSS JOIN unnest(v_new) AS c(id)
     WHERE e.child_id = p_id;
    INSERT INTO {schema}.flow_edges (child_id, parent_id, run_id, each, run_on_failure)
    SELECT e.child_id, c.id, e.run_id, e.each, e.run_on_failure
      FROM {schema}.flow_edges e CROSS JOIN unnest(v_new) AS c(id)
     WHERE e.parent_id = p_id;
    UPDATE {schema}.processing_queue r SET waiting_on = r.waiting_on + (n - 1)
     WHERE r.id = ANY(ARRAY(SELECT e.child_id FROM {schema}.flow_edges e WHERE e.parent_id = p_id))
       AND r.status = 'waiting';
    RETURN n;
END
$fn$;

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
                INSERT INTO {schema}.flow_records (flow_run_id, record_id) VALUES (run.id, v_fid);
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
               AND NOT EXISTS (SELECT 1 FROM {schema}.flow_records f
                                CROSS JOIN LATERAL (SELECT r.status FROM {schema}.processing_queue r
                                                     WHERE r.id = f.record_id LIMIT 1) r
                                WHERE f.flow_run_id = fr.id AND r.status IN ('waiting', 'pending', 'processing'));
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

-- What a flow record's handler gets as record.parents: {step: result} of its parents that completed; a
-- for_each step's results as a list in element order (an element that did not complete: null; none: []).
-- A run's on_failure record gets every step of its run.
CREATE OR REPLACE FUNCTION {schema}.dp_flow_parents(p_id bigint, p_run bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    -- Every row by an index lookup with its key (LIMIT: a subquery never flattened into a join a plan made on
    -- an empty table could turn into a walk).
    WITH src AS (
        SELECT r.step, r.flow_index, r.status, r.result
          FROM {schema}.flow_edges e
         CROSS JOIN LATERAL (SELECT x.step, x.flow_index, x.status, x.result FROM {schema}.processing_queue x
                              WHERE x.id = e.parent_id LIMIT 1) r
         WHERE e.child_id = p_id
        UNION ALL
        SELECT r.step, r.flow_index, r.status, r.result
          FROM (SELECT fr.id FROM {schema}.flow_runs fr WHERE fr.id = p_run AND fr.on_failure_id = p_id LIMIT 1) fr
         CROSS JOIN LATERAL (SELECT f.record_id FROM {schema}.flow_records f
                              WHERE f.flow_run_id = fr.id AND f.record_id <> p_id) f
         CROSS JOIN LATERAL (SELECT x.step, x.flow_index, x.status, x.result FROM {schema}.processing_queue x
                              WHERE x.id = f.record_id LIMIT 1) r
    )
    SELECT coalesce(jsonb_object_agg(g.step, g.val), '{}'::jsonb)
      FROM (SELECT s.step,
                   CASE WHEN bool_and(s.flow_index IS NULL)
                        THEN (array_agg(s.result))[1]
                        ELSE coalesce(jsonb_agg(CASE WHEN s.status = 'completed' THEN s.result END
                                                ORDER BY s.flow_index) FILTER (WHERE s.flow_index >= 0), '[]'::jsonb)
                   END AS val
              FROM src s
             WHERE s.status = 'completed' OR s.flow_index IS NOT NULL
             GROUP BY s.step) g
$fn$;

-- Cancel what of a run has not finished: waiting and pending records at once, processing ones flagged (their
-- outcome becomes cancelled); the run is cancelled (its on_failure step does not run). Returns the run's
-- status after (NULL: no such run).
CREATE OR REPLACE FUNCTION {schema}.dp_cancel_flow(p_run bigint) RETURNS text
LANGUAGE plpgsql SET plan_cache_mode = 'auto' AS $fn$
DECLARE
    v_ids bigint[];
    v_status text;
BEGIN
    -- The records first, in id order, then the run (the order dp_flow_settle locks them in).
    PERFORM 1 FROM {schema}.processing_queue r
     WHERE r.id = ANY(ARRAY(SELECT f.record_id FROM {schema}.flow_records f WHERE f.flow_run_id = p_run))
       AND r.status IN ('waiting', 'pending', 'processing')
     ORDER BY r.id FOR UPDATE;
    UPDATE {schema}.flow_runs SET status = 'cancelled', finished_at = now(), updated_at = now()
     WHERE id = p_run AND status = 'running';
    SELECT fr.status INTO v_status FROM {schema}.flow_runs fr WHERE fr.id = p_run;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    WITH c AS (
        UPDATE {schema}.processing_queue r
           SET status = CASE WHEN r.status = 'processing' THEN r.status ELSE 'cancelled' END,
               finished_at = CASE WHEN r.status = 'processing' THEN r.finished_at ELSE now() END,
               dedupe_held = CASE WHEN r.status = 'processing' THEN r.dedupe_held ELSE false END,
               last_error = CASE WHEN r.status = 'processing' THEN r.last_error ELSE 'flow run cancelled' END,
               cancel_requested = true, waiting_on = 0, updated_at = now()
         WHERE r.id = ANY(ARRAY(SELECT f.record_id FROM {schema}.flow_records f WHERE f.flow_run_id = p_run))
           AND r.status IN ('waiting', 'pending', 'processing')
        RETURNING r.id, r.status
    )
    SELECT array_agg(c.id ORDER BY c.id) FILTER (WHERE c.status = 'cancelled') INTO v_ids FROM c;
    PERFORM {schema}.dp_flow_settle(NULL, v_ids);
    RETURN v_status;
END
$fn$;

-- The repair of a defect that must never happen (health reports it): a waiting record none of whose parents
-- is unfinished. Its count is set right: cancelled when a parent that it does not run without failed, a
-- placeholder fanned out from its source's stored result, released otherwise. p_ids: the defects a sweep found
-- (each checked again here, locked); returns how many were repaired.
CREATE OR REPLACE FUNCTION {schema}.dp_flow_repair(p_ids bigint[]) RETURNS integer
LANGUAGE plpgsql SET plan_cache_mode = 'auto' AS $fn$
DECLARE
    d record;
    n integer := 0;
    k integer;
    v_src bigint;
BEGIN
    FOR d IN
        SELECT w.id, w.flow_index FROM {schema}.processing_queue w
         WHERE w.id = ANY(p_ids) AND w.status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM {schema}.flow_edges e
                             JOIN {schema}.processing_queue p ON p.id = e.parent_id
                            WHERE e.child_id = w.id AND p.status NOT IN ('completed', 'failed', 'cancelled'))
         ORDER BY w.id
           FOR UPDATE OF w SKIP LOCKED
    LOOP
        n := n + 1;
        IF EXISTS (SELECT 1 FROM {schema}.flow_edges e JOIN {schema}.processing_queue p ON p.id = e.parent_id
                    WHERE e.child_id = d.id AND NOT e.run_on_failure AND p.status <> 'completed') THEN
            UPDATE {schema}.processing_queue SET status = 'cancelled', finished_at = now(), waiting_on = 0,
                   last_error = 'dependency failed (repaired)', updated_at = now()
             WHERE id = d.id;
            PERFORM {schema}.dp_flow_settle(NULL, ARRAY[d.id]);
            CONTINUE;
        END IF;
        IF d.flow_index = -1 THEN
            SELECT e.parent_id INTO v_src FROM {schema}.flow_edges e WHERE e.child_id = d.id AND e.each;
            k := {schema}.dp_flow_expand(d.id, (SELECT src.result FROM {schema}.processing_queue src
                                                 WHERE src.id = v_src));
            IF k = 0 THEN
                PERFORM {schema}.dp_flow_settle(ARRAY[d.id], NULL);
                CONTINUE;
            ELSIF k < 0 THEN
                PERFORM {schema}.dp_flow_settle(NULL, ARRAY[d.id]);
                CONTINUE;
            END IF;
            PERFORM {schema}.dp_flow_release(ARRAY(
                SELECT r.id FROM {schema}.processing_queue r
                 WHERE r.id = ANY(ARRAY(SELECT f.record_id FROM {schema}.flow_records f
                                         WHERE f.flow_run_id = (SELECT x.flow_run_id FROM {schema}.processing_queue x
                                                                 WHERE x.id = d.id)))
                   AND r.step = (SELECT x.step FROM {schema}.processing_queue x WHERE x.id = d.id)
                   AND r.status = 'waiting'));
            CONTINUE;
        END IF;
        PERFORM {schema}.dp_flow_release(ARRAY[d.id]);
    END LOOP;
    RETURN n;
END
$fn$;

-- Read by none of the statements above any more; its entries were the cost.
DROP INDEX IF EXISTS {schema}.ix_processing_queue_flow;
