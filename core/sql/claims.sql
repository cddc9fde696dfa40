-- The fenced statements of claimed records: claim (with the completion it carries), fail, release,
-- lease extension (heartbeat).
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: claim
-- One round trip completes the caller's finished records (if any) and claims up to %(batch)s more: one
-- commit per batch instead of two (with batch 0 it is the plain completion of mark_completed).
-- The completion is fenced: only the claim whose token is still on the row may complete it, each id paired
-- with its own token (tokens are per claim statement, so ANY(tokens) alone could pair a stale record with a
-- later claim's token). A flagged cancel wins over completion.
-- The claim reads each queue by its own index scan in claim order, locked with SKIP LOCKED; only the
-- k*batch candidates are sorted, never the backlog. A keyed record qualifies only when no earlier record of
-- its key is pending, fewer than its key's limit are in flight, and (when the key blocks on failure) no
-- earlier record of it failed. Each queue's scan starts at the caller's floor (its position in claim order:
-- -priority, run_at, id), lowered by the floor events announced since the caller last looked: the index
-- seeks there instead of stepping over the dead entries an old snapshot keeps (see core/floors.py).
WITH done AS (
    UPDATE {records} d
       SET status = CASE WHEN d.cancel_requested THEN 'cancelled' ELSE 'completed' END,
           finished_at = now(),
           updated_at = now(),
           lease_expires_at = NULL,
           dedupe_held = false,
           -- A flow step's result (none without flow records: the array is NULL, nothing to look up).
           result = CASE WHEN %(done_results)s::jsonb[] IS NOT NULL
                         THEN (%(done_results)s::jsonb[])[width_bucket(d.id, %(done_ids)s::bigint[])] END
     -- An id list, not a join: a join's order comes from statistics, and one planned while the table was
     -- empty (a worker started before the first record; plans are cached per connection) walked the whole
     -- primary key on every statement. The ids come sorted, so width_bucket (a binary search) finds each
     -- row's own token: the pairing is exact, and rechecked on a row updated since our snapshot.
     WHERE d.id = ANY(%(done_ids)s::bigint[])
       AND d.lease_token = (%(done_tokens)s::uuid[])[width_bucket(d.id, %(done_ids)s::bigint[])]
       AND d.status = 'processing'
    RETURNING d.id, d.ordering_key, d.status, d.flow_run_id
),
-- Flow steps completed (or cancelled) here settle their run in this statement (results stored above), children's
-- counts down, those at zero claimable from the next statement on (core/sql/ddl/0010_flows.sql). Only records
-- this statement completed (fenced): a stale instance settles nothing. No flow record: no call.
settled AS (
    SELECT {flow_settle_function}(array_agg(s.id ORDER BY s.id) FILTER (WHERE s.status = 'completed'),
                                  array_agg(s.id ORDER BY s.id) FILTER (WHERE s.status = 'cancelled')) AS n
      FROM done s
     WHERE s.flow_run_id IS NOT NULL
    HAVING count(*) > 0
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
    RETURNING b.queue, b.priority, b.run_at, b.id
),
-- Made claimable for other instances' claimers (an operator's cancel, a limit change): announced to all.
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT queue, - priority::bigint, run_at, id FROM unblocked WHERE %(announce)s
),
-- A keyed completion may free its key's next record: wake the idle workers of those queues (the caller sends
-- them only with keyed records among those it completes, at most once per queue per window from a run:
-- core.claims.KeyNotices).
notified AS (
    SELECT pg_notify(w.channel, w.queue)
      FROM unnest(%(channels)s::text[], %(nqueues)s::text[]) AS w(channel, queue)
),
-- The token buckets of the rate-limited queues claimed (none: nothing to read). A queue's bucket is striped
-- over slots (core/schema.py: queue_rates); the claim charges the slot charged longest ago among those no
-- other claim holds (SKIP LOCKED), so claimers never wait for each other and the slots' tokens are exact.
-- Refilled to one instant, which the charge below dates the slot at (no refill lost in between); a slot
-- dated after our instant (charged meanwhile) refills nothing. limited: the queue has a rate, whether or not
-- a slot was free (none free: nothing to take now).
rates AS (
    SELECT qr.name AS queue, s.slot, s.interval_s, s.at, s.tokens,
           s.slot IS NOT NULL OR EXISTS (SELECT 1 FROM {queue_rates} x WHERE x.queue = qr.name) AS limited
      FROM unnest(%(queues)s::text[]) AS qr(name)
      LEFT JOIN LATERAL (
            SELECT b.slot, b.per / b.n AS interval_s, greatest(c.at, b.updated_at) AS at,
                   least(b.n, b.tokens + greatest(0, extract(epoch FROM c.at - b.updated_at)) * b.n / b.per)
                       AS tokens
              FROM {queue_rates} b CROSS JOIN (SELECT clock_timestamp() AS at) c
             WHERE b.queue = qr.name
             ORDER BY b.updated_at
             LIMIT 1
               FOR UPDATE OF b SKIP LOCKED) s ON true
     WHERE %(batch)s > 0
),
picked AS (
    SELECT c.id, qn.name AS queue, fs.np AS fs_np, fs.run_at AS fs_at, fs.id AS fs_id
      FROM unnest(%(queues)s::text[], %(floor_np)s::bigint[], %(floor_at)s::timestamptz[], %(floor_id)s::bigint[])
           AS qn(name, np, at, id)
     CROSS JOIN LATERAL (
        SELECT * FROM (SELECT qn.np, qn.at, qn.id
                 UNION ALL
                -- The events of this queue since the caller's last claim (minus a margin: an event written
                -- just before a slow commit becomes visible after later ones), by the (queue, created_at)
                -- index: the older events cost nothing.
                SELECT e.np, e.run_at, e.record_id FROM {floor_events} e
                 WHERE e.queue = qn.name AND e.created_at > %(since)s) f
         ORDER BY 1, 2, 3 LIMIT 1) fl
     -- The first pending record from the floor on, looked at without a lock: where the caller's floor moves
     -- to. Not the first record claimed: a record another claim holds locked (and may reject, its key busy)
     -- is skipped by SKIP LOCKED, and a floor moved past it would hide it from every claimer. Only when the
     -- caller asks (peek): a floor moved every few claims is close enough.
     LEFT JOIN LATERAL (
        SELECT - r.priority::bigint AS np, r.run_at, r.id
          FROM {records} r
         WHERE %(peek)s AND r.queue = qn.name AND r.status = 'pending' AND NOT r.key_blocked
           AND r.run_at <= now() AND (- r.priority::bigint, r.run_at, r.id) >= (fl.np, fl.at, fl.id)
         ORDER BY - r.priority::bigint, r.run_at, r.id
         LIMIT 1) fs ON true
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
                   AND (- r.priority::bigint, r.run_at, r.id) >= (fl.np, fl.at, fl.id)
                 ORDER BY - r.priority::bigint, r.run_at, r.id
                   FOR UPDATE OF r SKIP LOCKED) l
         WHERE l.ordering_key IS NULL OR CASE WHEN (
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
           -- A record its key's order allows starts when its key's rate (if any) has a token: charged only
           -- now (CASE: after every other test), by a function that never waits for another claim's bucket.
           ) THEN NOT (SELECT EXISTS (SELECT 1 FROM {key_rates})) OR {key_token_function}(l.ordering_key)
           ELSE false END
         -- A rate-limited queue gives no more records than its bucket has tokens.
         LIMIT least(%(batch)s, coalesce((SELECT CASE WHEN r.slot IS NOT NULL THEN greatest(0, floor(r.tokens))::int
                                                      WHEN r.limited THEN 0 END
                                             FROM rates r WHERE r.queue = qn.name), %(batch)s))
     ) c
     -- A paused queue gives nothing (its floor stays where it is): read by every claim, so no instance misses it.
     WHERE NOT EXISTS (SELECT 1 FROM {queue_state} ps
                        WHERE ps.queue = qn.name AND ps.paused_at IS NOT NULL
                          AND (ps.resume_at IS NULL OR ps.resume_at > now()))
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
    -- Not the lease token: the caller chose it, so it need not travel back and be decoded per row. The payload:
    -- the row's, else (NULL: a batch's record, migration 0018) its row in the payloads table, by primary key.
    RETURNING t.id, t.queue, coalesce(t.payload, (SELECT a.payload FROM {payloads} a WHERE a.id = t.id)) AS payload,
              t.priority, t.attempts, t.max_attempts, t.claimed_at,
              t.lease_expires_at, t.run_at, t.created_at, t.ordering_key, t.dedupe_key, t.cancel_requested,
              t.flow_run_id, t.step, t.trace_context
),
-- The parents' results of the flow steps claimed (only those rows: nothing is read for other records), by their
-- edges; a for_each step's results as a list in element order (an element not completed: null). MATERIALIZED:
-- computed once (inlined, it was run again for every claimed row).
parents AS MATERIALIZED (
    SELECT c.id,
           (SELECT jsonb_object_agg(g.step, g.val)
              FROM (SELECT p.step,
                           CASE WHEN bool_and(p.flow_index IS NULL) THEN (array_agg(p.result))[1]
                                ELSE coalesce(jsonb_agg(CASE WHEN p.status = 'completed' THEN p.result END
                                                        ORDER BY p.flow_index) FILTER (WHERE p.flow_index >= 0),
                                              '[]'::jsonb) END AS val
                      FROM {flow_edges} e
                     -- each parent by primary key (LIMIT: never flattened into a join a plan could turn into a
                     -- walk of the table)
                     CROSS JOIN LATERAL (SELECT x.step, x.flow_index, x.status, x.result FROM {records} x
                                          WHERE x.id = e.parent_id LIMIT 1) p
                     WHERE e.child_id = c.id AND (p.status = 'completed' OR p.flow_index IS NOT NULL)
                     GROUP BY p.step) g
            HAVING count(*) > 0) AS parents
      FROM claimed c
     WHERE c.flow_run_id IS NOT NULL
),
-- The tokens spent: what each rate-limited queue's claim took. Returned: how long until a bucket left
-- without a whole token has the next (an idle claimer sleeps that long rather than ask again at once).
charged AS (
    UPDATE {queue_rates} b
       SET tokens = r.tokens - (SELECT count(*) FROM claimed c WHERE c.queue = b.queue),
           updated_at = r.at
      FROM rates r
     WHERE b.queue = r.queue AND b.slot = r.slot
    RETURNING b.tokens, r.interval_s
)
-- The columns in core.record.Record's order (core/claims.py: Claims.claim_on), the lease token and the shard
-- left to the caller.
SELECT claimed.id, claimed.queue, claimed.payload, claimed.priority, claimed.attempts, claimed.max_attempts,
       claimed.claimed_at, claimed.lease_expires_at, claimed.run_at, claimed.created_at, claimed.ordering_key,
       claimed.dedupe_key, claimed.cancel_requested, claimed.flow_run_id, claimed.step,
       -- A flow step's parents' results ({} for a first step; an on_failure step's: dp_flow_parents). The
       -- function only for an on_failure record (a SQL function with a WITH is never inlined: called, it
       -- parses and plans its body again in every statement; for every first step it found {}).
       CASE WHEN claimed.flow_run_id IS NOT NULL
            THEN coalesce(par.parents,
                          CASE WHEN EXISTS (SELECT 1 FROM {flow_runs} fr
                                             WHERE fr.id = claimed.flow_run_id AND fr.on_failure_id = claimed.id)
                               THEN {flow_parents_function}(claimed.id, claimed.flow_run_id)
                               ELSE '{{}}'::jsonb END) END AS parents,
       NULL::text AS result,  -- a flow step's result: none yet
       claimed.trace_context,
       picked.fs_np, picked.fs_at, picked.fs_id,
       (SELECT count(*) FROM done) + 0 * (SELECT count(*) FROM notified) + 0 * (SELECT count(*) FROM settled)
           AS completed,
       least((SELECT min((1 - ch.tokens) * ch.interval_s) FROM charged ch WHERE ch.tokens < 1),
             (SELECT min(x.per / x.n) / 8 FROM rates r JOIN {queue_rates} x ON x.queue = r.queue
               WHERE r.limited AND r.slot IS NULL),  -- every slot held by another claim: look again soon
             nullif(current_setting('dp.rate_wait', true), '')::float8) AS rate_wait,
       -- Whether the lean statement (claimlean.sql) would claim as this one does (its gate: no pause, no rate
       -- anywhere). The caller's next claim sends that one when so.
       coalesce((SELECT c.paused = 0 AND c.queue_rate_rows = 0 AND c.key_rates = 0
                   FROM {queue_controls} c WHERE c.id = 1), false) AS lean
  FROM (SELECT 1) AS one
  LEFT JOIN claimed ON true
  -- The floor's peek on one row per queue (fewer values to decode); both sides are the statement's own
  -- few rows, never the table.
  LEFT JOIN (SELECT DISTINCT ON (p.queue) p.* FROM picked p ORDER BY p.queue, p.id) picked
         ON picked.id = claimed.id
  LEFT JOIN parents par ON par.id = claimed.id
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
    RETURNING t.id, t.status, t.ordering_key, t.queue, t.priority, t.run_at, t.flow_run_id
),
-- A flow step that ended failed or cancelled settles its run here: its waiting descendants cancelled (or
-- counting it finished), the run failed, its on_failure step claimable (core/sql/ddl/0010_flows.sql).
settled AS (
    SELECT {flow_settle_function}(NULL, array_agg(f.id ORDER BY f.id)) AS n
      FROM failed f
     WHERE f.flow_run_id IS NOT NULL AND f.status <> 'pending'
    HAVING count(*) > 0
),
-- A keyed record that ends failed or cancelled frees its key (unless the key blocks on failure): its next
-- record, which claims may have passed, is claimable. Announced at the failed record's position, before it.
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT DISTINCT ON (queue) queue, - priority::bigint, run_at, id FROM failed
     WHERE ordering_key IS NOT NULL AND status <> 'pending'
     ORDER BY queue, - priority::bigint, run_at, id
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
SELECT failed.id, failed.status FROM failed WHERE (SELECT count(*) FROM settled) >= 0;

