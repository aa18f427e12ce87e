"""What open-weight servers answer: the dialects of prompt logprobs, how to tell which one a
server speaks, and what the fields of their answers mean (no SDK here: the requests are made by
:mod:`klstream.backends.openai`).

A prompt-logprobs request gives Model 2's top-k before every token of a prompt. Servers ask for
and answer it differently (sources and dates in the README, "Open-weight models on
OpenAI-compatible servers"):

- **vllm** (:func:`vllm_body`, :func:`parse_vllm`): ``/v1/completions`` with vLLM's
  ``prompt_logprobs: k``; per prompt token ``{token_id: {logprob, rank, decoded_token}}``, the
  top-k plus the prompt's own token, ``null`` for the first token. The one generated token's
  ``logprobs`` give the distribution after the prompt.
- **echo** (:func:`echo_body`, :func:`parse_echo`): the legacy completions ``echo: true`` with
  ``logprobs: k`` and ``max_tokens: 1``, as lm-evaluation-harness's local-completions asks:
  ``tokens``, ``token_logprobs`` and ``top_logprobs`` (``{token text: logprob}``, the actual
  token added when outside the top-k) over the prompt and then the generated token; the first
  token's are ``null``. Keys are texts: two ids with the same text collapse into one entry.
- **sglang** (:func:`sglang_body`, :func:`parse_sglang`): SGLang's native ``/generate`` with
  ``input_ids``, ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num`` and
  ``return_text_in_logprobs``; ``meta_info.input_token_logprobs`` and ``input_top_logprobs``
  hold ``[logprob, token_id, text]`` triples over the prompt from ``logprob_start_len`` on, and
  the first entry of that window is always null, so the request starts one token earlier. The
  distribution after the prompt is the first of ``output_top_logprobs``.
- **tgi**: TGI's ``/generate`` with ``decoder_input_details`` gives each prompt token its own
  logprob only, with no alternatives (``top_n_tokens`` covers generated tokens), so it cannot
  give a top-k per prompt position: :func:`tgi_refusal` says so and what works instead.

Every entry whose logprob is not usable (:func:`~klstream.backends.checks.usable_logprob`:
null, NaN, ±inf, positive, a floor such as -9999 or -3.4e38) is left out of the top-k and
counted. A 200 answer without the field a dialect is asked for is a capability the server
lacks (:class:`~klstream.errors.MethodUnsupported`), not a fault worth retrying; a list
shorter than the prompt is a fault (:class:`~klstream.errors.UnusableAnswer`), retried.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from klstream.backends.base import Candidate, PromptScores, PromptToken
from klstream.backends.checks import usable_logprob
from klstream.backends.prices import Usage
from klstream.errors import MethodUnsupported, UnusableAnswer

TOKEN_ID_PREFIX = "token_id:"
"""How vLLM names a token with ``return_tokens_as_token_ids``: ``token_id:1234``."""
PROBE_TEXT = "Hello there."
"""The prompt of the requests that find out which dialect a server speaks."""
PREFILL_FIX = (
    "score by prefill instead, or serve the model with vLLM or SGLang, which return top-k "
    "prompt logprobs"
)
"""What works when a server gives no prompt logprobs."""

Entry = tuple[str, int | None, object]
"""A server's entry in a top-k list: (token text, id if named, reported logprob)."""


def json_value(text: str, content_type: str = "") -> Any:
    """A 200 answer's JSON; a body that is not JSON is a fault worth retrying."""
    try:
        return json.loads(text)
    except ValueError:
        snippet = " ".join(text.split())[:200]
        kind = f" ({content_type})" if content_type else ""
        raise UnusableAnswer(f"answer body is not JSON{kind}: {snippet!r}") from None


def json_object(text: str, content_type: str = "") -> dict[str, Any]:
    """A 200 answer's JSON object (see :func:`json_value`)."""
    body = json_value(text, content_type)
    if not isinstance(body, dict):
        raise UnusableAnswer(f"answer body is not a JSON object: {str(body)[:200]}")
    return body


def named_token(wire: str) -> tuple[str, int | None]:
    """A token as the server names it, with its id when the name carries one
    (``token_id:1234``)."""
    if wire.startswith(TOKEN_ID_PREFIX) and wire[len(TOKEN_ID_PREFIX) :].isdigit():
        return wire, int(wire[len(TOKEN_ID_PREFIX) :])
    return wire, None


def logprob_or_nan(value: object) -> float:
    """A reported logprob, NaN when it is not usable (for a token known to be there)."""
    return float(cast(float, value)) if usable_logprob(value) else math.nan


