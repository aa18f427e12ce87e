"""The run directory's layout, and a DuckDB connection with views over its Parquet files."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from klstream import schemas
from klstream.errors import KlstreamError
from klstream.sqlfiles import load_sql

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model2_dirname(model2: str) -> str:
    """A file-system-safe name for a Model 2 id such as ``models/gemini-2.0-flash``."""
    name = _UNSAFE.sub("_", model2.removeprefix("models/")).strip("._")
    if not name:
        raise KlstreamError(f"model2 name {model2!r} has no usable characters")
    return name


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def positions(self) -> Path:
        return self.root / "positions.parquet"

    @property
    def responses(self) -> Path:
        return self.root / "responses.parquet"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.parquet"

    def scores_dir(self, model2: str) -> Path:
        return self.root / "scores" / model2_dirname(model2)

    def kl_path(self, model2: str) -> Path:
        return self.root / "kl" / f"{model2_dirname(model2)}.parquet"

    def require_exploded(self) -> None:
        if not self.positions.is_file() or not self.responses.is_file():
            raise KlstreamError(
                f"{self.root} is not an exploded run directory (no positions.parquet); "
                f"run `klstream explode INPUT_DIR -o {self.root}` first"
            )


def views_script(run_dir: Path) -> str:
    """The views SQL preceded by the search path that makes its relative paths resolve."""
    quoted = str(run_dir.resolve()).replace("'", "''")
    return f"SET file_search_path = '{quoted}';\n" + load_sql("views")


def connect(run_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views.

    Views whose Parquet files do not exist yet (or that depend on such a view) are left out;
    :func:`view_names` tells which exist. Before any Model 2 result, ``scores`` is an empty
    table of the scores schema, so that "what is left to score" is one query either way.
    """
    run = RunDir(run_dir)
    run.require_exploded()
    con = duckdb.connect()
    if not any(run.root.glob("scores/*/*.parquet")):
        con.register("scores", schemas.SCORES.empty_table())
    for statement in duckdb.extract_statements(views_script(run_dir)):
        # Files that do not exist yet, or a view that depends on a view left out for that.
        with contextlib.suppress(duckdb.IOException, duckdb.CatalogException):
            con.execute(statement)
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(load_sql("view_names")).fetchall()
    return {name for (name,) in rows}


RANGE_POSITIONS = 200_000
"""Positions per range of responses that the KL pass and export hand to DuckDB at once: its
joins and sorts hold a range in memory, so this bounds their memory whatever the run's size."""


@dataclass(frozen=True)
class ResponseRange:
    """Responses from (lo_stem, lo_index) to (hi_stem, hi_index), both included, in key order."""

    lo_stem: str
    lo_index: int
    hi_stem: str
    hi_index: int

    def params(self) -> dict[str, str | int]:
        return {
            "lo_stem": self.lo_stem,
            "lo_index": self.lo_index,
            "hi_stem": self.hi_stem,
            "hi_index": self.hi_index,
        }


def response_ranges(
    con: duckdb.DuckDBPyConnection, max_positions: int = RANGE_POSITIONS
) -> list[ResponseRange]:
    """Consecutive ranges of whole responses, each with at most ``max_positions`` positions
    (or a single longer response)."""
    ranges: list[ResponseRange] = []
    first: tuple[str, int] | None = None
    last: tuple[str, int] = ("", 0)
    size = 0
    for stem, index, tokens in con.execute(load_sql("response_sizes")).fetchall():
        if first is not None and size + tokens > max_positions:
            ranges.append(ResponseRange(*first, *last))
            first, size = None, 0
        if first is None:
            first = (stem, index)
        last = (stem, index)
        size += tokens
    if first is not None:
        ranges.append(ResponseRange(*first, *last))
    return ranges
