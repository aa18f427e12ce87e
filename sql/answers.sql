-- What the results of $model2 that count came from: how many top-k entries carried no usable
-- logprob (left out of the lists: sentinels, NaN, ±inf, null), and which model the service says
-- answered (Gemini's modelVersion, an OpenAI-style server's model), counted in positions (the
-- same whatever the method or lookahead), with how many came from another model than asked for.
WITH results AS (
    SELECT * FROM scores_resolved
    WHERE model2 = $model2 AND status = getvariable('score_ok')
),
served AS (
    SELECT
        served_model AS model,
        count(*) AS positions,
        any_value(served_elsewhere(served_model, model2)) AS other
    FROM results
    WHERE served_model IS NOT NULL
    GROUP BY served_model
)
SELECT
    (SELECT coalesce(sum(dropped_logprobs), 0) FROM results)::BIGINT AS dropped_logprobs,
    (SELECT count(*) FROM results WHERE dropped_logprobs > 0)::BIGINT
        AS positions_with_dropped_logprobs,
    (SELECT list({'model': model, 'positions': positions} ORDER BY positions DESC, model)
     FROM served) AS served_models,
    (SELECT coalesce(sum(positions) FILTER (WHERE other), 0) FROM served)::BIGINT
        AS positions_from_other_models;
