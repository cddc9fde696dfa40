-- Shards (core/sharding.py, core/sharded.py, core/shardmove.py; docs/scale-out.md).
-- Blocks: "-- name: <name>".

-- name: shard_identity
SELECT shard_no, accepting FROM {shard_identity};

-- name: shard_identity_claim
-- Written once, when a sharded processor first migrates this database; a later one reads what is here.
INSERT INTO {shard_identity} (shard_no) VALUES (%(shard_no)s)
ON CONFLICT (singleton) DO NOTHING;

-- name: shard_set_ids
SELECT {shard_ids_function}(%(shard_no)s, %(stride)s);

-- name: shard_map_read
SELECT partition, shard_no, version, moving FROM {shard_map} ORDER BY partition;

-- name: shard_guard_partitions
-- Inside an insert's transaction: the partitions the batch was routed by, locked against a move until the
-- insert commits (a move updates these rows first), read as they are now.
SELECT partition, shard_no, moving FROM {shard_map}
 WHERE partition = ANY(%(partitions)s::int[])
 ORDER BY partition
   FOR SHARE;

-- name: shard_guard_identity
-- Inside an insert's transaction: which shard this is and whether it takes new records (a retiring shard
-- does not), locked against a retirement until the insert commits.
SELECT shard_no, accepting FROM {shard_identity} FOR SHARE;

-- name: shard_map_put
-- One partition's entry at a version; an older version never overwrites a newer one.
INSERT INTO {shard_map} AS m (partition, shard_no, version, moving)
VALUES (%(partition)s, %(shard_no)s, %(version)s, %(moving)s)
ON CONFLICT (partition) DO UPDATE
   SET shard_no = EXCLUDED.shard_no, version = EXCLUDED.version, moving = EXCLUDED.moving
 WHERE m.version <= EXCLUDED.version;

-- name: shard_set_accepting
UPDATE {shard_identity} SET accepting = %(accepting)s;
