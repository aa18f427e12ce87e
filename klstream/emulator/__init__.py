"""A local stand-in for the Gemini API, for dry runs and tests without network or cost.

The emulator is an aiohttp server that speaks the ``generateContent`` REST
protocol closely enough for the real google-genai SDK — and open-weight
servers' routes closely enough for the real openai SDK: vLLM's at the root,
SGLang's, a legacy completions server's and TGI's under path prefixes
(``klstream.emulator.openai_routes``, ``klstream.emulator.native_routes``) —
and answers from
deterministic toy language models (``klstream.emulator.toymodel``) whose exact
next-token distributions tests can recompute locally.

Running it
    ``klstream emulate [--port 8765] [fault options]`` (or
    ``python -m klstream.emulator``) prints
    ``klstream emulator listening on http://127.0.0.1:8765`` and serves until
    Ctrl-C/SIGTERM. From Python, ``with EmulatorServer(faults) as server:``
    runs it on a background thread (port 0 picks a free port) and exposes
    ``base_url``, the request log ``requests``, ``stats()``, ``reset_log()``
    and ``set_faults()``; ``await serve(host, port, faults)`` runs it in the
    current event loop until cancelled.

Pointing clients at it
    klstream: ``--base-url http://127.0.0.1:8765`` or the SDK's own
    ``GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:8765``. The SDK directly:
    ``genai.Client(api_key="anything", http_options=types.HttpOptions(base_url=url))``.
    For the Vertex AI shape, pass ``vertexai=True, project=..., location=...``,
    credentials that already hold a token (e.g.
    ``google.oauth2.credentials.Credentials(token="x")``; ``AnonymousCredentials``
    fails because the SDK tries to refresh it) and the same ``base_url``.
    Without project/location (and without an api_key) the SDK posts to the bare
    base_url with no model in the path; the emulator answers 404 saying so.
    The openai SDK: ``openai.AsyncOpenAI(base_url=url + "/v1", api_key="x")``;
    klstream: ``--backend openai --base-url http://127.0.0.1:8765``.

Endpoints (any version segment: v1, v1beta, v1alpha, v1beta1, ...)
    ``POST /{version}/models/{model}:generateContent`` (Developer API),
    ``POST /{version}/projects/{p}/locations/{l}/publishers/{pub}/models/{model}:generateContent``
    and ``POST /{version}/publishers/{pub}/models/{model}:generateContent`` (Vertex
    AI, the latter in express mode), ``GET /_emulator/stats`` (request counters),
    and ``POST /v1/chat/completions``, ``POST /v1/completions`` (with vLLM's
    ``prompt_logprobs``, the legacy ``echo`` and ``return_tokens_as_token_ids``)
    and ``POST /tokenize`` (described in ``klstream.emulator.openai_routes``,
    with its toy chat template). Other servers by path prefix
    (``klstream.emulator.servers``): ``/sglang/...`` (SGLang: the same routes
    without vLLM's extensions, and its native ``POST /sglang/generate``),
    ``/legacy/...`` (completions with ``echo`` only, what lm-evaluation-harness
    is pointed at), ``POST /tgi/generate`` and ``POST /tgi-prefill/generate``
    (TGI without and with ``--enable-prefill-logprobs``; described in
    ``klstream.emulator.native_routes``). Point the openai SDK or klstream at
    ``http://127.0.0.1:8765/sglang/v1``, say. Model name parts for the odd
    values real servers send (``floor9999``, ``floatmin``, ``nanvals``,
    ``kplus1``), a vLLM build without prompt logprobs (``noprompt``), a
    gateway that refuses vLLM's fields (``strict``) and a
    ``system_fingerprint`` (``fingerprint``) are listed in
    ``klstream.emulator.openai_routes``.
    The prompt is the system instruction and the user turns' text joined by
    newlines; a trailing model turn is a prefill that generation continues,
    re-tokenized with the toy tokenizer. ``generationConfig`` supports
    ``maxOutputTokens``, ``temperature`` (default 1), ``seed``,
    ``responseLogprobs``, ``logprobs`` (0..20, needs ``responseLogprobs``) and
    ``thinkingConfig.thinkingBudget``; snake_case keys are accepted anywhere.
    Answers carry ``avgLogprobs``, ``logprobsResult`` (``chosenCandidates``,
    ``topCandidates`` when ``logprobs`` > 0, ``logProbabilitySum`` except on
    Vertex), ``usageMetadata``, ``modelVersion`` and ``responseId``. When the
    model ends its answer, the last step is the end-of-sequence token with
    empty text and ``finishReason`` is ``STOP``; otherwise ``MAX_TOKENS``.
    Logprobs are those of the temperature-1 distribution at every step, whatever
    the sampling temperature (as Gemini's).

Usage and the implicit cache (``ServiceConfig``, CLI flags in brackets)
    ``usageMetadata`` counts with the toy tokenizer: ``promptTokenCount`` (the
    prompt and the prefill), ``candidatesTokenCount`` (answer tokens),
    ``thoughtsTokenCount`` and ``cachedContentTokenCount``: the longest token
    prefix (prompt, then prefill) that a request to the same model sent within
    ``cache_ttl_s`` [--cache-ttl, 300], when it holds at least
    ``cache_min_tokens`` tokens [--cache-min-tokens, 2048: Gemini 2.5 Flash's and
    Pro's minimum in Google's caching docs as of 2026-12; 1,024 for Flash at the
    launch of implicit caching in May 2025]. ``scaled_logprobs``
    [--scaled-logprobs] reports the logprobs of the distribution actually sampled
    from instead (temperature-scaled; at
    temperature 0 only the chosen token), as a service whose logprobs depend on
    the sampling settings would. ``EmulatorServer(service=...)`` and
    ``set_service()`` set it in process.
    Errors use Google's ``{"error": {"code", "message", "status"}}`` format:
    400 INVALID_ARGUMENT, 404 NOT_FOUND (unknown model family), 429
    RESOURCE_EXHAUSTED (with a ``RetryInfo`` detail and ``Retry-After``), 500
    INTERNAL, 503 UNAVAILABLE.

Model names
    A name is served when one of its dash-separated parts is ``toy``; any
    other name gets 404. ``toy`` is the base model. A part ``d<x>`` is the
    divergence dial: ``toy-d0.5`` is the base with its logits perturbed by
    strength 0.5, and the mean KL from the base grows monotonically with
    ``x`` (mean KL roughly 0.03, 0.1, 0.4, 1.7 nats for x = 0.25, 0.5, 1, 2). Prefixes are
    free (``gemini-toy-d0.25``). A part ``s<n>`` picks another perturbation
    direction (``toy-d1-s2``). Equal dial and seed mean identical
    distributions, whatever the rest of the name (but ``rerouted``). Behaviour
    flags, as parts anywhere in the name (``ToyModel.for_name`` parses them), each reproducing
    what a real service does (sources: README, "Gemini as of 2026-12-07"):

    ``thinking``
        spends the output budget on thoughts (finishReason MAX_TOKENS, no text,
        no logprobs, ``thoughtsTokenCount`` set) unless ``thinkingBudget`` is 0
        (a positive budget leaves the rest of ``maxOutputTokens`` for the
        answer, and the thoughts then come back as a ``thought`` part and ahead
        of the answer's steps in ``logprobsResult``: where a real service lists
        thought tokens is undocumented, so a client must not take them for
        answer steps).
    ``mustthink<N>``
        thinks like ``thinking`` but cannot stop, as Gemini 2.5 Pro: a budget
        of 0 gets 400 "Budget 0 is invalid. This model only works in thinking
        mode.", a budget from 1 to N-1 gets 400 "The thinking budget (B) is
        invalid."; N and above (or -1, dynamic) are accepted.
    ``noprefill``
        rejects a trailing model turn with 400 "Requests ending with a model
        turn are not supported.".
    ``nologprobs``
        answers without ``logprobsResult``.
    ``logprobsoff``
        refuses ``responseLogprobs`` as Google's services now do for most
        Gemini models: 400 INVALID_ARGUMENT "Logprobs is not enabled for
        models/<name>" on the Developer API route, "Unable to submit request
        because Logprobs is not supported for this model. Learn more: ..." on
        the Vertex AI routes. Requests without logprobs are answered.
    ``sentinels``
        Gemini's filler: at a step whose most likely token is within 1e-3
        nats of probability 1, that token is listed at logprob 0 and the other
        k-1 slots hold junk tokens (Cyrillic letters) at -1.2676506e30.
    ``padded``
        appends two such junk entries to every top-k list (k+2 entries): the
        true top-k is all there, so a client that drops the sentinels gets
        what the unpadded model gives.
    ``rerouted``
        a silent substitution: the base model ``toy`` answers whatever the
        dial and seed, and ``modelVersion`` says ``toy``. Every other model
        reports its own name there.
    ``retired``
        404 NOT_FOUND "models/<name> is not found for API version <v>, or is
        not supported for generateContent.", as retired Gemini models answer.

Faults (``FaultConfig``, CLI flags in brackets; all off by default)
    ``latency_ms`` + uniform ``jitter_ms`` per request [--latency-ms,
    --jitter-ms]; fractions of 429 with ``retry_delay_s`` [--rate-429,
    --retry-delay], of 500 and 503 [--rate-500, --rate-503], of hangs lasting
    ``hang_seconds`` before a normal answer [--rate-hang, --hang-seconds], of
    200 answers with a truncated JSON body [--rate-malformed] or an HTML page
    [--rate-html], of answers without logprobs [--rate-no-logprobs] and of
    OpenAI completions whose ``prompt_logprobs`` lack their last entries
    [--rate-short-prompt-logprobs], and of Gemini answers whose top-k lists hold
    3 candidates whatever was asked [--rate-short-topk]; ``quota_per_minute`` requests per
    rolling window (``quota_window_s``, default 60 s), then 429 whose
    ``retryDelay`` is the time until the window frees [--quota-per-minute];
    ``fail_first_n``: the first N copies of each distinct request body get
    503 [--fail-first-n]. Fault randomness comes from ``seed`` [--seed].
    ``--request-log FILE`` appends one JSON line per request; in process,
    ``EmulatorServer.requests`` keeps the last 50,000 as ``RequestRecord``s.
    A client that goes away mid-request (gives up, times out, is killed) is
    logged and counted with status ``"disconnect"`` (``DISCONNECT``).

Batch (``klstream.emulator.batch``)
    The Gemini Files API (resumable upload to ``/upload/{version}/files``, get,
    ``files/{id}:download``, delete), ``models/{model}:batchGenerateContent``
    (from an uploaded JSONL file or inline requests) and ``batches`` get, list,
    cancel and delete, the job carried in the Operation's ``metadata``; Vertex AI
    ``projects/{p}/locations/{l}/batchPredictionJobs`` create, get, list, cancel
    and delete, reading and writing JSONL in an in-memory Cloud Storage that
    ``google-cloud-storage`` reaches with ``STORAGE_EMULATOR_HOST`` (or an
    ``api_endpoint``) set to the base URL: buckets get/insert, object media,
    multipart and resumable uploads, metadata, download, list and delete.
    ``BatchConfig`` sets the schedule (``pending_s``, ``running_s``; CLI
    ``--batch-seconds``), per-line failures (``line_error_rate``;
    ``--batch-line-error-rate``), lines answered without logprobs
    (``without_logprobs``), end states per job (``end_states``, with
    ``partial_fraction`` of the lines answered), lost create replies, slow
    uploads, creates and downloads, and regions without batch.
    ``EmulatorServer.batch`` (a ``BatchService``) has ``configure()``, the event
    log ``events`` and ``submitted_keys()``: how many created jobs held each key.
"""

from klstream.emulator.app import DISCONNECT, Emulator, EmulatorServer, RequestRecord, serve
from klstream.emulator.batch import BatchConfig, BatchEvent, BatchService
from klstream.emulator.faults import FaultConfig
from klstream.emulator.service import ServiceConfig
from klstream.emulator.toymodel import ToyModel, decode, encode

__all__ = [
    "BatchConfig",
    "BatchEvent",
    "BatchService",
    "DISCONNECT",
    "Emulator",
    "EmulatorServer",
    "FaultConfig",
    "RequestRecord",
    "ServiceConfig",
    "ToyModel",
    "decode",
    "encode",
    "serve",
]
