-- Migration 0017 undone: the caller runs 0016's script again (dp_flow_settle as it was), then this.
-- {schema} is the quoted schema name.
DROP FUNCTION IF EXISTS {schema}.dp_flow_settle_take(bigint[], bigint[], text[], integer, uuid, text,
                                                     double precision);
