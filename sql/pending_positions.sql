-- Every position of the responses that still have something to score for $model2, in key order,
-- with the token and its id (to rebuild prefills and prompts), whether it is pending (no
-- successful result yet), Model 1's logprob of its token, whether that is its own top token and
-- its margin over the best other (what the acceptance prediction reads), and the prompt on each
-- response's first row only (so the sort carries no copies of it); for the responses from
-- ($lo_stem, $lo_index) to ($hi_stem, $hi_index), as klstream asks range by range.
WITH range_positions AS (
    SELECT * FROM positions
    WHERE in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
),
done AS (
    SELECT stem, response_index, position
    FROM scores_resolved
    WHERE model2 = $model2 AND status = getvariable('score_ok')
        AND in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
),
open_responses AS (
    SELECT DISTINCT stem, response_index
    FROM range_positions
    ANTI JOIN done USING (stem, response_index, position)
)
SELECT
    p.stem,
    p.response_index,
    p.position,
    p.token,
    p.token_id,
    p.char_offset,
    d.position IS NULL AS pending,
    p.logprob,
    own_top(p.token, p.token_id, p.top_tokens, p.top_token_ids) AS own_top,
    own_margin(p.token, p.token_id, p.logprob, p.top_tokens, p.top_token_ids, p.top_logprobs)
        AS margin,
    r.prompt
FROM range_positions AS p
SEMI JOIN open_responses USING (stem, response_index)
LEFT JOIN done AS d USING (stem, response_index, position)
LEFT JOIN responses AS r
    ON r.stem = p.stem AND r.response_index = p.response_index AND p.position = 0
ORDER BY p.stem, p.response_index, p.position;
