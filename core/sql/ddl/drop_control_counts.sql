-- Migration 0014's downgrade: the triggers and functions that keep queue_controls (the table goes after).
DROP TRIGGER IF EXISTS dp_count_pauses ON {schema}.queue_state;
DROP TRIGGER IF EXISTS dp_count_pauses_truncate ON {schema}.queue_state;
DROP TRIGGER IF EXISTS dp_count_queue_rates ON {schema}.queue_rates;
DROP TRIGGER IF EXISTS dp_count_queue_rates_truncate ON {schema}.queue_rates;
DROP TRIGGER IF EXISTS dp_count_key_rates ON {schema}.key_rates;
DROP TRIGGER IF EXISTS dp_count_key_rates_truncate ON {schema}.key_rates;
DROP FUNCTION IF EXISTS {schema}.dp_count_pauses();
DROP FUNCTION IF EXISTS {schema}.dp_count_queue_rates();
DROP FUNCTION IF EXISTS {schema}.dp_count_key_rates();
