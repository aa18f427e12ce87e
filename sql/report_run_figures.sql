-- Run figures beyond sql/summary.sql for one $model2: how many positions have Model 1's token
-- outside Model 2's top-k, and how many requests Model 2 was sent (retries included).
SELECT
    (SELECT count(*) FROM kl WHERE model2 = $model2 AND NOT m1_token_in_m2_topk)
        AS outside_topk,
    (SELECT sum(attempts) FROM scores WHERE model2 = $model2)::BIGINT AS requests;
