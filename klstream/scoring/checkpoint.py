"""Append-only checkpoint parts of Model 2 results
(:meth:`klstream.storage.rundir.RunDir.new_part`).

Each part is written whole to a temporary name, fsynced and renamed, so a crash loses at most
the batch being written and never leaves a corrupt part. Part names sort in write order.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from klstream.storage import schemas
from klstream.storage.atomic import atomic_path
from klstream.storage.rundir import RunDir


def write_scores_part(run: RunDir, model2: str, rows: pa.Table) -> Path:
    """Durably add ``rows`` (schema ``SCORES``) as a new part file and return its path."""
    table = rows.cast(schemas.SCORES)
    final = run.new_part(model2)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return final
