-- Every statement the processor runs, as named blocks ("-- name: <name>").
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled.

-- name: claim
-- One round trip completes the caller's finished records (if any) and claims up to %(batch)s more: one
-- commit per batch instead of two (with batch 0 it is the plain completion of mark_completed).
-- The completion is fenced: only the claim whose token is still on the row may complete it, each id paired
-- with its own token (tokens are per claim statement, so ANY(tokens) alone could pair a stale record with a
-- later claim's token). A flagged cancel wins over completion.
-- The claim reads each queue by its own index scan in claim order, locked with SKIP LOCKED; only the
-- k*batch candidates are sorted, never the backlog. A keyed record qualifies only when no earlier record of
-- its key is pending, fewer than its key's limit are in flight, and (when the key blocks on failure) no
-- earlier record of it failed.
WITH done AS (
    UPDATE {records} d
       SET status = CASE WHEN d.cancel_requested THEN 'cancelled' ELSE 'completed' END,
           finished_at = now(),
           updated_at = now(),
           lease_expires_at = NULL,
           dedupe_held = false
     -- An id list, not a join: a join's order comes from statistics, and one planned while the table was
     -- empty (a worker started before the first record; plans are cached per connection) walked the whole
     -- primary key on every statement. The ids come sorted, so width_bucket (a binary search) finds each
     -- row's own token: the pairing is exact, and rechecked on a row updated since our snapshot.
     WHERE d.id = ANY(%(done_ids)s::bigint[])
       AND d.lease_token = (%(done_tokens)s::uuid[])[width_bucket(d.id, %(done_ids)s::bigint[])]
       AND d.status = 'processing'
    RETURNING d.ordering_key
),
-- Keys whose earliest pending record must become claimable (the keys of records claimed by the caller's
-- previous statement: this statement's snapshot sees every insert committed since).
unblocked AS (
    -- Driven by the keys (a key-index lookup per head, then the heads by primary key), never a join the
    -- statistics could turn into a scan of the table for blocked rows.
    -- Only blocked heads reach the update (most are not: see KEY_GAP): no second lookup of the others.
    UPDATE {records} b
       SET key_blocked = false
     WHERE b.id = ANY(ARRAY(
               SELECT h.id
                 FROM unnest(%(unblock_keys)s::text[]) AS u(k)
                CROSS JOIN LATERAL (
                    SELECT n.id, n.key_blocked FROM {records} n
                     WHERE n.ordering_key = u.k AND n.status = 'pending'
                     ORDER BY n.ordering_key, n.status, n.id LIMIT 1) h
                WHERE h.key_blocked))
       AND b.key_blocked
    RETURNING 1
),
-- A keyed completion may free its key's next record: wake the idle workers of those queues.
notified AS (
    SELECT pg_notify(w.channel, w.queue)
      FROM unnest(%(channels)s::text[], %(nqueues)s::text[]) AS w(channel, queue)
     WHERE EXISTS (SELECT 1 FROM done WHERE done.ordering_key IS NOT NULL)
),
picked AS (
    SELECT c.id
      FROM unnest(%(queues)s::text[]) AS qn(name)
     CROSS JOIN LATERAL (
        SELECT l.id, l.priority, l.run_at
          -- Lock first, then test the key: a row another claim holds or has just taken is skipped by its
          -- lock alone, before the per-key probes (index lookups) run on it. Rows are locked as the LIMIT
          -- pulls them, so the scan stops at the batch; an ineligible row stays locked until our commit.
          FROM (SELECT r.id, r.priority, r.run_at, r.ordering_key
                  FROM {records} r
                 WHERE r.queue = qn.name
                   AND r.status = 'pending'
                   AND NOT r.key_blocked
                   AND r.run_at <= now()
                 ORDER BY r.priority DESC, r.run_at, r.id
                   FOR UPDATE OF r SKIP LOCKED) l
         WHERE l.ordering_key IS NULL OR (
                -- Not EXISTS: PostgreSQL drops an EXISTS subquery's ORDER BY, and the ORDER BY is what keeps
                -- every plan on the key index (a plan made on an empty table would walk the pending index).
                (SELECT e.id FROM {records} e
                  WHERE e.ordering_key = l.ordering_key AND e.status = 'pending' AND e.id < l.id
                  ORDER BY e.ordering_key, e.status, e.id LIMIT 1) IS NULL
                -- In flight of this key, read through the key index (the lease index's predicate is not
                -- implied here, so no plan walks every in-flight record instead). Records this statement
                -- completes still count: their keys' next records are claimable from the next statement on,
                -- by any instance (taking them here would hand a key to whoever holds it, slow or not).
                AND (SELECT count(*) FROM (
                        SELECT 1 FROM {records} p
                         WHERE p.ordering_key = l.ordering_key AND p.status = 'processing'
                         ORDER BY p.ordering_key, p.status, p.id
                         LIMIT 1000) inflight)
                    -- The limit lookups (a sort each) only when some limit is set: one InitPlan per statement.
                    < coalesce(CASE WHEN (SELECT EXISTS (SELECT 1 FROM {key_limits})) THEN
                               (SELECT k.max_concurrency FROM {key_limits} k
                                 WHERE l.ordering_key LIKE k.like_pattern
                                 ORDER BY k.is_exact DESC, length(k.pattern) DESC LIMIT 1) END,
                               %(default_key_concurrency)s)
                AND NOT (
                    coalesce(CASE WHEN (SELECT EXISTS (SELECT 1 FROM {key_limits})) THEN
                             (SELECT k.block_on_failure FROM {key_limits} k
                               WHERE l.ordering_key LIKE k.like_pattern
                               ORDER BY k.is_exact DESC, length(k.pattern) DESC LIMIT 1) END,
                             %(default_block_on_failure)s)
                    AND (SELECT f.id FROM {records} f
                          WHERE f.ordering_key = l.ordering_key AND f.status = 'failed' AND f.id < l.id
                          ORDER BY f.ordering_key, f.status, f.id LIMIT 1) IS NOT NULL)
           )
         LIMIT %(batch)s
     ) c
     ORDER BY c.priority DESC, c.run_at, c.id
     LIMIT %(batch)s
),
claimed AS (
    UPDATE {records} t
       SET status = 'processing',
           claimed_by = %(instance_id)s,
           -- clock_timestamp(), not now(): now() is fixed when the transaction starts, which can precede the
           -- snapshot by a commit of another claimer; the clock read here is after the snapshot, so claim
           -- times of one key are strictly increasing.
           claimed_at = clock_timestamp(),
           lease_expires_at = clock_timestamp() + %(lease_seconds)s * interval '1 second',
           -- One fresh token per claim statement, shared by its records: every later update pairs (id, token),
           -- so a re-claim (a new statement, a new token) fences out the old holder. Cheaper than one per row.
           lease_token = %(token)s::uuid,
           attempts = t.attempts + 1,
           dedupe_held = t.dedupe_held AND t.dedupe_while = 'active',
           updated_at = now()
     -- An id list, not a join: the rows are fetched by primary key whatever the plan guesses of the batch.
     WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    -- Not the lease token: the caller chose it, so it need not travel back and be decoded per row.
    RETURNING t.id, t.queue, t.payload, t.priority, t.attempts, t.max_attempts, t.claimed_at,
              t.lease_expires_at, t.run_at, t.created_at, t.ordering_key, t.dedupe_key, t.cancel_requested
)
SELECT claimed.*, (SELECT count(*) FROM done) + 0 * (SELECT count(*) FROM notified) AS completed
  FROM (SELECT 1) AS one
  LEFT JOIN claimed ON true
 ORDER BY claimed.priority DESC, claimed.run_at, claimed.id;

-- name: fail
-- Fenced like complete (ids sorted; width_bucket finds each row's own entries in the arrays). A retryable
-- failure with attempts left goes back to pending after its own backoff delay.
WITH failed AS (
    UPDATE {records} t
       SET status = CASE
               WHEN %(retry)s::bool AND t.attempts < t.max_attempts AND NOT t.cancel_requested THEN 'pending'
               WHEN t.cancel_requested THEN 'cancelled'
               ELSE 'failed' END,
           run_at = CASE
               WHEN %(retry)s::bool AND t.attempts < t.max_attempts AND NOT t.cancel_requested
               THEN now() + (%(delays)s::float8[])[width_bucket(t.id, %(ids)s::bigint[])] * interval '1 second'
               ELSE t.run_at END,
           finished_at = CASE
               WHEN %(retry)s::bool AND t.attempts < t.max_attempts AND NOT t.cancel_requested THEN NULL
               ELSE now() END,
           dedupe_held = t.dedupe_held
               AND %(retry)s::bool AND t.attempts < t.max_attempts AND NOT t.cancel_requested,
           last_error = %(error)s,
           lease_token = NULL,
           lease_expires_at = NULL,
           updated_at = now()
     WHERE t.id = ANY(%(ids)s::bigint[])
       AND t.lease_token = (%(tokens)s::uuid[])[width_bucket(t.id, %(ids)s::bigint[])]
       AND t.status = 'processing'
    RETURNING t.id, t.status, t.ordering_key
),
-- A keyed record that now waits (a retry after its backoff, or failed on a key that blocks on failure) holds
-- its key again: the key's later pending records that are claimable (the next one since this record's
-- claim; more when the batch that inserted them spread them out) go back to blocked, or every claim until
-- this record runs again would read them and reject them. Its next claim (or a cancel) unblocks the next.
held AS (
    SELECT f.ordering_key AS k, min(f.id) AS after
      FROM failed f
     WHERE f.ordering_key IS NOT NULL
       AND (f.status = 'pending' OR (f.status = 'failed' AND coalesce(
                CASE WHEN (SELECT EXISTS (SELECT 1 FROM {key_limits})) THEN
                     (SELECT k.block_on_failure FROM {key_limits} k
                       WHERE f.ordering_key LIKE k.like_pattern
                       ORDER BY k.is_exact DESC, length(k.pattern) DESC LIMIT 1) END,
                %(default_block_on_failure)s)))
     GROUP BY f.ordering_key
),
-- The claimable records of a key come before its blocked ones (inserts block every record behind a blocked
-- one; unblocks free only the earliest pending record), so the walk stops at the first blocked record.
chain AS (
    -- Starts from the failed record itself (blocked NULL: walked from, never updated).
    WITH RECURSIVE walk(k, id, blocked) AS (
        SELECT held.k, held.after, NULL::bool FROM held
        UNION ALL
        SELECT walk.k, h.id, h.key_blocked
          FROM walk
         CROSS JOIN LATERAL (
            SELECT n.id, n.key_blocked FROM {records} n
             WHERE n.ordering_key = walk.k AND n.status = 'pending' AND n.id > walk.id
             ORDER BY n.ordering_key, n.status, n.id LIMIT 1) h
         WHERE walk.blocked IS NOT TRUE
    )
    -- SKIP LOCKED: a record a claim holds is that claim's (its probes see this one pending or in flight),
    -- and the statement never waits, so it cannot deadlock with a claim's unblock.
    SELECT r.id FROM {records} r
     WHERE r.id = ANY(ARRAY(SELECT walk.id FROM walk WHERE NOT walk.blocked))
       AND r.status = 'pending' AND NOT r.key_blocked
       FOR UPDATE SKIP LOCKED
),
-- Runs whether or not the result names it (a data-modifying WITH always does).
reblocked AS (
    UPDATE {records} b SET key_blocked = true WHERE b.id = ANY(ARRAY(SELECT id FROM chain))
)
SELECT failed.id, failed.status FROM failed;

-- name: release
-- Hand records back at once (graceful shutdown): pending again, the attempt not charged.
UPDATE {records} t
   SET status = 'pending',
       attempts = greatest(t.attempts - 1, 0),
       run_at = now(),
       lease_token = NULL,
       lease_expires_at = NULL,
       last_error = %(reason)s,
       updated_at = now()
 -- Fenced as the completion in claim: ids sorted, each row's own token found by width_bucket, no join.
 WHERE t.id = ANY(%(ids)s::bigint[])
   AND t.lease_token = (%(tokens)s::uuid[])[width_bucket(t.id, %(ids)s::bigint[])]
   AND t.status = 'processing'
RETURNING t.id;

-- name: set_plan_mode
-- The session (or, with local, the transaction) our statements run in: generic plans, no JIT, and no
-- sequential scans. Every statement of ours reads processing_queue through an index (test_explain checks
-- each); but a plan is cached per connection, and one built while the table was empty (a worker started
-- before the first record) costs a sequential scan and a sort at nothing, so it would sort the whole
-- backlog on every claim until an ANALYZE replaced it. Disabled, a seq scan is only the last resort.
SELECT set_config('plan_cache_mode', 'force_generic_plan', %(local)s), set_config('jit', 'off', %(local)s),
       set_config('enable_seqscan', 'off', %(local)s);

-- name: reset_plan_mode
-- Back to what the session started with, before a connection is handed to other code.
SELECT set_config(name, reset_val, %(local)s) FROM pg_settings
 WHERE name IN ('plan_cache_mode', 'jit', 'enable_seqscan');

-- name: heartbeat
-- One round trip per heartbeat: the instance's own row (a wrongly declared dead instance revives; skipped
-- when not registered) and the leases of every record it holds. Rows not returned were lost to recovery.
WITH beat AS (
    UPDATE {instances}
       SET last_heartbeat_at = now(),
           status = CASE WHEN status = 'dead' THEN 'running' ELSE status END,
           stopped_at = CASE WHEN status = 'dead' THEN NULL ELSE stopped_at END
     WHERE instance_id = %(instance_id)s AND %(registered)s
    RETURNING 1
)
UPDATE {records} t
   SET lease_expires_at = clock_timestamp() + %(lease_seconds)s * interval '1 second'
 -- Fenced as the completion in claim: ids sorted, each row's own token found by width_bucket, no join.
 WHERE t.id = ANY(%(ids)s::bigint[])
   AND t.lease_token = (%(tokens)s::uuid[])[width_bucket(t.id, %(ids)s::bigint[])]
   AND t.status = 'processing'
RETURNING t.id, t.cancel_requested;

-- name: mark_dead_instances
-- Instances whose heartbeat is older than the threshold are dead; several cleaners may race, all harmless.
UPDATE {instances}
   SET status = 'dead', stopped_at = now()
 WHERE status IN ('running', 'stopping')
   AND last_heartbeat_at < now() - %(dead_after)s * interval '1 second'
RETURNING instance_id;

-- name: prune_instances
-- Registry rows of instances that ended long ago (every restart makes a new identity); none holds a record.
DELETE FROM {instances} i
 WHERE status IN ('stopped', 'dead')
   AND coalesce(stopped_at, last_heartbeat_at) < now() - %(retention)s * interval '1 second'
   AND NOT EXISTS (SELECT 1 FROM {records} r
                    WHERE r.status = 'processing' AND r.lease_expires_at IS NOT NULL
                      AND r.claimed_by = i.instance_id);

-- name: recover_orphans
-- One bounded batch: processing rows whose lease expired or whose instance is dead. SKIP LOCKED so that
-- every instance can run it at once; the status guard is re-checked on the locked row version.
WITH orphan AS (
    -- Both conditions read the small partial index of in-flight rows, never the finished ones.
    SELECT id
      FROM {records}
     WHERE status = 'processing'
       AND lease_expires_at IS NOT NULL  -- every processing row has one; it names the lease index
       AND (lease_expires_at < now()
            OR claimed_by IN (SELECT instance_id FROM {instances} WHERE status = 'dead'))
     ORDER BY lease_expires_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
)
UPDATE {records} t
   SET status = CASE
           WHEN t.cancel_requested THEN 'cancelled'
           WHEN t.attempts < t.max_attempts THEN 'pending'
           ELSE 'failed' END,
       finished_at = CASE
           WHEN t.attempts < t.max_attempts AND NOT t.cancel_requested THEN NULL
           ELSE now() END,
       run_at = now(),
       dedupe_held = t.dedupe_held AND t.attempts < t.max_attempts AND NOT t.cancel_requested,
       last_error = CASE
           WHEN t.lease_expires_at < now()
           THEN format('lease of %%s expired at %%s (attempt %%s of %%s)',
                       t.claimed_by, t.lease_expires_at, t.attempts, t.max_attempts)
           ELSE format('instance %%s was declared dead (attempt %%s of %%s)',
                       t.claimed_by, t.attempts, t.max_attempts) END,
       lease_token = NULL,
       lease_expires_at = NULL,
       updated_at = now()
  -- An id list, not a join with the table (a join planned on an empty table walks the primary key).
 WHERE t.id = ANY(ARRAY(SELECT id FROM orphan))
   AND t.status = 'processing'
RETURNING t.id, t.status, t.ordering_key;

-- name: key_heads
-- Under the producers' key locks: which keys already have a pending record. The earliest one is locked
-- FOR SHARE so that a claim of it in progress finishes first (then the next pending one is found instead).
-- And each key's latest pending record: a new record far enough behind it may be inserted claimable when
-- claims reach it after that one (same queue, not a lower priority, not due later) and it is claimable
-- itself; with the highest id so far, a lower bound of the new ids, to tell how far (see KEY_GAP).
SELECT u.k, h.id IS NOT NULL, t.id, t.follows, (SELECT max(m.id) FROM {records} m)
  FROM unnest(%(keys)s::text[]) AS u(k)
  LEFT JOIN LATERAL (
        SELECT id FROM {records}
         WHERE ordering_key = u.k AND status = 'pending'
         ORDER BY id
         LIMIT 1
           FOR SHARE
  ) h ON true
  LEFT JOIN LATERAL (
        SELECT l.id, NOT l.key_blocked AND l.queue = %(queue)s AND l.priority >= %(priority)s
                     AND l.run_at <= coalesce(%(run_at)s::timestamptz, now()) AS follows
          FROM {records} l
         WHERE l.ordering_key = u.k AND l.status = 'pending'
         ORDER BY l.ordering_key DESC, l.status DESC, l.id DESC
         LIMIT 1
  ) t ON true;

-- name: unblock_sweep
-- Safety net for a key left blocked (a claimer gone between a claim and its unblock, a record recovered to
-- failed): every key's earliest pending record claimable. A bounded slice of keys per call, after the key
-- %(after)s (keys are never empty: '' starts from the first), found by a loose index scan of the key index,
-- so a sweep costs the same at 10 million pending records. SKIP LOCKED: a head someone holds is theirs to
-- move (the sweep never waits, so it cannot deadlock with a claim's unblock). Returns the slice's last key
-- (NULL when the slice reached the end) and how many heads it unblocked.
WITH RECURSIVE keys AS (
    (SELECT ordering_key AS k FROM {records}
      WHERE ordering_key > %(after)s AND status = 'pending' AND ordering_key IS NOT NULL
      ORDER BY ordering_key LIMIT 1)
    UNION ALL
    SELECT (SELECT r.ordering_key FROM {records} r
             WHERE r.ordering_key > keys.k AND r.status = 'pending' AND r.ordering_key IS NOT NULL
             ORDER BY r.ordering_key LIMIT 1)
      FROM keys
     WHERE keys.k IS NOT NULL
),
slice AS (
    SELECT k FROM keys WHERE k IS NOT NULL LIMIT %(keys)s
),
stuck AS (
    -- Heads by primary key from an id list: never a join with the table (see claim's completion).
    SELECT r.id
      FROM {records} r
     WHERE r.id = ANY(ARRAY(SELECT h.id
                      FROM slice
                     CROSS JOIN LATERAL (
                        SELECT n.id, n.key_blocked FROM {records} n
                         WHERE n.ordering_key = slice.k AND n.status = 'pending'
                         ORDER BY n.id LIMIT 1) h
                     WHERE h.key_blocked))
       AND r.key_blocked
       AND r.status = 'pending'
       FOR UPDATE SKIP LOCKED
),
unblocked AS (
    UPDATE {records} t SET key_blocked = false WHERE t.id = ANY(ARRAY(SELECT id FROM stuck)) RETURNING 1
)
SELECT CASE WHEN (SELECT count(*) FROM slice) < %(keys)s THEN NULL ELSE (SELECT max(k) FROM slice) END,
       (SELECT count(*) FROM unblocked);

-- name: lock_queue_limit
SELECT max_pending FROM {queue_limits} WHERE queue = %(queue)s FOR UPDATE;

-- name: lock_ordering_keys
-- Producers of one key serialise so that id order equals commit order within the key.
SELECT count(pg_advisory_xact_lock(7117, hashtext(k)))
  FROM (SELECT DISTINCT k FROM unnest(%(keys)s::text[]) AS u(k) ORDER BY k) s;

-- name: lock_dedupe_keys
-- Producers of one dedupe key serialise in sorted order: unique-index waits between batches that list the
-- same keys in different orders would otherwise deadlock.
SELECT count(pg_advisory_xact_lock(7118, hashtext(%(queue)s || chr(31) || k)))
  FROM (SELECT DISTINCT k FROM unnest(%(keys)s::text[]) AS u(k) WHERE k IS NOT NULL ORDER BY k) s;

-- name: insert_records
-- One statement for the whole batch; ids follow input order. Duplicates of a held dedupe key are skipped.
INSERT INTO {records} (queue, payload, priority, run_at, max_attempts, ordering_key, dedupe_key,
                       dedupe_while, dedupe_held, key_blocked)
SELECT %(queue)s, u.p, %(priority)s, coalesce(%(run_at)s::timestamptz, now()), %(max_attempts)s, u.k, u.d,
       CASE WHEN u.d IS NULL THEN NULL ELSE %(dedupe_while)s END, u.d IS NOT NULL, u.b
  FROM unnest(%(payloads)s::jsonb[], %(keys)s::text[], %(dedupes)s::text[], %(blocked)s::bool[])
       WITH ORDINALITY AS u(p, k, d, b, ord)
 ORDER BY u.ord
    ON CONFLICT DO NOTHING
RETURNING id, dedupe_key;

-- name: existing_dedupe
SELECT dedupe_key, id FROM {records}
 WHERE queue = %(queue)s AND dedupe_key = ANY(%(dedupes)s::text[]) AND dedupe_held;

-- name: records_sequence
SELECT pg_get_serial_sequence(%(table)s, 'id');

-- name: allocate_ids
-- Ids for a COPY batch, in order (the sequence name is resolved once per processor, by records_sequence).
SELECT nextval(%(seq)s::regclass) FROM generate_series(1, %(n)s) g ORDER BY g;

-- name: copy_records
COPY {records} (id, queue, priority, max_attempts, ordering_key, key_blocked, payload) FROM STDIN;

-- name: copy_records_at
COPY {records} (id, queue, priority, max_attempts, run_at, ordering_key, key_blocked, payload) FROM STDIN;

-- name: pending_depth
SELECT count(*) FROM (
    SELECT 1 FROM {records} WHERE queue = %(queue)s AND status = 'pending' LIMIT %(cap)s
) d;

-- name: notify
SELECT pg_notify(%(channel)s, %(queue)s);

-- name: queue_status_active
-- Two branches so that each status is read through its own partial index, never the finished rows.
SELECT queue, 'pending' AS status, count(*) AS n,
       extract(epoch FROM now() - min(created_at)) AS oldest_pending_age,
       count(*) FILTER (WHERE run_at <= now()) AS due
  FROM {records}
 WHERE status = 'pending'
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
 GROUP BY queue
UNION ALL
SELECT queue, 'processing', count(*), NULL, 0
  FROM {records}
 WHERE status = 'processing'
   AND lease_expires_at IS NOT NULL  -- read through the lease index (every processing row has a lease)
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
 GROUP BY queue;

-- name: any_due
-- stop_when_empty: stops at the first due record instead of counting the backlog.
SELECT EXISTS (SELECT 1 FROM {records}
                WHERE status = 'pending' AND queue = ANY(%(queues)s::text[]) AND run_at <= now());

-- name: queue_status_finished
SELECT queue, status, count AS n
  FROM {stats}
 WHERE %(queue)s::text IS NULL OR queue = %(queue)s::text;

-- name: cancel
-- Pending records are cancelled at once; processing ones are flagged, and their outcome becomes cancelled.
-- A failed record may be cancelled too: that is how an operator unblocks a key stopped by block_on_failure.
UPDATE {records}
   SET status = CASE WHEN status = 'processing' THEN status ELSE 'cancelled' END,
       finished_at = CASE WHEN status = 'processing' THEN finished_at ELSE now() END,
       dedupe_held = CASE WHEN status = 'processing' THEN dedupe_held ELSE false END,
       cancel_requested = true,
       updated_at = now()
 WHERE id = ANY(%(ids)s::bigint[])
   AND status IN ('pending', 'processing', 'failed')
RETURNING id, status, ordering_key;

-- name: retry_failed
UPDATE {records}
   SET status = 'pending', run_at = now(), finished_at = NULL, attempts = 0, cancel_requested = false,
       updated_at = now()
 WHERE id IN (
    SELECT id FROM {records}
     WHERE status = 'failed'
       AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
       AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
       AND (%(pattern)s::text IS NULL OR last_error ~ %(pattern)s::text)
     ORDER BY id
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED)
   AND status = 'failed'
RETURNING id;

-- name: purge
-- One bounded, ordered batch of finished rows older than the cutoff.
DELETE FROM {records}
 WHERE id IN (
    SELECT id FROM {records}
     WHERE status IN ('completed', 'failed', 'cancelled')
       AND finished_at < now() - %(older_than)s * interval '1 second'
     ORDER BY finished_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED)
   AND status IN ('completed', 'failed', 'cancelled')
RETURNING id;

-- name: set_key_concurrency
INSERT INTO {key_limits} (pattern, like_pattern, is_exact, max_concurrency, block_on_failure, updated_at)
VALUES (%(pattern)s, %(like_pattern)s, %(is_exact)s, %(n)s, %(block_on_failure)s, now())
ON CONFLICT (pattern) DO UPDATE
   SET like_pattern = EXCLUDED.like_pattern, is_exact = EXCLUDED.is_exact,
       max_concurrency = EXCLUDED.max_concurrency, block_on_failure = EXCLUDED.block_on_failure,
       updated_at = now();

-- name: delete_key_concurrency
DELETE FROM {key_limits} WHERE pattern = %(pattern)s;

-- name: set_queue_limit
INSERT INTO {queue_limits} (queue, max_pending, updated_at) VALUES (%(queue)s, %(n)s, now())
ON CONFLICT (queue) DO UPDATE SET max_pending = EXCLUDED.max_pending, updated_at = now();

-- name: delete_queue_limit
DELETE FROM {queue_limits} WHERE queue = %(queue)s;

-- name: register_instance
INSERT INTO {instances} (instance_id, hostname, pid, version, started_at, last_heartbeat_at, status, metadata)
VALUES (%(instance_id)s, %(hostname)s, %(pid)s, %(version)s, now(), now(), 'running', %(metadata)s)
ON CONFLICT (instance_id) DO UPDATE
   SET last_heartbeat_at = now(), status = 'running', stopped_at = NULL, metadata = EXCLUDED.metadata;

-- name: heartbeat_instance
UPDATE {instances} SET last_heartbeat_at = now()
 WHERE instance_id = %(instance_id)s AND status IN ('running', 'stopping')
RETURNING status;

-- name: set_instance_status
UPDATE {instances}
   SET status = %(status)s,
       stopped_at = CASE WHEN %(status)s IN ('stopped', 'dead') THEN now() ELSE stopped_at END,
       last_heartbeat_at = now()
 WHERE instance_id = %(instance_id)s;

-- name: list_instances
SELECT instance_id, hostname, pid, version, started_at, last_heartbeat_at, stopped_at, status, metadata,
       (SELECT count(*) FROM {records} r
         WHERE r.status = 'processing' AND r.lease_expires_at IS NOT NULL AND r.claimed_by = i.instance_id)
           AS processing
  FROM {instances} i
 WHERE %(include_stopped)s OR status IN ('running', 'stopping')
 ORDER BY started_at;

-- name: server_facts
SELECT current_setting('server_version') AS version, to_regclass(%(table)s) IS NOT NULL AS migrated;

-- ---------------------------------------------------------------- `dproc demo` (its own ledger table)

-- name: demo_setup
CREATE TABLE IF NOT EXISTS {demo_ledger} (
    record_id bigint NOT NULL,
    instance text NOT NULL,
    done_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- name: demo_reset
WITH gone AS (DELETE FROM {records} WHERE queue = 'demo' RETURNING 1)
DELETE FROM {demo_ledger};

-- name: demo_record
-- Written in the same transaction as the record's completion: executions that did not complete leave no row.
INSERT INTO {demo_ledger} (record_id, instance) VALUES (%(id)s, %(instance)s);

-- name: demo_progress
SELECT instance, count(*) FROM {demo_ledger} GROUP BY instance ORDER BY instance;

-- name: demo_proof
SELECT (SELECT count(*) FROM {demo_ledger}) AS executions,
       (SELECT count(DISTINCT record_id) FROM {demo_ledger}) AS distinct_records,
       (SELECT count(*) FROM {records} WHERE queue = 'demo' AND status = 'completed') AS completed,
       (SELECT count(*) FROM {records} WHERE queue = 'demo' AND status <> 'completed') AS not_completed,
       (SELECT extract(epoch FROM max(done_at) - min(done_at)) FROM {demo_ledger}) AS span_seconds;
