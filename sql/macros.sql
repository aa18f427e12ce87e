-- Macros every klstream query shares. Run after the SET VARIABLE lines that klstream (or the
-- script `klstream views RUN_DIR` prints) puts first.

-- Whether the response (stem, idx) lies in the range of responses from (lo_stem, lo_index) to
-- (hi_stem, hi_index), both included, in key order. klstream cuts a run into such ranges so
-- DuckDB's joins and sorts hold one range at a time.
CREATE OR REPLACE MACRO in_response_range(stem, idx, lo_stem, lo_index, hi_stem, hi_index) AS
    stem BETWEEN lo_stem AND hi_stem
    AND (stem > lo_stem OR idx >= lo_index)
    AND (stem < hi_stem OR idx <= hi_index);
