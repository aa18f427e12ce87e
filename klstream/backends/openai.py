"""The boundary with OpenAI-compatible servers (vLLM, SGLang, gateways): client set-up, the
requests scoring makes, and what their answers mean.

Everything goes through the official ``openai`` SDK's async client with its own retries off
(``max_retries=0``), so that :mod:`klstream.backends.transport` decides about every retry and
counts it; the SDK's errors become the typed faults of :mod:`klstream.errors`
(:func:`fault_of`). Answers are read from the raw JSON body: the fields scoring needs (vLLM's
``prompt_logprobs``, say) are extensions the SDK's models do not declare.

Two ways to score:

- **prefill** (:meth:`OpenAIServer.generate`): ``/v1/chat/completions`` with the user prompt and
  Model 1's text so far as an assistant message the model continues
  (``continue_final_message: true, add_generation_prompt: false``, vLLM's and SGLang's spelling),
  ``logprobs`` with ``top_logprobs`` and ``max_tokens`` 1.
- **prompt logprobs** (vLLM; :meth:`OpenAIServer.prompt_logprobs`): the chat template's token
  ids from vLLM's ``/tokenize`` (``messages`` with ``add_generation_prompt``), Model 1's response
  as token ids, and one ``/v1/completions`` request with ``prompt_logprobs`` for all of it.
  vLLM answers, per prompt token, ``{token_id: {logprob, rank, decoded_token}}`` — the top-k
  given the tokens before it, plus the prompt's own token — with ``null`` for the first token.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from klstream.backends.base import (
    PLACEHOLDER_KEY,
    Answer,
    Backend,
    Candidate,
    ClientSettings,
    Endpoint,
    Generated,
    PrefillRequest,
    PromptScores,
    PromptToken,
    Tokenized,
    Where,
)
from klstream.errors import (
    AuthenticationError,
    CallFault,
    ConnectFailed,
    MethodUnsupported,
    MissingServerUrl,
    ModelNotFound,
    Overloaded,
    PrefillRejected,
    RateLimited,
    RequestRejected,
    TransientFault,
    UnusableAnswer,
)

API_KEY_VARIABLE = "OPENAI_API_KEY"
BASE_URL_VARIABLE = "OPENAI_BASE_URL"
API_PATH = "/v1"
"""Where vLLM and SGLang serve the OpenAI API; a base URL without a path gets it."""
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
PREFILL_OPTIONS = {"continue_final_message": True, "add_generation_prompt": False}
"""How vLLM and SGLang are told to continue the final (assistant) message instead of starting a
new turn after it."""
_PREFILL_REJECTED = re.compile(r"continue_final_message|final message|prefill", re.IGNORECASE)


def openai_endpoint(where: Where) -> Endpoint:
    """The server from the base URL or ``OPENAI_BASE_URL``; the key from ``OPENAI_API_KEY``, or
    none (local servers usually need none)."""
    base_url = where.base_url or os.environ.get(BASE_URL_VARIABLE) or None
    if base_url is None:
        raise MissingServerUrl(
            "an OpenAI-compatible server needs its base URL "
            f"({BASE_URL_VARIABLE}), such as http://localhost:8000/v1 for vLLM"
        )
    api_key = os.environ.get(API_KEY_VARIABLE) or None
    return Endpoint("openai", api_key, base_url=api_base_url(base_url), timeout_s=where.timeout_s)


def api_base_url(base_url: str) -> str:
    """``base_url``, with ``/v1`` when it has no path (``http://host:8000`` is vLLM's root)."""
    parts = urlsplit(base_url.rstrip("/"))
    return urlunsplit(parts._replace(path=parts.path or API_PATH))


def server_root(base_url: str) -> str:
    """The server's root, where vLLM serves ``/tokenize``: the base URL without its ``/v1``."""
    parts = urlsplit(base_url.rstrip("/"))
    return urlunsplit(parts._replace(path=parts.path.removesuffix(API_PATH)))


def chat_messages(prompt: str, prefill: str) -> list[dict[str, str]]:
    """The user prompt, then — past position 0 — Model 1's text so far as the assistant's."""
    messages = [{"role": "user", "content": prompt}]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    return messages


def _json_object(text: str, content_type: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        snippet = " ".join(text.split())[:200]
        kind = f" ({content_type})" if content_type else ""
        raise UnusableAnswer(f"answer body is not JSON{kind}: {snippet!r}") from None
    if not isinstance(body, dict):
        raise UnusableAnswer(f"answer body is not a JSON object: {str(body)[:200]}")
    return body


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UnusableAnswer(f"answer has no choices: {str(body)[:200]}")
    choice: dict[str, Any] = choices[0]
    return choice


def _is_logprob(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value <= 0.0


def _chat_candidate(raw: object) -> Candidate:
    if not isinstance(raw, dict):
        raise UnusableAnswer(f"malformed logprob entry {raw!r}")
    token, logprob = raw.get("token"), raw.get("logprob")
    if not isinstance(token, str) or not _is_logprob(logprob):
        raise UnusableAnswer(f"malformed logprob entry {raw!r}")
    return Candidate(token, None, float(logprob))  # type: ignore[arg-type]


def parse_chat_answer(text: str, content_type: str) -> Answer:
    """Read the generated tokens' logprobs out of a chat completion's JSON body."""
    choice = _first_choice(_json_object(text, content_type))
    finish = choice.get("finish_reason")
    content = (choice.get("logprobs") or {}).get("content")
    if not content or not isinstance(content, list):
        raise UnusableAnswer(
            f"answer without logprobs (finish reason {finish}); the server may not support "
            "logprobs for this model"
        )
    steps = []
    for step in content:
        chosen = _chat_candidate(step)
        top = [_chat_candidate(c) for c in step.get("top_logprobs") or []]
        if not top:
            raise UnusableAnswer("answer with an empty top_logprobs list")
        steps.append(Generated(chosen, top))
    message = choice.get("message") or {}
    answer_text = message.get("content") if isinstance(message, dict) else None
    return Answer(steps, answer_text if isinstance(answer_text, str) else "", finish)


def parse_tokenized(text: str, content_type: str) -> Tokenized:
    body = _json_object(text, content_type)
    tokens, limit = body.get("tokens"), body.get("max_model_len")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise UnusableAnswer(f"tokenize answer without a list of token ids: {str(body)[:200]}")
    return Tokenized(tokens, limit if type(limit) is int else None)


def _prompt_candidate(key: str, raw: object) -> Candidate:
    if not isinstance(raw, dict) or not _is_logprob(raw.get("logprob")):
        raise UnusableAnswer(f"malformed prompt logprob {key}: {raw!r}")
    try:
        token_id = int(key)
    except ValueError:
        raise UnusableAnswer(f"prompt logprob keyed by {key!r}, not a token id") from None
    decoded = raw.get("decoded_token")
    return Candidate(decoded if isinstance(decoded, str) else "", token_id, float(raw["logprob"]))


def _generated_top(choice: dict[str, Any], top_logprobs: int) -> list[Candidate] | None:
    """The completion's own logprobs at its first generated token: ``{token: logprob}``."""
    tops = (choice.get("logprobs") or {}).get("top_logprobs")
    first = tops[0] if isinstance(tops, list) and tops else None
    if not isinstance(first, dict) or not first:
        return None
    if not all(isinstance(t, str) and _is_logprob(lp) for t, lp in first.items()):
        raise UnusableAnswer(f"malformed top_logprobs {str(first)[:200]}")
    ranked = sorted(first.items(), key=lambda item: -item[1])[:top_logprobs]
    return [Candidate(token, None, float(logprob)) for token, logprob in ranked]


def parse_prompt_logprobs(
    text: str, content_type: str, prompt_ids: list[int], top_logprobs: int, start: int
) -> PromptScores:
    """The prompt tokens from index ``start`` on, each with Model 2's top-k before it, and the
    top-k after the prompt.

    vLLM adds the prompt's own token to each top-k when it ranks lower; that entry is recognised
    by its id and kept out of the top-k.
    """
    choice = _first_choice(_json_object(text, content_type))
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise UnusableAnswer(
            "answer without prompt_logprobs; the server does not return prompt logprobs (vLLM does)"
        )
    if not isinstance(entries, list) or len(entries) != len(prompt_ids):
        count = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise UnusableAnswer(
            f"prompt_logprobs has {count} entries for a prompt of {len(prompt_ids)} tokens"
        )
    tokens = []
    for index in range(max(start, 1), len(prompt_ids)):
        entry = entries[index]
        if not isinstance(entry, dict) or not entry:
            raise UnusableAnswer(f"prompt_logprobs[{index}] is {str(entry)[:100]}, not a top-k")
        candidates = [_prompt_candidate(key, raw) for key, raw in entry.items()]
        own = next((c for c in candidates if c.token_id == prompt_ids[index]), None)
        if own is None:
            raise UnusableAnswer(
                f"prompt_logprobs[{index}] lacks the prompt's own token {prompt_ids[index]}"
            )
        candidates.sort(key=lambda c: -c.logprob)
        tokens.append(PromptToken(own, candidates[:top_logprobs]))
    return PromptScores(tokens, _generated_top(choice, top_logprobs))


def _error_detail(error: openai.APIStatusError) -> str:
    """The server's message, or the start of its body when that is not an API error (HTML)."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    text = " ".join(str(body if body is not None else error.response.text).split())
    return text[:200] or error.message


def describe(error: BaseException) -> str:
    """A one-line description for the error column."""
    if isinstance(error, openai.APIStatusError):
        return f"{error.status_code}: {_error_detail(error)}"
    if isinstance(error, openai.APITimeoutError):
        return "timeout: no answer within the request timeout"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        return f"connection error: {cause or error.message}"
    return f"{type(error).__name__}: {error}"


def retry_delay(error: openai.APIStatusError) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms`` or ``Retry-After``."""
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(float(value) / scale, 0.0)
            except ValueError:
                continue
    return None


def unreachable(error: openai.APIConnectionError) -> str | None:
    """Why a connection error is a failed connect (refused, unknown host, TLS), or None when it
    is a time-out or a dropped connection. The SDK's HTTP library wraps the socket's error, so
    the chain of causes is searched for it."""
    if isinstance(error, openai.APITimeoutError):
        return None
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause})"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host ({cause.strerror or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return None


def status_fault(error: openai.APIStatusError) -> CallFault:
    """The fault an error status stands for; raises an
    :class:`~klstream.errors.EndpointError` when no request can succeed (bad key, unknown model,
    no prefill)."""
    code = error.status_code
    text = describe(error)
    if code == 429:
        return RateLimited(text, retry_delay(error))
    if code == 503:
        return Overloaded(text, retry_delay(error))
    if code in RETRIED_STATUS:
        return TransientFault(text, retry_delay(error))
    detail = _error_detail(error)
    if code == 400 and _PREFILL_REJECTED.search(detail):
        raise PrefillRejected(
            f"the server rejects continuing an assistant message ({code}: {detail}). "
            "Scoring by prefill needs it: the prompt, then Model 1's tokens so far as the "
            "model's own turn. Use a server that supports continue_final_message (vLLM, "
            "SGLang)."
        )
    if code in (401, 403):
        what = "authentication failed" if code == 401 else "permission denied"
        raise AuthenticationError(f"{what} ({code}: {detail}); no request can succeed")
    if code == 404:
        raise ModelNotFound(
            f"model or endpoint not found ({code}: {detail}); no request can succeed"
        )
    return RequestRejected(text)


def fault_of(error: openai.APIError) -> CallFault:
    """The fault an SDK error stands for (see :func:`status_fault`)."""
    if isinstance(error, openai.APIStatusError):
        return status_fault(error)
    if isinstance(error, openai.APIConnectionError):
        cause = unreachable(error)
        if cause is not None:
            return ConnectFailed(cause)
    return TransientFault(describe(error))


class OpenAIServer:
    """One model on one OpenAI-compatible server: generation (chat completions) and vLLM's
    prompt logprobs."""

    def __init__(self, client: openai.AsyncOpenAI, model: str) -> None:
        self.client, self.model = client, model
        self.tokenize_url = server_root(str(client.base_url)) + "/tokenize"

    async def generate(self, request: PrefillRequest) -> Answer:
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.seed is not None:
            options["seed"] = request.seed
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=chat_messages(request.prompt, request.prefill),  # type: ignore[arg-type]
                max_tokens=request.max_tokens,
                logprobs=True,
                top_logprobs=request.top_logprobs,
                extra_body=PREFILL_OPTIONS if request.prefill else None,
                **options,
            )
        except openai.APIError as error:
            raise fault_of(error) from error
        return parse_chat_answer(raw.text, raw.headers.get("content-type", ""))

    async def _tokenize(self, body: dict[str, Any]) -> Tokenized:
        try:
            text = await self.client.post(self.tokenize_url, cast_to=str, body=body)
        except openai.NotFoundError as error:
            if "model" in _error_detail(error).lower():
                raise fault_of(error) from error
            raise MethodUnsupported(
                f"the server has no tokenizer endpoint ({self.tokenize_url}: {describe(error)}); "
                "prompt logprobs need vLLM's /tokenize"
            ) from None
        except openai.APIError as error:
            raise fault_of(error) from error
        return parse_tokenized(text, "")

    async def template_tokens(self, prompt: str) -> Tokenized:
        """The chat template's tokens for ``prompt``, up to where the assistant's answer starts."""
        return await self._tokenize(
            {
                "model": self.model,
                "messages": chat_messages(prompt, ""),
                "add_generation_prompt": True,
            }
        )

    async def text_tokens(self, text: str) -> Tokenized:
        """``text``'s tokens, as they would continue a prompt (no special tokens added)."""
        return await self._tokenize(
            {"model": self.model, "prompt": text, "add_special_tokens": False}
        )

    async def prompt_logprobs(
        self, prompt_ids: list[int], top_logprobs: int, start: int
    ) -> PromptScores:
        """Model 2's top-k at every prompt token from ``start`` on, and after the last, from one
        request (the one token it generates brings the last)."""
        try:
            raw = await self.client.completions.with_raw_response.create(
                model=self.model,
                prompt=prompt_ids,
                max_tokens=1,
                logprobs=top_logprobs,
                extra_body={"prompt_logprobs": top_logprobs},
            )
        except openai.APIError as error:
            raise fault_of(error) from error
        return parse_prompt_logprobs(
            raw.text, raw.headers.get("content-type", ""), prompt_ids, top_logprobs, start
        )


@contextlib.asynccontextmanager
async def open_server(endpoint: Endpoint, settings: ClientSettings) -> AsyncIterator[OpenAIServer]:
    """A client making one HTTP attempt per call, closed on exit. Its connection pool (the
    SDK's, hundreds of connections) leaves the concurrency to klstream's limiter."""
    client = openai.AsyncOpenAI(
        api_key=endpoint.api_key or PLACEHOLDER_KEY,
        base_url=endpoint.base_url,
        timeout=endpoint.timeout_s,
        max_retries=0,
    )
    async with client:
        yield OpenAIServer(client, settings.model)


OPENAI = Backend("openai", openai_endpoint, prefill=open_server, prompt_scoring=open_server)
