"""Ad-hoc SQL over a run: the same views that ``sql/views.sql`` gives the duckdb CLI."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from klstream.errors import QueryError
from klstream.metrics.kl import connect_scored
from klstream.numbers import thousands
from klstream.storage.atomic import atomic_path

OutputFormat = Literal["table", "csv", "json", "parquet"]


def _write(relation: duckdb.DuckDBPyRelation, output_format: OutputFormat, path: Path) -> None:
    if output_format == "parquet":
        relation.write_parquet(str(path))
    elif output_format == "json":
        with open(path, "w", encoding="utf-8") as handle:
            for line in _json_lines(relation):
                handle.write(line + "\n")
    else:
        relation.write_csv(str(path))


def _json_lines(relation: duckdb.DuckDBPyRelation) -> list[str]:
    rows = relation.to_arrow_table().to_pylist()
    return [json.dumps(row, ensure_ascii=False, default=str) for row in rows]


def run_query(
    run_dir: Path,
    sql: str,
    output_format: OutputFormat = "table",
    output: Path | None = None,
    max_rows: int = 40,
) -> str:
    """Run ``sql`` against the run's views; write the result to ``output`` or return it as text.

    With ``output``, ``table`` means CSV. JSON is one object per line.
    """
    if output_format == "parquet" and output is None:
        raise QueryError("parquet output needs an output file")
    with connect_scored(run_dir) as con:
        try:
            return _render(con.sql(sql), output_format, output, max_rows)
        except duckdb.Error as error:
            raise QueryError(f"query failed: {error}") from error


def render_rows(
    rows: pa.Table, output_format: OutputFormat, output: Path | None, max_rows: int = 40
) -> str:
    """Rows computed elsewhere (`klstream top`'s) printed or written exactly as a query's."""
    if output_format == "parquet" and output is None:
        raise QueryError("parquet output needs an output file")
    with duckdb.connect() as con:
        return _render(con.from_arrow(rows), output_format, output, max_rows)


def _render(
    relation: duckdb.DuckDBPyRelation | None,
    output_format: OutputFormat,
    output: Path | None,
    max_rows: int,
) -> str:
    if relation is None:
        return ""
    if output is not None:
        with atomic_path(output) as tmp:
            _write(relation, output_format, tmp)
        return f"wrote {thousands(relation.shape[0])} rows to {output}"
    if output_format == "table":
        rendered = io.StringIO()
        with contextlib.redirect_stdout(rendered):
            relation.show(max_rows=max_rows, max_width=200)
        return rendered.getvalue().rstrip("\n")
    if output_format == "json":
        return "\n".join(_json_lines(relation))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "result.csv"
        relation.write_csv(str(path))
        return path.read_text(encoding="utf-8").rstrip("\n")
