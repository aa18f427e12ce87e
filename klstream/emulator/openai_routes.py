"""The emulator's OpenAI-compatible routes, vLLM flavoured, over the same toy models.

``POST /v1/chat/completions``
    ``messages`` (system/user/assistant; string or text-part content), ``max_tokens`` (or
    ``max_completion_tokens``, default 16), ``temperature``, ``seed``, ``logprobs`` with
    ``top_logprobs`` (0..20), and vLLM's ``continue_final_message`` (with
    ``add_generation_prompt: false``): the final assistant message is a prefill the model
    continues, re-tokenized like the Gemini routes' model turn. Logprobs come as OpenAI's
    ``choices[0].logprobs.content`` (``token``, ``logprob``, ``bytes``, ``top_logprobs``).
``POST /v1/completions``
    ``prompt`` as a string or a list of token ids, ``max_tokens`` (default 16; 0 only with
    ``echo``), ``temperature``, ``seed``, ``logprobs`` (legacy per-token logprobs, 0..20),
    ``echo`` (the prompt's text and, with ``logprobs``, its tokens come first) and vLLM's
    ``prompt_logprobs`` (0..20): per prompt token ``{token_id: {logprob, rank,
    decoded_token}}`` — the top-k before it, plus the token itself when it ranks lower — with
    ``null`` for the first.
``POST /tokenize``
    vLLM's: ``{"prompt": text}`` or ``{"messages": [...], "add_generation_prompt",
    "continue_final_message"}`` gives ``{"count", "max_model_len", "tokens"}`` (and
    ``token_strs`` with ``return_token_strs``).

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
``prompt_logprobs`` missing). Errors use the OpenAI format ``{"error": {"message", "type",
"param", "code"}}``; 429s carry ``Retry-After`` and ``retry-after-ms``. Answers carry
``usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from aiohttp import web

from klstream.emulator.faults import FaultState
from klstream.emulator.protocol import JSON_HEADERS, MAX_LOGPROBS, ApiError
from klstream.emulator.toymodel import (
    MASKED_LOGPROB,
    VOCAB_SIZE,
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


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"`{key}` must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"`{key}` must be in [{lo}, {hi}], got {value}")
    return value


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise ApiError(400, f"`temperature` must be a number in [0, 2], got {value!r}")
    return float(value)


def _logprob_count(body: dict[str, Any], key: str) -> int | None:
    value = _int(body, key, None, 0, 1 << 31)
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


def prompt_logprobs_entry(logprobs: np.ndarray, own_id: int, k: int) -> dict[str, Any]:
    """vLLM's entry for one prompt token: the top-k, and the token itself if it ranks lower."""
    entry = {
        str(c.token_id): {"logprob": c.logprob, "rank": rank, "decoded_token": c.token}
        for rank, c in enumerate(top_k(logprobs, k), start=1)
    }
    if str(own_id) not in entry:
        own = float(logprobs[own_id]) if 0 <= own_id < VOCAB_SIZE else MASKED_LOGPROB
        entry[str(own_id)] = {
            "logprob": own,
            "rank": int(np.count_nonzero(logprobs > own)) + 1,
            "decoded_token": token_str(own_id),
        }
    return entry


def _legacy_logprobs(steps: list[tuple[str, float | None, dict[str, float] | None]]) -> Any:
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


