-- Macros every klstream query shares. Run after the SET VARIABLE lines that klstream (or the
-- script `klstream views RUN_DIR` prints) puts first.

-- Whether the response (stem, idx) lies in the range of responses from (lo_stem, lo_index) to
-- (hi_stem, hi_index), both included, in key order. klstream cuts a run into such ranges so
-- DuckDB's joins and sorts hold one range at a time.
CREATE OR REPLACE MACRO in_response_range(stem, idx, lo_stem, lo_index, hi_stem, hi_index) AS
    stem BETWEEN lo_stem AND hi_stem
    AND (stem > lo_stem OR idx >= lo_index)
    AND (stem < hi_stem OR idx <= hi_index);

-- A model's name as the service spells it either way: without the Developer API's "models/".
CREATE OR REPLACE MACRO model_name(name) AS
    CASE WHEN starts_with(name, 'models/') THEN name[8:] ELSE name END;

-- Whether the model a service says answered (model, or model@fingerprint) is not the one asked
-- for: neither its name nor a numbered version of it (gemini-2.5-flash-001 for
-- gemini-2.5-flash). klstream.backends.checks.served_elsewhere says the same.
CREATE OR REPLACE MACRO served_elsewhere(served, asked) AS
    served IS NOT NULL
    AND model_name(split_part(served, '@', 1)) <> model_name(asked)
    AND NOT (
        starts_with(model_name(split_part(served, '@', 1)), model_name(asked) || '-')
        AND regexp_full_match(
            model_name(split_part(served, '@', 1))[length(model_name(asked)) + 2:], '[0-9]+'
        )
    );

-- Whether Model 1's token at a position of positions.parquet is its own top token (by id where
-- both carry one, else by text); null without a top-k list. What lookahead's acceptance
-- prediction (klstream.scoring.acceptance) reads, with own_margin.
CREATE OR REPLACE MACRO own_top(token, token_id, top_tokens, top_token_ids) AS
    coalesce(token_id = top_token_ids[1], token = top_tokens[1]);

-- Model 1's logprob of its token minus the best other token's: positive exactly when it is its
-- own top token; null when the top-k list does not show the other.
CREATE OR REPLACE MACRO own_margin(token, token_id, logprob, top_tokens, top_token_ids, top_logprobs)
    AS logprob - CASE
        WHEN own_top(token, token_id, top_tokens, top_token_ids) THEN top_logprobs[2]
        ELSE top_logprobs[1]
    END;
