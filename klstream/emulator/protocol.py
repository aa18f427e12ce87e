"""The Gemini ``generateContent`` wire format, as the emulator reads and writes it.

Parsing a request body into a validated call (``parse_contents``, ``build_call``), the toy
model's answer to it (``toy_answer``), encoding that answer (``response_body``) and Google's
JSON error bodies (``ApiError``). Nothing here knows about HTTP serving or fault injection.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from aiohttp import web

from klstream.emulator.toymodel import (
    VOCAB_SIZE,
    Candidate,
    Generation,
    Step,
    ToyModel,
    UnknownModelError,
    encode,
)

MAX_LOGPROBS = 20
DEFAULT_MAX_OUTPUT_TOKENS = 8192
NOPREFILL_MESSAGE = "Requests ending with a model turn are not supported."
NO_LOGPROBS_MESSAGE = "Logprobs is not enabled for models/{model}"
"""The Developer API's 400 for a model without logprobs (Gemini 2.5 since 2025)."""
VERTEX_NO_LOGPROBS_MESSAGE = (
    "Unable to submit request because Logprobs is not supported for this model. Learn more: "
    "https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/gemini"
)
"""Vertex AI's 400 for a model without logprobs (Gemini 3.x since 2026)."""
MUST_THINK_MESSAGE = "Budget 0 is invalid. This model only works in thinking mode."
"""Gemini 2.5 Pro's 400 for a thinking budget of 0."""
BUDGET_INVALID_MESSAGE = "The thinking budget ({budget}) is invalid."
"""The 400 for a budget outside the model's range."""
SENTINEL_LOGPROB = -1.2676506e30
"""Gemini's filler for entries with no value (-2**100 as a float32)."""
ROUNDS_TO_ONE = 1e-3
"""With ``sentinels``, a most likely token this close to probability 1 (in nats) is reported at
logprob 0 with the rest of its list filled with junk at :data:`SENTINEL_LOGPROB`, as Gemini does
when the probability rounds to 1. The toy rounds far more coarsely than Gemini's float32, so that
the case is common enough to test."""
PADDING = 2
"""Junk entries the ``padded`` model appends to every list."""
JUNK = tuple(
    Candidate(chr(code), VOCAB_SIZE + code, SENTINEL_LOGPROB)
    for code in range(0x430, 0x430 + MAX_LOGPROBS)
)
"""Filler tokens (Cyrillic letters: fallback ids the toy never predicts)."""

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
JSON_HEADERS = {"Content-Type": "application/json; charset=UTF-8"}


