-- What the stored answers of $model2 say of how often Model 2 generates Model 1's tokens, so that
-- a resumed run's `--lookahead auto` starts from it instead of warming up again: every answer
-- with s results matched s - 1 generated tokens, and one that asked for more than it kept
-- (without reaching the end of its piece of the response, which the table does not tell) broke.
WITH answers AS (
    SELECT any_value(lookahead) AS asked, count(*) AS kept
    FROM scores
    WHERE model2 = $model2 AND status = getvariable('score_ok') AND lookahead > 1
    GROUP BY request_id
)
SELECT
    coalesce(sum(kept - 1), 0)::BIGINT AS matched,
    coalesce(count(*) FILTER (WHERE kept < asked), 0)::BIGINT AS broke
FROM answers;
