"""Export: per-response statistics and the spec's ``<stem>_kl.json`` files, plus a run summary.

The statistics come from DuckDB (``sql/views.sql``'s ``response_stats``); this module only shapes
rows into the spec's JSON layout and writes the files. Every file is written to a temporary name
first and all of them are renamed into place only once every one has been written; then
``summary.json``, which lists them, marks the export complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import duckdb

from klstream.errors import AmbiguousModel2, NoResults, OutputError, describe_os_error
from klstream.metrics.kl import connect_scored
from klstream.numbers import thousands
from klstream.storage.atomic import (
    commit,
    sweep_stale_temporaries,
    temporary_sibling,
    write_text_atomic,
)
from klstream.storage.database import RANGE_POSITIONS, ranged
from klstream.storage.rundir import ExportDir
from klstream.storage.sqlfiles import load_sql

_SPEC_RESPONSE_KEYS = ("text", "num_tokens", "kl_per_token", "token_details", "statistics")
_EXTRA_RESPONSE_KEYS = ("response_index", "tokens_match_text", "unscored_positions")


@dataclass(frozen=True)
class ExportReport:
    model2: str
    files: list[Path]
    summary: dict[str, Any]
    summary_path: Path


def scored_models(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [name for (name,) in con.execute(load_sql("scored_models")).fetchall()]


def resolve_model2(con: duckdb.DuckDBPyConnection, run_dir: Path, model2: str | None) -> str:
    """The model2 to export: the one asked for, or the only one the run has KL results for."""
    available = scored_models(con)
    if model2 is not None:
        if model2 not in available:
            raise NoResults(
                f"{run_dir} has no KL results for model2 {model2!r} "
                f"(available: {', '.join(available) or 'none'})"
            )
        return model2
    if len(available) == 1:
        return available[0]
    if not available:
        raise NoResults(f"{run_dir} has no KL results yet")
    raise AmbiguousModel2(f"{run_dir} has KL results for several models ({', '.join(available)})")


def _response_rows(
    con: duckdb.DuckDBPyConnection, model2: str, range_positions: int
) -> Iterator[dict[str, Any]]:
    """Export rows in key order, one range of responses at a time to bound DuckDB's memory."""
    for relation in ranged(con, "export_responses", {"model2": model2}, range_positions):
        for batch in relation.to_arrow_reader(256):
            yield from batch.to_pylist()


def response_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One response in the spec's layout, extra keys after the spec's."""
    return {key: row[key] for key in (*_SPEC_RESPONSE_KEYS, *_EXTRA_RESPONSE_KEYS)}


def file_document(model2: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``_kl.json`` document for the responses of one input file."""
    first = rows[0]
    return {
        "prompt": first["prompt"],
        "model1": first["model1"],
        "model2": model2,
        "num_responses": len(rows),
        "responses": [response_entry(row) for row in rows],
        "source_path": first["source_path"],
    }


