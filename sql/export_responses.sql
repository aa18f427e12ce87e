-- One row per Model 1 response with everything its `_kl.json` entry needs, for one $model2,
-- in file then response order, for the responses from ($lo_stem, $lo_index) to
-- ($hi_stem, $hi_index) (klstream exports range by range to bound memory). Positions without a
-- Model 2 result have null values.
WITH model_kl AS (
    SELECT * FROM kl
    WHERE model2 = $model2
        AND in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
),
per_response AS (
    SELECT
        stem,
        response_index,
        list(kl_floor ORDER BY position) AS kl_per_token,
        list({
            'position': position,
            'token': token,
            'kl_divergence': kl_floor,
            'model1_chosen_logprob': model1_logprob,
            'model2_chosen_logprob': model2_logprob,
            'kl_lower': kl_lower,
            'kl_estimate': kl_estimate,
            'logratio': logratio,
            'm1_token_in_m2_topk': m1_token_in_m2_topk,
            'top1_agree': top1_agree,
            'entropy1': entropy1,
            'entropy2': entropy2,
            'status': status
        } ORDER BY position) AS token_details,
        list({'position': position, 'status': status, 'error': error} ORDER BY position)
            FILTER (WHERE kl_floor IS NULL) AS unscored_positions
    FROM model_kl
    GROUP BY stem, response_index
)
SELECT
    r.stem,
    r.response_index,
    r.prompt,
    r.model1,
    r.source_path,
    r.text,
    r.num_tokens,
    coalesce(t.kl_per_token, []) AS kl_per_token,
    coalesce(t.token_details, []) AS token_details,
    {
        'mean_kl': s.mean_kl,
        'median_kl': s.median_kl,
        'std_kl': s.std_kl,
        'min_kl': s.min_kl,
        'max_kl': s.max_kl,
        'total_kl': s.total_kl,
        'p90_kl': s.p90_kl,
        'p99_kl': s.p99_kl,
        'mean_kl_lower': s.mean_kl_lower,
        'total_kl_lower': s.total_kl_lower,
        'mean_kl_estimate': s.mean_kl_estimate,
        'total_kl_estimate': s.total_kl_estimate,
        'mean_logratio': s.mean_logratio,
        'total_logratio': s.total_logratio,
        'top1_agreement': s.top1_agreement,
        'm1_token_outside_m2_topk_rate': s.m1_token_outside_m2_topk_rate,
        'num_scored': coalesce(s.num_scored, 0),
        'num_unscored': coalesce(s.num_unscored, 0)
    } AS statistics,
    coalesce(t.unscored_positions, []) AS unscored_positions,
    r.tokens_match_text
FROM responses AS r
LEFT JOIN per_response AS t USING (stem, response_index)
LEFT JOIN (
    SELECT * FROM response_stats WHERE model2 = $model2
        AND in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
) AS s
    USING (stem, response_index)
WHERE in_response_range(r.stem, r.response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
ORDER BY r.stem, r.response_index;
