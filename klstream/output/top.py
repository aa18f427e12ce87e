"""The highest-KL tokens of a run with their context: ``klstream top`` and the report's list.

Both run ``sql/top_tokens.sql``, so the command and the report always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from klstream.metrics.kl import connect_scored
from klstream.output.export import resolve_model2
from klstream.storage.sqlfiles import load_sql

Score = Literal["kl", "normalized", "estimate"]
SCORES: tuple[Score, ...] = ("kl", "normalized", "estimate")
DEFAULT_LIMIT = 20
DEFAULT_CONTEXT = 8


@dataclass(frozen=True)
class TopQuery:
    """Which positions: one Model 2's (the run's only one when None), with ``score`` in
    [minimum, maximum], the highest first."""

    model2: str | None = None
    score: Score = "kl"
    minimum: float | None = None
    maximum: float | None = None
    limit: int | None = DEFAULT_LIMIT
    context: int = DEFAULT_CONTEXT

    def params(self) -> dict[str, object]:
        return {
            "model2": self.model2,
            "score": self.score,
            "min": self.minimum,
            "max": self.maximum,
            "limit": self.limit,
            "context": self.context,
        }


def top_tokens(con: duckdb.DuckDBPyConnection, query: TopQuery) -> pa.Table:
    """The rows of ``sql/top_tokens.sql`` for ``query``, highest score first."""
    return con.sql(load_sql("top_tokens"), params=query.params()).to_arrow_table()


def top_tokens_of_run(run_dir: Path, query: TopQuery) -> pa.Table:
    """:func:`top_tokens` over a run directory."""
    with connect_scored(run_dir) as con:
        model2 = resolve_model2(con, run_dir, query.model2)
        return top_tokens(con, replace(query, model2=model2))


def _visible(text: str) -> str:
    """Whitespace that would break a table row, shown as symbols."""
    return text.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def format_table(table: pa.Table) -> str:
    """A plain-text table: rank, KL, normalized KL, kl_estimate, where, and the token inside
    its context."""
    header = (
        f"{'#':>4}  {'kl':>10}  {'kl/(H1+H2)':>10}  {'kl_estimate':>11}  {'where':<28}  "
        "context ⟦token⟧"
    )
    lines = [header, "-" * len(header)]
    for rank, row in enumerate(table.to_pylist(), start=1):
        where = f"{row['stem']}:{row['response_index']}@{row['position']}"
        context = (
            f"{_visible(row['context_before'])}⟦{_visible(row['token'])}⟧"
            f"{_visible(row['context_after'])}"
        )
        lines.append(
            f"{rank:>4}  {row['kl']:>10.6f}  {_figure(row['normalized_kl']):>10}  "
            f"{_figure(row['kl_estimate']):>11}  {where:<28}  {context}"
        )
    if table.num_rows == 0:
        lines.append("(no position in that range)")
    return "\n".join(lines)
