-- Run figures beyond sql/summary.sql for one $model2: how many positions have Model 1's token
-- outside Model 2's top-k. Requests and tokens come from the `costs` view (sql/cost_summary.sql),
-- as the CLI prints them: a lookahead step is not a request of its own.
SELECT
    (SELECT count(*) FROM kl WHERE model2 = $model2 AND NOT m1_token_in_m2_topk)
        AS outside_topk;
