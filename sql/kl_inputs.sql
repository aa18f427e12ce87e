-- Model 1's positions beside Model 2's resolved outcome for one model2 ($model2), in key order,
-- for the responses from ($lo_stem, $lo_index) to ($hi_stem, $hi_index): klstream runs it range
-- by range so that memory stays bounded. A position Model 2 has not answered yet comes with a
-- null m2_status.
SELECT
    p.stem,
    p.response_index,
    p.position,
    p.token,
    p.token_id,
    p.logprob,
    p.top_tokens,
    p.top_token_ids,
    p.top_logprobs,
    s.status AS m2_status,
    s.error AS m2_error,
    s.top_tokens AS m2_top_tokens,
    s.top_token_ids AS m2_top_token_ids,
    s.top_logprobs AS m2_top_logprobs
FROM positions AS p
LEFT JOIN (
    SELECT * FROM scores_resolved
    WHERE model2 = $model2
        AND in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
) AS s
    USING (stem, response_index, position)
WHERE in_response_range(p.stem, p.response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
ORDER BY p.stem, p.response_index, p.position;
