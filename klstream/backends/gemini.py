"""The boundary with the Gemini API: client set-up, one prefill request, and what its answer means.

Everything here goes through ``google-genai``'s async client. The SDK's own retries are switched
off (one attempt), so that :mod:`klstream.scoring.score` decides about every retry and counts it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import string
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Literal
from urllib.parse import quote, quote_plus, urlparse

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from klstream.errors import (
    AuthenticationError,
    MissingCredentials,
    ModelNotFound,
    PrefillRejected,
    ThinkingNotDisabled,
    ThinkingRejected,
)

Backend = Literal["gemini", "vertex"]
API_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
BASE_URL_VARIABLE = "GOOGLE_GEMINI_BASE_URL"
PROJECT_VARIABLE = "GOOGLE_CLOUD_PROJECT"
PLACEHOLDER_KEY = "no-key-needed-for-this-base-url"
SECRET_RUN = 8
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
"""Characters of the key in a row that :meth:`Endpoint.redact` masks wherever they appear."""

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach Model 2. ``api_key`` is a secret: it is never printed or saved."""

    backend: Backend
    api_key: str | None = None
    project: str | None = None
    location: str = "global"
    base_url: str | None = None
    timeout_s: float = 60.0

    def __repr__(self) -> str:
        key = "set" if self.api_key else "unset"
        return (
            f"Endpoint(backend={self.backend!r}, api_key={key}, project={self.project!r}, "
            f"location={self.location!r}, base_url={self.base_url!r})"
        )

    @property
    def url(self) -> str:
        """Where requests go, for messages: the base URL, or the service's default host."""
        if self.base_url:
            return self.base_url
        if self.backend == "vertex":
            region = "" if self.location == "global" else f"{self.location}-"
            return f"https://{region}aiplatform.googleapis.com"
        return "https://generativelanguage.googleapis.com"

    @functools.cached_property
    def _key_pieces(self) -> frozenset[str]:
        """Every ``SECRET_RUN`` characters in a row of the key, as sent or URL-encoded (a
        server may echo it encoded, or cut short), in ASCII lower case; empty when nothing is
        secret."""
        key = self.api_key
        if not key or key == PLACEHOLDER_KEY:
            return frozenset()
        every_symbol_encoded = "".join(
            char
            if char.isascii() and char.isalnum()
            else "".join(f"%{b:02X}" for b in char.encode())
            for char in key
        )
        forms = {key, quote(key), quote(key, safe=""), quote_plus(key), every_symbol_encoded}
        return frozenset(
            form[start : start + SECRET_RUN].translate(_ASCII_LOWER)
            for form in forms
            for start in range(max(len(form) - SECRET_RUN, 0) + 1)
        )

    def redact(self, text: str) -> str:
        """``text`` with every run of ``SECRET_RUN`` or more characters of the API key (whole,
        cut short or URL-encoded) replaced by ``***``, should an error message ever echo it."""
        pieces = self._key_pieces
        if not pieces:
            return text
        lowered = text.translate(_ASCII_LOWER)  # same length, unlike str.lower()
        masked = [False] * len(text)
        for width in {len(piece) for piece in pieces}:
            for start in range(len(text) - width + 1):
                if lowered[start : start + width] in pieces:
                    masked[start : start + width] = [True] * width
        runs = groupby(zip(masked, text, strict=True), key=lambda pair: pair[0])
        return "".join("***" if hidden else "".join(c for _, c in run) for hidden, run in runs)


def endpoint_from_environment(
    backend: Backend,
    project_id: str | None = None,
    location: str = "global",
    base_url: str | None = None,
    timeout_s: float = 60.0,
) -> Endpoint:
    """Resolve credentials and endpoint from options and the documented environment variables."""
    base_url = base_url or os.environ.get(BASE_URL_VARIABLE) or None
    if backend == "vertex":
        project = project_id or os.environ.get(PROJECT_VARIABLE)
        if not project:
            raise MissingCredentials(f"Vertex AI needs a Google Cloud project ({PROJECT_VARIABLE})")
        return Endpoint("vertex", None, project, location, base_url, timeout_s)
    api_key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
    if api_key is None:
        if base_url is None:
            raise MissingCredentials(
                "the Gemini Developer API needs an API key in GEMINI_API_KEY (or GOOGLE_API_KEY)"
            )
        api_key = PLACEHOLDER_KEY
    return Endpoint("gemini", api_key, None, location, base_url, timeout_s)


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


class RetryableAnswer(Exception):
    """A 200 answer that cannot be used but may be fine next time (no logprobs, say)."""


@dataclass(frozen=True)
class Candidate:
    token: str
    token_id: int | None
    logprob: float


@dataclass(frozen=True)
class Generated:
    """One generated step: the token chosen and the top-k alternatives with logprobs."""

    chosen: Candidate
    top: list[Candidate]


