-- Migration 0016 undone: dp_start_flow back to 0010's signature (the caller then re-runs 0010's functions) and
-- flow_runs without the trace context. {schema} is the quoted schema name.
DROP FUNCTION IF EXISTS {schema}.dp_start_flow(text, integer, text, jsonb, jsonb, text, jsonb, integer, text);
ALTER TABLE {schema}.flow_runs DROP COLUMN IF EXISTS trace_context;
