"""Estimator benchmark: each KL estimator against the exact KL of toy model pairs.

The emulator's toy models know their full next-token distributions, so the exact KL(P‖Q) at every
position is computable. Model 1 (``toy``) samples responses at temperature 1; at each of their
positions both models' top-k lists go through the KL pass's own code (estimators, σ̂² fit,
``kl_estimate``), for a near, a medium and a far Model 2. For k = 5, 10, 20 it prints, per
estimator:

* ``mean err``: relative error of the run's mean against the exact mean KL;
* ``resp |err|``: mean over responses of the relative error of the response's total;
* ``corr``: Pearson correlation with the exact KL, position by position;
* ``above``: positions where the estimator exceeds the exact KL by more than 1e-6 (a bound must
  show 0 here).

``kl_bucket`` is the lower bound ``kl_lower`` replaced; ``logratio`` is the Monte Carlo estimate.

Usage: python bench/estimator_bench.py [--prompts 40] [--responses 5] [--tokens 100]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from klstream.emulator.toymodel import VOCAB, ToyModel
from klstream.metrics.kl import finish_batch, score_batches
from klstream.metrics.tailfit import TailSample, fit_tail_variance
from klstream.storage import schemas

PAIRS = {"near": "toy-d0.25", "medium": "toy-d1", "far": "toy-d2"}
TOP_KS = (5, 10, 20)
ESTIMATORS = ("kl_floor", "kl_bucket", "kl_lower", "kl_estimate", "logratio")
BOUNDS = ("kl_bucket", "kl_lower")
ABOVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Positions:
    """Every position of Model 1's responses: both models' top-20 and the exact KL."""

    response: np.ndarray  # response number of each position
    chosen_id: np.ndarray
    chosen_logprob: np.ndarray
    p_ids: np.ndarray  # [n, 20], most probable first
    p_logprobs: np.ndarray
    q_ids: np.ndarray
    q_logprobs: np.ndarray
    exact_kl: np.ndarray


def _top(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-logprobs, kind="stable")[:k]
    return ids, logprobs[ids]


def sample_positions(model2: str, prompts: int, responses: int, tokens: int) -> Positions:
    p_model, q_model = ToyModel.for_name("toy"), ToyModel.for_name(model2)
    columns: dict[str, list[object]] = {name: [] for name in Positions.__dataclass_fields__}
    response = 0
    for prompt_index in range(prompts):
        prompt = f"Benchmark prompt number {prompt_index}: say something."
        for sample_index in range(responses):
            generation = p_model.sample(prompt, tokens, seed=prompt_index * 1000 + sample_index)
            context: list[int] = []
            for step in generation.steps:
                lp = p_model.next_token_logprobs(prompt, context)
                lq = q_model.next_token_logprobs(prompt, context)
                p_ids, p_lps = _top(lp, max(TOP_KS))
                q_ids, q_lps = _top(lq, max(TOP_KS))
                for name, value in (
                    ("response", response),
                    ("chosen_id", step.chosen.token_id),
                    ("chosen_logprob", step.chosen.logprob),
                    ("p_ids", p_ids),
                    ("p_logprobs", p_lps),
                    ("q_ids", q_ids),
                    ("q_logprobs", q_lps),
                    ("exact_kl", float(np.sum(np.exp(lp) * (lp - lq)))),
                ):
                    columns[name].append(value)
                context.append(step.chosen.token_id)
            response += 1
    return Positions(**{name: np.asarray(values) for name, values in columns.items()})


def _lists(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), value_type))


def kl_inputs(positions: Positions, k: int) -> pa.RecordBatch:
    """The positions as ``sql/kl_inputs.sql`` would return them, with top-k lists."""
    n = len(positions.response)
    vocab = np.asarray(VOCAB, dtype=object)
    p_ids, q_ids = positions.p_ids[:, :k], positions.q_ids[:, :k]
    return pa.RecordBatch.from_pydict(
        {
            "stem": pa.array([f"r{r:05d}" for r in positions.response], pa.string()),
            "response_index": pa.array(np.zeros(n, dtype=np.int32)),
            "position": pa.array(np.zeros(n, dtype=np.int32)),
            "token": pa.array(vocab[positions.chosen_id].tolist(), pa.string()),
            "token_id": pa.array(positions.chosen_id, pa.int64()),
            "logprob": pa.array(positions.chosen_logprob, pa.float64()),
            "top_tokens": _lists(vocab[p_ids], pa.string()),
            "top_token_ids": _lists(p_ids, pa.int64()),
            "top_logprobs": _lists(positions.p_logprobs[:, :k], pa.float64()),
            "m2_status": pa.array([schemas.SCORE_OK] * n, pa.string()),
            "m2_error": pa.nulls(n, pa.string()),
            "m2_top_tokens": _lists(vocab[q_ids], pa.string()),
            "m2_top_token_ids": _lists(q_ids, pa.int64()),
            "m2_top_logprobs": _lists(positions.q_logprobs[:, :k], pa.float64()),
        }
    )


def kl_pass(batch: pa.RecordBatch, batch_rows: int = 4096) -> tuple[dict[str, np.ndarray], float]:
    """Both halves of the KL pass in memory: estimators and sample, σ̂² fit, ``kl_estimate``."""
    sample = TailSample()
    slices = (batch.slice(start, batch_rows) for start in range(0, batch.num_rows, batch_rows))
    spilled = list(score_batches(slices, "bench", sample))
    fit = fit_tail_variance(sample.observations())
    assert fit is not None
    spill = pa.Table.from_batches(spilled)
    finished = pa.Table.from_batches([finish_batch(rows, fit) for rows in spilled])
    values = {
        name: finished.column(name).to_numpy()
        for name in ESTIMATORS
        if name in finished.column_names
    }
    values["kl_bucket"] = spill.column("kl_bucket").to_numpy()
    return values, fit.sigma2


def _per_response_error(estimate: np.ndarray, exact: np.ndarray, response: np.ndarray) -> float:
    estimated_totals = np.bincount(response, estimate)
    exact_totals = np.bincount(response, exact)
    return float(np.mean(np.abs(estimated_totals - exact_totals) / exact_totals))


def report(name: str, model2: str, positions: Positions) -> None:
    exact = positions.exact_kl
    print(
        f"\n{name}: toy -> {model2}, {len(exact):,} positions in "
        f"{positions.response.max() + 1} responses, exact mean KL {exact.mean():.4f}"
    )
    print(f"{'k':>3}  {'estimator':<12}{'mean err':>10}{'resp |err|':>12}{'corr':>8}{'above':>8}")
    for k in TOP_KS:
        values, sigma2 = kl_pass(kl_inputs(positions, k))
        for estimator in ESTIMATORS:
            got = values[estimator]
            above = (
                str(int(np.count_nonzero(got > exact + ABOVE_TOLERANCE)))
                if estimator in BOUNDS
                else ""
            )
            print(
                f"{k:>3}  {estimator:<12}{got.mean() / exact.mean() - 1:>+10.1%}"
                f"{_per_response_error(got, exact, positions.response):>12.1%}"
                f"{np.corrcoef(got, exact)[0, 1]:>8.3f}{above:>8}"
            )
        print(f"{k:>3}  fitted σ̂² = {sigma2:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    for name, model2 in PAIRS.items():
        positions = sample_positions(model2, args.prompts, args.responses, args.tokens)
        report(name, model2, positions)


if __name__ == "__main__":
    main()
