"""The boundary with OpenAI-compatible servers (vLLM, SGLang, TGI, gateways): client set-up,
the requests scoring makes, and what their answers mean.

Everything goes through the official ``openai`` SDK's async client with its own retries off
(``max_retries=0``), so that :mod:`klstream.backends.transport` decides about every retry and
counts it; the SDK's errors become the typed faults of :mod:`klstream.errors`
(:func:`fault_of`). Answers are read from the raw JSON body: the fields scoring needs (vLLM's
``prompt_logprobs``, say) are extensions the SDK's models do not declare, and SGLang's and TGI's
``/generate`` are not OpenAI routes at all (the SDK's plain ``post`` reaches them).

Two ways to score:

- **prefill** (:meth:`OpenAIServer.generate`): ``/v1/chat/completions`` with the user prompt and
  Model 1's text so far as an assistant message the model continues
  (``continue_final_message: true, add_generation_prompt: false``, vLLM's and SGLang's spelling),
  ``logprobs`` with ``top_logprobs`` and ``max_tokens`` 1. When Model 1's tokens carry ids, the
  request asks for vLLM's ``return_tokens_as_token_ids`` (tokens named ``token_id:1234``); a
  server that ignores it answers with texts, one that refuses it (400) is asked without it from
  then on.
- **prompt logprobs** (:meth:`OpenAIServer.prompt_logprobs`): the chat template's token ids
  from the server's ``/tokenize`` (``messages`` with ``add_generation_prompt``), Model 1's
  response as token ids, and one request for all of it in the server's dialect
  (:mod:`klstream.backends.dialects`: vLLM's ``prompt_logprobs``, the legacy ``echo``, SGLang's
  ``/generate``; TGI's is refused). ``auto`` finds the dialect with up to three small requests
  before the first response, once per run (:meth:`OpenAIServer.detect`).

Every answer records its ``usage`` and its ``model`` (with ``system_fingerprint`` when there is
one); entries without a usable logprob are left out of the top-k and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    Tokenized,
    Where,
)
from klstream.backends.dialects import (
    DIALECTS,
    PREFILL_FIX,
    Dialect,
    Entry,
    completions_probe,
    first_choice,
    json_object,
    json_value,
    kept,
    logprob_or_nan,
    named_token,
    openai_usage,
    served_model,
    sglang_probe,
    speaks_echo,
    speaks_sglang,
    speaks_tgi,
    speaks_vllm,
    tgi_probe,
    tgi_refusal,
)
from klstream.errors import (
    TIMED_OUT,
    AuthenticationError,
    BackendUnavailable,
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
TOKEN_IDS_OPTION = "return_tokens_as_token_ids"
"""vLLM's request field naming tokens by id (``token_id:1234``)."""


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
    return Endpoint(
        "openai",
        api_key,
        base_url=api_base_url(base_url),
        timeout_s=where.timeout_s,
        dialect=where.dialect,
    )


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


def _chat_entry(raw: object) -> Entry:
    if not isinstance(raw, dict) or not isinstance(raw.get("token"), str):
        raise UnusableAnswer(f"malformed logprob entry {str(raw)[:200]}")
    return (*named_token(raw["token"]), raw.get("logprob"))


def _chat_step(raw: object) -> Generated:
    """One generated token: the chosen one (its logprob NaN when the server's is not usable)
    and the usable entries of its ``top_logprobs``, most likely first."""
    text, token_id, logprob = _chat_entry(raw)
    listed = raw.get("top_logprobs") if isinstance(raw, dict) else None
    top, dropped = kept([_chat_entry(c) for c in listed or []])
    if not top:
        raise UnusableAnswer("answer with an empty top_logprobs list")
    return Generated(Candidate(text, token_id, logprob_or_nan(logprob)), top, dropped=dropped)


