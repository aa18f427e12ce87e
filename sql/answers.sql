-- What the answers of $model2 that count were: how many top-k entries carried no usable logprob
-- (left out of the lists: sentinels, NaN, ±inf, null), and which model the service says answered
-- them (Gemini's modelVersion, an OpenAI-style server's model), one count per answer, with how
-- many answers came from another model than the one asked for.
WITH results AS (
    SELECT * FROM scores_resolved
    WHERE model2 = $model2 AND status = getvariable('score_ok')
),
served AS (
    SELECT
        served_model AS model,
        count(DISTINCT request_id) AS answers,
        any_value(model_name(split_part(served_model, '@', 1)) <> model_name(model2)) AS other
    FROM results
    WHERE served_model IS NOT NULL
    GROUP BY served_model
)
SELECT
    (SELECT coalesce(sum(dropped_logprobs), 0) FROM results)::BIGINT AS dropped_logprobs,
    (SELECT count(*) FROM results WHERE dropped_logprobs > 0)::BIGINT
        AS positions_with_dropped_logprobs,
    (SELECT list({'model': model, 'answers': answers} ORDER BY answers DESC, model) FROM served)
        AS served_models,
    (SELECT coalesce(sum(answers) FILTER (WHERE other), 0) FROM served)::BIGINT
        AS answers_from_other_models;
