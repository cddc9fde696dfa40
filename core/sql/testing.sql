-- Databases of a test server (core/testing/postgres.py): fresh ones cloned from a migrated template.
-- CREATE DATABASE and DROP DATABASE take no bound parameters and cannot run inside a function or a
-- transaction, so each of these returns the statement to run, its names quoted by the server (format's %I).
-- A literal % is written %%. Blocks: "-- name: <name>".

-- name: test_server_version
SELECT current_setting('server_version');

-- name: test_create_database
SELECT format('CREATE DATABASE %%I', %(name)s::text);

-- name: test_create_database_from
-- The template must have no other connection while it is copied (CREATE DATABASE refuses otherwise).
SELECT format('CREATE DATABASE %%I TEMPLATE %%I', %(name)s::text, %(template)s::text);

-- name: test_drop_database
-- FORCE ends the sessions a test left open, so the drop never waits on a forgotten connection.
SELECT format('DROP DATABASE IF EXISTS %%I WITH (FORCE)', %(name)s::text);
