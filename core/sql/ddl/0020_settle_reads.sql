-- Migration 0020: issue 24's chain, the settlement's reads cut (docs/hot-path.md, "Fourth reading": the taken
-- children's parents' read was about a tenth of a chain's server time).
-- * A child whose one parent is not a for_each (flow_edges.sole, set by dp_start_flow; false on the edges that
--   existed before and on those a for_each's expansion copies) is taken with the {step: result} that its
--   parent's completion sent, without reading its edges and its parent again.
-- * The caller sends each completed record's run: the runs of the sinks completed are not read from the records.
-- * A run's completion looks for an unfinished record among its sinks only (flow_records.sink, set where the
--   pair is written; NULL on the pairs written before, which are looked at), not among all its records.
-- * The completed records' edges are read once per round (the for_each probe only when one is among them), and
--   the children taken are chosen in the update that counts them (no read of them before it).
-- Safe while workers of the previous version run: their claim statement calls the settlement by 0017's
-- signature, which now runs this one (reading what they do not send: their children's parents are read).
-- {schema} is the quoted schema name.

ALTER TABLE {schema}.flow_edges ADD COLUMN IF NOT EXISTS sole boolean NOT NULL DEFAULT false;
ALTER TABLE {schema}.flow_records ADD COLUMN IF NOT EXISTS sink boolean;

-- A run in one call, as 0019's, with its edges' sole and its pairs' sink set.
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
    -- sink: a step no other step follows (after or for_each); the runs' completion looks at these only.
    INSERT INTO {schema}.flow_records (flow_run_id, record_id, sink)
    SELECT run_id, v_ids[s.ord],
           NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_steps) AS t(v)
                        WHERE t.v -> 'after' ? (s.v ->> 'name') OR t.v ->> 'each' = s.v ->> 'name')
      FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, ord);
    -- ids are taken in the steps' order (INSERT ... SELECT ... ORDER BY ordinality): the k-th id is step k's
    SELECT jsonb_object_agg(s.v ->> 'name', v_ids[s.ord]) INTO ids
      FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, ord);
    -- sole: the child's one parent, not a for_each (the settlement then takes the child with that parent's result
    -- as its parents', reading nothing).
    INSERT INTO {schema}.flow_edges (child_id, parent_id, run_id, each, run_on_failure, sole)
    SELECT v_ids[s.ord], (ids ->> p.name)::bigint, run_id, p.name = coalesce(s.v ->> 'each', ''),
           coalesce(s.v ->> 'policy', 'cancel') = 'run',
           jsonb_array_length(s.v -> 'after') = 1 AND s.v ->> 'each' IS NULL
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


