-- The first $max_positions positions of the first $responses responses with at least two tokens,
-- in key order, with what a request there needs (prompt on every row, token, id, prefill length):
-- the sites of the greedy consistency probe.
WITH chosen AS (
    SELECT stem, response_index, prompt
    FROM responses
    WHERE num_tokens >= 2
    ORDER BY stem, response_index
    LIMIT $responses
)
SELECT
    p.stem,
    p.response_index,
    p.position,
    p.token,
    p.token_id,
    p.char_offset,
    c.prompt
FROM positions AS p
JOIN chosen AS c USING (stem, response_index)
WHERE p.position < $max_positions
ORDER BY p.stem, p.response_index, p.position;
