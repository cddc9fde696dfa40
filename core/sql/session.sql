-- Session settings of our connections, and what the health probes ask the server.
-- Placeholders in braces are identifiers filled in with psycopg.sql.Identifier (schema-qualified tables);
-- %(name)s are bound parameters. A literal % is written %%, a literal brace doubled. Blocks: "-- name: <name>".

-- name: set_plan_mode
-- The session (or, with local, the transaction) our statements run in: generic plans, no JIT, and no
-- sequential scans. Every statement of ours reads processing_queue through an index (test_explain checks
-- each); but a plan is cached per connection, and one built while the table was empty (a worker started
-- before the first record) costs a sequential scan and a sort at nothing, so it would sort the whole
-- backlog on every claim until an ANALYZE replaced it. Disabled, a seq scan is only the last resort.
SELECT set_config('plan_cache_mode', 'force_generic_plan', %(local)s), set_config('jit', 'off', %(local)s),
       set_config('enable_seqscan', 'off', %(local)s);

-- name: transaction_settings
-- Under transaction pooling (PgBouncer), at the start of every transaction of ours: what a session of ours
-- carries in its startup options otherwise, and for our own statements (internal) no JIT and no sequential
-- scans. No plan_cache_mode: without prepared statements every statement is planned with its values.
SELECT set_config('statement_timeout', %(statement_timeout)s, true),
       set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, true),
       set_config('TimeZone', 'UTC', true),
       CASE WHEN %(internal)s THEN set_config('jit', 'off', true) END,
       CASE WHEN %(internal)s THEN set_config('enable_seqscan', 'off', true) END;

-- name: reset_plan_mode
-- Back to what the session started with, before a connection is handed to other code.
SELECT set_config(name, reset_val, %(local)s) FROM pg_settings
 WHERE name IN ('plan_cache_mode', 'jit', 'enable_seqscan');

-- name: server_facts
SELECT current_setting('server_version') AS version, to_regclass(%(table)s) IS NOT NULL AS migrated;

-- name: local_statement_timeout
-- A limit for the rest of the transaction only (health probes share one deadline across their statements).
SELECT set_config('statement_timeout', %(ms)s, true);

-- name: ping
-- An idle socket can hide a dead peer: a round trip that proves the connection.
SELECT 1;

-- name: has_table
SELECT to_regclass(%(table)s) IS NOT NULL;

-- name: alembic_revision
-- The revision a migrated schema is at (migrate.current_revision).
SELECT version_num FROM {alembic_version};

-- name: connection_budget
-- What the server can give one more client: its max_connections less the slots kept for superusers, and
-- how many are in use now.
SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend');