-- As 0019's, its elements' pairs marked sink when the placeholder is one.
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
    -- the elements of a sink (a placeholder no step follows) are sinks
    INSERT INTO {schema}.flow_records (flow_run_id, record_id, sink)
    SELECT ph.flow_run_id, x.id, NOT EXISTS (SELECT 1 FROM {schema}.flow_edges e WHERE e.parent_id = p_id)
      FROM unnest(v_new) AS x(id);
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
-- results already on their rows, written by the same statement), p_ended failed or cancelled. Children count a
-- completed parent (all of a batch's parents of one child at once); a failed or cancelled parent cancels its
-- waiting children (on_dependency_failure 'cancel', with an error naming the step) or counts as finished
-- ('run'); a child whose count reaches zero becomes pending, or processing when the caller takes it. Each
-- statement that changes waiting records locks them in id order, so two transactions settling parents of one
-- child take turns (the later sees the earlier's count) and never wait for each other in a cycle; the runs are
-- locked last, in id order. Set-based: a batch of completions costs a few statements, not a few per record.
-- Returns the children it took (with p_room > 0), as the claim statement returns the records it claims.
-- Against 0019's: p_done_runs (each completed record's run) and p_done_parents (what each gives a child it is the
-- one parent of: {step: result}, NULL for a for_each element), both in p_done's order; the edges read once per
-- round; the children taken chosen in the counting update.
CREATE OR REPLACE FUNCTION {schema}.dp_flow_settle_take(
    p_done bigint[], p_ended bigint[], p_queues text[], p_room integer, p_token uuid, p_instance text,
    p_lease_seconds double precision, p_done_runs bigint[], p_done_parents jsonb[])
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
    v_round_sinks bigint[];
    v_each boolean;
    v_grew boolean;
    v_runs bigint[];
    ph record;
    n integer;
    released integer := 0;
    run record;
    v_handler jsonb;
    v_fid bigint;
    v_room integer := coalesce(p_room, 0);
    v_cut bigint;
    v_pick bigint[];
    v_take bigint[] := '{}';
    v_taken bigint[] := '{}';
    v_open boolean;
    v_first boolean := true;
    v_fast_ids bigint[] := '{}';
    v_fast_obj jsonb[] := '{}';
    v_f_ids bigint[];
    v_f_obj jsonb[];
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
        v_grew := false;
        LOOP
            -- The edges of this round's completed records, one lookup each: their children with the number of
            -- parents each counts here (sorted by child), the records without children (sinks), and whether a
            -- for_each edge is among them.
            WITH e AS MATERIALIZED (
                SELECT d.id AS parent_id, x.child_id, x.each, x.sole
                  -- an id sent twice counts once (and none is NULL: a NULL among the sinks would hide every
                  -- pair from the runs' look for an unfinished one)
                  FROM (SELECT DISTINCT u.id FROM unnest(v_done) AS u(id) WHERE u.id IS NOT NULL) d
                  LEFT JOIN {schema}.flow_edges x ON x.parent_id = d.id
            ),
            c AS (SELECT e.child_id, count(*)::integer AS k FROM e WHERE e.child_id IS NOT NULL GROUP BY e.child_id),
            -- A child whose one parent (not a for_each) is one of the caller's completed records: its parents'
            -- results are that record's {step: result}, which the caller sent (p_done_parents, NULL for a
            -- for_each element, whose results go in a list), so taking it reads nothing more.
            f AS (SELECT e.child_id, p_done_parents[width_bucket(e.parent_id, p_done)] AS obj FROM e
                   WHERE e.sole AND p_done_parents IS NOT NULL
                     AND p_done[width_bucket(e.parent_id, p_done)] = e.parent_id)
            SELECT coalesce((SELECT array_agg(c.child_id ORDER BY c.child_id) FROM c), '{}'),
                   coalesce((SELECT array_agg(c.k ORDER BY c.child_id) FROM c), '{}'),
                   coalesce((SELECT array_agg(e.parent_id) FROM e WHERE e.child_id IS NULL), '{}'),
                   coalesce((SELECT bool_or(e.each) FROM e), false),
                   coalesce((SELECT array_agg(f.child_id ORDER BY f.child_id) FROM f WHERE f.obj IS NOT NULL), '{}'),
                   coalesce((SELECT array_agg(f.obj ORDER BY f.child_id) FROM f WHERE f.obj IS NOT NULL), '{}')
              INTO v_cids, v_ks, v_round_sinks, v_each, v_f_ids, v_f_obj;
            IF v_first THEN  -- later rounds (a cascade's) have no results sent: their children's parents are read
                v_fast_ids := v_f_ids;
                v_fast_obj := v_f_obj;
            END IF;
            -- Read again after an expansion that added elements: the source's edges to them count here too.
            EXIT WHEN NOT v_each OR v_grew;
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
                ELSIF n > 1 THEN
                    v_grew := true;
                END IF;
            END LOOP;
            EXIT WHEN NOT v_grew;
        END LOOP;
        v_sinks := v_sinks || v_round_sinks;
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
            -- The children that run without it count it as a finished parent, with the completed records' ones.
            WITH pairs AS (
                SELECT u.child_id, u.k FROM unnest(v_cids, v_ks) AS u(child_id, k)
                UNION ALL
                SELECT e.child_id, 1 FROM {schema}.flow_edges e WHERE e.parent_id = ANY(v_ended) AND e.run_on_failure
            ),
            x AS (SELECT pairs.child_id, sum(pairs.k)::integer AS k FROM pairs GROUP BY pairs.child_id)
            SELECT coalesce((SELECT array_agg(x.child_id ORDER BY x.child_id) FROM x), '{}'),
                   coalesce((SELECT array_agg(x.k ORDER BY x.child_id) FROM x), '{}')
              INTO v_cids, v_ks;
        END IF;
        -- The children count their finished parents, every one of this round at once: one at zero becomes
        -- pending in the same update (run_at now: it queues behind what is due already), or processing when the
        -- caller takes it; a for_each placeholder at zero (its source failed, it runs without it) finishes with no
        -- element. The children go by their sorted ids through the primary key, so two transactions settling
        -- parents of the same children lock them in the same order (a deadlock the server would still break is
        -- retried by the caller, as any). Each child's count by width_bucket over the sorted ids: no join.
        -- Taken (migration 0017): a child at zero that is not a placeholder, without an ordering key (its key's
        -- order is the claim's to keep), in one of the caller's queues, tested on the row the update locked (a
        -- count another transaction lowered meanwhile, or a child it cancelled, is seen). When the room holds
        -- every child of this round (a batch's usual case) no read picks them first: v_cut is the largest id.
        -- Otherwise the smallest ids of those that can be taken, read without a lock (a count only goes down, so
        -- a child found at zero is at zero in the update, which tests it again), up to the room, as 0017 did.
        v_pick := '{}';
        v_cut := NULL;
        IF v_room > 0 AND cardinality(v_cids) > 0 THEN
            IF cardinality(v_cids) <= v_room THEN
                v_cut := v_cids[cardinality(v_cids)];
            ELSE
                v_pick := ARRAY(SELECT c.id FROM {schema}.processing_queue c
                                 WHERE c.id = ANY(v_cids) AND c.status = 'waiting'
                                   AND c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                   AND c.flow_index IS DISTINCT FROM -1 AND c.ordering_key IS NULL
                                   AND c.queue = ANY(p_queues)
                                 ORDER BY c.id
                                 LIMIT v_room);
            END IF;
        END IF;
        WITH counted AS (
            UPDATE {schema}.processing_queue c
               SET waiting_on = c.waiting_on - v_ks[width_bucket(c.id, v_cids)],
                   status = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                      AND c.flow_index IS DISTINCT FROM -1
                                 THEN CASE WHEN (c.id <= v_cut OR c.id = ANY(v_pick)) AND c.ordering_key IS NULL
                                                AND c.queue = ANY(p_queues)
                                           THEN 'processing' ELSE 'pending' END
                                 ELSE 'waiting' END,
                   run_at = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0 THEN now()
                                 ELSE c.run_at END,
                   key_blocked = false,
                   updated_at = now(),
                   -- A child taken: claimed here as the claim statement's own update claims (the caller's token,
                   -- lease and instance; clock_timestamp() for the same reason), in this one write.
                   claimed_by = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                          AND c.flow_index IS DISTINCT FROM -1 AND (c.id <= v_cut OR c.id = ANY(v_pick))
                                          AND c.ordering_key IS NULL AND c.queue = ANY(p_queues)
                                     THEN p_instance ELSE c.claimed_by END,
                   claimed_at = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                          AND c.flow_index IS DISTINCT FROM -1 AND (c.id <= v_cut OR c.id = ANY(v_pick))
                                          AND c.ordering_key IS NULL AND c.queue = ANY(p_queues)
                                     THEN clock_timestamp() ELSE c.claimed_at END,
                   lease_expires_at = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                                AND c.flow_index IS DISTINCT FROM -1 AND (c.id <= v_cut OR c.id = ANY(v_pick))
                                                AND c.ordering_key IS NULL AND c.queue = ANY(p_queues)
                                           THEN clock_timestamp() + p_lease_seconds * interval '1 second'
                                           ELSE c.lease_expires_at END,
                   lease_token = CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                           AND c.flow_index IS DISTINCT FROM -1 AND (c.id <= v_cut OR c.id = ANY(v_pick))
                                           AND c.ordering_key IS NULL AND c.queue = ANY(p_queues)
                                      THEN p_token ELSE c.lease_token END,
                   attempts = c.attempts + CASE WHEN c.waiting_on - v_ks[width_bucket(c.id, v_cids)] <= 0
                                                     AND c.flow_index IS DISTINCT FROM -1 AND (c.id <= v_cut OR c.id = ANY(v_pick))
                                                     AND c.ordering_key IS NULL AND c.queue = ANY(p_queues)
                                                THEN 1 ELSE 0 END
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
        v_first := false;
        v_done := v_next_done;
        v_ended := v_next_ended;
    END LOOP;
    released := {schema}.dp_flow_announce(v_release);
    -- The runs. The first failure fails its run (its ended time) and makes its on_failure step claimable
    -- (once: only the transaction that moves the run from running does it).
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
    -- A run completes with its last record, which is a sink: the runs of the sinks completed here (as the caller
    -- sent them, p_done_runs; the others read) are locked in id order, then (a new snapshot: whoever finished
    -- another of their records before us has committed) those with no unfinished record left are completed. Two
    -- transactions finishing a run's last two sinks take turns on its row, and the later one sees the earlier's.
    -- Only the run's sinks are looked at (flow_records.sink; not known, NULL, on the pairs written before 0020:
    -- looked at), and not those completed here: a record that is not a sink comes before one, which starts only
    -- once its parents completed (a parent that failed has failed the run), so no sink left means nothing left.
    IF cardinality(v_sinks) > 0 THEN
        v_runs := ARRAY(SELECT fr.id FROM {schema}.flow_runs fr
                         WHERE fr.id = ANY(ARRAY(
                                   SELECT coalesce(CASE WHEN p_done[width_bucket(s.id, p_done)] = s.id
                                                        THEN p_done_runs[width_bucket(s.id, p_done)] END,
                                                   (SELECT r.flow_run_id FROM {schema}.processing_queue r
                                                     WHERE r.id = s.id))
                                     FROM unnest(v_sinks) AS s(id)))
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
                                WHERE f.flow_run_id = fr.id AND f.sink IS NOT FALSE AND f.record_id <> ALL(v_sinks)
                                  AND r.status IN ('waiting', 'pending', 'processing'));
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
                   -- sent by the caller (see f above) or read, as the claim statement reads them
                   CASE WHEN v_fast_ids[width_bucket(r.id, v_fast_ids)] = r.id THEN v_fast_obj[width_bucket(r.id, v_fast_ids)]
                   ELSE coalesce(
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
                       '{}'::jsonb) END
              FROM {schema}.processing_queue r
             WHERE r.id = ANY(v_taken) AND r.status = 'processing' AND r.lease_token = p_token
             ORDER BY r.id;
    END IF;
END
$fn$;

-- 0017's signature (dp_flow_settle, and any caller that sends neither runs nor results): the same settlement,
-- which reads what those would have given.
CREATE OR REPLACE FUNCTION {schema}.dp_flow_settle_take(
    p_done bigint[], p_ended bigint[], p_queues text[], p_room integer, p_token uuid, p_instance text,
    p_lease_seconds double precision)
RETURNS TABLE (id bigint, queue text, payload jsonb, priority integer, attempts integer, max_attempts integer,
               claimed_at timestamptz, lease_expires_at timestamptz, run_at timestamptz, created_at timestamptz,
               ordering_key text, dedupe_key text, cancel_requested boolean, flow_run_id bigint, step text,
               trace_context text, parents jsonb)
LANGUAGE sql ROWS 10 AS $fn$
    SELECT * FROM {schema}.dp_flow_settle_take(p_done, p_ended, p_queues, p_room, p_token, p_instance, p_lease_seconds,
                                               NULL::bigint[], NULL::jsonb[])
$fn$;
