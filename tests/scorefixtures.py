"""Model 2 results written in the scores contract, without any API: fixtures for KL and export.

Model 2's list at a position is Model 1's list with every logprob moved by a seeded amount and the
last entry swapped for a token Model 1 did not list, so both shared and unshared tokens occur.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klstream.backends.base import Answer, Candidate, Generated
from klstream.backends.transport import Outcome
from klstream.scoring.checkpoint import write_part
from klstream.scoring.work import WorkItem, result_rows
from klstream.storage import schemas
from klstream.storage.rundir import RunDir

Key = tuple[str, int, int]
Lists = tuple[list[str], list[int | None], list[float]]
"""Model 2's top-k at one position: tokens, token ids, logprobs."""


def model2_list(
    tokens: list[str], ids: list[int | None], logprobs: list[float], rnd: random.Random
) -> Lists:
    shifted = [min(lp + rnd.uniform(-1.0, 0.5), 0.0) for lp in logprobs]
    tokens, ids = list(tokens), list(ids)
    if len(tokens) > 1:
        tokens[-1] = f"{tokens[-1]}#m2"
        ids[-1] = None if ids[-1] is None else 1_000_000 + ids[-1]
    return tokens, ids, shifted


def score_row(
    key: Key, model2: str, *, lists: Lists | None = None, error: str | None = None
) -> dict[str, Any]:
    """A SCORES row built by the score stage's own row builder."""
    answer = None
    if lists is not None:
        top = [Candidate(*entry) for entry in zip(*lists, strict=True)]
        best = max(top, key=lambda c: c.logprob)
        answer = Answer([Generated(best, top)], text="", finish_reason="MAX_TOKENS")
    outcome = Outcome(answer, error, attempts=1, latency_ms=12.5)
    (row,) = result_rows(WorkItem(*key, prompt="", prefill=""), model2, outcome)
    return row


def write_fixture_scores(
    run_dir: Path,
    model2: str,
    *,
    seed: int = 0,
    errors: frozenset[Key] = frozenset(),
    missing: frozenset[Key] = frozenset(),
    fail_then_succeed: frozenset[Key] = frozenset(),
    rows_per_part: int = 7,
) -> dict[Key, tuple[list[str], list[int | None], list[float]]]:
    """Write parts for every position except ``missing``; return Model 2's lists by key.

    ``errors`` get only a failure row; ``fail_then_succeed`` get a failure in an earlier part and
    the success in a later one, as after ``--resume``.
    """
    rnd = random.Random(seed)
    positions = pq.read_table(RunDir(run_dir).positions).to_pylist()
    lists: dict[Key, Lists] = {}
    first_pass, later_pass = [], []
    for pos in positions:
        key = (pos["stem"], pos["response_index"], pos["position"])
        if key in missing:
            continue
        if key in errors:
            first_pass.append(score_row(key, model2, error="503 UNAVAILABLE: overloaded"))
            continue
        lists[key] = model2_list(pos["top_tokens"], pos["top_token_ids"], pos["top_logprobs"], rnd)
        success = score_row(key, model2, lists=lists[key])
        if key in fail_then_succeed:
            first_pass.append(score_row(key, model2, error="429 RESOURCE_EXHAUSTED"))
            later_pass.append(success)
        else:
            first_pass.append(success)
    for rows in (first_pass, later_pass):
        for start in range(0, len(rows), rows_per_part):
            chunk = rows[start : start + rows_per_part]
            write_part(
                RunDir(run_dir).new_part(model2),
                pa.Table.from_pylist(chunk, schema=schemas.SCORES),
                config=None,
            )
    return lists