def kept(entries: list[Entry], top_logprobs: int | None = None) -> tuple[list[Candidate], int]:
    """The entries with a usable logprob, most likely first (cut to ``top_logprobs`` when
    given: servers add the actual token beyond the k), and how many had none."""
    usable = [
        Candidate(text, token_id, float(cast(float, logprob)))
        for text, token_id, logprob in entries
        if usable_logprob(logprob)
    ]
    usable.sort(key=lambda c: -c.logprob)
    return usable[:top_logprobs], len(entries) - len(usable)


def first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UnusableAnswer(f"answer has no choices: {str(body)[:200]}")
    choice: dict[str, Any] = choices[0]
    return choice


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


def openai_usage(body: dict[str, Any]) -> Usage:
    """An OpenAI-style ``usage``: prompt (with cached) and completion tokens; 0 where absent."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        cached_tokens=_count(cached),
        candidates_tokens=_count(usage.get("completion_tokens")),
    )


def served_model(body: dict[str, Any]) -> str | None:
    """The ``model`` the answer names, with its ``system_fingerprint`` when it has one
    (``model@fingerprint``): the fingerprint changes with the serving configuration."""
    model, fingerprint = body.get("model"), body.get("system_fingerprint")
    if not isinstance(model, str) or not model:
        return None
    return f"{model}@{fingerprint}" if isinstance(fingerprint, str) and fingerprint else model


def _prompt_length_fault(field: str, count: int, expected: int) -> UnusableAnswer:
    return UnusableAnswer(f"{field} has {count} entries for a prompt of {expected} tokens")


def lacks(field: str, dialect: str) -> MethodUnsupported:
    """A 200 answer without the field the dialect is asked for: a capability the server lacks."""
    return MethodUnsupported(
        f"the server answered without {field}, so it does not give prompt logprobs as "
        f"{dialect} does (a build or flags without them); {PREFILL_FIX}"
    )


# --- vLLM's prompt_logprobs -------------------------------------------------------------------


def _completion(model: str, prompt: str | list[int], top_logprobs: int) -> dict[str, Any]:
    """A completion of one token with its top-k: the distribution after the prompt."""
    return {"model": model, "prompt": prompt, "max_tokens": 1, "logprobs": top_logprobs}


def vllm_body(model: str, prompt_ids: list[int], top_logprobs: int, start: int) -> dict[str, Any]:
    return {**_completion(model, prompt_ids, top_logprobs), "prompt_logprobs": top_logprobs}


def _vllm_entries(index: int, entry: object) -> list[Entry]:
    if not isinstance(entry, dict) or not entry:
        raise UnusableAnswer(f"prompt_logprobs[{index}] is {str(entry)[:100]}, not a top-k")
    entries: list[Entry] = []
    for key, raw in entry.items():
        token_id = named_token(key)[1] if key.startswith(TOKEN_ID_PREFIX) else None
        if token_id is None and key.lstrip("-").isdigit():
            token_id = int(key)
        if token_id is None or not isinstance(raw, dict):
            raise UnusableAnswer(f"malformed prompt logprob {key}: {str(raw)[:100]}")
        decoded = raw.get("decoded_token")
        entries.append((decoded if isinstance(decoded, str) else "", token_id, raw.get("logprob")))
    return entries


def _own(entries: list[Entry], token_id: int, where: str) -> Candidate:
    """The prompt's own token among ``entries`` (its logprob NaN when not usable)."""
    for text, entry_id, logprob in entries:
        if entry_id == token_id:
            return Candidate(text, token_id, logprob_or_nan(logprob))
    raise UnusableAnswer(f"{where} lacks the prompt's own token {token_id}")


def _generated_top(
    choice: dict[str, Any], index: int, top_logprobs: int
) -> tuple[list[Candidate] | None, int]:
    """The legacy ``top_logprobs`` at ``index`` (``{token: logprob}``) as candidates, or None."""
    tops = (choice.get("logprobs") or {}).get("top_logprobs")
    step = tops[index] if isinstance(tops, list) and len(tops) > index else None
    if not isinstance(step, dict) or not step:
        return None, 0
    if not all(isinstance(token, str) for token in step):
        raise UnusableAnswer(f"malformed top_logprobs {str(step)[:200]}")
    return kept([(*named_token(token), logprob) for token, logprob in step.items()], top_logprobs)


