-- One $model2's estimators at every position, aligned row for row with sql/report_tokens.sql
-- (null where the KL table has no row for a position, as for one not scored yet).
WITH model_kl AS (
    SELECT * FROM kl
    WHERE model2 = $model2 AND stem BETWEEN $lo_stem AND $hi_stem
)
SELECT
    k.kl_floor,
    k.kl_floor / nullif(k.entropy1 + k.entropy2, 0) AS normalized_kl,
    k.logratio,
    coalesce(k.status, 'unscored') AS status,
    k.m1_token_in_m2_topk,
    k.top1_agree,
    k.error
FROM positions AS p
LEFT JOIN model_kl AS k USING (stem, response_index, position)
WHERE p.stem BETWEEN $lo_stem AND $hi_stem
    AND (p.stem > $lo_stem OR p.response_index >= $lo_index)
    AND (p.stem < $hi_stem OR p.response_index <= $hi_index)
ORDER BY p.stem, p.response_index, p.position;
