"""The boundary with the Gemini API: client set-up, one prefill request, and what its answer means.

Everything here goes through ``google-genai``'s async client. The SDK's own retries are switched
off (one attempt), so that :mod:`klstream.backends.transport` decides about every retry and
counts it; the SDK's errors become the typed faults of :mod:`klstream.errors`
(:func:`fault_of`). Both backends generate with logprobs (:class:`GeminiPrefill`) and run batch
jobs (:mod:`klstream.backends.google_batch`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlparse

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from klstream.backends.base import (
    PLACEHOLDER_KEY,
    Answer,
    Candidate,
    ClientSettings,
    Endpoint,
    Generated,
    PrefillRequest,
    Where,
)
from klstream.backends.checks import usable_logprob
from klstream.backends.google_errors import (
    ServiceError,
    status_fault,
)
from klstream.backends.prices import Usage, usage_of
from klstream.errors import (
    TIMED_OUT,
    CallFault,
    ConnectFailed,
    MissingCredentials,
    ThinkingNotDisabled,
    TransientFault,
    UnusableAnswer,
)

API_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
BASE_URL_VARIABLE = "GOOGLE_GEMINI_BASE_URL"
PROJECT_VARIABLE = "GOOGLE_CLOUD_PROJECT"

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def gemini_endpoint(where: Where) -> Endpoint:
    """The Gemini Developer API's endpoint: its key from ``GEMINI_API_KEY`` (or
    ``GOOGLE_API_KEY``), none needed by a local server."""
    base_url = where.base_url or os.environ.get(BASE_URL_VARIABLE) or None
    api_key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
    if api_key is None:
        if base_url is None:
            raise MissingCredentials(
                "the Gemini Developer API needs an API key in GEMINI_API_KEY (or GOOGLE_API_KEY)"
            )
        api_key = PLACEHOLDER_KEY
    return Endpoint(
        "gemini",
        api_key,
        None,
        where.location,
        base_url,
        where.timeout_s,
        "https://generativelanguage.googleapis.com",
    )


def vertex_endpoint(where: Where) -> Endpoint:
    """Vertex AI's endpoint: a project (``GOOGLE_CLOUD_PROJECT``) and a region; the credentials
    are Application Default Credentials, resolved by the SDK."""
    base_url = where.base_url or os.environ.get(BASE_URL_VARIABLE) or None
    project = where.project_id or os.environ.get(PROJECT_VARIABLE)
    if not project:
        raise MissingCredentials(f"Vertex AI needs a Google Cloud project ({PROJECT_VARIABLE})")
    region = "" if where.location == "global" else f"{where.location}-"
    return Endpoint(
        "vertex",
        None,
        project,
        where.location,
        base_url,
        where.timeout_s,
        f"https://{region}aiplatform.googleapis.com",
    )


def make_client(endpoint: Endpoint, session: aiohttp.ClientSession | None = None) -> genai.Client:
    """A client whose async calls make exactly one HTTP attempt each."""
    options = types.HttpOptions(
        base_url=endpoint.base_url,
        timeout=int(endpoint.timeout_s * 1000),
        retry_options=types.HttpRetryOptions(attempts=1),
        aiohttp_client=session,
    )
    if endpoint.backend == "vertex":
        credentials = None
        if endpoint.base_url and urlparse(endpoint.base_url).hostname in LOOPBACK_HOSTS:
            from google.oauth2.credentials import Credentials

            credentials = Credentials(token="local-server")  # type: ignore[no-untyped-call]
        return genai.Client(
            vertexai=True,
            project=endpoint.project,
            location=endpoint.location,
            credentials=credentials,
            http_options=options,
        )
    return genai.Client(api_key=endpoint.api_key, http_options=options)


def prefill_contents(prompt: str, prefill: str) -> list[types.ContentDict]:
    """The user prompt, then — past position 0 — Model 1's tokens so far as a model turn.

    Plain dicts rather than ``types.Content``: the SDK accepts both, and dicts spare it a round
    of pydantic work on every request (about a fifth of its CPU per call).
    """
    contents: list[types.ContentDict] = [{"role": "user", "parts": [{"text": prompt}]}]
    if prefill:
        contents.append({"role": "model", "parts": [{"text": prefill}]})
    return contents


def generation_config(
    top_logprobs: int,
    thinking_budget: int | None,
    max_output_tokens: int = 1,
    temperature: float | None = None,
    seed: int | None = None,
) -> types.GenerateContentConfig:
    """The request's config. The answer comes back as the raw HTTP body
    (``should_return_http_response``), which :func:`parse_answer` reads directly: the SDK's
    conversion of it into pydantic objects costs more CPU than the rest of a request."""
    return types.GenerateContentConfig(
        max_output_tokens=max_output_tokens,
        response_logprobs=True,
        logprobs=top_logprobs,
        temperature=temperature,
        seed=seed,
        thinking_config=None
        if thinking_budget is None
        else types.ThinkingConfig(thinking_budget=thinking_budget),
        should_return_http_response=True,
    )


def request_template(
    endpoint: Endpoint,
    top_logprobs: int,
    thinking_budget: int | None,
    temperature: float | None,
    max_tokens: int = 1,
) -> dict[str, Any]:
    """Everything of an online scoring request's JSON body (asking ``max_tokens`` tokens) but
    its ``contents``,
    exactly as the SDK serialises :func:`request_config` for ``endpoint``'s backend, so that a
    batch line
    (``{"contents": prefill_contents(...), **template}``) asks what the online request asks.

    The SDK's own converter runs once per run here (it is private API: a test compares the
    result with the body the SDK sends online, so an SDK change that breaks it shows at once).
    """
    from google.genai import _common, models

    client = make_client(endpoint)
    parameters = types._GenerateContentParameters(
        model="scoring",
        contents=[types.Content(role="user", parts=[types.Part(text="")])],
        config=request_config(
            PrefillRequest("", "", top_logprobs, max_tokens, temperature), thinking_budget
        ),
    )
    convert = (
        models._GenerateContentParameters_to_vertex
        if endpoint.backend == "vertex"
        else models._GenerateContentParameters_to_mldev
    )
    body = _common.convert_to_dict(convert(client._api_client, parameters))
    return {key: value for key, value in body.items() if key not in ("contents", "_url")}


def _candidate(raw: Any) -> Candidate | None:
    """One entry of a logprobs list; None when its logprob is not usable
    (:func:`~klstream.backends.checks.usable_logprob`: a sentinel such as -1.2676506e30, NaN,
    an infinity, a positive value, null or missing), so that it is left out, never a value."""
    if not isinstance(raw, dict):
        raise UnusableAnswer(f"malformed logprob candidate {raw!r}")
    token, logprob, token_id = raw.get("token"), raw.get("logProbability"), raw.get("tokenId")
    if not isinstance(token, str) or not (
        token_id is None or (isinstance(token_id, int) and not isinstance(token_id, bool))
    ):
        raise UnusableAnswer(f"malformed logprob candidate {raw!r}")
    if not usable_logprob(logprob):
        return None
    return Candidate(token, token_id, float(cast(float, logprob)))


def _step(listed: Any, chosen: Any) -> Generated:
    """One step from its top-candidates entry and its chosen candidate (``None`` when the answer
    lists none): the top-k without unusable entries, counted in ``dropped``. A chosen token whose
    own logprob is unusable takes its entry's in the list, else counts as not reported."""
    raw = (listed.get("candidates") if isinstance(listed, dict) else None) or []
    if not isinstance(raw, list):
        raise UnusableAnswer(f"malformed top-candidates entry {listed!r}")
    parsed = [_candidate(c) for c in raw]
    top = [c for c in parsed if c is not None]
    dropped = len(parsed) - len(top)
    if not top:
        raise UnusableAnswer(
            "answer with an empty top-candidates list"
            + (f" ({dropped} entries without a usable logprob)" if dropped else "")
        )
    picked = None if chosen is None else _candidate(chosen)
    if picked is None and isinstance(chosen, dict):
        picked = next((c for c in top if (c.token, c.token_id) == _identity(chosen)), None)
    if picked is None:
        return Generated(top[0], top, chosen_reported=False, dropped=dropped)
    return Generated(picked, top, dropped=dropped)


