-- How many positions exist and how many of them already have a successful $model2 result.
SELECT
    (SELECT count(*) FROM positions) AS positions,
    (SELECT count(*) FROM scores_resolved WHERE model2 = $model2 AND status = getvariable('score_ok')) AS done;
