-- Queue control: pause and resume, rate limits (migration 0009). The claim statement reads them itself.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: pause_queue
-- Paused from the first pause on (a second one keeps that time and takes the new until and reason).
INSERT INTO {queue_state} AS s (queue, paused_at, resume_at, reason, updated_at)
VALUES (%(queue)s, now(), %(until)s, %(reason)s, now())
ON CONFLICT (queue) DO UPDATE
   SET paused_at = CASE WHEN s.paused_at IS NOT NULL AND (s.resume_at IS NULL OR s.resume_at > now())
                        THEN s.paused_at ELSE now() END,
       resume_at = EXCLUDED.resume_at, reason = EXCLUDED.reason, updated_at = now()
RETURNING paused_at;

-- name: resume_queue
-- Resumed; the idle workers of the queue are woken at once (the NOTIFY goes at the commit).
WITH resumed AS (
    UPDATE {queue_state} SET paused_at = NULL, resume_at = NULL, reason = NULL, updated_at = now()
     WHERE queue = %(queue)s AND paused_at IS NOT NULL
    RETURNING queue
)
SELECT count(*), count(pg_notify(%(channel)s, %(queue)s)) FROM resumed;

-- name: paused_queues
-- Queues paused now (one that resumed by itself, its until passed, is not).
SELECT queue, paused_at, resume_at, reason FROM {queue_state}
 WHERE paused_at IS NOT NULL AND (resume_at IS NULL OR resume_at > now())
 ORDER BY queue;

-- name: set_queue_rate
-- The bucket striped over %(slots)s rows of n / slots (core/schema.py: queue_rates): a new rate starts full;
-- a changed one keeps each slot's tokens left (at most its new burst). Slots beyond the new count go.
WITH put AS (
    INSERT INTO {queue_rates} AS r (queue, slot, n, per, tokens, updated_at)
    SELECT %(queue)s, s, %(n)s::float8 / %(slots)s, %(per)s, %(n)s::float8 / %(slots)s, clock_timestamp()
      FROM generate_series(0, %(slots)s - 1) s
    ON CONFLICT (queue, slot) DO UPDATE
       SET n = EXCLUDED.n, per = EXCLUDED.per, tokens = least(r.tokens, EXCLUDED.n)
    RETURNING slot
)
DELETE FROM {queue_rates} WHERE queue = %(queue)s AND slot >= %(slots)s AND (SELECT count(*) FROM put) > 0;

-- name: delete_queue_rate
DELETE FROM {queue_rates} WHERE queue = %(queue)s;

-- name: set_key_rate
INSERT INTO {key_rates} (pattern, like_pattern, is_exact, n, per, updated_at)
VALUES (%(pattern)s, %(like_pattern)s, %(is_exact)s, %(n)s, %(per)s, now())
ON CONFLICT (pattern) DO UPDATE
   SET like_pattern = EXCLUDED.like_pattern, is_exact = EXCLUDED.is_exact, n = EXCLUDED.n, per = EXCLUDED.per,
       updated_at = now();

-- name: delete_key_rate
-- The buckets of the keys it limited go with it (a rate set again starts them full).
WITH gone AS (DELETE FROM {key_rates} WHERE pattern = %(pattern)s RETURNING like_pattern)
DELETE FROM {key_buckets} b USING gone WHERE b.ordering_key LIKE gone.like_pattern;

-- name: rates
SELECT 'queue', queue, sum(n), min(per) FROM {queue_rates} GROUP BY queue
UNION ALL
SELECT 'key', pattern, n, per FROM {key_rates}
 ORDER BY 1, 2;

-- name: prune_key_buckets
-- Buckets idle longer than the longest rate's period are full again: they go (the next use starts one full).
DELETE FROM {key_buckets}
 WHERE updated_at < now() - coalesce((SELECT max(per) FROM {key_rates}), 0) * interval '1 second';

-- name: end_expired_pauses
-- A pause whose until has passed is over already (the claims read resume_at); written as resumed, it no longer
-- counts in queue_controls, and the claims go back to the lean statement (core/sql/claimlean.sql).
UPDATE {queue_state} SET paused_at = NULL, resume_at = NULL, reason = NULL, updated_at = now()
 WHERE paused_at IS NOT NULL AND resume_at <= now();
