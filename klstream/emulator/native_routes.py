"""The emulator's ``/generate`` routes of SGLang and HuggingFace TGI, over the same toy models.

``POST /sglang/generate`` (SGLang's native API)
    ``text`` or ``input_ids`` (one of them), ``sampling_params`` (``max_new_tokens``, default
    128; ``temperature``, default 1), ``return_logprob``, ``logprob_start_len`` (default -1:
    the output only), ``top_logprobs_num`` (0..20), ``return_text_in_logprobs`` and, for the
    emulator, ``model`` (default ``toy``; SGLang ignores it). ``meta_info`` carries
    ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``finish_reason`` and, with
    ``return_logprob``, ``input_token_logprobs`` and ``input_top_logprobs`` over the prompt from
    ``logprob_start_len`` on and ``output_token_logprobs`` and ``output_top_logprobs`` over the
    generated tokens, as ``[logprob, token_id, text]`` triples (``text`` null unless asked). As
    SGLang's scheduler pads it, the first entry of the prompt window is always ``[null, id,
    text]`` with a null top, wherever the window starts; the distribution after the prompt is
    the first output entry's. The model name's flags apply (``floor9999``, ``kplus1``, ...).
``POST /tgi/generate`` and ``POST /tgi-prefill/generate`` (TGI's)
    ``inputs`` (required: 422 "missing field `inputs`" otherwise) and ``parameters``
    (``max_new_tokens``, ``details`` (default true), ``decoder_input_details``,
    ``top_n_tokens`` (0..5, TGI's default ``--max-top-n-tokens``), ``do_sample``,
    ``temperature``, ``seed``). ``details`` holds ``prefill`` (``{id, text, logprob}`` per
    prompt token, the first null, and no alternatives: only generated tokens get
    ``top_tokens``), ``tokens`` and ``top_tokens``. Under ``/tgi`` the server runs as TGI 3 does
    by default, without ``--enable-prefill-logprobs``: ``prefill`` is ``[]``. Errors are TGI's
    ``{"error", "error_type"}``.

Faults and the request log are the OpenAI routes'
(:class:`~klstream.emulator.openai_routes.Routes`).
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any, Final

from aiohttp import web

from klstream.emulator.faults import FaultState
from klstream.emulator.openai_routes import (
    Flags,
    PromptSplit,
    Routes,
    check_context,
    extended,
    integer,
    logged,
    own_logprob,
    prompt_token_ids,
    served_model,
    step_contexts,
    temperature_of,
)
from klstream.emulator.protocol import JSON_HEADERS, MAX_LOGPROBS, ApiError
from klstream.emulator.toymodel import EOS_ID, Candidate, Generation, ToyModel, token_str, top_k

DEFAULT_MODEL: Final = "toy"
"""The model a ``/generate`` request without ``model`` gets (SGLang and TGI serve one)."""
SGLANG_MAX_NEW_TOKENS: Final = 128
TGI_MAX_NEW_TOKENS: Final = 100
TGI_MAX_TOP_N: Final = 5
"""TGI's ``--max-top-n-tokens`` default."""
_SGLANG_LOGPROBS = (
    "input_token_logprobs",
    "input_top_logprobs",
    "output_token_logprobs",
    "output_top_logprobs",
)
_TGI_ERROR_TYPES = {422: "validation", 429: "overloaded", 503: "overloaded"}


def tgi_error(error: ApiError) -> web.Response:
    """``error`` in TGI's format, with the waiting time on a 429."""
    body = {"error": error.message, "error_type": _TGI_ERROR_TYPES.get(error.code, "generation")}
    headers = dict(JSON_HEADERS)
    if error.retry_delay_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_delay_s)))
    return web.Response(status=error.code, body=json.dumps(body).encode(), headers=headers)


def _model(body: dict[str, Any]) -> ToyModel:
    return served_model(body.get("model") or DEFAULT_MODEL)


def _generate(
    model: ToyModel, ids: list[int], split: PromptSplit, max_new: int, temperature: float, k: int
) -> Generation | None:
    """The toy model's continuation of a prompt of ids, as the completions route makes it."""
    if not max_new:
        return None
    return model.sample(split.prompt, max_new, temperature, None, k, ids[split.start :])


def _strip_meta(payload: Any) -> None:
    for key in _SGLANG_LOGPROBS:
        payload["meta_info"].pop(key, None)


def _strip_details(payload: Any) -> None:
    payload.pop("details", None)


