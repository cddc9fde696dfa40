-- Migration 0009: queue control. {schema} is the quoted schema name.

-- A start of a record of ordering key k, charged to the key's token bucket (its rate from key_rates: the exact
-- key, else the longest matching pattern). Called by the claim statement for a candidate that passed every
-- other test, so a token is spent only on a record about to start. True: start it (or no rate applies).
-- A bucket another claim is charging right now is passed over (SKIP LOCKED: a claim never waits on one).
-- When it says no, the seconds until the bucket's next token go into the transaction's setting
-- dp.rate_wait (the smallest of the statement's), which the claim returns so an idle claimer sleeps that long.
CREATE OR REPLACE FUNCTION {schema}.dp_key_token(k text) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    cfg record;
    bucket record;
    available float8;
    wait float8;
    at timestamptz;
BEGIN
    SELECT r.n, r.per INTO cfg
      FROM {schema}.key_rates r
     WHERE k LIKE r.like_pattern
     ORDER BY r.is_exact DESC, length(r.pattern) DESC
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN true;
    END IF;
    INSERT INTO {schema}.key_buckets (ordering_key, tokens, updated_at)
    VALUES (k, cfg.n, clock_timestamp())
    ON CONFLICT (ordering_key) DO NOTHING;
    SELECT b.tokens, b.updated_at INTO bucket
      FROM {schema}.key_buckets b WHERE b.ordering_key = k
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    at := greatest(clock_timestamp(), bucket.updated_at);  -- one instant for the refill and the bucket's date
    available := least(cfg.n::float8, bucket.tokens + extract(epoch FROM at - bucket.updated_at) * cfg.n / cfg.per);
    IF available < 1 THEN
        wait := (1 - available) * cfg.per / cfg.n;
        PERFORM set_config('dp.rate_wait', least(wait, coalesce(nullif(current_setting('dp.rate_wait', true),
                                                                         '')::float8, wait))::text, true);
        RETURN false;
    END IF;
    UPDATE {schema}.key_buckets SET tokens = available - 1, updated_at = at WHERE ordering_key = k;
    RETURN true;
END
$fn$;

-- One tick of a schedule, once: moves next_fire on from the value the caller read (p_expected), and only the
-- caller whose compare and swap succeeds adds the tick's records, in the same statement: one record per tick
-- in p_ticks (none: a tick skipped by the misfire policy), each with run_at its tick and the dedupe key
-- schedule:<name>:<tick>, unless the overlap policy skip_if_running finds the previous one still pending or
-- processing. fired false: another instance fired it (or the schedule changed meanwhile).
CREATE OR REPLACE FUNCTION {schema}.dp_fire_schedule(
    p_name text, p_expected timestamptz, p_next timestamptz, p_ticks timestamptz[], p_notify boolean DEFAULT true,
    OUT fired boolean, OUT ids bigint[], OUT skipped text)
LANGUAGE plpgsql AS $fn$
DECLARE
    s record;
    tick timestamptz;
    added record;
BEGIN
    ids := '{}';
    UPDATE {schema}.schedules sc SET next_fire = p_next, updated_at = now()
     WHERE sc.name = p_name AND sc.next_fire = p_expected
    RETURNING sc.* INTO s;
    IF NOT FOUND THEN
        fired := false;
        RETURN;
    END IF;
    fired := true;
    IF coalesce(cardinality(p_ticks), 0) = 0 THEN
        skipped := 'misfire';
        RETURN;
    END IF;
    IF s.overlap = 'skip_if_running' AND s.last_record_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM {schema}.processing_queue r
             WHERE r.id = s.last_record_id AND r.status IN ('pending', 'processing')) THEN
        skipped := 'running';
        RETURN;
    END IF;
    FOREACH tick IN ARRAY p_ticks LOOP
        SELECT a.status, a.ids INTO added
          FROM {schema}.dp_add_records(
                   s.queue, ARRAY[s.payload], coalesce((s.options->>'priority')::int, 0), tick,
                   coalesce((s.options->>'max_attempts')::int, 5),
                   CASE WHEN s.options ? 'ordering_key' THEN ARRAY[s.options->>'ordering_key'] END,
                   ARRAY['schedule:' || s.name || ':' || to_char(tick AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')],
                   'pending', p_notify, NULL, 1000, true, false) a;
        IF added.status = 'ok' THEN
            ids := ids || added.ids;
        ELSE
            skipped := added.status;  -- a full queue: the tick is counted fired, its record not added
        END IF;
    END LOOP;
    IF cardinality(ids) > 0 THEN
        UPDATE {schema}.schedules sc
           SET last_fire = p_ticks[cardinality(p_ticks)], last_record_id = ids[cardinality(ids)],
               fired = sc.fired + cardinality(ids)
         WHERE sc.name = p_name;
    END IF;
END
$fn$;