def _identity(raw: dict[str, Any]) -> tuple[Any, Any]:
    return raw.get("token"), raw.get("tokenId")


def _thought_steps(step_count: int, usage: Usage) -> int:
    """How many leading logprob steps are thinking: those beyond the answer's own tokens
    (``candidatesTokenCount``) when the thought tokens account for them. A service that lists
    thoughts among the logprobs lists them before the answer they lead to."""
    extra = step_count - usage.candidates_tokens
    return extra if usage.candidates_tokens and 0 < extra <= usage.thoughts_tokens else 0


def parse_answer(response: types.GenerateContentResponse, thinking_budget: int | None) -> Answer:
    """Read the logprobs out of an answer's JSON body (the REST wire format), or say why there
    are none. Thinking (``thought`` parts, thought tokens among the logprobs) is left out."""
    http = response.sdk_http_response
    try:
        body = json.loads(http.body) if http is not None and http.body else None
    except json.JSONDecodeError as error:
        raise UnusableAnswer(f"answer body is not JSON: {error}") from None
    return parse_answer_body(body, thinking_budget)


def parse_answer_body(body: Any, thinking_budget: int | None) -> Answer:
    """:func:`parse_answer` for a decoded ``GenerateContentResponse`` JSON object, such as a
    line of a batch job's output."""
    if not isinstance(body, dict):
        raise UnusableAnswer(f"answer body is not a JSON object: {str(body)[:200]}")
    candidates = body.get("candidates") or []
    if not candidates or not isinstance(candidates[0], dict):
        raise UnusableAnswer(
            f"answer has no candidates (prompt feedback: {body.get('promptFeedback')})"
        )
    candidate = candidates[0]
    finish = candidate.get("finishReason")
    usage = usage_of(body.get("usageMetadata"))
    result = candidate.get("logprobsResult") or {}
    top_steps = result.get("topCandidates") or []
    chosen = result.get("chosenCandidates") or []
    thoughts = _thought_steps(len(top_steps), usage)
    only_thinking = bool(usage.thoughts_tokens) and not usage.candidates_tokens
    if len(top_steps) <= thoughts or only_thinking:
        if only_thinking:
            raise ThinkingNotDisabled(
                f"the model spent its output tokens on thinking ({usage.thoughts_tokens} thought "
                f"tokens, finish reason {finish}) and returned no logprobs with a thinking budget "
                f"of {thinking_budget}",
                thinking_budget,
            )
        raise UnusableAnswer(
            f"answer without logprobs (finish reason {finish}); the model may not support "
            "response_logprobs"
        )
    steps = [
        _step(top_steps[index], chosen[index] if index < len(chosen) else None)
        for index in range(thoughts, len(top_steps))
    ]
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(
        part.get("text", "") for part in parts if isinstance(part, dict) and not part.get("thought")
    )
    served = body.get("modelVersion")
    return Answer(steps, text, finish, usage, served if isinstance(served, str) else None)


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    genai_errors.APIError,
    aiohttp.ClientError,
    json.JSONDecodeError,
    ConnectionError,
    TimeoutError,
)
"""The SDK's and its HTTP library's errors: :func:`fault_of` turns each into a fault."""


