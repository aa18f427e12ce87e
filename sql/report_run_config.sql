-- What a resumed run of $model2 must repeat (scores/<model2>/run.json, see
-- klstream/scoring/runconfig.py RESULT_PARAMETERS): no row where run.json is missing.
-- thinking_budget is text: a number, 'auto', or null for `none`.
SELECT backend, top_logprobs, temperature, thinking_budget
FROM run_configs
WHERE model2 = $model2;
