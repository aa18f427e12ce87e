"""Append-only checkpoint parts of Model 2 results: ``scores/<model2>/part-*.parquet``.

Each part is written whole to a temporary name, fsynced and renamed, so a crash loses at most
the batch being written and never leaves a corrupt part. Part names sort in write order.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from klstream import schemas
from klstream.atomic import atomic_path

_sequence = itertools.count()


def part_name() -> str:
    """A unique name that sorts by creation time across processes and restarts."""
    return f"part-{time.time_ns():020d}-{os.getpid()}-{next(_sequence):06d}.parquet"


def write_scores_part(scores_dir: Path, rows: pa.Table) -> Path:
    """Durably add ``rows`` (schema ``SCORES``) as a new part file and return its path."""
    table = rows.cast(schemas.SCORES)
    final = scores_dir / part_name()
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return final