def parse_chat_answer(text: str, content_type: str) -> Answer:
    """The generated tokens' logprobs out of a chat completion's JSON body, with its usage and
    the model that answered."""
    body = json_object(text, content_type)
    choice = first_choice(body)
    finish = choice.get("finish_reason")
    content = (choice.get("logprobs") or {}).get("content")
    if not content or not isinstance(content, list):
        raise UnusableAnswer(
            f"answer without logprobs (finish reason {finish}); the server may not support "
            "logprobs for this model"
        )
    steps = [_chat_step(step) for step in content]
    message = choice.get("message") or {}
    answer_text = message.get("content") if isinstance(message, dict) else None
    return Answer(
        steps,
        answer_text if isinstance(answer_text, str) else "",
        finish,
        openai_usage(body),
        served_model(body),
    )


def parse_tokenized(text: str, content_type: str) -> Tokenized:
    body = json_object(text, content_type)
    tokens, limit = body.get("tokens"), body.get("max_model_len")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise UnusableAnswer(f"tokenize answer without a list of token ids: {str(body)[:200]}")
    return Tokenized(tokens, limit if type(limit) is int and limit > 0 else None)


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
        return TIMED_OUT
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


def _route_missing(error: openai.APIStatusError) -> bool:
    """The server has no such route (404, 405), as opposed to not knowing the model."""
    if error.status_code == 404:
        return "model" not in _error_detail(error).lower()
    return error.status_code == 405


def _not_taken(error: openai.APIStatusError, refusals: tuple[int, ...] = (400, 422)) -> bool:
    """The server does not take the request as asked: no such route, or a body it refuses
    (``refusals``)."""
    return _route_missing(error) or error.status_code in refusals


