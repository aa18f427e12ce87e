-- Per-response figures of one $model2 for the report's table, one row per response of
-- sql/report_responses.sql in the same order (null figures where nothing is scored).
-- normalized KL is kl_floor / (entropy1 + entropy2), as in sql/top_tokens.sql.
WITH model_kl AS (
    SELECT * FROM kl
    WHERE model2 = $model2
        AND in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
)
SELECT
    avg(k.kl_floor) AS mean_kl,
    max(k.kl_floor) AS max_kl,
    sum(k.kl_floor) AS total_kl,
    avg(k.kl_floor / nullif(k.entropy1 + k.entropy2, 0)) AS mean_normalized_kl,
    avg(k.kl_estimate) AS mean_kl_estimate,
    sum(k.logratio) AS total_logratio,
    count(k.kl_floor)::INTEGER AS scored,
    count(*) FILTER (WHERE k.status = getvariable('kl_error'))::INTEGER AS failed,
    count(*) FILTER (WHERE k.status = getvariable('kl_unscored'))::INTEGER AS unscored,
    count(*) FILTER (WHERE NOT k.m1_token_in_m2_topk)::INTEGER AS outside_topk,
    avg(k.top1_agree::DOUBLE) AS top1_agreement
FROM responses AS r
LEFT JOIN model_kl AS k USING (stem, response_index)
WHERE in_response_range(r.stem, r.response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
GROUP BY r.stem, r.response_index
ORDER BY r.stem, r.response_index;
