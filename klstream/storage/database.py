"""DuckDB over a run directory: the views of ``sql/views.sql``, and ranges of responses.

Every query klstream runs over a run goes through :func:`connect`; the big ones go range by
range (:func:`ranged`), so DuckDB's memory is bounded by a range, whatever the run's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import duckdb
import pyarrow as pa

from klstream.errors import RunDirError
from klstream.storage import schemas
from klstream.storage.health import drop_damaged_kl, require_readable_inputs
from klstream.storage.rundir import RunDir
from klstream.storage.sqlfiles import load_sql

RANGE_POSITIONS = 200_000
"""Positions per range of responses handed to DuckDB at once: its joins and sorts hold a range
in memory, so this bounds their memory whatever the run's size."""


FILE_VIEWS: dict[str, tuple[str, pa.Schema]] = {
    "skipped": ("skipped_file", schemas.SKIPPED),
    "scores": ("scores_files", schemas.SCORES),
    "kl": ("kl_files", schemas.KL),
    "run_configs": ("run_config_files", schemas.RUN_CONFIGS),
}
"""The views over files that may not exist yet (``sql/file_view_<view>.sql``): the variable of
:meth:`RunDir.sql_variables` naming their files, and the schema of their columns. A view whose
files are missing is empty with these columns, so every view always exists."""


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _duckdb_types(schema: pa.Schema) -> list[tuple[str, str]]:
    """Each column's name and DuckDB type, as DuckDB itself reads the Arrow schema."""
    with duckdb.connect() as con:
        relation = con.from_arrow(schema.empty_table())
        return [
            (name, str(kind)) for name, kind in zip(relation.columns, relation.types, strict=True)
        ]


@cache
def _columns_macro(view: str) -> str:
    """``<view>_columns()``: the view's columns, typed, and no rows (made once per process)."""
    columns = ",\n    ".join(
        f"NULL::{kind} AS {_sql_identifier(name)}"
        for name, kind in _duckdb_types(FILE_VIEWS[view][1])
    )
    return load_sql("columns_macro").format(view=view, columns=columns)


@cache
def _run_config_columns() -> str:
    """The ``columns`` argument of ``read_json`` for ``run.json``, as a DuckDB struct literal."""
    fields = ", ".join(
        f"{_sql_string(name)}: {_sql_string(kind)}"
        for name, kind in _duckdb_types(schemas.RUN_CONFIGS)
    )
    return "{" + fields + "}"


def views_script(run_dir: Path) -> str:
    """The SQL that makes a plain DuckDB see the run: search path, variables, macros, views.

    It runs as-is whatever files exist yet (the duckdb CLI stops at an error, and so does
    ``execute``): a view whose files are missing is made empty with its columns."""
    run = RunDir(run_dir)
    run.require_exploded()
    file_variables = RunDir.sql_variables()
    variables = {**file_variables, **schemas.STATUS_VARIABLES}
    lines = [f"SET file_search_path = {_sql_string(str(run_dir.resolve()))};"]
    lines += [f"SET VARIABLE {name} = {_sql_string(v)};" for name, v in variables.items()]
    lines += [f"SET VARIABLE run_config_columns = {_run_config_columns()};", ""]
    parts = ["\n".join(lines), load_sql("macros")]
    for view, (variable, _) in FILE_VIEWS.items():
        parts.append(_columns_macro(view))
        if run.has_files(file_variables[variable]):
            parts.append(load_sql(f"file_view_{view}"))
        else:
            parts.append(load_sql("empty_view").format(view=view, files=file_variables[variable]))
    parts.append(load_sql("views"))
    return "\n".join(parts)


def connect(run_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views (:func:`views_script`); use it as a context
    manager to close it. Views whose files do not exist yet are empty: before any Model 2
    result, ``scores`` has no rows, so that "what is left to score" is one query either way."""
    run = RunDir(run_dir)
    run.require_exploded()
    require_readable_inputs(run)
    drop_damaged_kl(run)
    con = duckdb.connect()
    try:
        con.execute(views_script(run_dir))
    except duckdb.InvalidInputException as damaged:
        con.close()
        raise RunDirError(
            f"a file of {run_dir} cannot be read ({damaged}); a damaged scores part "
            "is moved out of the way by scoring the run again with resume"
        ) from None
    except BaseException:
        con.close()
        raise
    return con


@dataclass(frozen=True)
class ResponseRange:
    """Responses from (lo_stem, lo_index) to (hi_stem, hi_index), both included, in key order.

    Queries select it with ``in_response_range(stem, response_index, $lo_stem, $lo_index,
    $hi_stem, $hi_index)`` (``sql/macros.sql``).
    """

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


def ranged(
    con: duckdb.DuckDBPyConnection,
    sql_name: str,
    params: Mapping[str, object],
    max_positions: int = RANGE_POSITIONS,
    ranges: list[ResponseRange] | None = None,
) -> Iterator[duckdb.DuckDBPyRelation]:
    """``sql/<sql_name>.sql`` once per range of responses (``ranges``, by default all the run's
    responses in ranges of at most ``max_positions`` positions), in key order."""
    sql = load_sql(sql_name)
    for response_range in ranges if ranges is not None else response_ranges(con, max_positions):
        yield con.sql(sql, params={**params, **response_range.params()})
