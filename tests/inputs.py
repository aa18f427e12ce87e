"""Build Model 1 input files in the spec's JSON format, for tests of any stage.

A token is ``(token, token_id, logprob, top)`` and each ``top`` entry is ``(token, token_id,
logprob)``; a ``token_id`` of ``None`` leaves the key out, as producers without ids do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TopEntry = tuple[str, int | None, float]
Token = tuple[str, int | None, float, list[TopEntry]]


def scored(token: str, token_id: int | None, logprob: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"token": token, "logprob": logprob}
    if token_id is not None:
        entry["token_id"] = token_id
    return entry


def make_response(
    tokens: list[Token], *, text: str | None = None, model: str | None = None
) -> dict[str, Any]:
    """One response; ``text`` defaults to the concatenated tokens, ``model`` to the file's."""
    content = []
    for token, token_id, logprob, top in tokens:
        entry = scored(token, token_id, logprob)
        entry["top_logprobs"] = [scored(*alternative) for alternative in top]
        content.append(entry)
    response: dict[str, Any] = {
        "text": "".join(t[0] for t in tokens) if text is None else text,
        "logprobs": {"content": content},
    }
    if model is not None:
        response["model"] = model
    return response


def make_input(
    prompt: str,
    model: str | None,
    responses: Sequence[list[Token] | dict[str, Any]],
) -> dict[str, Any]:
    """A whole input file; a response is a token list, or a dict already built by make_response."""
    data: dict[str, Any] = {"prompt": prompt}
    if model is not None:
        data["model"] = model
    data["responses"] = [r if isinstance(r, dict) else make_response(r) for r in responses]
    return data


def write_input(directory: Path, stem: str, data: dict[str, Any] | str | bytes) -> Path:
    """Write ``directory/stem.json``: a dict as JSON, a str or bytes exactly as given."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
