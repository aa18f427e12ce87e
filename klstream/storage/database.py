"""DuckDB over a run directory: the views of ``sql/views.sql``, and ranges of responses.

Every query klstream runs over a run goes through :func:`connect`; the big ones go range by
range (:func:`ranged`), so DuckDB's memory is bounded by a range, whatever the run's size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb

from klstream.errors import RunDirError
from klstream.storage import schemas
from klstream.storage.health import drop_damaged_kl, require_readable_inputs
from klstream.storage.rundir import RunDir
from klstream.storage.sqlfiles import load_sql

RANGE_POSITIONS = 200_000
"""Positions per range of responses handed to DuckDB at once: its joins and sorts hold a range
in memory, so this bounds their memory whatever the run's size."""


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def views_script(run_dir: Path) -> str:
    """The SQL that makes a plain DuckDB see the run: search path, variables, macros, views."""
    variables = {**RunDir.sql_variables(), **schemas.STATUS_VARIABLES}
    preamble = [f"SET file_search_path = {_sql_string(str(run_dir.resolve()))};"]
    preamble += [f"SET VARIABLE {name} = {_sql_string(v)};" for name, v in variables.items()]
    return "\n".join(preamble) + "\n" + load_sql("macros") + load_sql("views")


def connect(run_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views; use it as a context manager to close it.

    Views whose Parquet files do not exist yet (or that depend on such a view) are left out;
    :func:`view_names` tells which exist. Before any Model 2 result, ``scores`` is an empty
    table of the scores schema, so that "what is left to score" is one query either way.
    """
    run = RunDir(run_dir)
    run.require_exploded()
    require_readable_inputs(run)
    drop_damaged_kl(run)
    con = duckdb.connect()
    try:
        if not run.has_scores():
            con.register("scores", schemas.SCORES.empty_table())
        for statement in duckdb.extract_statements(views_script(run_dir)):
            # Files that do not exist yet, a view that depends on a view left out for that, or
            # columns that only parts written by a later release have.
            with contextlib.suppress(
                duckdb.IOException, duckdb.CatalogException, duckdb.BinderException
            ):
                try:
                    con.execute(statement)
                except duckdb.InvalidInputException as damaged:
                    raise RunDirError(
                        f"a file of {run_dir} cannot be read ({damaged}); a damaged scores part "
                        "is moved out of the way by scoring the run again with resume"
                    ) from None
    except BaseException:
        con.close()
        raise
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(load_sql("view_names")).fetchall()
    return {name for (name,) in rows}


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
