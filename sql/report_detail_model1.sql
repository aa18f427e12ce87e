-- Model 1's top-k at every position of the responses in `detail_keys` (stem, response_index,
-- detail_order: a table klstream registers), in detail order then position order. $stems lists
-- their stems: a filter DuckDB pushes into the Parquet scan, unlike the join.
SELECT p.token, p.logprob, p.top_tokens, p.top_logprobs
FROM detail_keys AS d
JOIN (SELECT * FROM positions WHERE list_contains($stems, stem)) AS p
    USING (stem, response_index)
ORDER BY d.detail_order, p.position;