def summarize(con: duckdb.DuckDBPyConnection, model2: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = (
        con.sql(load_sql("summary"), params={"model2": model2}).to_arrow_table().to_pylist()
    )
    answers = con.sql(load_sql("answers"), params={"model2": model2}).to_arrow_table()
    return {**rows[0], **answers.to_pylist()[0], "cost": cost_summary(con, model2)}


def cost_summary(con: duckdb.DuckDBPyConnection, model2: str) -> dict[str, Any] | None:
    """Requests, tokens by kind and USD of ``model2``'s results (the ``costs`` view); None for
    runs whose results carry no usage (scored before it was recorded, or without run.json)."""
    rows: list[dict[str, Any]] = (
        con.sql(load_sql("cost_summary"), params={"model2": model2}).to_arrow_table().to_pylist()
    )
    return rows[0] if rows and rows[0]["uncached_input_tokens"] is not None else None


def _cost_lines(cost: dict[str, Any] | None) -> list[str]:
    if cost is None:
        return []
    lines = [
        f"Requests:      {thousands(cost['requests']):>10}   "
        f"{_fmt(cost['requests_per_position'], 0, 3)} "
        f"per position; input tokens {thousands(cost['uncached_input_tokens'])} uncached + "
        f"{thousands(cost['cached_input_tokens'])} cached, output tokens "
        f"{thousands(cost['output_tokens'])}",
    ]
    if cost["usd"] is not None:
        lines.append(
            f"Cost (list):   ${cost['usd']:.4f} (batch ${cost['batch_usd']:.4f}), "
            f"${cost['usd_per_1000_positions']:.4f} per 1,000 positions, at "
            f"{cost['priced_as']}'s prices of {cost['price_date']}"
        )
    if cost["lookahead_hazards"]:
        lines.append(
            f"Note: {thousands(cost['lookahead_hazards'])} results came from lookahead steps in "
            "responses "
            "whose tokens do not reproduce their text (see the lookahead_hazards view)"
        )
    return lines


def _answer_lines(summary: dict[str, Any]) -> list[str]:
    """Where the answers say something a reader must not miss: logprobs left out, another
    model answering."""
    lines = []
    if summary["dropped_logprobs"]:
        lines.append(
            f"Logprobs left out: {thousands(summary['dropped_logprobs'])} unusable top-k entries "
            f"(sentinels, NaN, ±inf, null) at "
            f"{thousands(summary['positions_with_dropped_logprobs'])} "
            "positions; never taken as values"
        )
    served = summary["served_models"] or []
    if summary["positions_from_other_models"]:
        names = ", ".join(f"{entry['model']} ({thousands(entry['positions'])})" for entry in served)
        lines.append(
            f"Served by:         {names} positions: "
            f"{thousands(summary['positions_from_other_models'])} "
            f"results came from another model than {summary['model2']}"
        )
    return lines


def _fmt(value: float | None, width: int = 10, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a".rjust(width)
    return f"{value:{width}.{digits}f}"


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a text table, in the manner of llama.cpp's ``--kl-divergence``."""
    s = summary
    percentiles = [
        ("99.9%", "p99_9_kl"),
        ("99.0%", "p99_kl"),
        ("95.0%", "p95_kl"),
        ("90.0%", "p90_kl"),
        ("Median", "p50_kl"),
        ("10.0%", "p10_kl"),
        ("5.0%", "p05_kl"),
        ("1.0%", "p01_kl"),
    ]

    def mean_line(label: str, key: str) -> str:
        return f"{label:<27}{_fmt(s[key])} ± {_fmt(s[key + '_stderr'], 8)}"

    return "\n".join(
        [
            f"====== KL divergence: {', '.join(s['model1'] or [])} -> {s['model2']} ======",
            f"Responses:     {thousands(s['responses']):>10}",
            f"Positions:     {thousands(s['positions']):>10}   scored {thousands(s['scored'])}, "
            f"failed {thousands(s['failed'])}, "
            f"unscored {thousands(s['unscored'])} (failed and unscored are excluded from every "
            "figure)",
            f"Mean    KLD:   {_fmt(s['mean_kl'])} ± {_fmt(s['mean_kl_stderr'], 8)}",
            f"Maximum KLD:   {_fmt(s['max_kl'])}",
            *[f"{label:<7} KLD:   {_fmt(s[key])}" for label, key in percentiles],
            f"Minimum KLD:   {_fmt(s['min_kl'])}",
            f"Same top token:{_fmt(_percent(s['top1_agreement']), 10, 3)} ± "
            f"{_fmt(_percent(s['top1_agreement_stderr']), 6, 3)} %",
            "M1 token outside M2 top-k: "
            f"{_fmt(_percent(s['m1_token_outside_m2_topk_rate']), 7, 3)} %",
            mean_line("Mean KL estimate:", "mean_kl_estimate"),
            mean_line("Mean KL lower bound:", "mean_kl_lower"),
            mean_line("Mean log-ratio (MC KL):", "mean_logratio"),
            f"{'Tail variance σ̂²:':<27}{_fmt(s['tail_sigma2'])}",
            *_answer_lines(s),
            *_cost_lines(s.get("cost")),
        ]
    )


def summary(run_dir: Path, model2: str | None = None) -> dict[str, Any]:
    """Run-level figures for one Model 2 (the only one when ``model2`` is None)."""
    with connect_scored(run_dir) as con:
        return summarize(con, resolve_model2(con, run_dir, model2))


def export(
    run_dir: Path,
    output_dir: Path,
    model2: str | None = None,
    range_positions: int = RANGE_POSITIONS,
) -> ExportReport:
    """Write one ``<stem>_kl.json`` per input file and ``summary.json`` into ``output_dir``.

    ``summary.json`` is removed first and written last, listing the files of this export: when
    it is there, the export it names is complete. A file system that refuses a write raises
    :class:`~klstream.errors.OutputError`.
    """
    exports = ExportDir(output_dir)
    with connect_scored(run_dir) as con:
        chosen = resolve_model2(con, run_dir, model2)
        try:
            files = _write_kl_files(con, exports, chosen, range_positions)
            run_summary = summarize(con, chosen)
            document = {**run_summary, "files": [path.name for path in files]}
            write_text_atomic(
                exports.summary, json.dumps(document, indent=2, allow_nan=False) + "\n"
            )
        except OSError as error:
            raise OutputError(f"cannot write {output_dir}: {describe_os_error(error)}") from error
    return ExportReport(chosen, files, run_summary, exports.summary)


def _write_kl_files(
    con: duckdb.DuckDBPyConnection, exports: ExportDir, model2: str, range_positions: int
) -> list[Path]:
    """Every ``_kl.json`` to a temporary name, then all renamed into place."""
    exports.root.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(exports.root)
    exports.summary.unlink(missing_ok=True)
    written: list[tuple[Path, Path]] = []
    try:
        rows_in_order = _response_rows(con, model2, range_positions)
        for stem, rows in groupby(rows_in_order, key=lambda row: row["stem"]):
            final = exports.kl_json(stem)
            tmp = temporary_sibling(final)
            written.append((tmp, final))
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(
                    file_document(model2, list(rows)),
                    handle,
                    ensure_ascii=False,
                    allow_nan=False,
                    indent=1,
                )
        for tmp, final in written:
            commit(tmp, final)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    return [final for _, final in written]
