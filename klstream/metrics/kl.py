"""The KL pass: positions ⨝ resolved Model 2 scores → ``kl/<model2>.parquet`` (schema ``KL``).

DuckDB streams the join in key order as Arrow record batches, one range of responses at a time
(:func:`klstream.rundir.response_ranges`); each batch goes through the vectorized estimators
and is appended to the output, so memory stays bounded by the range and batch sizes whatever
the size of the run. The output is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from klstream import schemas
from klstream.atomic import atomic_path
from klstream.errors import KlstreamError
from klstream.metrics.columns import SideColumns, keyed_sides
from klstream.metrics.estimators import estimate, model1_only
from klstream.rundir import RANGE_POSITIONS, RunDir, connect, response_ranges
from klstream.sqlfiles import load_sql

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


def score_batch(batch: pa.RecordBatch, model2: str) -> pa.RecordBatch:
    """Compute the KL table's rows for one batch of ``sql/kl_inputs.sql`` output."""
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
    est = estimate(p, q, chosen_key, ok.column("logprob").to_numpy(zero_copy_only=False))

    entropy1, coverage1 = np.empty(n), np.empty(n)
    entropy1[rows], coverage1[rows] = est.entropy1, est.coverage1
    if len(rows) < n:
        others = np.flatnonzero(status_code != 0)
        rest = batch.take(others)
        p_rest, _, _ = keyed_sides(
            model1_columns(rest), None, rest.column("token"), rest.column("token_id")
        )
        entropy1[others], coverage1[others] = model1_only(p_rest)

    f64, boolean = pa.float64(), pa.bool_()
    return pa.RecordBatch.from_arrays(
        [
            pc.take(pa.array([model2], pa.string()), np.zeros(n, dtype=np.int32)),
            column("stem"),
            column("response_index"),
            column("position"),
            column("token"),
            pc.take(_STATUS_NAMES, status_code),
            column("m2_error"),
            _with_nulls(est.kl_floor, rows, n, f64),
            _with_nulls(est.kl_lower, rows, n, f64),
            _with_nulls(est.logratio, rows, n, f64),
            column("logprob"),
            _with_nulls(est.model2_logprob, rows, n, f64),
            _with_nulls(est.m1_token_in_m2_topk, rows, n, boolean),
            _with_nulls(est.top1_agree, rows, n, boolean),
            pa.array(entropy1, f64),
            _with_nulls(est.entropy2, rows, n, f64),
            pa.array(coverage1, f64),
            _with_nulls(est.coverage2, rows, n, f64),
        ],
        schema=schemas.KL,
    )


def score_batches(
    batches: Iterable[pa.RecordBatch], model2: str, workers: int = DEFAULT_WORKERS
) -> Iterator[pa.RecordBatch]:
    """:func:`score_batch` over a stream, in order, ``workers`` batches at a time.

    numpy and Arrow release the GIL in their kernels, so threads use the other cores; at most
    ``workers + 1`` batches are in memory.
    """
    if workers <= 1:
        for batch in batches:
            yield score_batch(batch, model2)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[pa.RecordBatch]] = deque()
        for batch in batches:
            pending.append(pool.submit(score_batch, batch, model2))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
    if not any(run.scores_dir(model2).glob("*.parquet")):
        raise KlstreamError(
            f"no Model 2 results for {model2!r} in {run.scores_dir(model2)}; "
            f"run `klstream score {run_dir} --model2 {model2}` first"
        )
    con = connect(run_dir)
    sql = load_sql("kl_inputs")

    def inputs() -> Iterator[pa.RecordBatch]:
        for response_range in response_ranges(con, range_positions):
            params = {"model2": model2, **response_range.params()}
            yield from con.sql(sql, params=params).to_arrow_reader(batch_rows)

    counts: Counter[str] = Counter()
    final = run.kl_path(model2)
    with atomic_path(final) as tmp, pq.ParquetWriter(tmp, schemas.KL, compression="zstd") as out:
        for result in score_batches(inputs(), model2):
            out.write_batch(result)
            for entry in pc.value_counts(result.column("status")).to_pylist():
                counts[entry["values"]] += entry["counts"]
    con.close()
    return KlReport(
        path=final,
        positions=sum(counts.values()),
        scored=counts[schemas.KL_STATUS_SCORED],
        failed=counts[schemas.KL_STATUS_ERROR],
        unscored=counts[schemas.KL_STATUS_UNSCORED],
    )
