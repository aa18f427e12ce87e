-- The columns of {view} (klstream.storage.schemas) and no rows: {view} before its files exist,
-- and the columns that files written by older releases lack.
CREATE OR REPLACE MACRO {view}_columns() AS TABLE
SELECT
    {columns}
WHERE false;
