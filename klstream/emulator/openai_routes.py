"""The emulator's OpenAI-compatible routes over the same toy models: vLLM's at the root, and the
same routes as other servers answer them under a path prefix (:data:`SERVERS`).

``POST /v1/chat/completions``
    ``messages`` (system/user/assistant; string or text-part content), ``max_tokens`` (or
    ``max_completion_tokens``, default 16), ``temperature``, ``seed``, ``logprobs`` with
    ``top_logprobs`` (0..20), and vLLM's ``continue_final_message`` (with
    ``add_generation_prompt: false``): the final assistant message is a prefill the model
    continues, re-tokenized like the Gemini routes' model turn. Logprobs come as OpenAI's
    ``choices[0].logprobs.content`` (``token``, ``logprob``, ``bytes``, ``top_logprobs``). With
    vLLM's ``return_tokens_as_token_ids`` every token is named ``token_id:<id>`` (and ``bytes``
    are those of that name, as vLLM's).
``POST /v1/completions``
    ``prompt`` as a string or a list of token ids, ``max_tokens`` (default 16; 0 only with
    ``echo``), ``temperature``, ``seed``, ``logprobs`` (legacy per-token logprobs, 0..20),
    ``echo`` (the prompt's text and, with ``logprobs``, its tokens come first: the first
    token's logprob and top are ``null``, each top is ``{token text: logprob}`` with the actual
    token added when it ranks below the k, as vLLM answers lm-evaluation-harness), vLLM's
    ``prompt_logprobs`` (0..20): per prompt token ``{token_id: {logprob, rank,
    decoded_token}}`` — the top-k before it, plus the token itself when it ranks lower — with
    ``null`` for the first, and ``return_tokens_as_token_ids`` (the legacy ``tokens`` and top
    keys become ``token_id:<id>``).
``POST /tokenize``
    vLLM's: ``{"prompt": text}`` or ``{"messages": [...], "add_generation_prompt",
    "continue_final_message"}`` gives ``{"count", "max_model_len", "tokens"}`` (and
    ``token_strs`` with ``return_token_strs``).

Other servers, by path prefix (``--base-url http://127.0.0.1:8765/sglang/v1``, say):

``/sglang``
    SGLang: the same chat, completions (``echo`` works, ``prompt_logprobs`` and
    ``return_tokens_as_token_ids`` are ignored) and ``/tokenize``, and SGLang's native
    ``/generate`` (:mod:`klstream.emulator.native_routes`).
``/legacy``
    A completions server with the legacy ``echo`` but without vLLM's extensions (what
    lm-evaluation-harness's local-completions is pointed at), with vLLM's ``/tokenize``.
``/tgi`` and ``/tgi-prefill``
    HuggingFace TGI's ``/generate``, launched without and with ``--enable-prefill-logprobs``.

The toy chat template renders the conversation as ``<|user|>PROMPT<|end|>`` and, for the
answer, ``<|assistant|>`` followed by the assistant's text; PROMPT is the system and user
messages joined by newlines, as the Gemini routes join their turns. Markers are plain text
(their characters are toy tokens). A completion prompt that renders this way is read back: its
positions after the template condition on PROMPT and the response tokens before them — exactly
the distributions the chat route and the Gemini routes give for the same prefill — and the
template's own tokens (and any prompt without the template) condition on an empty prompt.

A model name part ``ctx<n>`` sets ``max_model_len`` (default 32768); longer requests get vLLM's
400. The behaviour flags and faults are the Gemini routes' (``noprefill`` rejects
``continue_final_message``; ``nologprobs`` and ``rate_no_logprobs`` drop logprobs and
``prompt_logprobs``), plus ``rate_short_prompt_logprobs`` (the last entries of
``prompt_logprobs`` missing) and these name parts (:data:`ODD_VALUES` and :class:`Flags`):

- ``noprompt``: a vLLM build without prompt logprobs: no ``prompt_logprobs`` field, and the
  echo's ``logprobs`` cover the generated tokens only;
- ``floor9999``, ``floatmin``, ``nanvals``: every top-k list (chat, legacy, prompt logprobs,
  SGLang's triples) also lists the two least likely tokens, at vLLM's and OpenAI's floor
  -9999.0, at float32's lowest -3.4028234663852886e+38 (SGLang), or as ``null`` and ``NaN``;
- ``kplus1``: chat and SGLang lists add the chosen (or prompt) token beyond the k when it
  ranks lower, as vLLM's completions always do;
- ``strict``: chat requests with ``return_tokens_as_token_ids`` get 400 "Unrecognized request
  argument supplied", as a gateway that checks OpenAI's schema;
- ``fingerprint``: answers carry a ``system_fingerprint``.

Errors use the OpenAI format ``{"error": {"message", "type", "param", "code"}}``; 429s carry
``Retry-After`` and ``retry-after-ms``. Answers carry ``usage`` (``prompt_tokens``,
``completion_tokens``, ``total_tokens``) and the ``model``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
from aiohttp import web

from klstream.emulator.faults import FaultState
from klstream.emulator.protocol import JSON_HEADERS, MAX_LOGPROBS, ApiError
from klstream.emulator.toymodel import (
    MASKED_LOGPROB,
    VOCAB_SIZE,
    Candidate,
    Generation,
    ToyModel,
    UnknownModelError,
    decode,
    encode,
    token_str,
    top_k,
)

USER_MARK: Final = "<|user|>"
END_MARK: Final = "<|end|>"
ASSISTANT_MARK: Final = "<|assistant|>"
DEFAULT_MAX_MODEL_LEN: Final = 32768
DEFAULT_MAX_TOKENS: Final = 16
HTML_PAGE: Final = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>"
)
_CONTEXT_PART = re.compile(r"ctx(\d+)")
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

RecordRequest = Callable[[web.Request, float, str, str, str | None, web.Response, str | None], None]
"""(request, arrival time, model, prompt, prefill, response, fault) into the emulator's log."""


