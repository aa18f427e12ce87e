"""KL pass benchmark: the vectorized core against a plain per-position Python implementation.

Prints, from one run on the same synthetic data:
  * positions/s of ``klstream.metrics.reference.kl_floor`` over Python dicts (what a user would
    script), of the vectorized kl_floor (Arrow columns in, kl_floor out) and of
    ``klstream.metrics.kl.score_batch`` (everything the KL pass does per batch: all estimators,
    Arrow batch out), and the ratios;
    once with token ids as keys and once with token strings (inputs without ids);
  * a streaming run over N positions (default 10 million) in record batches: throughput and peak
    resident memory, to show that memory is bounded by the batch, not by N; first the estimators
    alone (with the σ̂² sample), then the whole table as the KL pass writes it
    (``klstream.metrics.kl.write_kl_table``: estimators, spill, σ̂² fit, ``kl_estimate``,
    Parquet), everything but the DuckDB join.

Usage: python bench/kl_bench.py [--positions 10000000] [--batch-rows 16384] [--reference 20000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from klstream.metrics import reference
from klstream.metrics.columns import keyed_sides
from klstream.metrics.estimators import kl_floor
from klstream.metrics.kl import (
    DEFAULT_BATCH_ROWS,
    model1_columns,
    model2_columns,
    score_batch,
    score_batches,
    write_kl_table,
)
from klstream.metrics.tailfit import TailSample

TOP_K = 20


def _lists(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), value_type))


def _descending_logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Top-k logprobs of a proper distribution: descending, covering 50–99.9% of the mass."""
    decay = -np.cumsum(rng.exponential(rng.uniform(0.1, 2.0, size=(n, 1)), size=(n, TOP_K)), axis=1)
    mass = np.exp(decay)
    coverage = rng.uniform(0.5, 0.999, size=(n, 1))
    logprobs: np.ndarray = np.log(mass / mass.sum(axis=1, keepdims=True) * coverage)
    return logprobs


