-- Migration 0012: an insert in our own one-statement transaction no longer announces its records to the claimers.
-- dp_announce is for records that may become visible long after their position in claim order: a transaction
-- that goes on after the insert (an application's). That was tested as statement_timestamp() > now(), which
-- holds for every statement a client sends with the extended protocol (the transaction starts at Bind, the
-- statement at Execute) and for every statement after a BEGIN, so the pool's single-statement inserts (committed
-- in the same pipeline, right after) wrote a floor event and re-dated it at the commit, every one of them, and
-- every claim read those events for EVENT_SETTLE seconds. The caller says which it is: p_own true (the pool's
-- add_records, a schedule's fire) skips that test; everything else about announcing is unchanged (a priority,
-- an explicit run_at that is due, a statement longer than 0.25 s; an application's transaction always).
-- dp_enqueue_finish gains a trailing p_own (a new signature: the old one is dropped first, so that a call with
-- seven arguments is not ambiguous; the COPY path passes none: its own transaction is several statements).
-- {schema} is the quoted schema name, {schema_literal} the schema name as a string literal (NOTIFY channels).

DROP FUNCTION IF EXISTS {schema}.dp_enqueue_finish(text, integer, timestamptz, bigint[], integer, boolean, boolean);

-- After a batch was inserted (p_ids, ascending): the queue's limit (a new snapshot: every producer before us
-- committed; over it, status 'full' and, with p_undo, the batch deleted again: nothing of it is left, and no
-- error aborts the caller's transaction), the announcement (dp_announce), and the NOTIFY, which the server
-- delivers at the commit. p_own: the caller's statement is our own transaction, committed right after it.
CREATE OR REPLACE FUNCTION {schema}.dp_enqueue_finish(
    p_queue text, p_priority integer, p_run_at timestamptz, p_ids bigint[], p_limit integer, p_notify boolean,
    p_undo boolean, p_own boolean DEFAULT false, OUT status text, OUT depth integer)
LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := cardinality(p_ids);
BEGIN
    status := 'ok';
    IF n = 0 THEN
        RETURN;
    END IF;
    IF p_limit IS NOT NULL THEN
        SELECT count(*) INTO depth FROM (
            SELECT 1 FROM {schema}.processing_queue r
             WHERE r.queue = p_queue AND r.status = 'pending' LIMIT p_limit + n + 1) d;
        IF depth > p_limit THEN
            status := 'full';
            depth := depth - n;
            IF p_undo THEN
                DELETE FROM {schema}.processing_queue r WHERE r.id = ANY(p_ids);
            END IF;
            RETURN;
        END IF;
    END IF;
    IF p_priority <> 0 OR (p_run_at IS NOT NULL AND p_run_at < clock_timestamp() + interval '2 seconds')
       OR (NOT p_own AND statement_timestamp() > now()) OR clock_timestamp() - now() > interval '0.25 seconds' THEN
        PERFORM {schema}.dp_announce(p_queue, p_priority, p_run_at);
    END IF;
    IF p_notify THEN
        PERFORM pg_notify({schema}.dp_channel(p_queue), p_queue);
    END IF;
END
$fn$;

-- A batch in one call: prepare, insert (ids in input order; a held dedupe key, or one repeated in the batch,
-- inserts nothing and gives the holder's id, its input index listed in deduplicated), finish. Never raises for
-- a full queue or a key of another shard: status says so (dp_add_record raises), so an application's
-- transaction stays usable. QueueFull's numbers in queue_limit, depth and adding. A batch without keys, on a
-- database that is not a shard, takes the short way: no producer locks and no key heads to read.
CREATE OR REPLACE FUNCTION {schema}.dp_add_records(
    p_queue text, p_payloads jsonb[], p_priority integer DEFAULT 0, p_run_at timestamptz DEFAULT NULL,
    p_max_attempts integer DEFAULT 5, p_keys text[] DEFAULT NULL, p_dedupes text[] DEFAULT NULL,
    p_dedupe_while text DEFAULT 'pending', p_notify boolean DEFAULT true, p_expect_shard integer DEFAULT NULL,
    p_key_gap integer DEFAULT 1000, p_own boolean DEFAULT false, p_route boolean DEFAULT true,
    p_trace text DEFAULT NULL,
    OUT status text, OUT ids bigint[], OUT deduplicated integer[], OUT owner integer, OUT queue_limit integer,
    OUT depth integer, OUT adding integer)
LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := coalesce(cardinality(p_payloads), 0);
    v_keys text[] := coalesce(p_keys, array_fill(NULL::text, ARRAY[n]));
    v_dedupes text[] := coalesce(p_dedupes, array_fill(NULL::text, ARRAY[n]));
    v_blocked boolean[];
    v_limit integer;
    v_new bigint[];
    v_new_keys text[];
    v_depth integer;
BEGIN
    deduplicated := '{}';
    ids := '{}';
    status := 'ok';
    IF n = 0 THEN
        RETURN;
    END IF;
    IF p_keys IS NULL AND p_dedupes IS NULL AND p_expect_shard IS NULL
       AND NOT EXISTS (SELECT 1 FROM {schema}.shard_identity) THEN
        SELECT l.max_pending INTO v_limit FROM {schema}.queue_limits l WHERE l.queue = p_queue FOR UPDATE;
    ELSE
        SELECT p.status, p.owner, p.blocked, p.queue_limit INTO status, owner, v_blocked, v_limit
          FROM {schema}.dp_enqueue_prepare(p_queue, p_priority, p_run_at, v_keys, v_dedupes, p_expect_shard,
                                           p_key_gap, p_own, p_route) p;
        IF status <> 'ok' THEN
            RETURN;
        END IF;
    END IF;
    WITH ins AS (
        INSERT INTO {schema}.processing_queue AS r (queue, payload, priority, run_at, max_attempts, ordering_key,
                                                    dedupe_key, dedupe_while, dedupe_held, key_blocked,
                                                    trace_context)
        SELECT p_queue, u.p, p_priority, coalesce(p_run_at, now()), p_max_attempts, u.k, u.d,
               CASE WHEN u.d IS NULL THEN NULL ELSE p_dedupe_while END, u.d IS NOT NULL,
               coalesce(v_blocked[u.ord], false), p_trace
          FROM unnest(p_payloads, v_keys, v_dedupes) WITH ORDINALITY AS u(p, k, d, ord)
         ORDER BY u.ord
            ON CONFLICT DO NOTHING
        RETURNING r.id, r.dedupe_key
    )
    SELECT coalesce(array_agg(ins.id ORDER BY ins.id), '{}'), coalesce(array_agg(ins.dedupe_key ORDER BY ins.id), '{}')
      INTO v_new, v_new_keys FROM ins;
    IF v_limit IS NOT NULL THEN
        SELECT f.status, f.depth INTO status, v_depth
          FROM {schema}.dp_enqueue_finish(p_queue, p_priority, p_run_at, v_new, v_limit, p_notify, true,
                                         p_own) f;
    ELSIF cardinality(v_new) > 0 THEN  -- dp_enqueue_finish without a limit, inline: one call less
        IF p_priority <> 0 OR (p_run_at IS NOT NULL AND p_run_at < clock_timestamp() + interval '2 seconds')
           OR (NOT p_own AND statement_timestamp() > now()) OR clock_timestamp() - now() > interval '0.25 seconds' THEN
            PERFORM {schema}.dp_announce(p_queue, p_priority, p_run_at);
        END IF;
        IF p_notify THEN
            PERFORM pg_notify({schema}.dp_channel(p_queue), p_queue);
        END IF;
    END IF;
    IF status = 'full' THEN
        queue_limit := v_limit;
        depth := v_depth;
        adding := cardinality(v_new);
        RETURN;
    END IF;
    IF NOT p_own AND true = ANY(v_blocked) THEN
        PERFORM {schema}.dp_key_checks(p_queue, v_keys, v_blocked);
    END IF;
    IF cardinality(v_new) = n THEN
        ids := v_new;  -- ids are taken in input order (INSERT ... SELECT ... ORDER BY ordinality)
        RETURN;
    END IF;
    -- Some inputs were deduplicated: the k-th input without a dedupe key got the k-th id of the inserted rows
    -- without one; an input with one got its key's row (this batch's, else the holder's).
    WITH src AS (
        SELECT u.d, u.ord, row_number() OVER (PARTITION BY u.d IS NULL ORDER BY u.ord) AS nth,
               row_number() OVER (PARTITION BY u.d ORDER BY u.ord) AS occurrence
          FROM unnest(v_dedupes) WITH ORDINALITY AS u(d, ord)
    ),
    inserted AS (
        SELECT i.id, i.k, row_number() OVER (PARTITION BY i.k IS NULL ORDER BY i.id) AS nth
          FROM unnest(v_new, v_new_keys) AS i(id, k)
    ),
    holders AS (
        SELECT r.dedupe_key AS k, r.id FROM {schema}.processing_queue r
         WHERE r.queue = p_queue AND r.dedupe_key = ANY(v_dedupes) AND r.dedupe_held
    )
    SELECT array_agg(coalesce(
               CASE WHEN s.d IS NULL THEN (SELECT i.id FROM inserted i WHERE i.k IS NULL AND i.nth = s.nth) END,
               (SELECT i.id FROM inserted i WHERE i.k = s.d),
               (SELECT min(h.id) FROM holders h WHERE h.k = s.d),
               0) ORDER BY s.ord),
           coalesce(array_agg((s.ord - 1)::integer ORDER BY s.ord) FILTER (
               WHERE s.d IS NOT NULL AND (s.occurrence > 1 OR NOT EXISTS (SELECT 1 FROM inserted i WHERE i.k = s.d))),
               '{}')
      INTO ids, deduplicated
      FROM src s;
END
$fn$;
