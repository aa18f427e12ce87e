-- Responses in the order the report gives them full top-k detail: by their best rank across
-- every model2's ranking by mean KL and by max KL (so the top of each ranking comes first).
WITH ranked AS (
    SELECT
        stem,
        response_index,
        num_tokens,
        rank() OVER (PARTITION BY model2 ORDER BY mean_kl DESC) AS by_mean,
        rank() OVER (PARTITION BY model2 ORDER BY max_kl DESC) AS by_max
    FROM response_stats
    WHERE num_scored > 0
)
SELECT stem, response_index, any_value(num_tokens) AS num_tokens
FROM ranked
GROUP BY stem, response_index
ORDER BY min(least(by_mean, by_max)), stem, response_index;
