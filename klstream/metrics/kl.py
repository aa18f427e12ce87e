"""The KL pass: positions ⨝ resolved Model 2 scores → ``kl/<model2>.parquet`` (schema ``KL``).

DuckDB streams the join in key order as Arrow record batches, one range of responses at a time
(:func:`klstream.storage.database.ranged`); each batch goes through the vectorized estimators,
so memory stays bounded by the range and batch sizes whatever the size of the run.

``kl_estimate`` needs σ̂², fitted once over the whole run (:mod:`klstream.metrics.tailfit`), so
the pass has two halves. The first streams the join once, writes every estimator but
``kl_estimate`` to a spill file (Arrow IPC beside the output) and keeps a bounded sample of the
fit's data. After the fit, the second reads the spill back batch by batch, adds
``kl_estimate = kl_bucket + m_P·σ̂²/2`` and writes the Parquet output. The join, by far the
dominant cost, runs once; the spill costs a sequential write and read of the table. The output is
written to a temporary name and renamed into place; the spill is deleted either way.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from klstream.errors import NoResults
from klstream.metrics.columns import SideColumns, keyed_sides
from klstream.metrics.estimators import estimate, kl_estimate, model1_only
from klstream.metrics.tailfit import (
    EVERYTHING,
    TailFit,
    TailObservations,
    TailSample,
    fit_tail_variance,
    priority,
)
from klstream.storage import schemas
from klstream.storage.atomic import atomic_path, temporary_sibling
from klstream.storage.database import RANGE_POSITIONS, connect, ranged
from klstream.storage.health import drop_damaged_kl, scored_model2s
from klstream.storage.rundir import RunDir

DEFAULT_BATCH_ROWS = 16_384
"""Measured best with two worker threads (bench/kl_bench.py): smaller batches spend more time
holding the GIL in Python, larger ones fall out of cache."""
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class KlReport:
    path: Path
    positions: int
    scored: int
    failed: int
    unscored: int
    tail_fit: TailFit | None  # None when no position says anything about σ


def _with_nulls(values: np.ndarray, rows: np.ndarray, n: int, dtype: pa.DataType) -> pa.Array:
    """Scatter ``values`` (one per selected row) into a length-``n`` array, null elsewhere."""
    if len(rows) == n:
        return pa.array(values, type=dtype)
    full = np.zeros(n, dtype=values.dtype)
    full[rows] = values
    mask = np.ones(n, dtype=bool)
    mask[rows] = False
    return pa.array(full, type=dtype, mask=mask)


def model1_columns(batch: pa.RecordBatch) -> SideColumns:
    """Model 1's lists in a batch of ``sql/kl_inputs.sql`` output."""
    return SideColumns(
        batch.column("top_tokens"), batch.column("top_token_ids"), batch.column("top_logprobs")
    )


def model2_columns(batch: pa.RecordBatch) -> SideColumns:
    """Model 2's lists in a batch of ``sql/kl_inputs.sql`` output."""
    return SideColumns(
        batch.column("m2_top_tokens"),
        batch.column("m2_top_token_ids"),
        batch.column("m2_top_logprobs"),
    )


_STATUS_NAMES = pa.array(
    [schemas.KL_STATUS_SCORED, schemas.KL_STATUS_ERROR, schemas.KL_STATUS_UNSCORED], pa.string()
)


_F64, _BOOL = pa.float64(), pa.bool_()

SPILL = pa.schema(
    [
        *(field for field in schemas.KL if field.name not in ("kl_estimate", "tail_sigma2")),
        pa.field("kl_bucket", _F64),
        pa.field("unshared_mass1", _F64),
    ]
)
"""The first half's output: the ``KL`` columns but ``kl_estimate`` and ``tail_sigma2``, plus
what ``kl_estimate`` is computed from once σ̂² is known."""


@dataclass(frozen=True)
class ScoredBatch:
    """One batch through the estimators: its rows (schema :data:`SPILL`) and the σ̂² fit's data
    for the scored positions that can still enter the sample, with their ordinals in the run."""

    rows: pa.RecordBatch
    tail: TailObservations
    tail_ordinals: np.ndarray


