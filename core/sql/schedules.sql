-- Schedules (core/schedules.py, migration 0009): declared by any instance, fired once per tick by any.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: declare_schedule
-- Idempotent: every container may declare its schedules at start. The same definition keeps its next fire
-- time; a changed one starts from the next tick after now.
INSERT INTO {schedules} AS s (name, cron, every_seconds, timezone, queue, payload, options, misfire,
                              backfill_seconds, overlap, flow, definition, next_fire)
VALUES (%(name)s, %(cron)s, %(every)s, %(timezone)s, %(queue)s, %(payload)s::jsonb, %(options)s::jsonb,
        %(misfire)s, %(backfill)s, %(overlap)s, %(flow)s, %(definition)s, %(next_fire)s)
ON CONFLICT (name) DO UPDATE
   SET cron = EXCLUDED.cron, every_seconds = EXCLUDED.every_seconds, timezone = EXCLUDED.timezone,
       queue = EXCLUDED.queue, payload = EXCLUDED.payload, options = EXCLUDED.options,
       misfire = EXCLUDED.misfire, backfill_seconds = EXCLUDED.backfill_seconds, overlap = EXCLUDED.overlap,
       flow = EXCLUDED.flow, definition = EXCLUDED.definition,
       next_fire = CASE WHEN s.definition = EXCLUDED.definition THEN s.next_fire ELSE EXCLUDED.next_fire END,
       updated_at = CASE WHEN s.definition = EXCLUDED.definition THEN s.updated_at ELSE now() END
RETURNING name;

-- name: remove_schedule
DELETE FROM {schedules} WHERE name = %(name)s RETURNING name;

-- name: list_schedules
SELECT name, cron, every_seconds, timezone, queue, payload, options, misfire, backfill_seconds, overlap, flow,
       next_fire, last_fire, last_record_id, fired, created_at, updated_at
  FROM {schedules}
 ORDER BY name;

-- name: due_schedules
-- What is due now, by the next-fire index, with the server's clock (every instance agrees on it).
SELECT name, cron, every_seconds, timezone, misfire, backfill_seconds, next_fire, clock_timestamp()
  FROM {schedules}
 WHERE next_fire <= clock_timestamp()
 ORDER BY next_fire
 LIMIT %(limit)s;

-- name: next_schedule
-- When the next tick of any schedule falls (a worker looks again then, or within a second).
SELECT min(next_fire) - clock_timestamp() FROM {schedules};

-- name: fire_schedule
-- One tick, once: the compare and swap on next_fire and the tick's records in one statement.
SELECT fired, ids, skipped
  FROM {fire_schedule_function}(%(name)s, %(expected)s, %(next)s, %(ticks)s::timestamptz[], %(notify)s);