def synthetic_batch(rng: np.random.Generator, n: int, with_ids: bool) -> pa.RecordBatch:
    """A batch shaped like ``sql/kl_inputs.sql`` output; Model 2 lists overlap Model 1's."""
    start = rng.integers(0, 50_000, size=n)
    p_ids = start[:, None] + np.arange(TOP_K)
    q_ids = (start + rng.integers(0, 6, size=n))[:, None] + rng.permutation(TOP_K)
    p_lp, q_lp = _descending_logprobs(rng, n), _descending_logprobs(rng, n)
    chosen_col = rng.integers(0, 3, size=n)
    chosen_ids = p_ids[np.arange(n), chosen_col]

    def token_strings(ids: np.ndarray) -> pa.Array:
        return pa.array(np.char.add("tok", ids.astype(str)).ravel())

    def id_lists(ids: np.ndarray) -> pa.ListArray:
        if with_ids:
            return _lists(ids, pa.int64())
        offsets = pa.array(np.arange(0, (n + 1) * TOP_K, TOP_K, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.nulls(n * TOP_K, pa.int64()))

    offsets = pa.array(np.arange(0, (n + 1) * TOP_K, TOP_K, dtype=np.int32))
    return pa.RecordBatch.from_pydict(
        {
            "stem": pa.array(np.full(n, "bench", dtype=object), pa.string()),
            "response_index": pa.array(np.zeros(n, dtype=np.int32)),
            "position": pa.array(np.arange(n, dtype=np.int32)),
            "token": pa.array(np.char.add("tok", chosen_ids.astype(str))),
            "token_id": pa.array(chosen_ids) if with_ids else pa.nulls(n, pa.int64()),
            "logprob": pa.array(p_lp[np.arange(n), chosen_col]),
            "top_tokens": pa.ListArray.from_arrays(offsets, token_strings(p_ids)),
            "top_token_ids": id_lists(p_ids),
            "top_logprobs": _lists(p_lp, pa.float64()),
            "m2_status": pa.array(np.full(n, "ok", dtype=object), pa.string()),
            "m2_error": pa.nulls(n, pa.string()),
            "m2_top_tokens": pa.ListArray.from_arrays(offsets, token_strings(q_ids)),
            "m2_top_token_ids": id_lists(q_ids),
            "m2_top_logprobs": _lists(q_lp, pa.float64()),
        }
    )


def reference_kl(batch: pa.RecordBatch, with_ids: bool) -> tuple[list[float], float]:
    """What a user would script: one position at a time over Python lists; returns seconds too."""
    rows = batch.to_pylist()
    key_p = "top_token_ids" if with_ids else "top_tokens"
    key_q = "m2_top_token_ids" if with_ids else "m2_top_tokens"
    started = time.perf_counter()
    values = [
        reference.kl_floor(
            list(zip(row[key_p], row["top_logprobs"], strict=True)),
            list(zip(row[key_q], row["m2_top_logprobs"], strict=True)),
        )
        for row in rows
    ]
    return values, time.perf_counter() - started


def kl_floor_only(batch: pa.RecordBatch) -> np.ndarray:
    """The vectorized counterpart of the reference: Arrow columns in, kl_floor out."""
    p, q, _ = keyed_sides(
        model1_columns(batch),
        model2_columns(batch),
        batch.column("token"),
        batch.column("token_id"),
    )
    assert q is not None
    return kl_floor(p, q)


def full_pass(batch: pa.RecordBatch) -> np.ndarray:
    """Everything the KL pass does per batch: all estimators, Arrow batch out."""
    kl: np.ndarray = score_batch(batch, "bench").rows.column("kl_floor").to_numpy()
    return kl


def compare(rng: np.random.Generator, n: int, batch_rows: int, with_ids: bool) -> float:
    """Time the reference and the vectorized code on the same batch; return the reference's
    positions/s."""
    batch = synthetic_batch(rng, n, with_ids)
    want, ref_seconds = reference_kl(batch, with_ids)
    keys = "token ids" if with_ids else "token strings"
    print(f"keys = {keys}: plain Python reference {n / ref_seconds:>12,.0f} pos/s")
    for name, vectorized in (("kl_floor only", kl_floor_only), ("full KL pass", full_pass)):
        started = time.perf_counter()
        got = np.concatenate(
            [vectorized(batch.slice(offset, batch_rows)) for offset in range(0, n, batch_rows)]
        )
        seconds = time.perf_counter() - started
        assert np.allclose(got, want, rtol=1e-12, atol=1e-12), "vectorized and reference disagree"
        print(
            f"  {name:<15} vectorized {n / seconds:>12,.0f} pos/s   "
            f"speed-up over the reference: {ref_seconds / seconds:6.1f}x"
        )
    return n / ref_seconds


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(
    rng: np.random.Generator, total: int, batch_rows: int, workers: int, reference_rate: float
) -> None:
    """The full KL pass over ``total`` positions, as compute_kl runs it, batch by batch."""
    templates = [synthetic_batch(rng, batch_rows, with_ids=True) for _ in range(4)]
    rss_before = peak_rss_mib()

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, total, batch_rows):
            yield templates[(start // batch_rows) % len(templates)].slice(
                0, min(batch_rows, total - start)
            )

    done, kl_sum = 0, 0.0
    sample = TailSample()
    started = time.perf_counter()
    for rows in score_batches(batches(), "bench", sample, workers):
        kl_sum += float(np.sum(rows.column("kl_floor").to_numpy()))
        done += rows.num_rows
    seconds = time.perf_counter() - started
    rate = done / seconds
    print(
        f"estimators, {workers} thread(s): {done:,} positions in {seconds:.1f} s = "
        f"{rate:,.0f} pos/s = {rate / reference_rate:.1f}x the reference (mean kl_floor "
        f"{kl_sum / done:.4f}); peak RSS {peak_rss_mib():.0f} MiB, {rss_before:.0f} MiB before"
    )
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        _, fit = write_kl_table(batches(), "bench", Path(directory) / "kl.parquet", workers)
        seconds = time.perf_counter() - started
    assert fit is not None
    print(
        f"whole KL table, {workers} thread(s): {total:,} positions in {seconds:.1f} s = "
        f"{total / seconds:,.0f} pos/s (σ̂² {fit.sigma2:.3f} from {fit.positions:,} positions); "
        f"peak RSS {peak_rss_mib():.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=10_000_000)
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS)
    parser.add_argument(
        "--reference", type=int, default=20_000, help="positions for the side-by-side comparison"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    reference_rate = compare(rng, args.reference, args.batch_rows, with_ids=True)
    compare(rng, args.reference, args.batch_rows, with_ids=False)
    for workers in (1, 2):
        stream(rng, args.positions, args.batch_rows, workers, reference_rate)


if __name__ == "__main__":
    main()
