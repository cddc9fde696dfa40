-- Migration 0015: a record added alone in an application's transaction is announced to the claimers at the
-- commit, and only if the transaction turned out long. An announcement (a floor event, core/floors.py) is for a
-- record that becomes visible long after its position in claim order; a record with priority 0 and run_at now()
-- sits at its transaction's start, and claim floors never pass positions younger than FLOOR_LAG, so only a
-- transaction that commits later than ANNOUNCE_AFTER after its start needs one. Until now the insert could not
-- know how long its transaction would go on and wrote the event (then dated it again at the commit) every time:
-- two writes beside the record's one. Now the first such insert of a transaction, per queue, queues a deferred
-- trigger event (no write): at the commit it writes the event if the transaction lasted longer than that.
-- dp_add_one is the single keyless record of add_records (an application's connection or the pool), returning
-- a status as dp_add_records does; dp_add_record's inline insert takes the same rule. Batches are unchanged.
-- dp_channel becomes inlinable.
-- {schema} is the quoted schema name, {schema_literal} the schema name as a string literal (NOTIFY channels).

-- A queue's NOTIFY channel (as 0008 names it), declared so that the planner inlines it into every enqueue
-- function's pg_notify: STABLE (its convert_to is: an IMMUTABLE SQL function whose body is not is never
-- inlined) and not STRICT (a STRICT one is inlined only when its body provably is; a NULL queue still gives
-- NULL). Called as a function it ran its own executor for every record: about 7 % of dp_add_record's time.
CREATE OR REPLACE FUNCTION {schema}.dp_channel(q text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN octet_length('dproc:' || {schema_literal} || ':' || q) <= 63
                THEN 'dproc:' || {schema_literal} || ':' || q
                ELSE 'dproc:' || left(encode(sha256(convert_to({schema_literal} || ':' || q, 'UTF8')), 'hex'), 40)
           END
$fn$;

-- At the commit of a transaction that added a record (priority 0, run_at now()) while it was short: the event
-- it would have written, if the transaction lasted longer than ANNOUNCE_AFTER (core/floors.py), dated now.
CREATE OR REPLACE FUNCTION {schema}.dp_announce_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF clock_timestamp() - now() > interval '0.25 seconds' THEN
        INSERT INTO {schema}.claim_floor_events (queue, np, run_at, record_id) VALUES (NEW.queue, 0, now(), 0);
    END IF;
    RETURN NULL;
END
$fn$;

-- Queued only for the rows inserted while the transaction-local setting is on: one insert of the functions
-- below, per queue and transaction. Every other insert evaluates the condition and queues nothing.
DROP TRIGGER IF EXISTS dp_announce_at_commit ON {schema}.processing_queue;
CREATE CONSTRAINT TRIGGER dp_announce_at_commit AFTER INSERT ON {schema}.processing_queue
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('dp.announce_at_commit', true) = 'on')
    EXECUTE FUNCTION {schema}.dp_announce_at_commit();

