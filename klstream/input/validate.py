"""Validation of Model 1's input files: the spec's JSON format, checked field by field.

Every problem is raised as :class:`Invalid` with the JSON path of the offending field and a reason
that shows the value as the file writes it; :mod:`klstream.input.explode` decides whether that
fails the run or skips the response. The checks run once per top-k entry, so the common case is a
few exact type checks.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_SHOWN_CHARS = 60


class Invalid(Exception):
    """A malformed field, located relative to the value being read; callers prepend their part.

    An internal signal, not a user-facing error: explode turns it into an ``InputError`` or a row
    of ``skipped.parquet``.
    """

    def __init__(self, json_path: str, reason: str) -> None:
        super().__init__(json_path, reason)
        self.json_path = json_path
        self.reason = reason

    def under(self, prefix: str) -> Invalid:
        return Invalid(prefix + self.json_path, self.reason)


def read_json(path: Path) -> object:
    """One file's parsed JSON; an unreadable, non-UTF-8, empty or malformed file is invalid at $."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise Invalid("$", f"cannot read the file: {error.strerror or error}") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = f"0x{raw[error.start]:02x}"
        reason = f"not valid UTF-8: byte {byte} at offset {error.start} ({error.reason})"
        raise Invalid("$", reason) from error
    del raw  # free the bytes before json builds the much larger parsed objects
    if not text.strip():
        raise Invalid("$", "invalid JSON: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise Invalid(
            "$", f"invalid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except ValueError as error:
        raise Invalid("$", f"invalid JSON: {error}") from error
    except RecursionError as error:
        raise Invalid("$", "invalid JSON: nested too deeply to parse") from error


def file_fields(document: object) -> tuple[str, str | None, list[object]]:
    """The prompt, the file-level model (the fallback for responses naming none), the responses."""
    if type(document) is not dict:
        raise Invalid("$", f"expected a JSON object at the top level, got {_describe(document)}")
    try:
        prompt = _string(document, "prompt")
        file_model = _string(document, "model") if document.get("model") is not None else None
        responses = document.get("responses")
        if type(responses) is not list:
            raise _field_problem(document, "responses", "a list")
    except Invalid as problem:
        raise problem.under("$") from None
    return prompt, file_model, responses


@dataclass
class ValidResponse:
    """One validated response, as flat column values."""

    model1: str
    text: str
    tokens_match_text: bool
    tokens: list[str]
    token_ids: list[int | None]
    logprobs: list[float]
    top_counts: list[int]
    top_tokens: list[str]
    top_token_ids: list[int | None]
    top_logprobs: list[float]


def validate_response(response: object, file_model: str | None) -> ValidResponse:
    """Validate one response; paths in the errors it raises are relative to the response."""
    if type(response) is not dict:
        raise Invalid("", f"expected an object, got {_describe(response)}")
    text = _string(response, "text")
    if response.get("model") is not None:
        model1 = _string(response, "model")
    elif file_model is not None:
        model1 = file_model
    else:
        raise Invalid(
            ".model",
            "missing required key 'model': neither the response nor the file names its model",
        )
    logprobs = response.get("logprobs")
    if type(logprobs) is not dict:
        raise _field_problem(response, "logprobs", "an object")
    content = logprobs.get("content")
    if type(content) is not list:
        raise _field_problem(logprobs, "content", "a list").under(".logprobs")

    tokens: list[str] = []
    token_ids: list[int | None] = []
    chosen_logprobs: list[float] = []
    top_counts: list[int] = []
    top_tokens: list[str] = []
    top_token_ids: list[int | None] = []
    top_logprobs: list[float] = []
    for position, entry in enumerate(content):
        try:
            token, token_id, logprob = _scored_token(entry)
            alternatives = entry.get("top_logprobs")
            if type(alternatives) is not list or not alternatives:
                raise _field_problem(entry, "top_logprobs", "a non-empty list")
            for rank, alternative in enumerate(alternatives):
                try:
                    top_token, top_token_id, top_logprob = _scored_token(alternative)
                except Invalid as problem:
                    raise problem.under(f".top_logprobs[{rank}]") from None
                top_tokens.append(top_token)
                top_token_ids.append(top_token_id)
                top_logprobs.append(top_logprob)
        except Invalid as problem:
            raise problem.under(f".logprobs.content[{position}]") from None
        tokens.append(token)
        token_ids.append(token_id)
        chosen_logprobs.append(logprob)
        top_counts.append(len(alternatives))

    bad = _first_unencodable(tokens)
    if bad is not None:
        raise Invalid(f".logprobs.content[{bad}].token", _unencodable_reason(tokens[bad]))
    bad = _first_unencodable(top_tokens)
    if bad is not None:
        ends = list(accumulate(top_counts))
        position = bisect_right(ends, bad)
        rank = bad - (ends[position - 1] if position else 0)
        raise Invalid(
            f".logprobs.content[{position}].top_logprobs[{rank}].token",
            _unencodable_reason(top_tokens[bad]),
        )
    return ValidResponse(
        model1=model1,
        text=text,
        tokens_match_text="".join(tokens) == text,
        tokens=tokens,
        token_ids=token_ids,
        logprobs=chosen_logprobs,
        top_counts=top_counts,
        top_tokens=top_tokens,
        top_token_ids=top_token_ids,
        top_logprobs=top_logprobs,
    )


def _scored_token(entry: object) -> tuple[str, int | None, float]:
    """Validate one ``{token, logprob, token_id?}`` object: a chosen token or an alternative.

    This runs for every top-k entry, so the common case is a few exact type checks.
    """
    if type(entry) is not dict:
        raise Invalid("", f"expected an object, got {_describe(entry)}")
    token = entry.get("token")
    if type(token) is not str:
        raise _field_problem(entry, "token", "a string")
    logprob = entry.get("logprob")
    if type(logprob) is not float:
        logprob = _integral_logprob(entry)
    if not -math.inf < logprob <= 0.0:
        raise Invalid(".logprob", f"expected a finite number <= 0, got {_describe(logprob)}")
    token_id = entry.get("token_id")
    if token_id is not None and (
        type(token_id) is not int or not _INT64_MIN <= token_id <= _INT64_MAX
    ):
        raise _token_id_problem(token_id)
    return token, token_id, logprob


def _token_id_problem(token_id: object) -> Invalid:
    if type(token_id) is int:
        reason = f"expected an integer that fits in 64 bits, got {_describe(token_id)}"
        return Invalid(".token_id", reason)
    return Invalid(".token_id", f"expected an integer or null, got {_describe(token_id)}")


def _integral_logprob(entry: dict[str, object]) -> float:
    """A logprob written as a JSON integer such as ``0``; any other non-float is an error."""
    logprob = entry.get("logprob")
    if type(logprob) is not int:
        raise _field_problem(entry, "logprob", "a number")
    try:
        return float(logprob)
    except OverflowError:
        reason = f"expected a finite number <= 0, got {_describe(logprob)}"
        raise Invalid(".logprob", reason) from None


def _string(obj: dict[str, object], key: str) -> str:
    """A required string field, which must also be storable as UTF-8."""
    value = obj.get(key)
    if type(value) is not str:
        raise _field_problem(obj, key, "a string")
    if not encodable(value):
        raise Invalid(f".{key}", _unencodable_reason(value))
    return value


def _field_problem(obj: dict[str, object], key: str, expected: str) -> Invalid:
    """Explain why ``obj[key]`` failed its type check: absent, or of the wrong kind."""
    if key not in obj:
        return Invalid(f".{key}", f"missing required key {key!r}")
    return Invalid(f".{key}", f"expected {expected}, got {_describe(obj[key])}")


def _first_unencodable(strings: list[str]) -> int | None:
    """Index of the first string Arrow cannot store as UTF-8: one holding a lone surrogate, which
    a JSON escape such as ``"\\ud83d"`` produces. One encode of the concatenation keeps the common
    case fast; joining never creates a surrogate, so a failure means some single string has one."""
    try:
        "".join(strings).encode()
    except UnicodeEncodeError:
        return next(index for index, value in enumerate(strings) if not encodable(value))
    return None


def encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unencodable_reason(value: str) -> str:
    return (
        f"expected valid Unicode text, got {_describe(value)}, which holds a lone UTF-16 surrogate"
    )


def _describe(value: object) -> str:
    """Show a value as the JSON file writes it, so a reason reads 'got true', not 'got True'."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    shown = json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()
    return shown if len(shown) <= _MAX_SHOWN_CHARS else shown[:_MAX_SHOWN_CHARS] + "..."
