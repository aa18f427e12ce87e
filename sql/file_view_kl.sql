-- Per-position estimators for every scored model2 (null where Model 2 has no result).
-- A table written before kl_estimate existed reads it as null until `klstream kl` redoes it.
CREATE OR REPLACE VIEW kl AS
SELECT * FROM read_parquet(getvariable('kl_files'), union_by_name = true)
UNION ALL BY NAME
FROM kl_columns();