def score_batch(
    batch: pa.RecordBatch, model2: str, first_ordinal: int = 0, tail_cut: np.uint64 = EVERYTHING
) -> ScoredBatch:
    """The estimators for one batch of ``sql/kl_inputs.sql`` output, whose first position is the
    run's ``first_ordinal``-th; fit data only where the priority passes ``tail_cut``."""
    n = batch.num_rows
    column = batch.column
    status_code = np.where(
        pc.fill_null(pc.equal(column("m2_status"), schemas.SCORE_OK), False).to_numpy(
            zero_copy_only=False
        ),
        0,
        np.where(column("m2_status").is_null().to_numpy(zero_copy_only=False), 2, 1),
    )
    rows = np.flatnonzero(status_code == 0)
    ok = batch if len(rows) == n else batch.take(rows)
    p, q, chosen_key = keyed_sides(
        model1_columns(ok),
        model2_columns(ok),
        ok.column("token"),
        ok.column("token_id"),
    )
    assert q is not None
    tail_rows = np.flatnonzero(priority(first_ordinal + rows) <= tail_cut)
    chosen_logprob = ok.column("logprob").to_numpy(zero_copy_only=False)
    est = estimate(p, q, chosen_key, chosen_logprob, tail_rows)

    entropy1, coverage1 = np.empty(n), np.empty(n)
    entropy1[rows], coverage1[rows] = est.entropy1, est.coverage1
    if len(rows) < n:
        others = np.flatnonzero(status_code != 0)
        rest = batch.take(others)
        p_rest, _, _ = keyed_sides(
            model1_columns(rest), None, rest.column("token"), rest.column("token_id")
        )
        entropy1[others], coverage1[others] = model1_only(p_rest)

    spilled = pa.RecordBatch.from_arrays(
        [
            pc.take(pa.array([model2], pa.string()), np.zeros(n, dtype=np.int32)),
            column("stem"),
            column("response_index"),
            column("position"),
            column("token"),
            pc.take(_STATUS_NAMES, status_code),
            column("m2_error"),
            _with_nulls(est.kl_floor, rows, n, _F64),
            _with_nulls(est.kl_lower, rows, n, _F64),
            _with_nulls(est.logratio, rows, n, _F64),
            column("logprob"),
            _with_nulls(est.model2_logprob, rows, n, _F64),
            _with_nulls(est.m1_token_in_m2_topk, rows, n, _BOOL),
            _with_nulls(est.top1_agree, rows, n, _BOOL),
            pa.array(entropy1, _F64),
            _with_nulls(est.entropy2, rows, n, _F64),
            pa.array(coverage1, _F64),
            _with_nulls(est.coverage2, rows, n, _F64),
            _with_nulls(est.kl_bucket, rows, n, _F64),
            _with_nulls(est.unshared_mass1, rows, n, _F64),
        ],
        schema=SPILL,
    )
    return ScoredBatch(spilled, est.tail, first_ordinal + rows[tail_rows])


def finish_batch(spilled: pa.RecordBatch, tail_fit: TailFit | None) -> pa.RecordBatch:
    """A spilled batch in the ``KL`` schema, with ``kl_estimate`` from the run's σ̂²."""
    n = spilled.num_rows
    if tail_fit is None:
        estimates, sigma2 = pa.nulls(n, _F64), pa.nulls(n, _F64)
    else:
        bucket = spilled.column("kl_bucket")
        values = kl_estimate(
            bucket.to_numpy(zero_copy_only=False),
            spilled.column("unshared_mass1").to_numpy(zero_copy_only=False),
            tail_fit.sigma2,
        )
        estimates = pa.array(values, _F64, mask=bucket.is_null().to_numpy(zero_copy_only=False))
        sigma2 = pa.array(np.full(n, tail_fit.sigma2), _F64)
    added = {"kl_estimate": estimates, "tail_sigma2": sigma2}
    return pa.RecordBatch.from_arrays(
        [added[name] if name in added else spilled.column(name) for name in schemas.KL.names],
        schema=schemas.KL,
    )


