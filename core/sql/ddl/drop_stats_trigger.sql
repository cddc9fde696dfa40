-- Dropping the queue_stats triggers and their function (migration 0001's downgrade).
DROP TRIGGER IF EXISTS dp_track_finished_update ON {schema}.processing_queue;
DROP TRIGGER IF EXISTS dp_track_finished_delete ON {schema}.processing_queue;
DROP TRIGGER IF EXISTS dp_track_finished_insert ON {schema}.processing_queue;
DROP FUNCTION IF EXISTS {schema}.dp_track_finished();
