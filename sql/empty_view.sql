-- No {files} yet: {view} has its columns and no rows.
CREATE OR REPLACE VIEW {view} AS
FROM {view}_columns();
