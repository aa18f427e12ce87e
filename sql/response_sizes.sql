-- Every response's key and number of tokens, in key order: klstream cuts the run into ranges of
-- responses from it.
SELECT stem, response_index, num_tokens FROM responses ORDER BY stem, response_index;
