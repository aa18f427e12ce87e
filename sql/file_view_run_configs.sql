-- What each Model 2's run recorded in scores/<model2>/run.json (null where an older release
-- recorded nothing): the price entry its costs are reckoned with and the greedy probe's outcome.
-- Its columns (run_config_columns) come from klstream.storage.schemas.RUN_CONFIGS.
CREATE OR REPLACE VIEW run_configs AS
SELECT * FROM read_json(
    getvariable('run_config_files'), columns = getvariable('run_config_columns')
);