def api_fault(
    error: genai_errors.APIError,
    thinking_budget: int | None,
    model: str = "",
    backend: str = "gemini",
) -> CallFault:
    """The fault an API error stands for (:func:`klstream.backends.google_errors.status_fault`);
    raises an :class:`~klstream.errors.EndpointError` when no request can succeed."""
    return status_fault(
        ServiceError(
            error.code or 0,
            error.status,
            error.message or str(error),
            describe(error),
            server_retry_delay(error),
        ),
        thinking_budget,
        model,
        backend,
    )


def fault_of(
    error: BaseException, thinking_budget: int | None, model: str = "", backend: str = "gemini"
) -> CallFault:
    """The fault one of :data:`TRANSPORT_ERRORS` stands for (see :func:`api_fault`)."""
    if isinstance(error, genai_errors.APIError):
        return api_fault(error, thinking_budget, model, backend)
    cause = unreachable(error)
    if cause is not None:
        return ConnectFailed(cause)
    return TransientFault(describe(error))


def server_retry_delay(error: genai_errors.APIError) -> float | None:
    """Seconds the server asked us to wait: google.rpc.RetryInfo's retryDelay or Retry-After."""
    details = error.details if isinstance(error.details, dict) else {}
    for item in (details.get("error") or details).get("details", []) or []:
        delay = item.get("retryDelay") if isinstance(item, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(float(delay[:-1]), 0.0)
            except ValueError:
                pass
    headers = getattr(error.response, "headers", None)
    if headers is not None:
        value = headers.get("Retry-After") or headers.get("retry-after")
        if value:
            try:
                return max(float(value), 0.0)
            except ValueError:
                return None
    return None


def unreachable(error: BaseException) -> str | None:
    """Why no connection could be made, in words (refused, unknown host, TLS, ...), or None
    when ``error`` is not a failure to connect."""
    if not isinstance(error, aiohttp.ClientConnectorError):
        return None
    os_error = error.os_error
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate not accepted ({error.certificate_error})"
    if isinstance(error, aiohttp.ClientSSLError):
        return f"TLS handshake failed ({os_error})"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {error.host} ({os_error.strerror or os_error})"
    # asyncio words a refusal "Connect call failed (...)"; the errno says what happened.
    cause = os.strerror(os_error.errno) if os_error.errno else str(os_error)
    return f"{cause.lower()} ({error.host}:{error.port})"


def describe(error: BaseException) -> str:
    """A one-line description for the error column."""
    if isinstance(error, genai_errors.APIError):
        return f"{error.code} {error.status}: {error.message or ''}".strip()
    if isinstance(error, TimeoutError):
        return TIMED_OUT
    return f"{type(error).__name__}: {error}"


_cached_config = functools.lru_cache(maxsize=64)(generation_config)
"""Scoring sends few distinct configs: built once each, they spare a pydantic object per call."""


def request_config(
    request: PrefillRequest, thinking_budget: int | None
) -> types.GenerateContentConfig:
    """The config of ``request``: its answer tokens, plus a positive thinking budget, since
    thought tokens count against ``maxOutputTokens``."""
    thinking = thinking_budget if thinking_budget is not None and thinking_budget > 0 else 0
    return _cached_config(
        request.top_logprobs,
        thinking_budget,
        request.max_tokens + thinking,
        request.temperature,
        request.seed,
    )


class GeminiPrefill:
    """One Gemini model through one google-genai client: the backends' generation."""

    def __init__(
        self,
        client: genai.Client,
        model: str,
        thinking_budget: int | None,
        backend: str = "gemini",
    ) -> None:
        self.client, self.model, self.thinking_budget = client, model, thinking_budget
        self.backend = backend

    async def generate(self, request: PrefillRequest) -> Answer:
        config = request_config(request, self.thinking_budget)
        try:
            response = await self.client.aio.models.generate_content(
                model=self.model,
                contents=prefill_contents(request.prompt, request.prefill),
                config=config,
            )
        except TRANSPORT_ERRORS as error:
            raise fault_of(error, self.thinking_budget, self.model, self.backend) from error
        return parse_answer(response, self.thinking_budget)


@contextlib.asynccontextmanager
async def open_prefill(
    endpoint: Endpoint, settings: ClientSettings
) -> AsyncIterator[GeminiPrefill]:
    """A client over one HTTP session whose connection pool matches the concurrency.

    With Vertex the SDK keeps its own session, which carries the Google auth.
    """
    connector = aiohttp.TCPConnector(limit=settings.max_concurrent, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = make_client(endpoint, session if endpoint.backend == "gemini" else None)
        yield GeminiPrefill(client, settings.model, settings.thinking_budget, endpoint.backend)
