-- Model 1's token at every position, in key order, for the responses from ($lo_stem, $lo_index)
-- to ($hi_stem, $hi_index): the text of the report's heat maps.
SELECT token
FROM positions
WHERE in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
ORDER BY stem, response_index, position;