class OpenAIServer:
    """One model on one OpenAI-compatible server: generation (chat completions) and prompt
    logprobs in the server's dialect."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, dialect: str = "auto") -> None:
        self.client, self.model = client, model
        self.root = server_root(str(client.base_url))
        self.tokenize_url = self.root + "/tokenize"
        self.requested = dialect
        """The dialect asked for: ``auto``, or a name of :data:`DIALECTS` (or ``tgi``)."""
        self._dialect: Dialect | None = None
        self._detecting = asyncio.Lock()
        self.token_ids_accepted = True
        """False once the server has refused ``return_tokens_as_token_ids`` (400)."""

    @property
    def dialect(self) -> str | None:
        """The dialect prompt logprobs are asked in, once known."""
        return self._dialect.name if self._dialect else None

    async def generate(self, request: PrefillRequest) -> Answer:
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.seed is not None:
            options["seed"] = request.seed
        extra: dict[str, Any] = dict(PREFILL_OPTIONS) if request.prefill else {}
        token_ids = request.token_ids and self.token_ids_accepted
        if token_ids:
            extra[TOKEN_IDS_OPTION] = True
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=chat_messages(request.prompt, request.prefill),  # type: ignore[arg-type]
                max_tokens=request.max_tokens,
                logprobs=True,
                top_logprobs=request.top_logprobs,
                extra_body=extra or None,
                **options,
            )
        except openai.BadRequestError as error:
            if token_ids and TOKEN_IDS_OPTION in _error_detail(error):
                self.token_ids_accepted = False
                return await self.generate(request)
            raise fault_of(error) from error
        except openai.APIError as error:
            raise fault_of(error) from error
        return parse_chat_answer(raw.text, raw.headers.get("content-type", ""))

    async def _probe(self, url: str, body: dict[str, Any]) -> Any:
        """The server's JSON answer to a detection request, or None when it does not take it."""
        try:
            text = await self.client.post(url, cast_to=str, body=body)
        except openai.APIStatusError as error:
            if _not_taken(error):
                return None
            raise fault_of(error) from error
        except openai.APIError as error:
            raise fault_of(error) from error
        return json_value(text)

    async def detect(self) -> Dialect:
        """The dialect the server speaks: vLLM's ``prompt_logprobs`` (and the legacy echo) from
        one completion, then SGLang's ``/generate``, then the echo, then TGI's ``/generate``
        (refused: :func:`~klstream.backends.dialects.tgi_refusal`)."""
        completion = await self._probe("/completions", completions_probe(self.model))
        completion = completion if isinstance(completion, dict) else {}
        if speaks_vllm(completion):
            return DIALECTS["vllm"]
        native = await self._probe(self.root + "/generate", sglang_probe(self.model))
        if isinstance(native, dict) and speaks_sglang(native):
            return DIALECTS["sglang"]
        if speaks_echo(completion):
            return DIALECTS["echo"]
        tgi = await self._probe(self.root + "/generate", tgi_probe())
        if speaks_tgi(tgi):
            raise tgi_refusal(self.root, tgi)
        raise MethodUnsupported(
            f"{self.root} gives prompt logprobs in none of the ways klstream asks for them "
            f"(vLLM's prompt_logprobs, the legacy completions echo, SGLang's /generate); "
            f"{PREFILL_FIX}"
        )

    async def _resolved(self) -> Dialect:
        """The dialect, detected once for the run when ``auto``."""
        async with self._detecting:
            if self._dialect is None:
                if self.requested == "auto":
                    self._dialect = await self.detect()
                elif self.requested == "tgi":
                    raise tgi_refusal(self.root, None)
                elif self.requested in DIALECTS:
                    self._dialect = DIALECTS[self.requested]
                else:
                    raise BackendUnavailable(
                        f"no dialect is called {self.requested!r}; the dialects are auto, "
                        f"{', '.join(DIALECTS)} and tgi"
                    )
        return self._dialect

    async def _tokenize(
        self, body: dict[str, Any], what: str, refusals: tuple[int, ...]
    ) -> Tokenized:
        """The server's ``/tokenize`` of ``body``; one that is missing or refuses the body
        (``refusals``) cannot serve prompt logprobs."""
        await self._resolved()  # a server that cannot score says so before its tokenizer
        try:
            text = await self.client.post(self.tokenize_url, cast_to=str, body=body)
        except openai.APIStatusError as error:
            if not _not_taken(error, refusals):
                raise fault_of(error) from error
            raise MethodUnsupported(
                f"the server has no tokenizer that {what} ({self.tokenize_url}: "
                f"{describe(error)}); prompt logprobs need the server's /tokenize (vLLM's, or "
                f"SGLang's that takes messages); {PREFILL_FIX}"
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
            },
            "renders chat messages",
            (400, 422),
        )

    async def text_tokens(self, text: str) -> Tokenized:
        """``text``'s tokens, as they would continue a prompt (no special tokens added)."""
        return await self._tokenize(
            {"model": self.model, "prompt": text, "add_special_tokens": False},
            "takes a prompt",
            (422,),
        )

    async def prompt_logprobs(
        self, prompt_ids: list[int], top_logprobs: int, start: int
    ) -> PromptScores:
        """Model 2's top-k at every prompt token from ``start`` on, and after the last, from one
        request in the server's dialect (the one token it generates brings the last)."""
        dialect = await self._resolved()
        url = self.root + dialect.path if dialect.at_root else dialect.path
        try:
            text = await self.client.post(
                url, cast_to=str, body=dialect.body(self.model, prompt_ids, top_logprobs, start)
            )
        except openai.APIStatusError as error:
            if _route_missing(error):
                raise MethodUnsupported(
                    f"the server does not speak the {dialect.name} dialect of prompt logprobs "
                    f"({url}: {describe(error)}); let klstream find the server's dialect"
                ) from None
            raise fault_of(error) from error
        except openai.APIError as error:
            raise fault_of(error) from error
        return dialect.parse(json_object(text), prompt_ids, top_logprobs, start)


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
        yield OpenAIServer(client, settings.model, endpoint.dialect)


OPENAI = Backend("openai", openai_endpoint, prefill=open_server, prompt_scoring=open_server)
