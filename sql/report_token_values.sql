-- One $model2's estimators at every position, aligned row for row with sql/report_tokens.sql
-- (null where the KL table has no row for a position, as for one not scored yet).
WITH model_kl AS (
    SELECT * FROM kl
    WHERE model2 = $model2
        AND in_response_range(stem, response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
)
SELECT
    k.kl_floor,
    k.kl_floor / nullif(k.entropy1 + k.entropy2, 0) AS normalized_kl,
    k.logratio,
    k.kl_estimate,
    coalesce(k.status, getvariable('kl_unscored')) AS status,
    k.m1_token_in_m2_topk,
    k.top1_agree,
    k.error
FROM positions AS p
LEFT JOIN model_kl AS k USING (stem, response_index, position)
WHERE in_response_range(p.stem, p.response_index, $lo_stem, $lo_index, $hi_stem, $hi_index)
ORDER BY p.stem, p.response_index, p.position;
