-- Migration 0018 undone: every payload back on its record's row, the table, trigger and view gone
-- (dp_add_records is put back by running 0012's script again). {schema}: the quoted schema name.
UPDATE {schema}.processing_queue r SET payload = p.payload
  FROM {schema}.processing_payload p WHERE p.id = r.id AND r.payload IS NULL;
-- a row inserted without any payload while the column allowed it: an empty one, as NOT NULL requires
UPDATE {schema}.processing_queue SET payload = '{}' WHERE payload IS NULL;
DROP VIEW IF EXISTS {schema}.record_payloads;
DROP TRIGGER IF EXISTS dp_payload_gone ON {schema}.processing_queue;
DROP TRIGGER IF EXISTS dp_payload_truncate ON {schema}.processing_queue;
DROP FUNCTION IF EXISTS {schema}.dp_payload_gone();
DROP TABLE IF EXISTS {schema}.processing_payload;
ALTER TABLE {schema}.processing_queue ALTER COLUMN payload SET NOT NULL;
