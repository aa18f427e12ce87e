-- What the stored answers of $model2 say of where Model 2 generates Model 1's tokens, so that a
-- resumed run's `--lookahead auto` starts calibrated instead of from its prior: every stored
-- result's chosen token is Model 2's token at that position given Model 1's prefix, compared
-- with Model 1's (by id where both carry one, else by text), with Model 1's logprob, whether
-- its token is its own top one and its margin there, and the decoding; the newest $most.
SELECT
    s.decoding,
    p.logprob,
    own_top(p.token, p.token_id, p.top_tokens, p.top_token_ids)::DOUBLE AS own_top,
    own_margin(p.token, p.token_id, p.logprob, p.top_tokens, p.top_token_ids, p.top_logprobs)
        AS margin,
    coalesce(s.chosen_token_id = p.token_id, s.chosen_token = p.token) AS agreed
FROM scores_resolved AS s
JOIN positions AS p USING (stem, response_index, position)
WHERE s.model2 = $model2 AND s.status = getvariable('score_ok') AND s.chosen_token IS NOT NULL
ORDER BY s.scored_at DESC
LIMIT $most;
