-- The views that klstream's connection has made over the run (those whose files exist).
SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name;
