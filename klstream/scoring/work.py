"""The work of scoring: which positions still lack a result, the requests made for them, and the
scores rows their outcomes become.

DuckDB lists the positions without a successful result (``sql/pending_positions.sql``), so a
resumed run asks only for what is missing; responses stream one range at a time, so neither
memory nor the event loop depends on the size of the run. Every scheduler reads its work here
and writes its results as :func:`result_rows`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from klstream.backends.base import Answer, Generated, PrefillRequest
from klstream.backends.prices import Usage
from klstream.backends.transport import Outcome
from klstream.scoring import acceptance, lookahead
from klstream.scoring.lookahead import Token
from klstream.scoring.options import ScoreOptions
from klstream.storage import schemas
from klstream.storage.database import connect, ranged
from klstream.storage.sqlfiles import load_sql


@dataclass(frozen=True)
class WorkItem:
    """One request: at ``position``, after ``prefill``, asking for ``max_tokens`` tokens."""

    stem: str
    response_index: int
    position: int
    prompt: str
    prefill: str
    max_tokens: int = 1
    decoding: str = "sample"
    token_ids: bool = False
    """Model 1's tokens carry ids, so Model 2's are asked for with theirs."""


@dataclass
class Response:
    """One response's Model 1 tokens, shared by the requests that cover its pending positions."""

    stem: str
    response_index: int
    prompt: str
    tokens: list[Token]
    offsets: list[int]
    text: str
    """Model 1's tokens concatenated: prefills are cut from it."""
    pending: list[bool]
    """Which positions lack a successful result."""
    features: np.ndarray
    """Per position, what predicts whether Model 2 generates Model 1's token there
    (:func:`klstream.scoring.acceptance.features`)."""
    measured: tuple[int, int] | None = None
    """(position, input tokens) of the latest answer: later requests extend that input."""
    token_ids: bool = False
    """Every token carries its id."""

    @classmethod
    def of(cls, rows: list[dict[str, Any]]) -> Response:
        """From the response's rows of ``sql/pending_positions.sql`` in position order."""
        tokens = [Token(row["token"], row["token_id"]) for row in rows]
        return cls(
            rows[0]["stem"],
            rows[0]["response_index"],
            rows[0]["prompt"],
            tokens,
            [row["char_offset"] for row in rows],
            "".join(token.text for token in tokens),
            [row["pending"] for row in rows],
            acceptance.row_features(rows),
            token_ids=all(token.token_id is not None for token in tokens),
        )

    def request(self, position: int, max_tokens: int = 1, decoding: str = "sample") -> WorkItem:
        prefill = self.text[: self.offsets[position]]
        return WorkItem(
            self.stem,
            self.response_index,
            position,
            self.prompt,
            prefill,
            max_tokens,
            decoding,
            self.token_ids,
        )

    def input_tokens(self, position: int) -> float:
        """Input tokens of a request at ``position``: measured, else the prompt's characters
        over :data:`~klstream.scoring.lookahead.CHARS_PER_TOKEN` and Model 1's tokens."""
        if self.measured is not None:
            at, tokens = self.measured
            return float(tokens + position - at)
        return lookahead.estimated_input_tokens(self.prompt, position)


async def pending_responses(
    run_dir: Path, model2: str, range_positions: int
) -> AsyncIterator[Response]:
    """Stream the responses with a position lacking a successful result, in key order.

    One range of whole responses at a time (:func:`klstream.storage.database.ranged`), read in
    a worker thread, so neither memory nor the event loop depends on the size of the run.
    """
    with connect(run_dir) as con:
        ranges = ranged(con, "pending_positions", {"model2": model2}, range_positions)

        def next_range_rows() -> list[dict[str, Any]] | None:
            relation = next(ranges, None)
            return None if relation is None else relation.to_arrow_table().to_pylist()

        while (rows := await asyncio.to_thread(next_range_rows)) is not None:
            for _, response in groupby(rows, key=lambda r: (r["stem"], r["response_index"])):
                yield Response.of(list(response))


def count_pending(run_dir: Path, model2: str) -> tuple[int, int]:
    """(positions, positions with a successful result) of the run."""
    with connect(run_dir) as con:
        counts = con.execute(load_sql("pending_count"), {"model2": model2}).fetchone()
    assert counts is not None
    return int(counts[0]), int(counts[1])


