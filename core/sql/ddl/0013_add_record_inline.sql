-- Migration 0013: dp_add_record inserts the common record itself (no ordering key, no dedupe key, not a shard,
-- no queue limit): one INSERT ... VALUES, the announcement when needed and the NOTIFY, with the semantics of
-- dp_add_records, which it still calls for everything else. Same signature: callers are unchanged.
-- {schema} is the quoted schema name, {schema_literal} the schema name as a string literal (NOTIFY channels).

-- One record, for any language, a psql session or a trigger on an application table, in the caller's
-- transaction: the semantics of add_records (key order and its producer lock, dedupe returning the existing
-- record's id, the queue's limit, NOTIFY at the commit). A full queue raises SQLSTATE DP001, a key that another
-- shard owns DP002; a payload that is not a JSON object 22023. max_attempts NULL: the column's default.
CREATE OR REPLACE FUNCTION {schema}.dp_add_record(
    payload jsonb, queue text DEFAULT 'default', priority integer DEFAULT 0, run_at timestamptz DEFAULT now(),
    ordering_key text DEFAULT NULL, dedupe_key text DEFAULT NULL, max_attempts integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
#variable_conflict use_variable
DECLARE
    r record;
    v_id bigint;
    v_limit integer;
BEGIN
    IF payload IS NULL OR jsonb_typeof(payload) <> 'object' THEN
        RAISE EXCEPTION 'dp_add_record: payload must be a JSON object, got %', coalesce(jsonb_typeof(payload), 'NULL')
              USING ERRCODE = '22023';
    END IF;
    IF queue IS NULL OR priority IS NULL OR run_at IS NULL THEN
        RAISE EXCEPTION 'dp_add_record: queue, priority and run_at must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF max_attempts IS NOT NULL AND max_attempts < 1 THEN
        RAISE EXCEPTION 'dp_add_record: max_attempts must be >= 1, got %', max_attempts USING ERRCODE = '22023';
    END IF;
    -- The common case inline: a record with neither key, on a database that is not a shard, for a queue with no
    -- limit (what dp_add_records does for it, without its arrays, its CTE and a second function call).
    IF ordering_key IS NULL AND dedupe_key IS NULL AND NOT EXISTS (SELECT 1 FROM {schema}.shard_identity) THEN
        SELECT l.max_pending INTO v_limit FROM {schema}.queue_limits l WHERE l.queue = queue FOR UPDATE;
        IF v_limit IS NULL THEN
            INSERT INTO {schema}.processing_queue AS q (queue, payload, priority, run_at, max_attempts)
            VALUES (queue, payload, priority, run_at, coalesce(max_attempts, 5))
            RETURNING q.id INTO v_id;
            -- dp_add_records' announcement rule (a caller's transaction may go on after this statement)
            IF priority <> 0 OR (run_at <> now() AND run_at < clock_timestamp() + interval '2 seconds')
               OR statement_timestamp() > now() OR clock_timestamp() - now() > interval '0.25 seconds' THEN
                PERFORM {schema}.dp_announce(queue, priority, CASE WHEN run_at = now() THEN NULL ELSE run_at END);
            END IF;
            PERFORM pg_notify({schema}.dp_channel(queue), queue);
            RETURN v_id;
        END IF;
    END IF;
    SELECT * INTO r
      FROM {schema}.dp_add_records(queue, ARRAY[payload], priority,
                                   CASE WHEN run_at = now() THEN NULL ELSE run_at END, coalesce(max_attempts, 5),
                                   CASE WHEN ordering_key IS NOT NULL THEN ARRAY[ordering_key] END,
                                   CASE WHEN dedupe_key IS NOT NULL THEN ARRAY[dedupe_key] END);
    IF r.status = 'full' THEN
        RAISE EXCEPTION 'queue % is full: limit % pending, depth %; the record was not added',
              quote_literal(queue), r.queue_limit, r.depth
              USING ERRCODE = 'DP001', HINT = 'raise the limit (set_queue_limit) or let the queue drain';
    ELSIF r.status <> 'ok' THEN
        RAISE EXCEPTION '%', CASE r.status
                WHEN 'elsewhere' THEN format('key %L belongs to shard %s: add it there', coalesce(ordering_key, dedupe_key), r.owner)
                WHEN 'moving' THEN format('key %L is moving between shards: try again shortly', coalesce(ordering_key, dedupe_key))
                WHEN 'retiring' THEN 'this shard is retiring: it takes no new records without a key'
                ELSE 'this database is not the shard the record belongs to' END
              USING ERRCODE = 'DP002';
    END IF;
    RETURN r.ids[1];
END
$fn$;
