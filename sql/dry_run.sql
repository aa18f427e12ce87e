-- Per prompt, what scoring its positions still pending for $model2 involves: how many positions
-- and responses, the sum of the positions (the Model 1 tokens their prefills hold), the runs of
-- consecutive pending positions (each needs a request of its own), the prompt's length in
-- characters, and Model 1's agreement with itself there (the sum of the probabilities of its own
-- tokens, and how many of them are its own top token): what a dry run estimates from.
WITH done AS (
    SELECT stem, response_index, position
    FROM scores_resolved
    WHERE model2 = $model2 AND status = getvariable('score_ok')
),
pending AS (
    SELECT
        stem,
        response_index,
        position,
        exp(logprob) AS own_probability,
        own_top(token, token_id, top_tokens, top_token_ids) AS own_top,
        position - row_number() OVER (
            PARTITION BY stem, response_index ORDER BY position
        ) AS run
    FROM positions
    ANTI JOIN done USING (stem, response_index, position)
),
per_response AS (
    SELECT
        stem,
        response_index,
        count(*) AS positions,
        sum(position) AS position_sum,
        count(DISTINCT run) AS runs,
        sum(own_probability) AS own_probability,
        count(*) FILTER (WHERE own_top) AS own_top
    FROM pending
    GROUP BY stem, response_index
)
SELECT
    r.prompt,
    length(r.prompt) AS prompt_chars,
    count(*) AS responses,
    sum(p.positions)::BIGINT AS positions,
    sum(p.position_sum)::BIGINT AS position_sum,
    sum(p.runs)::BIGINT AS runs,
    sum(p.own_probability) AS own_probability,
    sum(p.own_top)::BIGINT AS own_top
FROM per_response AS p
JOIN responses AS r USING (stem, response_index)
GROUP BY r.prompt
ORDER BY r.prompt;
