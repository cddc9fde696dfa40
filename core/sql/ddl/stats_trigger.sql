-- The function of the queue_stats triggers, with slots (migration 0006; 0007 lets a transaction choose its slot).
CREATE OR REPLACE FUNCTION {schema}.dp_track_finished() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO {schema}.queue_stats AS s (queue, status, slot, count)
        SELECT queue, status, pg_backend_pid() % 16, sum(delta) FROM (
            SELECT queue, status, 1 AS delta FROM dp_new
             WHERE status IN ('completed', 'failed', 'cancelled')
            UNION ALL
            SELECT queue, status, -1 FROM dp_old
             WHERE status IN ('completed', 'failed', 'cancelled')
        ) d
        GROUP BY queue, status HAVING sum(delta) <> 0
        ORDER BY queue, status
        ON CONFLICT (queue, status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.queue_stats AS s (queue, status, slot, count)
        SELECT queue, status, pg_backend_pid() % 16, -count(*) FROM dp_old
         WHERE status IN ('completed', 'failed', 'cancelled')
        GROUP BY queue, status
        ORDER BY queue, status
        ON CONFLICT (queue, status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSE
        INSERT INTO {schema}.queue_stats AS s (queue, status, slot, count)
        SELECT queue, status, pg_backend_pid() % 16, count(*) FROM dp_new
         WHERE status IN ('completed', 'failed', 'cancelled')
        GROUP BY queue, status
        ORDER BY queue, status
        ON CONFLICT (queue, status, slot) DO UPDATE SET count = s.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END
$fn$;
