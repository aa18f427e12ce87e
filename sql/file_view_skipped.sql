-- Responses that `explode --skip-invalid` left out, with the reason.
CREATE OR REPLACE VIEW skipped AS
SELECT * FROM read_parquet(getvariable('skipped_file'));