class OpenAIRoutes:
    """The OpenAI-compatible handlers, sharing the emulator's faults, sleep and request log."""

    def __init__(
        self,
        state: Callable[[], FaultState],
        sleep: Callable[[float], Awaitable[None]],
        record: RecordRequest,
    ) -> None:
        self._state, self._sleep, self._record = state, sleep, record

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/tokenize", self._tokenize)

    async def _handle(
        self,
        request: web.Request,
        answer: Callable[[dict[str, Any], FaultState], Awaitable[tuple[Any, str, str | None]]],
        generates: bool = True,
    ) -> web.Response:
        """Latency, parsing and faults around ``answer``, which returns (body, prompt, prefill)."""
        arrived = time.monotonic()
        state = self._state()
        config = state.config
        model_name, prompt, prefill, fault = "", "", None, None
        try:
            delay_ms = config.latency_ms
            if config.jitter_ms:
                delay_ms += state.rng.uniform(0.0, config.jitter_ms)
            if delay_ms:
                await self._sleep(delay_ms / 1000.0)
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
            if generates and state.draw_no_logprobs():
                fault = fault or "no_logprobs"
                for choice in payload.get("choices", []):
                    choice["logprobs"] = None
                    choice.pop("prompt_logprobs", None)
            response = self._body(payload, fault)
        except ApiError as exc:
            response, fault = error_response(exc), exc.fault
        except ConnectionResetError:
            response = web.Response(status=499)  # never sent: the client has gone
        except Exception as exc:  # a bug: still answer in the API's format
            response = error_response(ApiError(500, f"Internal error in the emulator: {exc!r}"))
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

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._chat_answer)

    async def _completions(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._completions_answer)

    async def _tokenize(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._tokenize_answer, generates=False)

    async def _chat_answer(
        self, body: dict[str, Any], _state: FaultState
    ) -> tuple[Any, str, str | None]:
        model = served_model(body.get("model"))
        prompt, prefill = parse_messages(body)
        if prefill is not None and model.noprefill:
            raise ApiError(400, "continue_final_message is not supported by this model.")
        with_logprobs = body.get("logprobs") is True
        top = _logprob_count(body, "top_logprobs")
        if top and not with_logprobs:
            raise ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true.")
        max_tokens = _int(body, "max_completion_tokens", None, 1, 1 << 31)
        max_tokens = _int(body, "max_tokens", max_tokens or DEFAULT_MAX_TOKENS, 1, 1 << 31)
        assert max_tokens is not None
        prompt_tokens = chat_prompt_tokens(prompt, prefill or "")
        check_context(model.name, prompt_tokens, max_tokens)
        prefill_ids = encode(prefill) if prefill else []
        generation = model.sample(
            prompt,
            max_tokens,
            _temperature(body),
            _int(body, "seed", None, -(1 << 63), 1 << 63),
            top or 0,
            prefill_ids,
        )
        logprobs = None
        if with_logprobs and not model.nologprobs:
            logprobs = {
                "content": [
                    {
                        "token": step.chosen.token,
                        "logprob": step.chosen.logprob,
                        "bytes": list(step.chosen.token.encode()),
                        "top_logprobs": [
                            {
                                "token": c.token,
                                "logprob": c.logprob,
                                "bytes": list(c.token.encode()),
                            }
                            for c in step.top
                        ],
                    }
                    for step in generation.steps
                ]
            }
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
        return payload, prompt, prefill

    async def _completions_answer(
        self, body: dict[str, Any], state: FaultState
    ) -> tuple[Any, str, str | None]:
        model = served_model(body.get("model"))
        ids = _prompt_ids(body.get("prompt"))
        echo = body.get("echo") is True
        max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0 if echo else 1, 1 << 31)
        assert max_tokens is not None
        check_context(model.name, len(ids), max_tokens)
        logprobs = _logprob_count(body, "logprobs")
        prompt_logprobs = _logprob_count(body, "prompt_logprobs")
        if prompt_logprobs is None and echo:
            prompt_logprobs = logprobs
        split = PromptSplit.of(ids)
        generation = None
        if max_tokens:
            generation = model.sample(
                split.prompt,
                max_tokens,
                _temperature(body),
                _int(body, "seed", None, -(1 << 63), 1 << 63),
                logprobs or 0,
                ids[split.start :],
            )
        with_logprobs = not model.nologprobs
        entries: list[dict[str, Any] | None] | None = None
        if prompt_logprobs is not None and with_logprobs:
            entries = [None] + [
                prompt_logprobs_entry(
                    model.next_token_logprobs(*split.context(ids, index)),
                    ids[index],
                    prompt_logprobs,
                )
                for index in range(1, len(ids))
            ]
            if state.draw_short_prompt_logprobs():
                entries = entries[: len(entries) // 2]
        steps = generation.steps if generation else []
        legacy = None
        if logprobs is not None and with_logprobs:
            shown: list[tuple[str, float | None, dict[str, float] | None]] = []
            if echo:
                shown.append((token_str(ids[0]), None, None))
                for index in range(1, len(ids)):
                    entry = entries[index] if entries and index < len(entries) else None
                    own = entry[str(ids[index])]["logprob"] if entry else None
                    top = (
                        {v["decoded_token"]: v["logprob"] for v in entry.values()}
                        if entry
                        else None
                    )
                    shown.append((token_str(ids[index]), own, top))
            shown += [
                (s.chosen.token, s.chosen.logprob, {c.token: c.logprob for c in s.top})
                for s in steps
            ]
            legacy = _legacy_logprobs(shown)
        text = "".join(s.chosen.token for s in steps)
        choice: dict[str, Any] = {
            "index": 0,
            "text": decode(ids) + text if echo else text,
            "logprobs": legacy,
            "finish_reason": _finish(generation),
            "stop_reason": None,
            "prompt_logprobs": entries,
        }
        payload = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [choice],
            "usage": _usage(len(ids), len(steps)),
        }
        response_text = decode(ids[split.start :]) if split.start else None
        return payload, split.prompt or decode(ids), response_text

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


def _prompt_ids(prompt: object) -> list[int]:
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
