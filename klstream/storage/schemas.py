"""Arrow schemas of every Parquet table klstream writes — the one place they are defined.

A run directory (``RUN_DIR``) holds:

``positions.parquet`` (:data:`POSITIONS`) — written by ``klstream explode``
    One row per token position of every Model 1 response.

    ============== ================== ==================================================
    stem           string             input file name without ``.json``
    response_index int32              index of the response in the file's ``responses``
    position       int32              0-based token position in the response
    token          string             Model 1's chosen token
    token_id       int64 (nullable)   its id; null when the input carries none
    logprob        float64            Model 1's logprob of the chosen token
    top_tokens     list<string>       Model 1's top-k tokens at this position
    top_token_ids  list<int64>        their ids (elements null when the input has none)
    top_logprobs   list<float64>      their logprobs
    char_offset    int64              length in characters of the prefill before ``position``
    ============== ================== ==================================================

``responses.parquet`` (:data:`RESPONSES`) — written by ``klstream explode``
    One row per response: ``stem``, ``response_index``, ``prompt``, ``model1``, ``text``,
    ``num_tokens``, ``source_path``, and ``tokens_match_text`` — false when the concatenated
    token strings do not reproduce ``text`` (for instance partial UTF-8 tokens), so prefills built
    from the tokens differ from the text Model 1 actually produced.

``skipped.parquet`` (:data:`SKIPPED`) — written by ``klstream explode --skip-invalid``
    One row per skipped response (or whole file, with a null ``response_index``), with the reason.

``scores/<model2>/part-*.parquet`` (:data:`SCORES`) — written by the Model 2 stage
    One row per request outcome for a position. Part files are append-only checkpoints; a key
    ``(stem, response_index, position)`` may appear more than once (a failure, then a success after
    ``--resume``). The resolved result for a key is its newest ``ok`` row, else its newest row.
    ``status`` is ``ok`` (the top-k lists are filled) or ``error`` (lists null, ``error`` filled):
    a failed request is never written as a value. ``source`` says how the request was made:
    ``online`` (one call) or ``batch`` (a line of a batch job, ``score --batch``; ``latency_ms`` is
    then the job's run time); the requests are the same, so the two are interchangeable. Parts
    written before the column existed read it as null (they are online).

    Where each result came from (null in parts written before these columns existed):

    ========================== ======== ====================================================
    request_id                 string   one id per answer (request): all rows of an answer
                                        share it and are written in the same part
    step                       int32    the answer's step this row is: 0 is the position the
                                        request was made at, s > 0 is lookahead (the request
                                        was at ``position - step``)
    lookahead                  int32    tokens the request asked for (``maxOutputTokens``)
    decoding                   string   ``sample`` (the run's temperature) or ``greedy``
                                        (temperature 0, after the consistency probe allowed it)
    prompt_token_count         int64    the answer's ``usageMetadata``: every input token,
    cached_content_token_count int64    the cached ones among them, the generated answer
    candidates_token_count     int64    tokens and the thinking tokens. Filled on step 0 rows
    thoughts_token_count       int64    only, so sums over the table count each answer once
    served_model               string   the model the service says answered (Gemini's
                                        ``modelVersion``, an OpenAI-style server's ``model``);
                                        null where it says nothing
    dropped_logprobs           int32    entries of the answer's top-k list at this position
                                        that carried no usable logprob (a sentinel such as
                                        -1.27e30, NaN, ±inf, a positive value, null) and were
                                        left out of ``top_*``; 0 where none
    ========================== ======== ====================================================

``scores/<model2>/run.json`` (:data:`RUN_CONFIGS`) — written by the Model 2 stage
    What the ``run_configs`` view reads of each Model 2's run parameters (JSON, not Parquet).

``kl/<model2>.parquet`` (:data:`KL`) — written by the KL pass
    One row per position of ``positions.parquet`` with the estimators of
    :mod:`klstream.metrics.estimators`; all estimator columns are null where Model 2 has no result
    (``status`` is ``unscored`` or ``error``).

    =================== ======= ===========================================================
    kl_floor            float64 the spec's KL (``kl_divergence`` in ``_kl.json``)
    kl_lower            float64 the capped certified lower bound on the true KL
    kl_estimate         float64 the model-based point estimate: bucket bound + m_P·σ̂²/2
    tail_sigma2         float64 σ̂², fitted once per run and Model 2 (the same in every row;
                                null when nothing could be fitted), see
                                :mod:`klstream.metrics.tailfit`
    logratio            float64 log P − log Q of Model 1's token (Q's floor if unlisted)
    model1_logprob      float64 Model 1's logprob of its token
    model2_logprob      float64 Model 2's logprob of it, or Q's floor
    m1_token_in_m2_topk bool    whether Q lists Model 1's token
    top1_agree          bool    same most probable token
    entropy1/entropy2   float64 entropy of each renormalized top-k list
    coverage1/coverage2 float64 probability mass each top-k list reports
    =================== ======= ===========================================================
"""

from __future__ import annotations

import pyarrow as pa

