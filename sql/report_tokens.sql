-- Model 1's token at every position, in key order, for the responses from ($lo_stem, $lo_index)
-- to ($hi_stem, $hi_index): the text of the report's heat maps.
SELECT token
FROM positions
WHERE stem BETWEEN $lo_stem AND $hi_stem
    AND (stem > $lo_stem OR response_index >= $lo_index)
    AND (stem < $hi_stem OR response_index <= $hi_index)
ORDER BY stem, response_index, position;
