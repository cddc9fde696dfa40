-- Migration 0015's downgrade: the deferred announcement and dp_add_one go, dp_channel is declared as 0008 did
-- (dp_add_record is put back by 0013's script). {schema} is the quoted schema name.
DROP TRIGGER IF EXISTS dp_announce_at_commit ON {schema}.processing_queue;
DROP FUNCTION IF EXISTS {schema}.dp_announce_at_commit();
DROP FUNCTION IF EXISTS {schema}.dp_add_one(text, jsonb, integer, timestamptz, integer, boolean, boolean, text);
ALTER FUNCTION {schema}.dp_channel(text) IMMUTABLE STRICT;
