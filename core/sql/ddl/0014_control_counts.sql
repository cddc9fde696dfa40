-- Migration 0014: how many controls are set (queues paused, queue rate slots, key rates), one row kept by
-- triggers, so that the lean claim statement (core/sql/claimlean.sql) tests one row instead of three tables.
-- Each trigger adds its row's change (n = n + d under the row's lock: two writers never lose one another's
-- change); a TRUNCATE, which no one runs beside a write of its table, sets its count to 0.
-- {schema} is the quoted schema name.

-- The tables' writers wait for this migration's commit, so the counts start exact.
LOCK TABLE {schema}.queue_state, {schema}.queue_rates, {schema}.key_rates IN SHARE ROW EXCLUSIVE MODE;

INSERT INTO {schema}.queue_controls (id, paused, queue_rate_rows, key_rates)
SELECT 1,
       (SELECT count(*) FROM {schema}.queue_state WHERE paused_at IS NOT NULL),
       (SELECT count(*) FROM {schema}.queue_rates),
       (SELECT count(*) FROM {schema}.key_rates);

CREATE FUNCTION {schema}.dp_count_pauses() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    d integer := 0;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE {schema}.queue_controls SET paused = 0;
        RETURN NULL;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.paused_at IS NOT NULL THEN d := d + 1; END IF;
    IF TG_OP <> 'INSERT' AND OLD.paused_at IS NOT NULL THEN d := d - 1; END IF;
    IF d <> 0 THEN
        UPDATE {schema}.queue_controls SET paused = paused + d;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE FUNCTION {schema}.dp_count_queue_rates() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE {schema}.queue_controls SET queue_rate_rows = 0;
    ELSE
        UPDATE {schema}.queue_controls SET queue_rate_rows = queue_rate_rows + CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE FUNCTION {schema}.dp_count_key_rates() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE {schema}.queue_controls SET key_rates = 0;
    ELSE
        UPDATE {schema}.queue_controls SET key_rates = key_rates + CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END;
    END IF;
    RETURN NULL;
END
$fn$;

-- Not on UPDATE of queue_rates: the claim charges a bucket by updating it, and the count does not change.
CREATE TRIGGER dp_count_pauses AFTER INSERT OR UPDATE OF paused_at OR DELETE ON {schema}.queue_state
    FOR EACH ROW EXECUTE FUNCTION {schema}.dp_count_pauses();
CREATE TRIGGER dp_count_pauses_truncate AFTER TRUNCATE ON {schema}.queue_state
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_count_pauses();
CREATE TRIGGER dp_count_queue_rates AFTER INSERT OR DELETE ON {schema}.queue_rates
    FOR EACH ROW EXECUTE FUNCTION {schema}.dp_count_queue_rates();
CREATE TRIGGER dp_count_queue_rates_truncate AFTER TRUNCATE ON {schema}.queue_rates
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_count_queue_rates();
CREATE TRIGGER dp_count_key_rates AFTER INSERT OR DELETE ON {schema}.key_rates
    FOR EACH ROW EXECUTE FUNCTION {schema}.dp_count_key_rates();
CREATE TRIGGER dp_count_key_rates_truncate AFTER TRUNCATE ON {schema}.key_rates
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.dp_count_key_rates();
