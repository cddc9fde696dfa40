-- Migration 0019 undone: the statement-level UPDATE trigger of 0001 back (its function, dp_track_finished,
-- was never dropped: the INSERT and DELETE triggers use it), the row trigger and the flag gone.
-- {schema}: the quoted schema name.
DROP TRIGGER IF EXISTS dp_track_finished_update ON {schema}.processing_queue;
DROP FUNCTION IF EXISTS {schema}.dp_track_finished_row();
CREATE TRIGGER dp_track_finished_update AFTER UPDATE ON {schema}.processing_queue
    REFERENCING OLD TABLE AS dp_old NEW TABLE AS dp_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_track_finished();
ALTER TABLE {schema}.processing_queue DROP COLUMN IF EXISTS finish_counted;
