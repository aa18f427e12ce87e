-- The report's response table: one row per Model 1 response, in key order, for the responses
-- from ($lo_stem, $lo_index) to ($hi_stem, $hi_index) (the report reads the run range by range).
SELECT stem, response_index, prompt, num_tokens, tokens_match_text
FROM responses
WHERE in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
ORDER BY stem, response_index;