-- name: release
-- Hand records back at once (graceful shutdown): pending again, the attempt not charged, in their place in
-- claim order (run_at kept: they were due), and announced to other instances' claimers (core/floors.py).
WITH released AS (
UPDATE {records} t
   SET status = 'pending',
       attempts = greatest(t.attempts - 1, 0),
       run_at = least(t.run_at, now()),
       lease_token = NULL,
       lease_expires_at = NULL,
       last_error = %(reason)s,
       updated_at = now()
 -- Fenced as the completion in claim: ids sorted, each row's own token found by width_bucket, no join.
 WHERE t.id = ANY(%(ids)s::bigint[])
   AND t.lease_token = (%(tokens)s::uuid[])[width_bucket(t.id, %(ids)s::bigint[])]
   AND t.status = 'processing'
RETURNING t.id, t.queue, t.priority, t.run_at
),
announced AS (
    INSERT INTO {floor_events} (queue, np, run_at, record_id)
    SELECT DISTINCT ON (queue) queue, - priority::bigint, run_at, id FROM released
     ORDER BY queue, - priority::bigint, run_at, id
)
SELECT id FROM released;

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

-- name: notify_queues
-- The keyed completions' wake-ups a run held back (core.claims.KeyNotices), once their window has passed: one
-- statement for all their queues.
SELECT count(pg_notify(w.channel, w.queue))
  FROM unnest(%(channels)s::text[], %(nqueues)s::text[]) AS w(channel, queue);

-- name: any_due
-- stop_when_empty: stops at the first due record instead of counting the backlog. A paused queue's records
-- are not due (nothing would take them). A flow step waiting for its parents counts as due: its parents'
-- completion (here or elsewhere) releases it (the waiting index: nothing read without flows).
SELECT EXISTS (SELECT 1 FROM {records}
                WHERE status = 'pending' AND queue = ANY(%(queues)s::text[]) AND run_at <= now()
                  AND NOT EXISTS (SELECT 1 FROM {queue_state} ps
                                   WHERE ps.queue = {records}.queue AND ps.paused_at IS NOT NULL
                                     AND (ps.resume_at IS NULL OR ps.resume_at > now())))
    OR EXISTS (SELECT 1 FROM {records} w WHERE w.status = 'waiting' AND w.queue = ANY(%(queues)s::text[]));