class NativeRoutes(Routes):
    """SGLang's ``/generate`` under ``/sglang``, TGI's under ``/tgi`` and ``/tgi-prefill``."""

    def register(self, app: web.Application) -> None:
        app.router.add_post("/sglang/generate", self._sglang)
        app.router.add_post("/tgi/generate", self._tgi)
        app.router.add_post("/tgi-prefill/generate", self._tgi_prefill)

    async def _sglang(self, request: web.Request) -> web.Response:
        return await self.handle(request, self._sglang_answer, _strip_meta)

    async def _tgi(self, request: web.Request) -> web.Response:
        return await self.handle(request, self._tgi_answer, _strip_details, tgi_error)

    async def _tgi_prefill(self, request: web.Request) -> web.Response:
        async def answer(body: dict[str, Any], state: FaultState) -> tuple[Any, str, str | None]:
            return await self._tgi_answer(body, state, prefill_logprobs=True)

        return await self.handle(request, answer, _strip_details, tgi_error)

    async def _sglang_answer(
        self, body: dict[str, Any], _state: FaultState
    ) -> tuple[Any, str, str | None]:
        model = _model(body)
        flags = Flags.of(model.name)
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise ApiError(400, "Either text or input_ids should be provided.")
        ids = prompt_token_ids(text if text is not None else input_ids)
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "`sampling_params` must be an object")
        max_new = integer(params, "max_new_tokens", SGLANG_MAX_NEW_TOKENS, 0, 1 << 31)
        start = integer(body, "logprob_start_len", -1, -1, 1 << 31)
        k = integer(body, "top_logprobs_num", 0, 0, MAX_LOGPROBS)
        assert max_new is not None and start is not None and k is not None
        if start >= len(ids):
            raise ApiError(
                400,
                f"logprob_start_len ({start}) is superior or equal to the length of the input "
                f"({len(ids)}).",
            )
        check_context(model.name, len(ids), max_new)
        split = PromptSplit.of(ids)
        generation = _generate(model, ids, split, max_new, temperature_of(params), k)
        steps = generation.steps if generation else []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        if generation is not None and generation.finish_reason == "STOP":
            finish = {"type": "stop", "matched": EOS_ID}
        meta: dict[str, Any] = {
            "id": secrets.token_hex(16),
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(steps),
            "cached_tokens": 0,
            "e2e_latency": 0.0,
        }
        with_text = body.get("return_text_in_logprobs") is True

        def triple(token_id: int, value: float | None) -> list[Any]:
            return [value, token_id, token_str(token_id) if with_text else None]

        if body.get("return_logprob") is True and not model.nologprobs:
            window = len(ids) if start < 0 else start
            owns: list[list[Any]] = []
            tops: list[list[list[Any]] | None] = []
            for index in range(window, len(ids)):
                if index == window:  # SGLang pads the window's first entry with None
                    owns.append(triple(ids[index], None))
                    tops.append(None)
                    continue
                logprobs = model.next_token_logprobs(*split.context(ids, index))
                actual = Candidate(
                    token_str(ids[index]), ids[index], own_logprob(logprobs, ids[index])
                )
                owns.append(triple(ids[index], actual.logprob))
                listed = extended(top_k(logprobs, k), flags, logprobs, actual)
                tops.append([triple(i, value) for i, value in listed])
            output_tops = []
            contexts = step_contexts(ids[split.start :], generation) if generation else []
            for step, context in zip(steps, contexts, strict=True):
                after = model.next_token_logprobs(split.prompt, context) if flags.odd else None
                listed = extended(step.top, flags, after, step.chosen)
                output_tops.append([triple(i, value) for i, value in listed])
            meta.update(
                input_token_logprobs=owns,
                input_top_logprobs=tops,
                output_token_logprobs=[triple(s.chosen.token_id, s.chosen.logprob) for s in steps],
                output_top_logprobs=output_tops,
            )
        payload = {
            "text": generation.text if generation else "",
            "output_ids": [s.chosen.token_id for s in steps],
            "meta_info": meta,
        }
        return payload, *logged(ids, split)

    async def _tgi_answer(
        self, body: dict[str, Any], _state: FaultState, prefill_logprobs: bool = False
    ) -> tuple[Any, str, str | None]:
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise ApiError(
                422,
                "Failed to deserialize the JSON body into the target type: missing field `inputs`",
            )
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(422, "`parameters` must be an object")
        model = _model(body)
        max_new = integer(params, "max_new_tokens", TGI_MAX_NEW_TOKENS, 1, 1 << 31)
        top_n = integer(params, "top_n_tokens", 0, 0, 1 << 31)
        assert max_new is not None and top_n is not None
        if top_n > TGI_MAX_TOP_N:
            raise ApiError(
                422,
                f"Input validation error: `top_n_tokens` must be >= 0 and <= "
                f"{TGI_MAX_TOP_N}. Given: {top_n}",
            )
        ids = prompt_token_ids(inputs)
        check_context(model.name, len(ids), max_new)
        split = PromptSplit.of(ids)
        temperature = temperature_of(params) if params.get("do_sample") is True else 0.0
        generation = _generate(model, ids, split, max_new, temperature, top_n)
        assert generation is not None

        def token(token_id: int, logprob: float | None) -> dict[str, Any]:
            return {"id": token_id, "text": token_str(token_id), "logprob": logprob}

        def generated(c: Candidate) -> dict[str, Any]:
            return {**token(c.token_id, c.logprob), "special": c.token_id == EOS_ID}

        decoder = params.get("decoder_input_details") is True
        prefill: list[dict[str, Any]] = []
        if decoder and prefill_logprobs and not model.nologprobs:
            prefill = [token(ids[0], None)] + [
                token(
                    ids[index],
                    own_logprob(model.next_token_logprobs(*split.context(ids, index)), ids[index]),
                )
                for index in range(1, len(ids))
            ]
        payload: dict[str, Any] = {"generated_text": generation.text}
        if params.get("details", True) is True or decoder:
            stopped = generation.finish_reason == "STOP"
            details: dict[str, Any] = {
                "finish_reason": "eos_token" if stopped else "length",
                "generated_tokens": len(generation.steps),
                "seed": None,
                "prefill": prefill,
                "tokens": [generated(s.chosen) for s in generation.steps],
            }
            if top_n:
                details["top_tokens"] = [[generated(c) for c in s.top] for s in generation.steps]
            payload["details"] = details
        return payload, *logged(ids, split)
