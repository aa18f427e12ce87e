-- The positions of one $model2 whose score lies in [$min, $max] (a null bound is no bound),
-- highest first, at most $limit of them (null: all), each with Model 1's $context tokens before
-- and after it. $score is 'kl' (kl_floor, the spec's KL), 'normalized' (kl_floor divided by
-- entropy1 + entropy2, so that positions where both models are unsure weigh less; null where
-- both entropies are 0) or 'estimate' (kl_estimate, the model-based point estimate of the full
-- KL; null in KL tables written before it existed). `klstream top` and the report's highest-KL list both run this.
WITH scored AS (
    SELECT
        model2,
        stem,
        response_index,
        position,
        token,
        kl_floor AS kl,
        kl_floor / nullif(entropy1 + entropy2, 0) AS normalized_kl,
        kl_estimate,
        kl_lower,
        logratio,
        entropy1,
        entropy2,
        m1_token_in_m2_topk,
        top1_agree
    FROM kl
    WHERE model2 = $model2 AND kl_floor IS NOT NULL
),
picked AS (
    SELECT *
    FROM (
        SELECT *, CASE $score
            WHEN 'normalized' THEN normalized_kl
            WHEN 'estimate' THEN kl_estimate
            ELSE kl
        END AS score
        FROM scored
    )
    WHERE score IS NOT NULL
        AND ($min IS NULL OR score >= $min)
        AND ($max IS NULL OR score <= $max)
    ORDER BY score DESC, stem, response_index, position
    LIMIT $limit
),
context AS (
    SELECT
        t.stem,
        t.response_index,
        t.position,
        coalesce(string_agg(p.token, '' ORDER BY p.position)
            FILTER (WHERE p.position < t.position), '') AS context_before,
        coalesce(string_agg(p.token, '' ORDER BY p.position)
            FILTER (WHERE p.position > t.position), '') AS context_after
    FROM picked AS t
    JOIN positions AS p
        ON p.stem = t.stem
        AND p.response_index = t.response_index
        AND p.position BETWEEN t.position - $context AND t.position + $context
    GROUP BY t.stem, t.response_index, t.position
)
SELECT
    t.model2,
    t.stem,
    t.response_index,
    t.position,
    t.token,
    t.kl,
    t.normalized_kl,
    t.kl_estimate,
    t.kl_lower,
    t.logratio,
    t.entropy1,
    t.entropy2,
    t.m1_token_in_m2_topk,
    t.top1_agree,
    c.context_before,
    c.context_after
FROM picked AS t
JOIN context AS c USING (stem, response_index, position)
ORDER BY t.score DESC, t.stem, t.response_index, t.position;
