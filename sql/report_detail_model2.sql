-- One $model2's estimators and top-k at every position of the responses in `detail_keys`,
-- row for row with sql/report_detail_model1.sql (null lists where Model 2 has no result).
-- $stems lists their stems: a filter DuckDB pushes through the views into the Parquet scans.
WITH detail_positions AS (
    SELECT d.detail_order, p.stem, p.response_index, p.position
    FROM detail_keys AS d
    JOIN (SELECT * FROM positions WHERE list_contains($stems, stem)) AS p
        USING (stem, response_index)
),
answers AS (
    SELECT stem, response_index, position, top_tokens, top_logprobs
    FROM scores_resolved
    WHERE model2 = $model2 AND status = getvariable('score_ok') AND list_contains($stems, stem)
)
SELECT
    k.kl_floor,
    k.kl_lower,
    k.kl_estimate,
    k.logratio,
    k.entropy1,
    k.entropy2,
    k.model2_logprob,
    a.top_tokens,
    a.top_logprobs
FROM detail_positions AS d
LEFT JOIN (SELECT * FROM kl WHERE model2 = $model2 AND list_contains($stems, stem)) AS k
    USING (stem, response_index, position)
LEFT JOIN answers AS a USING (stem, response_index, position)
ORDER BY d.detail_order, d.position;
