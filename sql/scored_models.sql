-- The Model 2 names that have KL results in this run.
SELECT DISTINCT model2 FROM kl ORDER BY model2;
