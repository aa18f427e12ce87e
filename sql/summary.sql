-- Run-level figures for one $model2, in the manner of llama.cpp's --kl-divergence report.
-- Standard errors are of the mean over positions (sample standard deviation / sqrt(n)).
-- Responses are counted from the responses table: one without tokens has no position.
WITH model_kl AS (
    SELECT * FROM kl WHERE model2 = $model2
)
SELECT
    $model2 AS model2,
    (SELECT list(DISTINCT model1 ORDER BY model1) FROM responses) AS model1,
    (SELECT count(*) FROM responses) AS responses,
    count(*) AS positions,
    count(kl_floor) AS scored,
    count(*) FILTER (WHERE status = getvariable('kl_error')) AS failed,
    count(*) FILTER (WHERE status = getvariable('kl_unscored')) AS unscored,
    avg(kl_floor) AS mean_kl,
    stddev_samp(kl_floor) / sqrt(count(kl_floor)) AS mean_kl_stderr,
    max(kl_floor) AS max_kl,
    quantile_cont(kl_floor, 0.999) AS p99_9_kl,
    quantile_cont(kl_floor, 0.99) AS p99_kl,
    quantile_cont(kl_floor, 0.95) AS p95_kl,
    quantile_cont(kl_floor, 0.90) AS p90_kl,
    quantile_cont(kl_floor, 0.50) AS p50_kl,
    quantile_cont(kl_floor, 0.10) AS p10_kl,
    quantile_cont(kl_floor, 0.05) AS p05_kl,
    quantile_cont(kl_floor, 0.01) AS p01_kl,
    min(kl_floor) AS min_kl,
    avg(top1_agree::DOUBLE) AS top1_agreement,
    sqrt(avg(top1_agree::DOUBLE) * (1 - avg(top1_agree::DOUBLE)) / count(top1_agree))
        AS top1_agreement_stderr,
    avg((NOT m1_token_in_m2_topk)::DOUBLE) AS m1_token_outside_m2_topk_rate,
    avg(kl_lower) AS mean_kl_lower,
    stddev_samp(kl_lower) / sqrt(count(kl_lower)) AS mean_kl_lower_stderr,
    avg(kl_estimate) AS mean_kl_estimate,
    stddev_samp(kl_estimate) / sqrt(count(kl_estimate)) AS mean_kl_estimate_stderr,
    any_value(tail_sigma2) AS tail_sigma2,
    avg(logratio) AS mean_logratio,
    stddev_samp(logratio) / sqrt(count(logratio)) AS mean_logratio_stderr,
    avg(entropy1) AS mean_entropy1,
    avg(entropy2) AS mean_entropy2
FROM model_kl;