def parse_vllm(
    body: dict[str, Any], prompt_ids: list[int], top_logprobs: int, start: int
) -> PromptScores:
    """vLLM's answer: the prompt tokens from ``start`` on with the top-k before each (the
    prompt's own token, which vLLM adds when it ranks lower, is recognised by its id), and
    the top-k after the prompt."""
    choice = first_choice(body)
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise lacks("prompt_logprobs", "vLLM")
    if not isinstance(entries, list) or len(entries) != len(prompt_ids):
        count = len(entries) if isinstance(entries, list) else 0
        raise _prompt_length_fault("prompt_logprobs", count, len(prompt_ids))
    tokens = []
    for index in range(max(start, 1), len(prompt_ids)):
        listed = _vllm_entries(index, entries[index])
        own = _own(listed, prompt_ids[index], f"prompt_logprobs[{index}]")
        top, dropped = kept(listed, top_logprobs)
        tokens.append(PromptToken(own, top, dropped))
    after, after_dropped = _generated_top(choice, 0, top_logprobs)
    return PromptScores(tokens, after, openai_usage(body), after_dropped, served_model(body))


# --- the legacy echo --------------------------------------------------------------------------


def echo_body(model: str, prompt_ids: list[int], top_logprobs: int, start: int) -> dict[str, Any]:
    return {**_completion(model, prompt_ids, top_logprobs), "echo": True, "temperature": 0}


def parse_echo(
    body: dict[str, Any], prompt_ids: list[int], top_logprobs: int, start: int
) -> PromptScores:
    """The echoed prompt's ``logprobs``: per prompt token its text and logprob and the top-k
    before it, then the generated token's top-k (the distribution after the prompt)."""
    choice = first_choice(body)
    logprobs = choice.get("logprobs")
    texts = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    own_logprobs = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(texts, list) or not isinstance(own_logprobs, list):
        raise lacks("logprobs for the echoed prompt", "the legacy completions echo")
    size = len(prompt_ids)
    if len(texts) < size or len(own_logprobs) < size:
        if len(texts) <= 1 < size:
            raise lacks("the prompt's tokens in logprobs (echo ignored)", "the legacy echo")
        raise _prompt_length_fault("logprobs.tokens", len(texts), size)
    tokens = []
    for index in range(max(start, 1), size):
        listed, dropped = _generated_top(choice, index, top_logprobs)
        if listed is None:
            raise UnusableAnswer(f"logprobs.top_logprobs[{index}] is not a top-k")
        text = texts[index] if isinstance(texts[index], str) else ""
        own = Candidate(text, prompt_ids[index], logprob_or_nan(own_logprobs[index]))
        tokens.append(PromptToken(own, listed, dropped))
    after, after_dropped = _generated_top(choice, size, top_logprobs)
    return PromptScores(tokens, after, openai_usage(body), after_dropped, served_model(body))


# --- SGLang's native /generate --------------------------------------------------------------


def sglang_body(model: str, prompt_ids: list[int], top_logprobs: int, start: int) -> dict[str, Any]:
    """The window starts one token before ``start``: its first entry is always null."""
    return {
        "model": model,
        "input_ids": prompt_ids,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": max(start - 1, 0),
        "top_logprobs_num": top_logprobs,
        "return_text_in_logprobs": True,
    }


def _triples(raw: object, where: str) -> list[Entry]:
    if not isinstance(raw, list):
        raise UnusableAnswer(f"{where} is {str(raw)[:100]}, not a list of triples")
    entries: list[Entry] = []
    for triple in raw:
        if not isinstance(triple, list) or len(triple) < 2 or type(triple[1]) is not int:
            raise UnusableAnswer(f"{where} holds {str(triple)[:100]}, not [logprob, id, text]")
        text = triple[2] if len(triple) > 2 and isinstance(triple[2], str) else ""
        entries.append((text, triple[1], triple[0]))
    return entries


def parse_sglang(
    body: dict[str, Any], prompt_ids: list[int], top_logprobs: int, start: int
) -> PromptScores:
    """SGLang's ``meta_info``: the window from ``logprob_start_len`` (one before ``start``)
    on, each token's ``[logprob, id, text]`` and the top-k before it; after the prompt, the
    first output token's top-k."""
    meta = body.get("meta_info")
    if not isinstance(meta, dict):
        raise UnusableAnswer(f"answer without meta_info: {str(body)[:200]}")
    own_list, top_list = meta.get("input_token_logprobs"), meta.get("input_top_logprobs")
    if top_list is None or own_list is None:
        raise lacks("meta_info.input_top_logprobs", "SGLang's /generate")
    window = max(start - 1, 0)
    expected = len(prompt_ids) - window
    if not isinstance(own_list, list) or not isinstance(top_list, list):
        raise UnusableAnswer("input_token_logprobs and input_top_logprobs must be lists")
    if len(own_list) != expected or len(top_list) != expected:
        count = min(len(own_list), len(top_list))
        raise _prompt_length_fault("input_top_logprobs", window + count, len(prompt_ids))
    tokens = []
    for index in range(max(start, 1), len(prompt_ids)):
        at = index - window
        owns = _triples([own_list[at]], f"input_token_logprobs[{at}]")
        own = _own(owns, prompt_ids[index], f"input_token_logprobs[{at}]")
        top, dropped = kept(_triples(top_list[at], f"input_top_logprobs[{at}]"), top_logprobs)
        tokens.append(PromptToken(own, top, dropped))
    outputs = meta.get("output_top_logprobs")
    after, after_dropped = None, 0
    if isinstance(outputs, list) and outputs and outputs[0]:
        after, after_dropped = kept(_triples(outputs[0], "output_top_logprobs[0]"), top_logprobs)
    usage = Usage(
        prompt_tokens=_count(meta.get("prompt_tokens")),
        cached_tokens=_count(meta.get("cached_tokens")),
        candidates_tokens=_count(meta.get("completion_tokens")),
    )
    return PromptScores(tokens, after, usage, after_dropped, served_model(body))


