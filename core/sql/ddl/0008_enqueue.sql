-- Migration 0008: adding records as SQL functions of the processor's schema, so that one round trip adds a
-- batch from any connection (the processor's pool, an application's transaction, a psql session, a trigger).
-- {schema} is the quoted schema name, {schema_literal} the schema name as a string literal (NOTIFY channels).
--
-- Every statement of a VOLATILE PL/pgSQL function takes a new snapshot under READ COMMITTED, so a lock
-- taken by one statement is followed by reads that see what the previous holder committed: key heads after
-- the ordering-key locks, the queue's depth after its limit row's lock. That is why one function can do what
-- took several statements from the client before.

-- A routing key's partition (0..63): byte 7 of its SHA-256, as core.sharding.partition_of computes it.
CREATE OR REPLACE FUNCTION {schema}.dp_partition_of(k text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    SELECT get_byte(sha256(convert_to(k, 'UTF8')), 7) & 63
$fn$;

-- A queue's NOTIFY channel, as core.queries.channel_for names it (an identifier of at most 63 bytes).
CREATE OR REPLACE FUNCTION {schema}.dp_channel(q text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    SELECT CASE WHEN octet_length('dproc:' || {schema_literal} || ':' || q) <= 63
                THEN 'dproc:' || {schema_literal} || ':' || q
                ELSE 'dproc:' || left(encode(sha256(convert_to({schema_literal} || ':' || q, 'UTF8')), 'hex'), 40)
           END
$fn$;

-- At the commit of a transaction that wrote one (an application's, or one of our COPY batches), a floor event
-- is dated again: claimers read the events of the last few seconds, and the records it announces become
-- visible only then. An event naming an ordering key is a key check: an application's transaction inserted
-- records of that key blocked, and the claims that ran while it was open could not see them to make the next
-- one claimable; if the key's earliest pending record is blocked now, it is made claimable here and the
-- event announces it (else the event goes). A record a claim holds is passed over: a commit never waits.
CREATE OR REPLACE FUNCTION {schema}.dp_floor_event_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    h record;
BEGIN
    IF NEW.ordering_key IS NULL THEN
        UPDATE {schema}.claim_floor_events SET created_at = clock_timestamp(), at_commit = false WHERE id = NEW.id;
        RETURN NULL;
    END IF;
    UPDATE {schema}.processing_queue b SET key_blocked = false
     WHERE b.id = (SELECT n.id FROM {schema}.processing_queue n
                    WHERE n.ordering_key = NEW.ordering_key AND n.status = 'pending'
                    ORDER BY n.ordering_key, n.status, n.id
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED)
       AND b.key_blocked
    RETURNING b.queue, - b.priority::bigint AS np, b.run_at, b.id INTO h;
    IF FOUND THEN
        UPDATE {schema}.claim_floor_events
           SET queue = h.queue, np = h.np, run_at = h.run_at, record_id = h.id, created_at = clock_timestamp(),
               at_commit = false
         WHERE id = NEW.id;
    ELSE
        DELETE FROM {schema}.claim_floor_events WHERE id = NEW.id;
    END IF;
    RETURN NULL;
END
$fn$;

-- The key checks of a batch inserted in an application's transaction (see dp_floor_event_at_commit): one per
-- key with a record inserted blocked, once per transaction.
CREATE OR REPLACE FUNCTION {schema}.dp_key_checks(p_queue text, p_keys text[], p_blocked boolean[])
RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    k text;
BEGIN
    FOR k IN SELECT DISTINCT u.k FROM unnest(p_keys, p_blocked) AS u(k, b) WHERE u.b ORDER BY 1 LOOP
        CONTINUE WHEN nullif(current_setting('dp.key_' || md5(k), true), '') IS NOT NULL;
        INSERT INTO {schema}.claim_floor_events (queue, np, run_at, record_id, at_commit, ordering_key)
        VALUES (p_queue, 0, now(), 0, true, k);
        PERFORM set_config('dp.key_' || md5(k), 'y', true);
    END LOOP;
END
$fn$;

DROP TRIGGER IF EXISTS dp_floor_event_at_commit ON {schema}.claim_floor_events;
CREATE CONSTRAINT TRIGGER dp_floor_event_at_commit AFTER INSERT ON {schema}.claim_floor_events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.at_commit)
    EXECUTE FUNCTION {schema}.dp_floor_event_at_commit();

-- Before a batch is inserted: on a shard, the batch must be this shard's (its routing keys' partitions mapped
-- here, locked against a move until the commit; a retiring shard takes no keyless records); the producers'
-- locks (dedupe keys, then ordering keys, each in sorted order: id order is commit order within a key); which
-- keyed records go in blocked (behind an earlier pending record of their key, unless that one is claimable,
-- reached by claims first, and p_key_gap ids or more earlier: core.enqueue.KEY_GAP); and the queue's limit,
-- its row locked so that producers of a limited queue take turns.
-- status: 'ok', or why not: 'rerouted' (not the expected shard), 'elsewhere' (a key is shard owner's),
-- 'moving' (a key's partition is moving), 'retiring' (keyless records refused).
CREATE OR REPLACE FUNCTION {schema}.dp_enqueue_prepare(
    p_queue text, p_priority integer, p_run_at timestamptz, p_keys text[], p_dedupes text[],
    p_expect_shard integer DEFAULT NULL, p_key_gap integer DEFAULT 1000, p_own boolean DEFAULT false,
    p_route boolean DEFAULT true,
    OUT status text, OUT owner integer, OUT blocked boolean[], OUT queue_limit integer)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_shard integer;
    v_accepting boolean;
    v_parts integer[];
    v_moving boolean;
    v_keys text[];
BEGIN
    status := 'ok';
    SELECT i.shard_no, i.accepting INTO v_shard, v_accepting FROM {schema}.shard_identity i FOR SHARE;
    IF FOUND THEN
        IF p_expect_shard IS NOT NULL AND v_shard <> p_expect_shard THEN
            status := 'rerouted';
            RETURN;
        END IF;
        -- (p_route false: a schedule's records live on its shard, whatever their tick's dedupe key routes to)
        v_parts := ARRAY(SELECT DISTINCT {schema}.dp_partition_of(coalesce(u.k, u.d))
                           FROM unnest(p_keys, p_dedupes) AS u(k, d)
                          WHERE coalesce(u.k, u.d) IS NOT NULL AND p_route ORDER BY 1);
        IF cardinality(v_parts) > 0 THEN
            PERFORM 1 FROM {schema}.shard_map m WHERE m.partition = ANY(v_parts) ORDER BY m.partition FOR SHARE;
            SELECT m.shard_no, coalesce(m.moving, false) INTO owner, v_moving
              FROM unnest(v_parts) AS p(p)
              LEFT JOIN {schema}.shard_map m ON m.partition = p.p
             WHERE m.partition IS NULL OR m.shard_no <> v_shard OR m.moving
             ORDER BY p.p LIMIT 1;
            IF FOUND THEN
                status := CASE WHEN v_moving THEN 'moving' WHEN owner IS NULL THEN 'rerouted' ELSE 'elsewhere' END;
                RETURN;
            END IF;
        END IF;
        IF NOT v_accepting AND EXISTS (SELECT 1 FROM unnest(p_keys, p_dedupes) AS u(k, d)
                                        WHERE coalesce(u.k, u.d) IS NULL) THEN
            status := 'retiring';
            owner := v_shard;
            RETURN;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock(7118, hashtext(p_queue || chr(31) || s.k))
       FROM (SELECT DISTINCT u.k FROM unnest(p_dedupes) AS u(k) WHERE u.k IS NOT NULL ORDER BY u.k) s;
    v_keys := ARRAY(SELECT DISTINCT u.k FROM unnest(p_keys) AS u(k) WHERE u.k IS NOT NULL ORDER BY u.k);
    IF cardinality(v_keys) > 0 THEN
        PERFORM pg_advisory_xact_lock(7117, hashtext(s.k)) FROM unnest(v_keys) AS s(k);
        IF p_own THEN
            -- Our own short transaction: the head of each key is locked FOR SHARE so that a claim of it in
            -- progress finishes first (the heads are then read after its commit). An application's
            -- transaction holds no such lock for its whole length (claims unblocking those heads would wait
            -- for it, and deadlock with it): its blocked records get a key check at its commit instead.
            PERFORM 1 FROM unnest(v_keys) AS u(k)
              CROSS JOIN LATERAL (
                    SELECT r.id FROM {schema}.processing_queue r
                     WHERE r.ordering_key = u.k AND r.status = 'pending'
                     ORDER BY r.ordering_key, r.status, r.id
                     LIMIT 1
                       FOR SHARE) h;
        END IF;
        -- A new snapshot: the previous holders' records are visible.
        WITH heads AS (
            SELECT u.k, h.id IS NOT NULL AS has, CASE WHEN t.follows THEN t.id END AS last_id
              FROM unnest(v_keys) AS u(k)
              LEFT JOIN LATERAL (
                    SELECT r.id FROM {schema}.processing_queue r
                     WHERE r.ordering_key = u.k AND r.status = 'pending'
                     ORDER BY r.ordering_key, r.status, r.id
                     LIMIT 1) h ON true
              LEFT JOIN LATERAL (
                    SELECT l.id, NOT l.key_blocked AND l.queue = p_queue AND l.priority >= p_priority
                                 AND l.run_at <= coalesce(p_run_at, now()) AS follows
                      FROM {schema}.processing_queue l
                     WHERE l.ordering_key = u.k AND l.status = 'pending'
                     ORDER BY l.ordering_key DESC, l.status DESC, l.id DESC
                     LIMIT 1) t ON true
        ),
        -- a lower bound of the batch's first id: the gaps it gives are never larger than the real ones
        first_id AS (SELECT coalesce(max(m.id), 0) + 1 AS id FROM {schema}.processing_queue m),
        batch AS (
            SELECT u.k, u.ord, f.id + u.ord - 1 AS rid,
                   lag(f.id + u.ord - 1) OVER (PARTITION BY u.k ORDER BY u.ord) AS prev
              FROM unnest(p_keys) WITH ORDINALITY AS u(k, ord) CROSS JOIN first_id f
        ),
        cond AS (
            SELECT b.k, b.ord,
                   CASE WHEN b.k IS NULL THEN false
                        WHEN b.prev IS NOT NULL THEN b.rid - b.prev < p_key_gap
                        ELSE coalesce(h.has AND (h.last_id IS NULL OR b.rid - h.last_id < p_key_gap), false)
                   END AS c
              FROM batch b LEFT JOIN heads h ON h.k = b.k
        )
        -- a record blocked makes every later record of its key blocked
        SELECT array_agg(w.b ORDER BY w.ord) INTO blocked
          FROM (SELECT c.ord, bool_or(c.c) OVER (PARTITION BY c.k ORDER BY c.ord ROWS UNBOUNDED PRECEDING) AS b
                  FROM cond c) w;
    END IF;
    SELECT l.max_pending INTO queue_limit FROM {schema}.queue_limits l WHERE l.queue = p_queue FOR UPDATE;
END
$fn$;

-- Records that claims may have passed are announced to the claimers whose floors may be above them
-- (core/floors.py), when they need it: a priority (another class of the claim order), an explicit run_at that is
-- due, a statement longer than 0.25 s, or a transaction that goes on after this statement (an application's):
-- records become visible at the commit, maybe long after their run_at. The position announced is the first of
-- the class, (-priority, run_at, id 0): every record of the class in this transaction is at it or after it, so
-- a floor lowered to it finds them all. Once per transaction and position (a setting local to the transaction,
-- no write), so a trigger adding a record per row announces once. The event is dated at the commit
-- (dp_floor_event_at_commit).
CREATE OR REPLACE FUNCTION {schema}.dp_announce(p_queue text, p_priority integer, p_run_at timestamptz)
RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    v_guc text := 'dp.floor_' || md5(p_queue);
    v_seen text := nullif(current_setting(v_guc, true), '');
    v_np bigint := - p_priority::bigint;
    v_at timestamptz := coalesce(p_run_at, now());
    v_us bigint := (extract(epoch FROM coalesce(p_run_at, now())) * 1000000)::bigint;
BEGIN
    IF v_seen IS NOT NULL AND (v_np, v_us) >= (split_part(v_seen, '|', 1)::bigint, split_part(v_seen, '|', 2)::bigint)
    THEN
        RETURN;  -- a position at or before this one was announced by this transaction
    END IF;
    INSERT INTO {schema}.claim_floor_events (queue, np, run_at, record_id, at_commit)
    VALUES (p_queue, v_np, v_at, 0, true);
    PERFORM set_config(v_guc, v_np || '|' || v_us, true);
END
$fn$;

-- After a batch was inserted (p_ids, ascending): the queue's limit (a new snapshot: every producer before us
-- committed; over it, status 'full' and, with p_undo, the batch deleted again: nothing of it is left, and no
-- error aborts the caller's transaction), the announcement (dp_announce), and the NOTIFY, which the server
-- delivers at the commit.
CREATE OR REPLACE FUNCTION {schema}.dp_enqueue_finish(
    p_queue text, p_priority integer, p_run_at timestamptz, p_ids bigint[], p_limit integer, p_notify boolean,
    p_undo boolean, OUT status text, OUT depth integer)
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
       OR statement_timestamp() > now() OR clock_timestamp() - now() > interval '0.25 seconds' THEN
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
                                                    dedupe_key, dedupe_while, dedupe_held, key_blocked)
        SELECT p_queue, u.p, p_priority, coalesce(p_run_at, now()), p_max_attempts, u.k, u.d,
               CASE WHEN u.d IS NULL THEN NULL ELSE p_dedupe_while END, u.d IS NOT NULL,
               coalesce(v_blocked[u.ord], false)
          FROM unnest(p_payloads, v_keys, v_dedupes) WITH ORDINALITY AS u(p, k, d, ord)
         ORDER BY u.ord
            ON CONFLICT DO NOTHING
        RETURNING r.id, r.dedupe_key
    )
    SELECT coalesce(array_agg(ins.id ORDER BY ins.id), '{}'), coalesce(array_agg(ins.dedupe_key ORDER BY ins.id), '{}')
      INTO v_new, v_new_keys FROM ins;
    IF v_limit IS NOT NULL THEN
        SELECT f.status, f.depth INTO status, v_depth
          FROM {schema}.dp_enqueue_finish(p_queue, p_priority, p_run_at, v_new, v_limit, p_notify, true) f;
    ELSIF cardinality(v_new) > 0 THEN  -- dp_enqueue_finish without a limit, inline: one call less
        IF p_priority <> 0 OR (p_run_at IS NOT NULL AND p_run_at < clock_timestamp() + interval '2 seconds')
           OR statement_timestamp() > now() OR clock_timestamp() - now() > interval '0.25 seconds' THEN
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