@dataclass(frozen=True)
class Answer:
    steps: list[Generated]
    text: str
    finish_reason: str | None


def _candidate(raw: Any) -> Candidate:
    if not isinstance(raw, dict):
        raise RetryableAnswer(f"malformed logprob candidate {raw!r}")
    token, logprob, token_id = raw.get("token"), raw.get("logProbability"), raw.get("tokenId")
    if (
        not isinstance(token, str)
        or not isinstance(logprob, int | float)
        or not logprob <= 0.0
        or not (token_id is None or isinstance(token_id, int))
    ):
        raise RetryableAnswer(f"malformed logprob candidate {raw!r}")
    return Candidate(token, token_id, float(logprob))


def parse_answer(response: types.GenerateContentResponse, thinking_budget: int | None) -> Answer:
    """Read the logprobs out of an answer's JSON body (the REST wire format), or say why there
    are none."""
    http = response.sdk_http_response
    body = json.loads(http.body) if http is not None and http.body else None
    if not isinstance(body, dict):
        raise RetryableAnswer(f"answer body is not a JSON object: {str(body)[:200]}")
    candidates = body.get("candidates") or []
    if not candidates or not isinstance(candidates[0], dict):
        raise RetryableAnswer(
            f"answer has no candidates (prompt feedback: {body.get('promptFeedback')})"
        )
    candidate = candidates[0]
    finish = candidate.get("finishReason")
    result = candidate.get("logprobsResult") or {}
    top_steps = result.get("topCandidates") or []
    if not top_steps:
        thoughts = (body.get("usageMetadata") or {}).get("thoughtsTokenCount")
        if thoughts and not result:
            raise ThinkingNotDisabled(
                f"the model spent its output tokens on thinking ({thoughts} thought tokens, "
                f"finish reason {finish}) and returned no logprobs with a thinking budget of "
                f"{thinking_budget}",
                thinking_budget,
            )
        raise RetryableAnswer(
            f"answer without logprobs (finish reason {finish}); the model may not support "
            "response_logprobs"
        )
    chosen = result.get("chosenCandidates") or []
    steps = []
    for index, top in enumerate(top_steps):
        alternatives = [_candidate(c) for c in (top or {}).get("candidates") or []]
        if not alternatives:
            raise RetryableAnswer("answer with an empty top-candidates list")
        picked = _candidate(chosen[index]) if index < len(chosen) else alternatives[0]
        steps.append(Generated(picked, alternatives))
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(part.get("text", "") for part in parts if isinstance(part, dict))
    return Answer(steps, text, finish)


_PREFILL_REJECTED = re.compile(r"model turn|prefill|last turn|ending with", re.IGNORECASE)
_THINKING_REJECTED = re.compile(r"thinking|budget", re.IGNORECASE)


def classify_api_error(error: genai_errors.APIError, thinking_budget: int | None) -> str:
    """``retry``, ``fail`` (this position only), or raise an
    :class:`~klstream.errors.EndpointError` that ends the run."""
    code = error.code or 0
    message = error.message or str(error)
    if code in RETRIED_STATUS:
        return "retry"
    if code == 400 and _PREFILL_REJECTED.search(message):
        raise PrefillRejected(
            f"the model rejects a trailing model turn ({code}: {message}). Scoring needs "
            "prefill: the prompt, then Model 1's tokens so far as the model's own turn. "
            "Choose a Model 2 that accepts it."
        )
    if code == 400 and thinking_budget is not None and _THINKING_REJECTED.search(message):
        raise ThinkingRejected(f"the model rejects the thinking configuration ({code}: {message})")
    if code in (401, 403):
        what = "authentication failed" if code == 401 else "permission denied"
        raise AuthenticationError(
            f"{what} ({code} {error.status}: {message}); no request can succeed"
        )
    if code == 404:
        raise ModelNotFound(
            f"model or endpoint not found ({code} {error.status}: {message}); "
            "no request can succeed"
        )
    return "fail"


def server_retry_delay(error: BaseException) -> float | None:
    """Seconds the server asked us to wait: google.rpc.RetryInfo's retryDelay or Retry-After."""
    if not isinstance(error, genai_errors.APIError):
        return None
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


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,
    aiohttp.ClientError,
    json.JSONDecodeError,
    ConnectionError,
    RetryableAnswer,
)


def is_rate_limit(error: BaseException) -> bool:
    return isinstance(error, genai_errors.APIError) and error.code == 429


def describe(error: BaseException) -> str:
    """A one-line description for the error column."""
    if isinstance(error, genai_errors.APIError):
        return f"{error.code} {error.status}: {error.message or ''}".strip()
    if isinstance(error, asyncio.TimeoutError):
        return "timeout: no answer within the request timeout"
    return f"{type(error).__name__}: {error}"
