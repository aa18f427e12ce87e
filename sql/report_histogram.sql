-- The report's KL histogram, per model2, on a log scale: bin b counts the positions with
-- 10^(b/10) <= kl_floor < 10^((b+1)/10), the first and last bins also holding everything below
-- 1e-8 and above 100; exact zeros have a null bin.
SELECT
    model2,
    CASE WHEN kl_floor > 0
        THEN least(greatest(floor(log10(kl_floor) * 10), -80), 19)::INTEGER
    END AS bin,
    count(*) AS positions
FROM kl
WHERE kl_floor IS NOT NULL
GROUP BY ALL
ORDER BY model2, bin NULLS FIRST;
