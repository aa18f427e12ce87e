-- Every Model 2 request outcome, all models, all checkpoint parts (a key may repeat). Columns
-- added by later releases read as null in parts written before them (scores_columns()).
CREATE OR REPLACE VIEW scores AS
SELECT * FROM read_parquet(getvariable('scores_files'), union_by_name = true)
UNION ALL BY NAME
FROM scores_columns();
