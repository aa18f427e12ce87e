"""Answer journal benchmark: what journaling each answer costs the event loop, and why JSON.

For answers of 1, 4 and 16 rows with top-20 lists, prints

* the encoding alone, per answer: the journal's JSON record (:func:`encode_answer`) against an
  Arrow IPC record batch of schema SCORES (``RecordBatch.from_pylist`` and ``serialize``), the
  alternative the module docstring weighs;
* :meth:`AnswerJournal.append` (encode, frame, one ``write``): appends/s, MB/s and µs per
  answer, the time each answer holds the event loop;
* compaction: reading the segment back and building its SCORES table, per row (worker thread);

each the best of three passes;
* for scale, ``append`` followed by ``sync()`` (an fsync per answer, which the journal does not
  do: it targets SIGKILL, not power loss).

Usage: python bench/journal_bench.py [--answers 3000] [--top-k 20] [--sync-answers 200]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from klstream.storage.journal import AnswerJournal, encode_answer, read_segment, rows_table
from klstream.storage.rundir import RunDir
from klstream.storage.schemas import SCORES

MODEL2 = "models/gemini-2.0-flash"
ROWS_PER_ANSWER = (1, 4, 16)
REPEATS = 3


def make_answer(rng: random.Random, steps: int, top_k: int) -> list[dict[str, Any]]:
    request_id = uuid.UUID(int=rng.getrandbits(128)).hex
    return [
        {
            "stem": "prompt_00042",
            "response_index": 3,
            "position": 100 + step,
            "model2": MODEL2,
            "status": "ok",
            "top_tokens": [f" tok{rng.randrange(50_000)}" for _ in range(top_k)],
            "top_token_ids": [rng.randrange(250_000) for _ in range(top_k)],
            "top_logprobs": [-rng.random() * 20 for _ in range(top_k)],
            "chosen_token": " the",
            "chosen_token_id": 279,
            "chosen_logprob": -rng.random(),
            "finish_reason": "MAX_TOKENS",
            "attempts": 1,
            "latency_ms": rng.random() * 1000,
            "error": None,
            "scored_at": datetime.now(UTC),
            "source": "online",
            "request_id": request_id,
            "step": step,
            "lookahead": steps,
            "decoding": "sample",
            "prompt_token_count": 1200 if step == 0 else None,
            "cached_content_token_count": None,
            "candidates_token_count": steps if step == 0 else None,
            "thoughts_token_count": 0 if step == 0 else None,
        }
        for step in range(steps)
    ]


def arrow_record(rows: list[dict[str, Any]]) -> bytes:
    return pa.RecordBatch.from_pylist(rows, schema=SCORES).serialize().to_pybytes()


def per_call(
    function: Callable[[list[dict[str, Any]]], object], answers: list[Any], repeats: int = 1
) -> float:
    """Seconds per call of ``function`` over ``answers``, the best of ``repeats`` passes (the
    others lose to whatever else the machine runs)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for rows in answers:
            function(rows)
        best = min(best, time.perf_counter() - start)
    return best / len(answers)


def compaction_seconds(segment: Path) -> float:
    """Reading a sealed segment and building its table, the best of ``REPEATS`` times."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        rows_table(read_segment(segment).records)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=3000)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--sync-answers", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(0)

    print(f"{args.answers} answers per size, top-{args.top_k} lists\n")
    print(
        f"{'rows':>4} {'JSON µs':>8} {'IPC µs':>8} {'JSON B':>7} {'IPC B':>7} │ "
        f"{'appends/s':>10} {'MB/s':>7} {'µs/answer':>9} │ {'compact µs/row':>14}"
    )
    for steps in ROWS_PER_ANSWER:
        answers = [make_answer(rng, steps, args.top_k) for _ in range(args.answers)]
        json_seconds = per_call(encode_answer, answers, REPEATS)
        arrow_seconds = per_call(arrow_record, answers, REPEATS)
        json_bytes = len(encode_answer(answers[0]))
        arrow_bytes = len(arrow_record(answers[0]))
        with tempfile.TemporaryDirectory() as directory:
            run = RunDir(Path(directory))
            with AnswerJournal.open(run, MODEL2) as journal:
                append_seconds = per_call(journal.append, answers, REPEATS)
                sealed = journal.rotate()
            assert sealed is not None
            # Every pass appended every answer: the segment holds REPEATS copies.
            size = sealed.path.stat().st_size // REPEATS
            compact_seconds = compaction_seconds(sealed.path) / (steps * len(answers) * REPEATS)
        print(
            f"{steps:>4} {json_seconds * 1e6:>8.1f} {arrow_seconds * 1e6:>8.1f} "
            f"{json_bytes:>7} {arrow_bytes:>7} │ {1 / append_seconds:>10,.0f} "
            f"{size / (append_seconds * len(answers)) / 1e6:>7.1f} {append_seconds * 1e6:>9.1f} │ "
            f"{compact_seconds * 1e6:>14.1f}"
        )

    answers = [make_answer(rng, 1, args.top_k) for _ in range(args.sync_answers)]
    with (
        tempfile.TemporaryDirectory() as directory,
        AnswerJournal.open(RunDir(Path(directory)), MODEL2) as journal,
    ):

        def append_and_sync(rows: list[dict[str, Any]]) -> None:
            journal.append(rows)
            journal.sync()

        synced = per_call(append_and_sync, answers, REPEATS)
    print(f"\nappend + sync() per 1-row answer (fsync, not done by default): {synced * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
