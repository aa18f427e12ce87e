-- What $model2's results cost (the `costs` view), and how many of them came from a lookahead step
-- in a response whose tokens do not reproduce its text (the `lookahead_hazards` view).
SELECT
    c.* EXCLUDE (model2),
    (SELECT count(*) FROM lookahead_hazards WHERE model2 = $model2) AS lookahead_hazards
FROM costs AS c
WHERE c.model2 = $model2;