-- One record with no ordering key and no dedupe key (add_records' commonest call): the queue's limit (its row
-- locked, so that producers of a limited queue take turns; over it, status 'full' and nothing written), the
-- insert, the announcement (p_own: our own one-statement transaction, committed right after) and the NOTIFY.
-- On a shard, status 'general': the caller goes through dp_add_records, which guards a shard's records.
CREATE OR REPLACE FUNCTION {schema}.dp_add_one(
    p_queue text, p_payload jsonb, p_priority integer, p_run_at timestamptz, p_max_attempts integer,
    p_notify boolean, p_own boolean, p_trace text,
    OUT status text, OUT id bigint, OUT queue_limit integer, OUT depth integer)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_shard boolean;
    v_marker text;
    v_defer boolean := false;
BEGIN
    status := 'ok';
    -- One probe for both (a queue without a limit takes no lock; one with a limit is read again, locked)
    SELECT EXISTS (SELECT 1 FROM {schema}.shard_identity),
           (SELECT l.max_pending FROM {schema}.queue_limits l WHERE l.queue = p_queue)
      INTO v_shard, queue_limit;
    IF v_shard THEN
        status := 'general';
        RETURN;
    END IF;
    IF queue_limit IS NOT NULL THEN
        SELECT l.max_pending INTO queue_limit FROM {schema}.queue_limits l WHERE l.queue = p_queue FOR UPDATE;
    END IF;
    IF queue_limit IS NOT NULL THEN
        -- a new snapshot: every producer that held the limit's row before us has committed
        SELECT count(*) INTO depth FROM (
            SELECT 1 FROM {schema}.processing_queue r
             WHERE r.queue = p_queue AND r.status = 'pending' LIMIT queue_limit + 1) d;
        IF depth >= queue_limit THEN
            status := 'full';
            RETURN;
        END IF;
    END IF;
    IF NOT p_own AND p_priority = 0 AND p_run_at IS NULL AND clock_timestamp() - now() <= interval '0.25 seconds' THEN
        v_marker := 'dp.commit_' || md5(p_queue);
        v_defer := nullif(current_setting(v_marker, true), '') IS NULL;  -- not yet queued in this transaction
    END IF;
    IF v_defer THEN
        PERFORM set_config('dp.announce_at_commit', 'on', true);
    END IF;
    INSERT INTO {schema}.processing_queue AS q (queue, payload, priority, run_at, max_attempts, trace_context)
    VALUES (p_queue, p_payload, p_priority, coalesce(p_run_at, now()), p_max_attempts, p_trace)
    RETURNING q.id INTO id;
    IF v_defer THEN
        PERFORM set_config('dp.announce_at_commit', '', true), set_config(v_marker, 'y', true);
    ELSIF v_marker IS NULL AND (
          p_priority <> 0 OR (p_run_at IS NOT NULL AND p_run_at < clock_timestamp() + interval '2 seconds')
          OR (NOT p_own AND statement_timestamp() > now()) OR clock_timestamp() - now() > interval '0.25 seconds') THEN
        PERFORM {schema}.dp_announce(p_queue, p_priority, p_run_at);
    END IF;
    IF p_notify THEN
        PERFORM pg_notify({schema}.dp_channel(p_queue), p_queue);
    END IF;
END
$fn$;

-- dp_add_record as migration 0013 left it, its inline insert announcing by the rule of dp_add_one above (it
-- cannot know whether its transaction goes on, so it is never "own").
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
    v_shard boolean;
    v_marker text;
    v_defer boolean := false;
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
    IF ordering_key IS NULL AND dedupe_key IS NULL THEN
        -- one probe for both (a queue with a limit goes through dp_add_records, which locks the limit's row)
        SELECT EXISTS (SELECT 1 FROM {schema}.shard_identity),
               (SELECT l.max_pending FROM {schema}.queue_limits l WHERE l.queue = queue)
          INTO v_shard, v_limit;
        IF NOT v_shard AND v_limit IS NULL THEN
            IF priority = 0 AND run_at = now() AND clock_timestamp() - now() <= interval '0.25 seconds' THEN
                v_marker := 'dp.commit_' || md5(queue);
                v_defer := nullif(current_setting(v_marker, true), '') IS NULL;
            END IF;
            IF v_defer THEN
                PERFORM set_config('dp.announce_at_commit', 'on', true);
            END IF;
            INSERT INTO {schema}.processing_queue AS q (queue, payload, priority, run_at, max_attempts)
            VALUES (queue, payload, priority, run_at, coalesce(max_attempts, 5))
            RETURNING q.id INTO v_id;
            IF v_defer THEN
                PERFORM set_config('dp.announce_at_commit', '', true), set_config(v_marker, 'y', true);
            ELSIF v_marker IS NULL AND (
                  priority <> 0 OR (run_at <> now() AND run_at < clock_timestamp() + interval '2 seconds')
                  OR statement_timestamp() > now() OR clock_timestamp() - now() > interval '0.25 seconds') THEN
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