class ApiError(Exception):
    """An error answered in Google's JSON error format."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        fault: str | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fault = fault
        self.retry_delay_s = retry_delay_s

    def response(self) -> web.Response:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "status": STATUS_NAMES[self.code],
        }
        headers = dict(JSON_HEADERS)
        if self.retry_delay_s is not None:
            delay = f"{self.retry_delay_s:.3f}".rstrip("0").rstrip(".") + "s"
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
            ]
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_delay_s)))
        return web.Response(
            status=self.code, body=json.dumps({"error": error}).encode(), headers=headers
        )


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def normalize_keys(obj: Any) -> Any:
    """Recursively rename snake_case keys to camelCase, like proto-JSON parsing.

    The SDK serialises some nested configs by pydantic field name (e.g.
    ``thinkingConfig.thinking_budget``), and the real service accepts both.
    Applied to the top level and ``generationConfig``: the keys of contents
    (``role``, ``parts``, ``text``) are the same in both spellings.
    """
    if isinstance(obj, dict):
        return {_camel(k): normalize_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize_keys(v) for v in obj]
    return obj


def client_gone(request: web.Request) -> bool:
    """Whether the client closed its connection, so no answer can reach it."""
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclass(frozen=True)
class Call:
    """A validated generateContent request."""

    model: ToyModel
    prompt: str
    prefill: str | None
    max_tokens: int
    temperature: float
    seed: int | None
    response_logprobs: bool
    logprobs: int
    thinking_budget: int | None


def _text_of(content: Any, where: str) -> str:
    if not isinstance(content, dict) or not isinstance(content.get("parts", []), list):
        raise ApiError(400, f"Invalid value at '{where}': expected a Content object.")
    texts = [p.get("text", "") for p in content.get("parts", []) if isinstance(p, dict)]
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, f"Invalid value at '{where}.parts.text': expected a string.")
    return "".join(texts)


def _number(cfg: dict[str, Any], key: str, kind: type, lo: float, hi: float) -> Any:
    value = cfg.get(key)
    if value is None:
        return None
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        raise ApiError(400, f"Invalid value at 'generation_config.{key}': {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"generation_config.{key} must be in [{lo:g}, {hi:g}], got {value}.")
    return value


def parse_contents(body: bytes) -> tuple[dict[str, Any], str, str | None]:
    """Decode the body; returns (normalised request, prompt, prefill text or None).

    The prompt is the system instruction and the user turns' text joined by
    newlines; a trailing model turn is the prefill. Raises ``ApiError`` (400).
    """
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"Invalid JSON payload received. {exc}") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "Invalid JSON payload received. Expected an object.")
    req = {_camel(k): v for k, v in raw.items()}
    req["generationConfig"] = normalize_keys(req.get("generationConfig"))
    contents = req.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise ApiError(400, f"Please use a valid role: user, model (contents[{i}]).")
    prefill = None
    if contents[-1].get("role") == "model":
        prefill = _text_of(contents[-1], f"contents[{len(contents) - 1}]")
        contents = contents[:-1]
    turns = [
        _text_of(c, f"contents[{i}]")
        for i, c in enumerate(contents)
        if c.get("role", "user") == "user"
    ]
    if not turns:
        raise ApiError(400, "* GenerateContentRequest.contents: must contain a user turn")
    if "systemInstruction" in req:
        turns.insert(0, _text_of(req["systemInstruction"], "system_instruction"))
    return req, "\n".join(turns), prefill


def build_call(
    req: dict[str, Any], prompt: str, prefill: str | None, model_name: str, version: str
) -> Call:
    """Resolve the model and validate ``generationConfig``; raises ``ApiError`` (400/404)."""
    try:
        model = ToyModel.for_name(model_name)
    except UnknownModelError:
        raise ApiError(
            404,
            f"models/{model_name} is not found for API version {version}, or is not "
            "supported for generateContent. The klstream emulator serves toy models: "
            "names with a 'toy' part, such as 'toy' or 'toy-d0.5'.",
        ) from None
    if model.retired:
        raise ApiError(
            404,
            f"models/{model_name} is not found for API version {version}, or is not "
            "supported for generateContent.",
        )
    cfg = req.get("generationConfig") or {}
    if not isinstance(cfg, dict):
        raise ApiError(400, "Invalid value at 'generation_config': expected an object.")
    logprobs = _number(cfg, "logprobs", int, 0, MAX_LOGPROBS)
    response_logprobs = cfg.get("responseLogprobs") is True
    if logprobs and not response_logprobs:
        raise ApiError(400, "logprobs is set but responseLogprobs is not enabled.")
    thinking = cfg.get("thinkingConfig") or {}
    if not isinstance(thinking, dict):
        raise ApiError(400, "Invalid value at 'generation_config.thinking_config'.")
    max_tokens = _number(cfg, "maxOutputTokens", int, 1, 1 << 31)
    temperature = _number(cfg, "temperature", float, 0.0, 2.0)
    budget = _number(thinking, "thinkingBudget", int, -1, 1 << 31)
    least = model.min_thinking_budget
    if least is not None and budget is not None and 0 <= budget < least:
        raise ApiError(
            400, MUST_THINK_MESSAGE if budget == 0 else BUDGET_INVALID_MESSAGE.format(budget=budget)
        )
    return Call(
        model=model,
        prompt=prompt,
        prefill=prefill,
        max_tokens=DEFAULT_MAX_OUTPUT_TOKENS if max_tokens is None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        seed=_number(cfg, "seed", int, -(1 << 63), 1 << 63),
        response_logprobs=response_logprobs,
        logprobs=logprobs or 0,
        thinking_budget=budget,
    )


def refuse_logprobs(call: Call, vertex: bool) -> None:
    """Raise the service's 400 when ``call`` asks a ``logprobsoff`` model for logprobs, in the
    words of the route it came in on."""
    if call.model.logprobs_off and call.response_logprobs:
        message = (
            VERTEX_NO_LOGPROBS_MESSAGE
            if vertex
            else NO_LOGPROBS_MESSAGE.format(model=call.model.name)
        )
        raise ApiError(400, message)


def refuse_prefill(call: Call) -> None:
    """Raise the service's 400 when ``call`` gives a ``noprefill`` model a prefill."""
    if call.model.noprefill and call.prefill is not None:
        raise ApiError(400, NOPREFILL_MESSAGE)


def refuse_call(call: Call, vertex: bool) -> None:
    """The 400s of generateContent for a call the model refuses, in the service's order:
    logprobs from a ``logprobsoff`` model (:func:`refuse_logprobs`), then a prefill
    (:func:`refuse_prefill`)."""
    refuse_logprobs(call, vertex)
    refuse_prefill(call)


@lru_cache(maxsize=4096)
def prompt_ids(prompt: str) -> tuple[int, ...]:
    """The prompt's token ids (prompts repeat across requests, hence the cache)."""
    return tuple(encode(prompt))


