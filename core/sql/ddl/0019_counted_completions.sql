-- Migration 0019: the statements that complete records keep their finished counts themselves (issue 27).
-- Before, a statement-level trigger counted every UPDATE of processing_queue from its transition tables: the
-- old and the new version of every updated row were copied into them, claims included, which cost the drain
-- about 4 us of server CPU per record (docs/hot-path.md). Now the claim statements' completions, and the fail
-- statement, add their counts to queue_stats in one upsert of their own (one per queue and status, in that
-- order) and flip finish_counted on the rows they finish; a row-level trigger counts every other change into
-- or out of a finished status (an operator's cancel, recovery, flows' cascades, a user's own UPDATE), and skips
-- the rows whose finish_counted flipped. Its WHEN is tested in the executor (no call) for every updated row,
-- so a claim costs no more than that test. The flag's value means nothing; only a change of it does, so no
-- statement has to reset it. Rows of the previous version's statements (no flip) are counted by the trigger:
-- its workers may drain while this runs and after it. {schema}: the quoted schema name.
ALTER TABLE {schema}.processing_queue ADD COLUMN IF NOT EXISTS finish_counted boolean NOT NULL DEFAULT false;

-- One row's change of (queue, status) into, out of or between finished statuses, in the transaction's slot.
CREATE OR REPLACE FUNCTION {schema}.dp_track_finished_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {schema}.queue_stats AS s (queue, status, slot, count)
    SELECT v.queue, v.status,
           coalesce(nullif(current_setting('dp.stats_slot', true), '')::int, pg_backend_pid() % 16), sum(v.delta)
      FROM (VALUES (OLD.queue, OLD.status, -1), (NEW.queue, NEW.status, 1)) AS v(queue, status, delta)
     WHERE v.status IN ('completed', 'failed', 'cancelled')
     GROUP BY v.queue, v.status HAVING sum(v.delta) <> 0
     ORDER BY v.queue, v.status
    ON CONFLICT (queue, status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS dp_track_finished_update ON {schema}.processing_queue;
CREATE TRIGGER dp_track_finished_update AFTER UPDATE ON {schema}.processing_queue
    FOR EACH ROW
    WHEN ((OLD.status IN ('completed', 'failed', 'cancelled') OR NEW.status IN ('completed', 'failed', 'cancelled'))
          AND (OLD.status <> NEW.status OR OLD.queue <> NEW.queue)
          AND OLD.finish_counted = NEW.finish_counted)
    EXECUTE FUNCTION {schema}.dp_track_finished_row();
