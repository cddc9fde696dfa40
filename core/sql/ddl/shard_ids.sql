-- dp_set_shard_ids and dp_raise_ids (migration 0007): see core/schema.py. {schema}: the quoted schema.
CREATE OR REPLACE FUNCTION {schema}.dp_set_shard_ids(shard integer, stride integer, above bigint)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    next_id bigint;
BEGIN
    SELECT (greatest(coalesce(max(id), 0), above) / stride + 1) * stride + shard INTO next_id
      FROM {schema}.processing_queue;
    EXECUTE format('ALTER TABLE %s.processing_queue ALTER COLUMN id SET INCREMENT BY %s RESTART WITH %s',
                   '{schema}', stride, next_id);
    RETURN next_id;
END
$fn$;
CREATE OR REPLACE FUNCTION {schema}.dp_raise_ids(above bigint) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    seq text := pg_get_serial_sequence('{schema}.processing_queue', 'id');
    taken bigint;
BEGIN
    LOOP
        taken := nextval(seq);
        EXIT WHEN taken > above;
    END LOOP;
    RETURN taken;
END
$fn$;