def _candidate_json(token: str, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": token, "tokenId": token_id, "logProbability": logprob}


@dataclass(frozen=True)
class ToyAnswer:
    """The toy model's answer to a call, before any wire format: what the HTTP routes encode
    and the in-process toy backend (:mod:`klstream.backends.toy`) hands over as it is."""

    generation: Generation | None
    """The continuation of the prefill; ``None`` when every output token went to thinking."""
    thinking: list[Step]
    """The thought tokens, when there is an answer after them."""
    thoughts: int
    """Thought tokens spent."""
    prompt_tokens: int
    """Input tokens: the prompt's and the prefill's."""
    cached: int
    """Input tokens the implicit cache served."""


def toy_answer(call: Call, scaled_logprobs: bool = False, cached: int = 0) -> ToyAnswer:
    """The toy model's answer to a validated call: thoughts first when the model thinks, then
    the sampled continuation of the prefill. ``cached`` is the input the implicit cache reports
    as cached."""
    model = call.model
    prefill_ids = encode(call.prefill) if call.prefill else []
    thoughts = 0
    if model.thinking and call.thinking_budget != 0:
        budget = call.thinking_budget
        thoughts = call.max_tokens if budget is None or budget < 0 else budget
        thoughts = min(thoughts, call.max_tokens)
    gen, thinking = None, []
    top_k = call.logprobs if call.response_logprobs else 0
    if call.max_tokens > thoughts:
        gen = model.sample(
            call.prompt,
            call.max_tokens - thoughts,
            call.temperature,
            call.seed,
            top_k,
            prefill_ids,
            scaled_logprobs,
        )
        if model.sentinels or model.padded:
            steps = [_with_sentinels(model, step) for step in gen.steps]
            gen = Generation(steps, gen.finish_reason)
        thinking = model.think(call.prompt, thoughts, top_k)
    prompt_tokens = len(prompt_ids(call.prompt)) + len(prefill_ids)
    return ToyAnswer(gen, thinking, thoughts, prompt_tokens, cached)


def _with_sentinels(model: ToyModel, step: Step) -> Step:
    """``step`` as a model that reports sentinels lists it: ``sentinels`` reports a most likely
    token within :data:`ROUNDS_TO_ONE` of probability 1 at logprob 0 and fills the rest of the
    list with junk at :data:`SENTINEL_LOGPROB`; ``padded`` appends :data:`PADDING` junk
    entries to every list."""
    chosen, top = step
    if model.sentinels and top and top[0].logprob > -ROUNDS_TO_ONE:
        first = top[0]._replace(logprob=0.0)
        if chosen.token_id == first.token_id:
            chosen = first
        top = [first, *JUNK[: len(top) - 1]]
    if model.padded and top:
        top = [*top, *JUNK[:PADDING]]
    return Step(chosen, top)


def response_body(
    call: Call, answer: ToyAnswer, with_logprobs: bool, vertex: bool
) -> dict[str, Any]:
    """The generateContent JSON for an answer to ``call``.

    When there is an answer after thinking, the thoughts' text is a ``thought`` part and
    ``logprobsResult`` lists them ahead of the answer's steps (where a real service lists
    thought tokens is undocumented, so clients must not take them for answer steps).
    """
    gen, thinking = answer.generation, answer.thinking
    steps = gen.steps if gen else []
    text = "".join(s.chosen.token for s in steps)
    thought_text = "".join(s.chosen.token for s in thinking)
    candidate: dict[str, Any] = {"content": {"role": "model"}}
    parts = [{"text": thought_text, "thought": True}] if thought_text else []
    if text:
        parts.append({"text": text})
    if parts:
        candidate["content"]["parts"] = parts
    candidate["finishReason"] = gen.finish_reason if gen else "MAX_TOKENS"
    if steps and with_logprobs:
        total = sum(s.chosen.logprob for s in steps)
        candidate["avgLogprobs"] = total / len(steps)
        if call.response_logprobs:
            listed = [*thinking, *steps]
            result: dict[str, Any] = {}
            if call.logprobs:
                result["topCandidates"] = [
                    {"candidates": [_candidate_json(*c) for c in s.top]} for s in listed
                ]
            result["chosenCandidates"] = [_candidate_json(*s.chosen) for s in listed]
            if not vertex:  # "This field is not supported in Vertex AI."
                result["logProbabilitySum"] = total
            candidate["logprobsResult"] = result
    usage = {
        "promptTokenCount": answer.prompt_tokens,
        "cachedContentTokenCount": answer.cached,
        "candidatesTokenCount": len(steps),
        "thoughtsTokenCount": answer.thoughts,
        "totalTokenCount": answer.prompt_tokens + len(steps) + answer.thoughts,
    }
    body: dict[str, Any] = {
        "candidates": [candidate],
        # Proto3 JSON leaves out zero-valued fields.
        "usageMetadata": {k: v for k, v in usage.items() if v},
        "modelVersion": call.model.served_name,
        "responseId": secrets.token_urlsafe(15),
    }
    if vertex:
        body["createTime"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return body


def answer_body(
    call: Call, with_logprobs: bool, vertex: bool, scaled_logprobs: bool = False, cached: int = 0
) -> dict[str, Any]:
    """The generateContent JSON of the toy model's answer to a validated call
    (:func:`toy_answer`). Online requests and batch lines share it; ``cached`` is the input the
    implicit cache reports as cached."""
    return response_body(call, toy_answer(call, scaled_logprobs, cached), with_logprobs, vertex)


def cut_top_candidates(body: dict[str, Any], keep: int) -> dict[str, Any]:
    """``body`` (a generateContent answer) with every step's top candidates cut to ``keep``."""
    for candidate in body.get("candidates", []):
        for step in (candidate.get("logprobsResult") or {}).get("topCandidates", []):
            step["candidates"] = step["candidates"][:keep]
    return body
