-- Mean KL by position in the response, per model2, positions grouped into at most $buckets
-- buckets of equal width (bucket `start` holds positions start .. start + width - 1).
WITH bucket AS (
    SELECT greatest(1, ceil((max(position) + 1) / $buckets))::INTEGER AS width FROM kl
)
SELECT
    k.model2,
    (k.position // b.width) * b.width AS start,
    b.width,
    avg(k.kl_floor) AS mean_kl,
    count(k.kl_floor) AS scored
FROM kl AS k, bucket AS b
GROUP BY ALL
ORDER BY k.model2, start;