KEY_FIELDS = [
    pa.field("stem", pa.string(), nullable=False),
    pa.field("response_index", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
]

POSITIONS = pa.schema(
    [
        *KEY_FIELDS,
        pa.field("token", pa.string(), nullable=False),
        pa.field("token_id", pa.int64()),
        pa.field("logprob", pa.float64(), nullable=False),
        pa.field("top_tokens", pa.list_(pa.string()), nullable=False),
        pa.field("top_token_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("top_logprobs", pa.list_(pa.float64()), nullable=False),
        pa.field("char_offset", pa.int64(), nullable=False),
    ]
)

RESPONSES = pa.schema(
    [
        pa.field("stem", pa.string(), nullable=False),
        pa.field("response_index", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("model1", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("tokens_match_text", pa.bool_(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
    ]
)

SKIPPED = pa.schema(
    [
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("stem", pa.string(), nullable=False),
        pa.field("response_index", pa.int32()),
        pa.field("json_path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

SCORE_OK = "ok"
SCORE_ERROR = "error"
SOURCE_ONLINE = "online"
SOURCE_BATCH = "batch"
KL_STATUS_SCORED = "scored"
KL_STATUS_ERROR = "error"
KL_STATUS_UNSCORED = "unscored"
STATUS_VARIABLES = {
    "score_ok": SCORE_OK,
    "score_error": SCORE_ERROR,
    "kl_scored": KL_STATUS_SCORED,
    "kl_error": KL_STATUS_ERROR,
    "kl_unscored": KL_STATUS_UNSCORED,
}
"""The status values, as the DuckDB variables the SQL files compare with (``getvariable``)."""

SCORES = pa.schema(
    [
        *KEY_FIELDS,
        pa.field("model2", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("top_tokens", pa.list_(pa.string())),
        pa.field("top_token_ids", pa.list_(pa.int64())),
        pa.field("top_logprobs", pa.list_(pa.float64())),
        pa.field("chosen_token", pa.string()),
        pa.field("chosen_token_id", pa.int64()),
        pa.field("chosen_logprob", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("step", pa.int32()),
        pa.field("lookahead", pa.int32()),
        pa.field("decoding", pa.string()),
        pa.field("prompt_token_count", pa.int64()),
        pa.field("cached_content_token_count", pa.int64()),
        pa.field("candidates_token_count", pa.int64()),
        pa.field("thoughts_token_count", pa.int64()),
        pa.field("served_model", pa.string()),
        pa.field("dropped_logprobs", pa.int32()),
    ]
)

PART_CONFIG_KEY = b"klstream.run_config"
"""Key of a scores part's footer metadata holding the configuration its results were made with
(the result parameters of ``run.json``, as JSON): what a run whose ``run.json`` is lost is
checked against. Parts of older releases have none."""

BATCH_KEYS = pa.schema(
    [
        *KEY_FIELDS,
        pa.field("max_tokens", pa.int32(), nullable=False),
        pa.field("model1_tokens", pa.list_(pa.string()), nullable=False),
        pa.field("model1_token_ids", pa.list_(pa.int64()), nullable=False),
    ]
)
"""``batch/<model2>/job-<id>.keys.parquet``: one row per line of a batch job, in line order —
its position, the tokens it asks for, and Model 1's tokens at the ``max_tokens`` positions from
it on, against which the answer's generated tokens are accepted
(:func:`klstream.scoring.lookahead.accept`). Files from before lookahead in batch have only the
key columns: one token per line."""

KL = pa.schema(
    [
        pa.field("model2", pa.string(), nullable=False),
        *KEY_FIELDS,
        pa.field("token", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("kl_floor", pa.float64()),
        pa.field("kl_lower", pa.float64()),
        pa.field("kl_estimate", pa.float64()),
        pa.field("tail_sigma2", pa.float64()),
        pa.field("logratio", pa.float64()),
        pa.field("model1_logprob", pa.float64(), nullable=False),
        pa.field("model2_logprob", pa.float64()),
        pa.field("m1_token_in_m2_topk", pa.bool_()),
        pa.field("top1_agree", pa.bool_()),
        pa.field("entropy1", pa.float64(), nullable=False),
        pa.field("entropy2", pa.float64()),
        pa.field("coverage1", pa.float64(), nullable=False),
        pa.field("coverage2", pa.float64()),
    ]
)

_PRICE = pa.struct(
    [
        pa.field("model", pa.string()),
        pa.field("input", pa.float64()),
        pa.field("cached_input", pa.float64()),
        pa.field("output", pa.float64()),
        pa.field("batch_input", pa.float64()),
        pa.field("batch_cached_input", pa.float64()),
        pa.field("batch_output", pa.float64()),
        pa.field("source", pa.string()),
        pa.field("date", pa.string()),
    ]
)

_GREEDY_PROBE = pa.struct(
    [
        pa.field("decoding", pa.string()),
        pa.field("compared", pa.int64()),
        pa.field("median_deviation", pa.float64()),
        pa.field("tolerance", pa.float64()),
        pa.field("requests", pa.int64()),
        pa.field("prompt_token_count", pa.int64()),
        pa.field("cached_content_token_count", pa.int64()),
        pa.field("candidates_token_count", pa.int64()),
        pa.field("thoughts_token_count", pa.int64()),
        pa.field("finding", pa.string()),
    ]
)

RUN_CONFIGS = pa.schema(
    [
        pa.field("model2", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("top_logprobs", pa.int64()),
        pa.field("thinking_budget", pa.string()),
        pa.field("temperature", pa.float64()),
        pa.field("lookahead", pa.string()),
        pa.field("decoding", pa.string()),
        pa.field("prices", _PRICE),
        pa.field("greedy_probe", _GREEDY_PROBE),
    ]
)
"""What the ``run_configs`` view reads of each ``scores/<model2>/run.json`` (null where an older
release recorded nothing): what the report's resume command repeats (backend, top-k, thinking
budget, temperature), the price entry costs are reckoned with and the greedy probe's outcome.
``lookahead`` and ``thinking_budget`` read as text, whatever JSON type recorded them."""
