"""Damaged files in a run directory: found before they are read, named in one line, with a way
out.

Every file klstream writes is written whole and renamed into place, so damage comes from outside
(a full disk at the wrong moment elsewhere, a copy cut short, a hand edit). What is damaged
decides what happens:

- **Inputs** (``positions.parquet``, ``responses.parquet``, ``inputs.json``): nothing can be
  trusted that was built from them, so every command that needs them stops with
  :class:`~klstream.errors.RunDamaged` naming the file and saying to explode the inputs again.
- **A scores part**: :func:`scan_parts` moves it to ``quarantine/<model2>/`` (out of every view's
  reach, kept for inspection); its positions then lack a result and a resumed run asks for them
  again.
- **Derived data** (the KL table, exports, the report): rebuilt from the scores by the stage that
  reads them (:func:`klstream.metrics.kl.ensure_kl`).

A Parquet file is judged by its footer (:func:`parquet_problem`): a file cut short has none.
Every scores part also carries, in its footer's key-value metadata, the configuration its results
were made with (:data:`~klstream.storage.schemas.PART_CONFIG_KEY`), so that a run whose
``run.json`` is lost can still be checked against its data.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klstream.errors import RunDamaged
from klstream.storage.rundir import RunDir
from klstream.storage.schemas import PART_CONFIG_KEY


def parquet_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as Parquet (in a few words), or None when its footer reads."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException) as error:
        return " ".join(str(error).split())[:200]
    return None


def inputs_record(run: RunDir) -> dict[str, Any] | None:
    """The run's record of its input files (``inputs.json``), None when it has none (runs from
    before the record); :class:`RunDamaged` when it cannot be read."""
    path = run.inputs_manifest
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunDamaged(path, " ".join(str(error).split()), run.root) from None
    if not isinstance(document, dict) or not isinstance(document.get("files"), list):
        raise RunDamaged(path, "not a record of input files", run.root)
    return document


def damaged_positions(run: RunDir) -> tuple[Path, str] | None:
    """The first of the positions and the responses that cannot be read, and why."""
    for path in (run.positions, run.responses):
        problem = parquet_problem(path) if path.is_file() else None
        if problem is not None:
            return path, problem
    return None


def require_readable_inputs(run: RunDir) -> None:
    """Stop with the fix when the positions, the responses or the input record are damaged."""
    record = inputs_record(run)
    damaged = damaged_positions(run)
    if damaged is not None:
        input_dir = record.get("input_dir") if record else None
        raise RunDamaged(*damaged, run.root, input_dir)


@dataclass
class PartsScan:
    """What the parts of one Model 2 say of themselves."""

    configs: Counter[str] = field(default_factory=Counter)
    """The configurations the parts were made with (JSON), and how many parts each."""
    untagged: int = 0
    """Parts written before configurations were recorded in them."""
    quarantined: list[Path] = field(default_factory=list)
    """Damaged parts, moved to the quarantine folder by this scan."""


def scan_parts(run: RunDir, model2: str) -> PartsScan:
    """Read every part's footer: move the damaged ones to quarantine, and collect the
    configurations the others record."""
    scan = PartsScan()
    for part in run.score_parts(model2):
        try:
            metadata = pq.read_metadata(part).metadata or {}
        except (OSError, pa.ArrowException):
            quarantine = run.quarantine_dir(model2)
            quarantine.mkdir(parents=True, exist_ok=True)
            moved = quarantine / part.name
            part.rename(moved)
            scan.quarantined.append(moved)
            continue
        config = metadata.get(PART_CONFIG_KEY)
        if config is None:
            scan.untagged += 1
        else:
            scan.configs[config.decode()] += 1
    return scan


def drop_damaged_kl(run: RunDir) -> list[Path]:
    """Delete every KL table that cannot be read: it is derived from the scores, and the stage
    that needs it builds it again (:func:`klstream.metrics.kl.ensure_kl`)."""
    damaged = [path for path in run.kl_tables() if parquet_problem(path) is not None]
    for path in damaged:
        path.unlink(missing_ok=True)
    return damaged


def scored_model2s(run: RunDir) -> list[str]:
    """The Model 2s with a readable part, by the name their results carry."""
    names = []
    for parts in run.parts_by_model2():
        for part in parts:
            try:
                column = pq.read_table(part, columns=["model2"])["model2"]
            except (OSError, pa.ArrowException):
                continue
            if len(column):
                names.append(str(column[0].as_py()))
                break
    return names
