-- The first $max_positions tokens of $sites responses, one per prompt before any prompt's second,
-- in key order otherwise, with their prompt: where a calibrating dry run sends its requests (at
-- position 0, so the service counts the prompt alone), and what predicts acceptance there.
WITH ranked AS (
    SELECT
        stem,
        response_index,
        prompt,
        row_number() OVER (PARTITION BY prompt ORDER BY stem, response_index) AS nth_of_prompt
    FROM responses
    WHERE num_tokens >= 1
),
chosen AS (
    SELECT stem, response_index, prompt
    FROM ranked
    ORDER BY nth_of_prompt, stem, response_index
    LIMIT $sites
)
SELECT
    p.stem,
    p.response_index,
    p.position,
    p.token,
    p.token_id,
    p.char_offset,
    p.logprob,
    own_top(p.token, p.token_id, p.top_tokens, p.top_token_ids)::DOUBLE AS own_top,
    own_margin(p.token, p.token_id, p.logprob, p.top_tokens, p.top_token_ids, p.top_logprobs)
        AS margin,
    c.prompt
FROM positions AS p
JOIN chosen AS c USING (stem, response_index)
WHERE p.position < $max_positions
ORDER BY p.stem, p.response_index, p.position;