def score_batches(
    batches: Iterable[pa.RecordBatch],
    model2: str,
    sample: TailSample,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[pa.RecordBatch]:
    """:func:`score_batch` over a stream, in order, ``workers`` batches at a time; the rows come
    out (schema :data:`SPILL`) and the fit's data goes into ``sample``.

    numpy and Arrow release the GIL in their kernels, so threads use the other cores; at most
    ``workers + 1`` batches are in memory. A batch is examined for the sample only where its
    positions can still get in (the cut when it is handed out).
    """
    ordinal = 0

    def arguments(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, str, int, np.uint64]:
        nonlocal ordinal
        first, ordinal = ordinal, ordinal + batch.num_rows
        return batch, model2, first, sample.cut

    def taken(result: ScoredBatch) -> pa.RecordBatch:
        sample.add(result.tail, result.tail_ordinals)
        return result.rows

    if workers <= 1:
        for batch in batches:
            yield taken(score_batch(*arguments(batch)))
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[ScoredBatch]] = deque()
        for batch in batches:
            pending.append(pool.submit(score_batch, *arguments(batch)))
            if len(pending) > workers:
                yield taken(pending.popleft().result())
        while pending:
            yield taken(pending.popleft().result())


def write_kl_table(
    batches: Iterable[pa.RecordBatch], model2: str, final: Path, workers: int = DEFAULT_WORKERS
) -> tuple[Counter[str], TailFit | None]:
    """Both halves of the pass over ``batches`` (``sql/kl_inputs.sql`` output): the KL table at
    ``final``, written atomically. Returns the positions per status and the σ̂² fit."""
    counts: Counter[str] = Counter()
    sample = TailSample()
    final.parent.mkdir(parents=True, exist_ok=True)
    spill = temporary_sibling(final.with_name(final.name + ".spill"))
    try:
        with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_file(sink, SPILL) as spilled:
            for rows in score_batches(batches, model2, sample, workers):
                spilled.write_batch(rows)
                for entry in pc.value_counts(rows.column("status")).to_pylist():
                    counts[entry["values"]] += entry["counts"]
        tail_fit = fit_tail_variance(sample.observations())
        with (
            atomic_path(final) as tmp,
            pq.ParquetWriter(tmp, schemas.KL, compression="zstd") as out,
            pa.OSFile(str(spill), "rb") as source,  # read, not mapped: resident memory stays flat
        ):
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                out.write_batch(finish_batch(reader.get_batch(index), tail_fit))
    finally:
        spill.unlink(missing_ok=True)
    return counts, tail_fit


def compute_kl(
    run_dir: Path,
    model2: str,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    range_positions: int = RANGE_POSITIONS,
) -> KlReport:
    """(Re)compute ``kl/<model2>.parquet`` from the run's positions and Model 2's scores,
    one range of responses at a time."""
    run = RunDir(run_dir)
    run.require_exploded()
    if not run.has_scores(model2):
        raise NoResults(f"no Model 2 results for {model2!r} in {run.scores_dir(model2)}")
    final = run.kl_path(model2)
    with connect(run_dir) as con:
        inputs = (
            batch
            for relation in ranged(con, "kl_inputs", {"model2": model2}, range_positions)
            for batch in relation.to_arrow_reader(batch_rows)
        )
        counts, tail_fit = write_kl_table(inputs, model2, final)
    return KlReport(
        path=final,
        positions=sum(counts.values()),
        scored=counts[schemas.KL_STATUS_SCORED],
        failed=counts[schemas.KL_STATUS_ERROR],
        unscored=counts[schemas.KL_STATUS_UNSCORED],
        tail_fit=tail_fit,
    )


def ensure_kl(run_dir: Path) -> list[str]:
    """Build the KL table of every Model 2 whose results have none (it was damaged and
    dropped, or the scoring that writes it was killed first); the Model 2s it built."""
    run = RunDir(run_dir)
    drop_damaged_kl(run)
    built = []
    for model2 in scored_model2s(run):
        if not run.kl_path(model2).exists():
            compute_kl(run_dir, model2)
            built.append(model2)
    return built


def connect_scored(run_dir: Path) -> duckdb.DuckDBPyConnection:
    """The run's views (:func:`~klstream.storage.database.connect`) with every Model 2's KL
    table there: what exports, reports and queries read."""
    ensure_kl(run_dir)
    return connect(run_dir)