def render_chat(prompt: str, assistant: str | None) -> str:
    """The toy chat template: the user turn, then (unless ``None``) the assistant's answer so
    far after the generation prompt."""
    rendered = USER_MARK + prompt + END_MARK
    return rendered if assistant is None else rendered + ASSISTANT_MARK + assistant


def chat_prompt_tokens(prompt: str, assistant: str | None) -> int:
    """Prompt tokens of a chat request, as its ``usage`` counts them."""
    return len(encode(render_chat(prompt, assistant)))


def max_model_len(model_name: str) -> int:
    for part in model_name.split("-"):
        if match := _CONTEXT_PART.fullmatch(part):
            return int(match.group(1))
    return DEFAULT_MAX_MODEL_LEN


def error_response(error: ApiError) -> web.Response:
    """``error`` in the OpenAI error format, with the waiting time on a 429."""
    body = {
        "error": {
            "message": error.message,
            "type": _ERROR_TYPES.get(error.code, "Error"),
            "param": None,
            "code": error.code,
        }
    }
    headers = dict(JSON_HEADERS)
    if error.retry_delay_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_delay_s)))
        headers["retry-after-ms"] = str(round(error.retry_delay_s * 1000))
    return web.Response(status=error.code, body=json.dumps(body).encode(), headers=headers)


def served_model(name: object) -> ToyModel:
    if not isinstance(name, str):
        raise ApiError(400, "model must be a string")
    try:
        return ToyModel.for_name(name)
    except UnknownModelError:
        raise ApiError(
            404,
            f"The model `{name}` does not exist. The klstream emulator serves toy models: "
            "names with a 'toy' part, such as 'toy' or 'toy-d0.5'.",
        ) from None


def integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"`{key}` must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"`{key}` must be in [{lo}, {hi}], got {value}")
    return value