def acceptance_so_far(run_dir: Path, model2: str) -> dict[str, acceptance.AcceptanceModel]:
    """Per decoding, the acceptance model calibrated on the stored answers' chosen tokens
    (``sql/acceptance_so_far.sql``): where a resumed run's ``auto`` starts."""
    with connect(run_dir) as con:
        table = con.sql(
            load_sql("acceptance_so_far"),
            params={"model2": model2, "most": acceptance.MAX_OBSERVATIONS},
        ).to_arrow_table()
    columns = {
        name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names
    }
    models: dict[str, acceptance.AcceptanceModel] = {}
    for decoding in acceptance.PRIORS:
        rows = columns["decoding"] == decoding
        model = acceptance.AcceptanceModel(decoding)
        model.observe(
            acceptance.features(
                *(columns[name][rows].astype(np.float64) for name in acceptance.FEATURE_COLUMNS)
            ),
            columns["agreed"][rows].astype(bool),
        )
        models[decoding] = model
    return models


def prefill_request(options: ScoreOptions, item: WorkItem) -> PrefillRequest:
    """The request for ``item``: greedy at temperature 0, else at the run's temperature."""
    temperature = 0.0 if item.decoding == "greedy" else options.temperature
    return PrefillRequest(
        item.prompt,
        item.prefill,
        options.top_logprobs,
        item.max_tokens,
        temperature,
        token_ids=item.token_ids,
    )


def chosen_tokens(answer: Answer) -> list[Token | None]:
    """The tokens an answer generated, None where it did not say which it chose."""
    return [
        Token(step.chosen.token, step.chosen.token_id) if step.chosen_reported else None
        for step in answer.steps
    ]


def _lists(step: Generated) -> dict[str, Any]:
    return {
        "top_tokens": [c.token for c in step.top],
        "top_token_ids": [c.token_id for c in step.top],
        "top_logprobs": [c.logprob for c in step.top],
        "chosen_token": step.chosen.token,
        "chosen_token_id": step.chosen.token_id,
        "chosen_logprob": step.chosen.logprob,
        "dropped_logprobs": step.dropped,
    }


def usage_columns(usage: Usage | None) -> dict[str, int | None]:
    """``usage`` as the scores table's (and ``run.json``'s greedy probe's) token columns."""
    return {
        "prompt_token_count": usage.prompt_tokens if usage else None,
        "cached_content_token_count": usage.cached_tokens if usage else None,
        "candidates_token_count": usage.candidates_tokens if usage else None,
        "thoughts_token_count": usage.thoughts_tokens if usage else None,
    }


_NO_LISTS = dict.fromkeys(
    (
        "top_tokens",
        "top_token_ids",
        "top_logprobs",
        "chosen_token",
        "chosen_token_id",
        "chosen_logprob",
        "dropped_logprobs",
    )
)
_NO_USAGE = usage_columns(None)


def result_rows(
    item: WorkItem,
    model2: str,
    outcome: Outcome,
    steps: int = 1,
    source: str = schemas.SOURCE_ONLINE,
) -> list[dict[str, Any]]:
    """The SCORES rows of one request: its answer's first ``steps`` steps as the results of
    ``item.position`` onward, or its failure at ``item.position``. They are committed together.
    """
    answer = outcome.value
    shared: dict[str, Any] = {
        "stem": item.stem,
        "response_index": item.response_index,
        "model2": model2,
        "status": schemas.SCORE_OK if answer else schemas.SCORE_ERROR,
        "finish_reason": answer.finish_reason if answer else None,
        "attempts": outcome.attempts,
        "latency_ms": outcome.latency_ms,
        "error": outcome.error,
        "scored_at": datetime.now(UTC),
        "source": source,
        "request_id": uuid.uuid4().hex,
        "lookahead": item.max_tokens,
        "decoding": item.decoding,
        "served_model": answer.served_model if answer else None,
    }
    if answer is None:
        return [{**shared, **_NO_LISTS, **_NO_USAGE, "position": item.position, "step": 0}]
    return [
        {
            **shared,
            **_lists(answer.steps[step]),
            **(usage_columns(answer.usage) if step == 0 else _NO_USAGE),
            "position": item.position + step,
            "step": step,
        }
        for step in range(steps)
    ]
