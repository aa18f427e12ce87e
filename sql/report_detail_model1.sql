-- Model 1's top-k at every position of the responses in `detail_keys` (stem, response_index,
-- detail_order: a table klstream registers), in detail order then position order.
SELECT p.token, p.logprob, p.top_tokens, p.top_logprobs
FROM detail_keys AS d
JOIN positions AS p USING (stem, response_index)
ORDER BY d.detail_order, p.position;
