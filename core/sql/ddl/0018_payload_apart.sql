-- Migration 0018: a batch's payloads apart from its records (docs/hot-path.md, "Payloads apart").
-- Every state change of a record writes a whole new version of its row, so a payload on the row is copied into
-- the table and into the WAL at the claim and again at the completion. processing_payload holds the payloads of
-- records added by dp_add_records (batches, keyed records, records on a shard or in a limited queue, schedule
-- ticks) and by the COPY path of add_records, written once; those records carry a NULL payload. A keyless
-- record added alone where neither a shard nor a queue limit applies (dp_add_one, dp_add_record's own insert),
-- flow steps, moved records and rows a user inserts keep theirs on the row. Every reader takes
-- coalesce(record.payload, processing_payload.payload). A record's payload row goes when the record is deleted
-- (the trigger below), whichever statement deletes it.
-- Not safe while processes of the previous version run: from this migration on dp_add_records writes apart,
-- and they read the payload on the row (a worker would hand its handler None; a shard move would carry a NULL
-- payload). Stop them (workers, movers, producers that call the enqueue functions) before migrating.
-- {schema}: the quoted schema name.

CREATE TABLE IF NOT EXISTS {schema}.processing_payload (
    id bigint NOT NULL,
    payload jsonb NOT NULL,
    CONSTRAINT pk_processing_payload PRIMARY KEY (id)
);

ALTER TABLE {schema}.processing_queue ALTER COLUMN payload DROP NOT NULL;

-- A deleted record's payload row, deleted in the same transaction (purge, a move's source, an over-limit batch
-- undone, the dashboard's purge, a user's DELETE), whether or not the record's row has a payload too (a user
-- may have set one). A TRUNCATE of the records truncates the payloads too: ids the sequence gives again
-- (RESTART IDENTITY) must not meet an old payload row. SECURITY DEFINER: a role allowed to delete records
-- needs no privilege on the payloads.
CREATE OR REPLACE FUNCTION {schema}.dp_payload_gone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE {schema}.processing_payload;
    ELSE
        DELETE FROM {schema}.processing_payload p WHERE p.id = ANY(ARRAY(SELECT o.id FROM dp_old o));
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS dp_payload_gone ON {schema}.processing_queue;
CREATE TRIGGER dp_payload_gone AFTER DELETE ON {schema}.processing_queue
    REFERENCING OLD TABLE AS dp_old
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_payload_gone();
DROP TRIGGER IF EXISTS dp_payload_truncate ON {schema}.processing_queue;
CREATE TRIGGER dp_payload_truncate AFTER TRUNCATE ON {schema}.processing_queue
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_payload_gone();

-- A record's payload wherever it is (for reading by SQL: the statements join the table themselves).
CREATE OR REPLACE VIEW {schema}.record_payloads AS
SELECT r.id, coalesce(r.payload, p.payload) AS payload
  FROM {schema}.processing_queue r LEFT JOIN {schema}.processing_payload p ON p.id = r.id;

-- dp_add_records as migration 0012 left it, its payloads written apart.
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
    v_ids bigint[];
    v_seq text := pg_get_serial_sequence('{schema}.processing_queue', 'id');
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
    -- The ids first, in input order (taken after the producers' locks, as the column default would take
    -- them): a payload's row is written under its record's id.
    v_ids := ARRAY(SELECT nextval(v_seq) FROM generate_series(1, n) g ORDER BY g);
    WITH ins AS (
        INSERT INTO {schema}.processing_queue AS r (id, queue, priority, run_at, max_attempts, ordering_key,
                                                    dedupe_key, dedupe_while, dedupe_held, key_blocked,
                                                    trace_context)
        SELECT v_ids[u.ord], p_queue, p_priority, coalesce(p_run_at, now()), p_max_attempts, u.k, u.d,
               CASE WHEN u.d IS NULL THEN NULL ELSE p_dedupe_while END, u.d IS NOT NULL,
               coalesce(v_blocked[u.ord], false), p_trace
          FROM unnest(v_keys, v_dedupes) WITH ORDINALITY AS u(k, d, ord)
         ORDER BY u.ord
            ON CONFLICT DO NOTHING
        RETURNING r.id, r.dedupe_key
    ),
    apart AS (  -- the inserted records' payloads (a deduplicated input inserted none): a join, linear in n
        INSERT INTO {schema}.processing_payload (id, payload)
        SELECT u.id, u.p FROM unnest(v_ids, p_payloads) AS u(id, p) JOIN ins ON ins.id = u.id
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