# --- telling them apart ---------------------------------------------------------------------


def completions_probe(model: str) -> dict[str, Any]:
    """One completion asking for both vLLM's prompt logprobs and the legacy echo."""
    return {**_completion(model, PROBE_TEXT, 1), "echo": True, "prompt_logprobs": 1}


def sglang_probe(model: str) -> dict[str, Any]:
    body = sglang_body(model, [], 1, 0)
    del body["input_ids"]
    return {**body, "text": PROBE_TEXT}


def tgi_probe() -> dict[str, Any]:
    parameters = {"max_new_tokens": 1, "details": True, "decoder_input_details": True}
    return {"inputs": PROBE_TEXT, "parameters": {**parameters, "top_n_tokens": 1}}


def speaks_vllm(body: dict[str, Any]) -> bool:
    """The completion carries vLLM's ``prompt_logprobs``."""
    choices = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return isinstance(first, dict) and isinstance(first.get("prompt_logprobs"), list)


def speaks_echo(body: dict[str, Any]) -> bool:
    """The completion's ``logprobs`` cover the echoed prompt: more than the one generated
    token, the first without a logprob."""
    choices = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    logprobs = first.get("logprobs") if isinstance(first, dict) else None
    if not isinstance(logprobs, dict):
        return False
    values = logprobs.get("token_logprobs")
    return isinstance(values, list) and len(values) > 1 and values[0] is None


def speaks_sglang(body: dict[str, Any]) -> bool:
    meta = body.get("meta_info")
    return isinstance(meta, dict) and isinstance(meta.get("input_token_logprobs"), list)


def speaks_tgi(body: object) -> bool:
    """TGI's ``GenerateResponse`` (a list of them from the HF Inference API)."""
    first = body[0] if isinstance(body, list) and body else body
    return isinstance(first, dict) and "generated_text" in first


def tgi_refusal(url: str, body: object) -> MethodUnsupported:
    """Why TGI cannot score by prompt logprobs, and what works instead; ``body`` is its answer
    to :func:`tgi_probe`, None when the user said the server is TGI."""
    first = body[0] if isinstance(body, list) and body else body
    details = first.get("details") if isinstance(first, dict) else None
    prefill = details.get("prefill") if isinstance(details, dict) else None
    empty = ""
    if prefill == []:
        empty = " (this one gives none at all: since TGI 3 they need --enable-prefill-logprobs)"
    return MethodUnsupported(
        f"{url} is HuggingFace TGI: its /generate gives each prompt token only its own logprob "
        f"(decoder_input_details){empty}, with no top-n alternatives, so prompt logprobs cannot "
        "give Model 2's top-k at each position. Score by prefill (TGI's chat completions "
        "continue a final assistant message), or serve the model with vLLM or SGLang for "
        "prompt logprobs"
    )


@dataclass(frozen=True)
class Dialect:
    """How one dialect asks for a prompt's logprobs and reads the answer."""

    name: str
    at_root: bool
    """Requests go to the server's root (``/generate``), not the OpenAI API's path."""
    path: str
    body: Callable[[str, list[int], int, int], dict[str, Any]]
    """(model, prompt ids, k, first token asked for) -> the request body."""
    parse: Callable[[dict[str, Any], list[int], int, int], PromptScores]


DIALECTS: dict[str, Dialect] = {
    dialect.name: dialect
    for dialect in (
        Dialect("vllm", False, "/completions", vllm_body, parse_vllm),
        Dialect("echo", False, "/completions", echo_body, parse_echo),
        Dialect("sglang", True, "/generate", sglang_body, parse_sglang),
    )
}
"""The dialects klstream scores with, by ``--dialect`` name (``tgi`` is recognised, and
refused: :func:`tgi_refusal`)."""