def temperature_of(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise ApiError(400, f"`temperature` must be a number in [0, 2], got {value!r}")
    return float(value)


def _logprob_count(body: dict[str, Any], key: str) -> int | None:
    value = integer(body, key, None, 0, 1 << 31)
    if value is not None and value > MAX_LOGPROBS:
        raise ApiError(
            400, f"Requested {key} of {value}, which is greater than max allowed: {MAX_LOGPROBS}"
        )
    return value


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    raise ApiError(400, f"{where}.content must be a string or a list of text parts")


def parse_messages(body: dict[str, Any]) -> tuple[str, str | None]:
    """(prompt, prefill or None): the system and user messages joined by newlines, and the final
    assistant message when ``continue_final_message`` asks to continue it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list")
    continue_final = body.get("continue_final_message") is True
    if continue_final and body.get("add_generation_prompt", True) is not False:
        raise ApiError(
            400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    roles = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{index}].role must be system, user or assistant")
        roles.append(role)
    prefill = None
    if continue_final:
        if roles[-1] != "assistant":
            raise ApiError(400, "continue_final_message needs a final assistant message")
        prefill = _content_text(messages[-1].get("content"), f"messages[{len(messages) - 1}]")
        messages, roles = messages[:-1], roles[:-1]
    turns = [
        _content_text(m.get("content"), f"messages[{i}]")
        for i, (m, role) in enumerate(zip(messages, roles, strict=True))
        if role != "assistant"
    ]
    if not turns:
        raise ApiError(400, "`messages` must contain a user message")
    return "\n".join(turns), prefill


@dataclass(frozen=True)
class PromptSplit:
    """A completion prompt read back: before token ``start`` the template (conditioning on an
    empty prompt), from it on the answer, conditioning on ``prompt``."""

    prompt: str
    start: int

    @classmethod
    def of(cls, ids: list[int]) -> PromptSplit:
        text = decode(ids)
        marker = END_MARK + ASSISTANT_MARK
        at = text.find(marker) if text.startswith(USER_MARK) else -1
        if at < 0:
            return cls("", 0)
        prompt, answer_start = text[len(USER_MARK) : at], at + len(marker)
        lengths = np.fromiter((len(token_str(i)) for i in ids), np.int64, len(ids))
        starts = np.cumsum(lengths) - lengths
        start = int(np.searchsorted(starts, answer_start))
        if answer_start == len(text) or (start < len(ids) and starts[start] == answer_start):
            return cls(prompt, start)
        return cls("", 0)  # the marker ends inside a token: not the template

    def context(self, ids: list[int], index: int) -> tuple[str, list[int]]:
        """What the toy model conditions on before token ``index``."""
        if index < self.start:
            return "", ids[:index]
        return self.prompt, ids[self.start : index]


def own_logprob(logprobs: np.ndarray, token_id: int) -> float:
    """A prompt token's logprob; a fallback id (outside the vocabulary) is never predicted."""
    return float(logprobs[token_id]) if 0 <= token_id < VOCAB_SIZE else MASKED_LOGPROB


def logged(ids: list[int], split: PromptSplit) -> tuple[str, str | None]:
    """What the request log shows of a prompt of token ids: the prompt, and the response after
    the chat template (as a prefill) when the ids render it."""
    return split.prompt or decode(ids), decode(ids[split.start :]) if split.start else None


def prompt_logprobs_entry(logprobs: np.ndarray, own_id: int, k: int) -> dict[str, Any]:
    """vLLM's entry for one prompt token: the top-k, and the token itself if it ranks lower."""
    entry = {
        str(c.token_id): {"logprob": c.logprob, "rank": rank, "decoded_token": c.token}
        for rank, c in enumerate(top_k(logprobs, k), start=1)
    }
    if str(own_id) not in entry:
        own = own_logprob(logprobs, own_id)
        entry[str(own_id)] = {
            "logprob": own,
            "rank": int(np.count_nonzero(logprobs > own)) + 1,
            "decoded_token": token_str(own_id),
        }
    return entry


ODD_VALUES: Final[dict[str, tuple[float | None, ...]]] = {
    "floor9999": (-9999.0, -9999.0),
    "floatmin": (-3.4028234663852886e38, -3.4028234663852886e38),
    "nanvals": (None, math.nan),
}
"""Model name parts that add entries without a usable logprob to every top-k list: the values
they are listed with (vLLM's and OpenAI's floor, float32's lowest as SGLang's filler, null and
NaN)."""
FINGERPRINT: Final = "fp_klstream_emulator"
TOKEN_IDS_OPTION: Final = "return_tokens_as_token_ids"


@dataclass(frozen=True)
class Flags:
    """The behaviour parts of a model name that the open-weight routes act on."""

    noprompt: bool = False
    kplus1: bool = False
    strict: bool = False
    fingerprint: bool = False
    odd: tuple[float | None, ...] = ()
    """Values of the entries each top-k list gets on top (:data:`ODD_VALUES`)."""

    @classmethod
    def of(cls, name: str) -> Flags:
        parts = set(name.removeprefix("models/").split("-"))
        odd = tuple(
            value for part, values in ODD_VALUES.items() if part in parts for value in values
        )
        return cls(
            "noprompt" in parts, "kplus1" in parts, "strict" in parts, "fingerprint" in parts, odd
        )

    def fillers(self, logprobs: np.ndarray, taken: set[int]) -> list[tuple[int, float | None]]:
        """(id, value) of the entries the odd-value parts add to a list holding ``taken``: the
        least likely tokens not in it, with the flags' values instead of their logprobs."""
        if not self.odd:
            return []
        least = np.argsort(logprobs, kind="stable")[: len(self.odd) + len(taken)].tolist()
        return list(zip([i for i in least if i not in taken], self.odd, strict=False))

    def fingerprinted(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` with vLLM's ``system_fingerprint``: null, or one with ``fingerprint``."""
        return {**payload, "system_fingerprint": FINGERPRINT if self.fingerprint else None}


def token_name(token_id: int, as_id: bool) -> str:
    """A token as the answer names it: its text, or vLLM's ``token_id:<id>``."""
    return f"token_id:{token_id}" if as_id else token_str(token_id)


def extended(
    top: list[Candidate], flags: Flags, logprobs: np.ndarray | None, actual: Candidate | None
) -> list[tuple[int, float | None]]:
    """A top-k list as (id, value) pairs with the entries the name's flags add: the actual
    token beyond the k (``kplus1``), then the odd values' fillers."""
    pairs: list[tuple[int, float | None]] = [(c.token_id, c.logprob) for c in top]
    taken = {c.token_id for c in top}
    if flags.kplus1 and actual is not None and actual.token_id not in taken:
        pairs.append((actual.token_id, actual.logprob))
        taken.add(actual.token_id)
    if logprobs is not None:
        pairs += flags.fillers(logprobs, taken)
    return pairs


def _legacy_logprobs(steps: list[tuple[str, float | None, dict[str, Any] | None]]) -> Any:
    """The completions API's own ``logprobs`` object over (token, logprob, top) steps."""
    lengths = [len(token) for token, _, _ in steps]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    return {
        "text_offset": offsets if steps else [],
        "token_logprobs": [logprob for _, logprob, _ in steps],
        "tokens": [token for token, _, _ in steps],
        "top_logprobs": [top for _, _, top in steps],
    }


def _finish(generation: Generation | None) -> str:
    return "stop" if generation is not None and generation.finish_reason == "STOP" else "length"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def step_contexts(prefix: list[int], generation: Generation) -> list[list[int]]:
    """The ids before each generated step: ``prefix``, then the steps before it."""
    ids = [step.chosen.token_id for step in generation.steps]
    return [prefix + ids[:index] for index in range(len(ids))]


Handler = Callable[[dict[str, Any], FaultState], Awaitable[tuple[Any, str, str | None]]]
"""A handler's answer to a parsed body: (payload, prompt, prefill) for the request log."""


class Routes:
    """Latency, parsing, faults and the request log around one emulated server's handlers."""

    def __init__(
        self,
        state: Callable[[], FaultState],
        sleep: Callable[[float], Awaitable[None]],
        record: RecordRequest,
    ) -> None:
        self._state, self._sleep, self._record = state, sleep, record

    async def handle(
        self,
        request: web.Request,
        answer: Handler,
        strip: Callable[[Any], None] | None = None,
        error: Callable[[ApiError], web.Response] = error_response,
    ) -> web.Response:
        """``answer``'s payload with the configured faults: ``strip`` removes its logprobs
        (``rate_no_logprobs``), ``error`` writes an error in the server's format."""
        arrived = time.monotonic()
        state = self._state()
        model_name, prompt, prefill, fault = "", "", None, None
        try:
            delay = state.latency_s()
            if delay:
                await self._sleep(delay)
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, f"Invalid JSON body: {exc}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object.")
            model_name = str(body.get("model") or "")
            state.check_quota(time.monotonic())
            state.check_fail_first(model_name, raw)
            fault = state.draw_exclusive()
            await self._inject(fault, state)
            payload, prompt, prefill = await answer(body, state)
            if strip is not None and state.draw_no_logprobs():
                fault = fault or "no_logprobs"
                strip(payload)
            response = self._body(payload, fault)
        except ApiError as exc:
            response, fault = error(exc), exc.fault
        except ConnectionResetError:
            response = web.Response(status=499)  # never sent: the client has gone
        except Exception as exc:  # a bug: still answer in the API's format
            response = error(ApiError(500, f"Internal error in the emulator: {exc!r}"))
            fault = "emulator_bug"
        self._record(request, arrived, model_name, prompt, prefill, response, fault)
        return response

    async def _inject(self, fault: str | None, state: FaultState) -> None:
        if fault == "429":
            raise ApiError(
                429,
                "Rate limit reached. Please try again later. (emulated fault)",
                fault=fault,
                retry_delay_s=state.config.retry_delay_s,
            )
        if fault == "500":
            raise ApiError(500, "Internal server error. (emulated fault)", fault=fault)
        if fault == "503":
            raise ApiError(503, "The server is overloaded. Please try again later.", fault=fault)
        if fault == "hang":
            await self._sleep(state.config.hang_seconds)

    @staticmethod
    def _body(payload: Any, fault: str | None) -> web.Response:
        if fault == "html":
            return web.Response(body=HTML_PAGE, content_type="text/html")
        data = json.dumps(payload, separators=(",", ":")).encode()
        if fault == "malformed":
            data = data[: len(data) // 2]
        return web.Response(body=data, headers=JSON_HEADERS)


@dataclass(frozen=True)
class Flavour:
    """Which OpenAI-compatible server the routes under ``prefix`` answer as."""

    prefix: str = ""
    prompt_logprobs: bool = True
    """vLLM's ``prompt_logprobs`` extension (else the field is ignored)."""
    token_ids: bool = True
    """vLLM's ``return_tokens_as_token_ids`` (else the field is ignored)."""


def _strip_choices(payload: Any) -> None:
    for choice in payload.get("choices", []):
        choice["logprobs"] = None
        choice.pop("prompt_logprobs", None)


class OpenAIRoutes(Routes):
    """The OpenAI-compatible handlers of one server flavour."""

    def __init__(
        self,
        state: Callable[[], FaultState],
        sleep: Callable[[float], Awaitable[None]],
        record: RecordRequest,
        flavour: Flavour = Flavour(),
    ) -> None:
        super().__init__(state, sleep, record)
        self.flavour = flavour

    def register(self, app: web.Application) -> None:
        prefix = self.flavour.prefix
        app.router.add_post(f"{prefix}/v1/chat/completions", self._chat)
        app.router.add_post(f"{prefix}/v1/completions", self._completions)
        app.router.add_post(f"{prefix}/tokenize", self._tokenize)

    async def _chat(self, request: web.Request) -> web.Response:
        return await self.handle(request, self._chat_answer, _strip_choices)

    async def _completions(self, request: web.Request) -> web.Response:
        return await self.handle(request, self._completions_answer, _strip_choices)

    async def _tokenize(self, request: web.Request) -> web.Response:
        return await self.handle(request, self._tokenize_answer)

    def _as_ids(self, body: dict[str, Any]) -> bool:
        """Whether the answer names tokens by id (asked for, and this server knows how)."""
        return body.get(TOKEN_IDS_OPTION) is True and self.flavour.token_ids

    async def _chat_answer(
        self, body: dict[str, Any], _state: FaultState
    ) -> tuple[Any, str, str | None]:
        model = served_model(body.get("model"))
        flags = Flags.of(model.name)
        if flags.strict and TOKEN_IDS_OPTION in body:
            raise ApiError(400, f"Unrecognized request argument supplied: {TOKEN_IDS_OPTION}")
        prompt, prefill = parse_messages(body)
        if prefill is not None and model.noprefill:
            raise ApiError(400, "continue_final_message is not supported by this model.")
        with_logprobs = body.get("logprobs") is True
        top = _logprob_count(body, "top_logprobs")
        if top and not with_logprobs:
            raise ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true.")
        max_tokens = integer(body, "max_completion_tokens", None, 1, 1 << 31)
        max_tokens = integer(body, "max_tokens", max_tokens or DEFAULT_MAX_TOKENS, 1, 1 << 31)
        assert max_tokens is not None
        prompt_tokens = chat_prompt_tokens(prompt, prefill or "")
        check_context(model.name, prompt_tokens, max_tokens)
        prefill_ids = encode(prefill) if prefill else []
        generation = model.sample(
            prompt,
            max_tokens,
            temperature_of(body),
            integer(body, "seed", None, -(1 << 63), 1 << 63),
            top or 0,
            prefill_ids,
        )
        logprobs = None
        if with_logprobs and not model.nologprobs:
            as_ids = self._as_ids(body)

            def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
                name = token_name(token_id, as_ids)
                return {"token": name, "logprob": logprob, "bytes": list(name.encode())}

            contexts = step_contexts(prefill_ids, generation)
            content = []
            for step, context in zip(generation.steps, contexts, strict=True):
                lp = model.next_token_logprobs(prompt, context) if flags.odd else None
                listed = extended(step.top, flags, lp, step.chosen)
                content.append(
                    {
                        **entry(step.chosen.token_id, step.chosen.logprob),
                        "top_logprobs": [entry(i, value) for i, value in listed],
                    }
                )
            logprobs = {"content": content}
        payload = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "logprobs": logprobs,
                    "finish_reason": _finish(generation),
                }
            ],
            "usage": _usage(prompt_tokens, len(generation.steps)),
        }
        return flags.fingerprinted(payload), prompt, prefill

    def _prompt_entries(
        self, model: ToyModel, flags: Flags, ids: list[int], split: PromptSplit, k: int
    ) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs``: null, then each prompt token's entry and fillers."""
        entries: list[dict[str, Any] | None] = [None]
        for index in range(1, len(ids)):
            logprobs = model.next_token_logprobs(*split.context(ids, index))
            entry = prompt_logprobs_entry(logprobs, ids[index], k)
            for token_id, value in flags.fillers(logprobs, {int(key) for key in entry}):
                entry[str(token_id)] = {
                    "logprob": value,
                    "rank": len(entry) + 1,
                    "decoded_token": token_str(token_id),
                }
            entries.append(entry)
        return entries

    async def _completions_answer(
        self, body: dict[str, Any], state: FaultState
    ) -> tuple[Any, str, str | None]:
        model = served_model(body.get("model"))
        flags = Flags.of(model.name)
        ids = prompt_token_ids(body.get("prompt"))
        echo = body.get("echo") is True
        max_tokens = integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0 if echo else 1, 1 << 31)
        assert max_tokens is not None
        check_context(model.name, len(ids), max_tokens)
        logprobs = _logprob_count(body, "logprobs")
        asked = _logprob_count(body, "prompt_logprobs") if self.flavour.prompt_logprobs else None
        prompt_logprobs = logprobs if asked is None and echo else asked
        split = PromptSplit.of(ids)
        generation = None
        if max_tokens:
            generation = model.sample(
                split.prompt,
                max_tokens,
                temperature_of(body),
                integer(body, "seed", None, -(1 << 63), 1 << 63),
                logprobs or 0,
                ids[split.start :],
            )
        with_logprobs = not model.nologprobs
        with_prompt = with_logprobs and not flags.noprompt
        entries: list[dict[str, Any] | None] | None = None
        if prompt_logprobs is not None and with_prompt:
            entries = self._prompt_entries(model, flags, ids, split, prompt_logprobs)
            if state.draw_short_prompt_logprobs():
                entries = entries[: len(entries) // 2]
        steps = generation.steps if generation else []
        legacy = None
        if logprobs is not None and with_logprobs:
            as_ids = self._as_ids(body)
            shown: list[tuple[str, float | None, dict[str, Any] | None]] = []
            if echo and with_prompt:
                shown.append((token_name(ids[0], as_ids), None, None))
                for index in range(1, len(ids)):
                    entry = entries[index] if entries and index < len(entries) else None
                    own = entry[str(ids[index])]["logprob"] if entry else None
                    top = (
                        {token_name(int(key), as_ids): v["logprob"] for key, v in entry.items()}
                        if entry
                        else None
                    )
                    shown.append((token_name(ids[index], as_ids), own, top))
            contexts = step_contexts(ids[split.start :], generation) if generation else []
            for step, context in zip(steps, contexts, strict=True):
                lp = model.next_token_logprobs(split.prompt, context) if flags.odd else None
                listed = extended(step.top, replace(flags, kplus1=True), lp, step.chosen)
                named = {token_name(i, as_ids): value for i, value in listed}
                shown.append((token_name(step.chosen.token_id, as_ids), step.chosen.logprob, named))
            legacy = _legacy_logprobs(shown)
        text = "".join(s.chosen.token for s in steps)
        choice: dict[str, Any] = {
            "index": 0,
            "text": decode(ids) + text if echo else text,
            "logprobs": legacy,
            "finish_reason": _finish(generation),
            "stop_reason": None,
        }
        if self.flavour.prompt_logprobs and not flags.noprompt:
            choice["prompt_logprobs"] = entries
        payload = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [choice],
            "usage": _usage(len(ids), len(steps)),
        }
        return flags.fingerprinted(payload), *logged(ids, split)

    async def _tokenize_answer(
        self, body: dict[str, Any], _state: FaultState
    ) -> tuple[Any, str, str | None]:
        name = body.get("model")
        limit = DEFAULT_MAX_MODEL_LEN
        if name is not None:
            limit = max_model_len(served_model(name).name)
        if "messages" in body:
            prompt, prefill = parse_messages(body)
            assistant = prefill
            if assistant is None and body.get("add_generation_prompt", True) is True:
                assistant = ""
            text = render_chat(prompt, assistant)
        else:
            raw_prompt = body.get("prompt")
            if not isinstance(raw_prompt, str):
                raise ApiError(400, "`prompt` must be a string (or send `messages`)")
            prompt, prefill, text = raw_prompt, None, raw_prompt
        ids = encode(text)
        payload: dict[str, Any] = {"count": len(ids), "max_model_len": limit, "tokens": ids}
        if body.get("return_token_strs") is True:
            payload["token_strs"] = [token_str(i) for i in ids]
        return payload, prompt, prefill


def prompt_token_ids(prompt: object) -> list[int]:
    if isinstance(prompt, str) and prompt:
        return encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(type(i) is int and 0 <= i < VOCAB_SIZE + 0x110000 for i in prompt)
    ):
        return list(prompt)
    raise ApiError(
        400,
        "`prompt` must be a non-empty string or list of token ids (the emulator serves one "
        "prompt per request)",
    )


def check_context(model_name: str, prompt_tokens: int, max_tokens: int) -> None:
    limit = max_model_len(model_name)
    if prompt_tokens + max_tokens > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
