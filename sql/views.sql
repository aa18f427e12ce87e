-- Views over one run directory's Parquet files, for klstream itself and for ad-hoc queries.
-- Paths are relative: run `SET file_search_path = 'RUN_DIR';` first (klstream does; so does the
-- script printed by `klstream views RUN_DIR`), or start duckdb inside RUN_DIR.
-- A view whose files do not exist yet (no scores before `klstream score`) is not created.

-- One row per token position of Model 1's responses.
CREATE OR REPLACE VIEW positions AS
SELECT * FROM read_parquet('positions.parquet');

-- One row per Model 1 response.
CREATE OR REPLACE VIEW responses AS
SELECT * FROM read_parquet('responses.parquet');

-- Responses that `explode --skip-invalid` left out, with the reason.
CREATE OR REPLACE VIEW skipped AS
SELECT * FROM read_parquet('skipped.parquet');

-- Every Model 2 request outcome, all models, all checkpoint parts (a key may repeat).
CREATE OR REPLACE VIEW scores AS
SELECT * FROM read_parquet('scores/*/*.parquet', union_by_name = true);

-- The outcome that counts for each (model2, key): its newest success, else its newest failure.
CREATE OR REPLACE VIEW scores_resolved AS
SELECT * EXCLUDE (resolution_rank)
FROM (
    SELECT *, row_number() OVER (
        PARTITION BY model2, stem, response_index, position
        ORDER BY (status = 'ok') DESC, scored_at DESC
    ) AS resolution_rank
    FROM scores
)
WHERE resolution_rank = 1;

-- Per-position estimators for every scored model2 (null where Model 2 has no result).
-- A table written before kl_estimate existed reads it as null until `klstream kl` redoes it.
CREATE OR REPLACE VIEW kl AS
SELECT * FROM read_parquet('kl/*.parquet', union_by_name = true)
UNION ALL BY NAME
SELECT NULL::DOUBLE AS kl_estimate, NULL::DOUBLE AS tail_sigma2 WHERE false;

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
