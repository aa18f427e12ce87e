-- Views over one run directory's Parquet files, for klstream itself and for ad-hoc queries.
-- File names come from DuckDB variables (positions_file, ...) and status values too (score_ok,
-- kl_error, ...), relative to file_search_path: klstream sets them first, and so does the script
-- printed by `klstream views RUN_DIR`. Before these come the views over files that may not exist
-- yet (skipped, scores, kl, run_configs: sql/file_view_*.sql, or an empty view of their columns), so
-- every view here always exists.

-- One row per token position of Model 1's responses.
CREATE OR REPLACE VIEW positions AS
SELECT * FROM read_parquet(getvariable('positions_file'));

-- One row per Model 1 response.
CREATE OR REPLACE VIEW responses AS
SELECT * FROM read_parquet(getvariable('responses_file'));

-- The outcome that counts for each (model2, key): its newest success, else its newest failure.
CREATE OR REPLACE VIEW scores_resolved AS
SELECT * EXCLUDE (resolution_rank)
FROM (
    SELECT *, row_number() OVER (
        PARTITION BY model2, stem, response_index, position
        ORDER BY (status = getvariable('score_ok')) DESC, scored_at DESC
    ) AS resolution_rank
    FROM scores
)
WHERE resolution_rank = 1;

-- Per-response statistics of kl_floor (the spec's KL) and of the other estimators
-- (kl_lower: the capped certified lower bound; kl_estimate: the model-based point estimate).
-- std_kl is the population standard deviation, as numpy's default.
CREATE OR REPLACE VIEW response_stats AS
SELECT
    model2,
    stem,
    response_index,
    count(*)::INTEGER AS num_tokens,
    count(kl_floor)::INTEGER AS num_scored,
    (count(*) - count(kl_floor))::INTEGER AS num_unscored,
    avg(kl_floor) AS mean_kl,
    median(kl_floor) AS median_kl,
    stddev_pop(kl_floor) AS std_kl,
    min(kl_floor) AS min_kl,
    max(kl_floor) AS max_kl,
    sum(kl_floor) AS total_kl,
    quantile_cont(kl_floor, 0.9) AS p90_kl,
    quantile_cont(kl_floor, 0.99) AS p99_kl,
    avg(kl_lower) AS mean_kl_lower,
    sum(kl_lower) AS total_kl_lower,
    avg(kl_estimate) AS mean_kl_estimate,
    sum(kl_estimate) AS total_kl_estimate,
    avg(logratio) AS mean_logratio,
    sum(logratio) AS total_logratio,
    avg(top1_agree::DOUBLE) AS top1_agreement,
    avg((NOT m1_token_in_m2_topk)::DOUBLE) AS m1_token_outside_m2_topk_rate,
    avg(entropy1) AS mean_entropy1,
    avg(entropy2) AS mean_entropy2
FROM kl
GROUP BY model2, stem, response_index;

-- What each Model 2's results cost, from the usage every answer reported (the greedy probe's
-- requests included): HTTP requests (retries included) and requests per scored position, input
-- tokens uncached and cached, output tokens (thinking included, as billed), and the list price
-- in USD online and in Batch Mode at the prices run.json recorded (null without a price).
CREATE OR REPLACE VIEW costs AS
WITH answers AS (
    SELECT
        model2,
        (sum(attempts) FILTER (WHERE coalesce(step, 0) = 0))::BIGINT AS requests,
        count(*) FILTER (WHERE coalesce(step, 0) = 0 AND status = getvariable('score_ok'))
            AS answers,
        count(DISTINCT (stem, response_index, position))
            FILTER (WHERE status = getvariable('score_ok')) AS positions,
        -- Null where no answer recorded its usage (parts written before it was recorded).
        sum(prompt_token_count)::BIGINT AS prompt_tokens,
        sum(cached_content_token_count)::BIGINT AS cached_tokens,
        sum(candidates_token_count)::BIGINT AS candidates_tokens,
        sum(thoughts_token_count)::BIGINT AS thoughts_tokens
    FROM scores
    GROUP BY model2
),
totals AS (
    SELECT
        a.model2,
        a.requests + coalesce(c.greedy_probe.requests, 0) AS requests,
        a.answers,
        a.positions,
        a.prompt_tokens + coalesce(c.greedy_probe.prompt_token_count, 0) AS prompt_tokens,
        a.cached_tokens + coalesce(c.greedy_probe.cached_content_token_count, 0)
            AS cached_tokens,
        a.candidates_tokens + a.thoughts_tokens
            + coalesce(c.greedy_probe.candidates_token_count, 0)
            + coalesce(c.greedy_probe.thoughts_token_count, 0) AS output_tokens,
        a.thoughts_tokens + coalesce(c.greedy_probe.thoughts_token_count, 0) AS thoughts_tokens,
        c.prices AS price
    FROM answers AS a
    LEFT JOIN run_configs AS c USING (model2)
)
SELECT
    model2,
    requests,
    positions,
    requests / nullif(positions, 0) AS requests_per_position,
    answers,
    prompt_tokens - cached_tokens AS uncached_input_tokens,
    cached_tokens AS cached_input_tokens,
    cached_tokens / nullif(prompt_tokens, 0) AS cached_share,
    output_tokens,
    thoughts_tokens,
    ((prompt_tokens - cached_tokens) * price.input + cached_tokens * price.cached_input
        + output_tokens * price.output) / 1e6 AS usd,
    ((prompt_tokens - cached_tokens) * price.batch_input
        + cached_tokens * price.batch_cached_input + output_tokens * price.batch_output) / 1e6
        AS batch_usd,
    1000 * usd / nullif(positions, 0) AS usd_per_1000_positions,
    price.model AS priced_as,
    price.date AS price_date,
    price.source AS price_source
FROM totals;

-- Results taken from a lookahead step (step > 0) in responses whose tokens do not reproduce their
-- text. A step is conditioned on the token ids Model 2 generated (Model 1's), a one-token request
-- on the service's tokenization of the prefill text; where Model 1's tokens do not reproduce the
-- text, the two conditionings can differ, and with them the results.
CREATE OR REPLACE VIEW lookahead_hazards AS
SELECT s.model2, s.stem, s.response_index, s.position, s.step
FROM scores_resolved AS s
JOIN responses AS r USING (stem, response_index)
WHERE s.status = getvariable('score_ok') AND s.step > 0 AND NOT r.tokens_match_text;
