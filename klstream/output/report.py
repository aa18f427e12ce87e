"""The run as one self-contained HTML file: overview, response table, token heat maps.

Data flow: DuckDB runs ``sql/report_*.sql``, ``sql/summary.sql`` and ``sql/top_tokens.sql`` over
the run's views; numpy turns the columns into compact typed arrays; they travel as one binary
payload (a JSON header, then little-endian arrays stored byte plane by byte plane, see
:meth:`Payload.encode`) compressed with gzip and base64-encoded inside the page, which the
browser's ``DecompressionStream`` unpacks (``templates/report.js`` mirrors every encoding here).
The Jinja2 template inlines its CSS and JS: the file needs no server and loads nothing over the
network.

Scale: a run of 10,000 responses × 500 tokens cannot carry every top-k list, so every position
carries its token (an index into a token dictionary), one byte per estimator (KL, normalized KL,
kl_estimate, log-ratio: log-scale quantized, :class:`LogScale` / :class:`SignedLogScale`) and one
byte of flags per Model 2. Full top-k lists (logprobs in fixed point, :data:`LOGPROB_UNITS`) and
exact estimators ride along only for *detail* responses: those named with ``detail``, then the
most divergent by mean and by max KL until ``detail_positions`` positions. ``only`` writes a page
for chosen responses, all of them with detail.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from markupsafe import Markup

from klstream import __version__
from klstream.errors import KlstreamError, NoResults
from klstream.metrics.kl import connect_scored
from klstream.numbers import thousands
from klstream.output.export import scored_models, summarize
from klstream.output.top import DEFAULT_CONTEXT, TopQuery, top_tokens
from klstream.storage import schemas
from klstream.storage.atomic import write_text_atomic
from klstream.storage.database import ResponseRange, ranged, response_ranges
from klstream.storage.health import inputs_record
from klstream.storage.rundir import RunDir
from klstream.storage.sqlfiles import load_sql

DEFAULT_DETAIL_POSITIONS = 50_000
"""About 100 responses of 500 tokens: some 10 MB of top-k lists (bench/report_bench.py)."""
DEFAULT_TOP_TOKENS = 100
POSITION_BUCKETS = 200
PAYLOAD_MAGIC = b"KLR1"
_ALIGN = 8

FLAG_ERROR = 1
FLAG_UNSCORED = 2
FLAG_OUTSIDE_TOPK = 4
FLAG_TOP1_DIFFERS = 8

ResponseKey = tuple[str, int]

COST_FIGURES = (
    "requests",
    "requests_per_position",
    "uncached_input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "thoughts_tokens",
    "usd",
    "batch_usd",
    "priced_as",
    "price_date",
)
"""What the overview shows of the ``costs`` view, the figures ``klstream export`` prints
(:func:`klstream.output.export.cost_summary`), by the same names."""


@dataclass(frozen=True)
class LogScale:
    """Non-negative values in one byte: 0 is null, 1..255 are equal steps of log10 over
    [low, high] (values outside are clamped, 0 included, to the ends)."""

    low: float
    high: float

    @property
    def step(self) -> float:
        return (self.high - self.low) / 254

    def encode(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.clip(np.log10(values), self.low, self.high)
        codes = 1 + np.rint((logs - self.low) / self.step)
        return np.where(np.isnan(values), 0, codes).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        values = 10.0 ** (self.low + (codes.astype(np.float64) - 1) * self.step)
        return np.where(codes == 0, np.nan, values)

    def describe(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


@dataclass(frozen=True)
class SignedLogScale:
    """Signed values in one byte: 0 is null, 128 is |x| < 10^low, 129..255 are positive values
    and 127..1 negative ones, in equal steps of log10 |x| over [low, high]."""

    low: float
    high: float

    @property
    def step(self) -> float:
        return (self.high - self.low) / 126

    def encode(self, values: np.ndarray) -> np.ndarray:
        magnitude = np.abs(values)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.clip(np.log10(magnitude), self.low, self.high)
            level = np.rint((logs - self.low) / self.step)
            codes = np.where(values > 0, 129 + level, 127 - level)
        codes = np.where(magnitude < 10.0**self.low, 128, codes)
        return np.where(np.isnan(values), 0, codes).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        as_float = codes.astype(np.float64)
        positive = 10.0 ** (self.low + (as_float - 129) * self.step)
        negative = -(10.0 ** (self.low + (127 - as_float) * self.step))
        values = np.where(codes > 128, positive, np.where(codes < 128, negative, 0.0))
        return np.where(codes == 0, np.nan, values)

    def describe(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


KL_SCALE = LogScale(-8.0, 2.0)
"""KL from 1e-8 to 100 in steps of 0.039 decade: values shown to within ±4.6%."""
LOGRATIO_SCALE = SignedLogScale(-4.0, 2.0)
"""|log-ratio| from 1e-4 to 100 in steps of 0.048 decade: within ±5.6%."""


@dataclass(frozen=True)
class ReportOptions:
    detail: tuple[ResponseKey, ...] = ()
    """Responses that carry full top-k detail whatever the budget."""
    detail_positions: int = DEFAULT_DETAIL_POSITIONS
    """Budget for the responses chosen by KL: the sum of their lengths stays within it."""
    only: tuple[ResponseKey, ...] = ()
    """Write a page with just these responses, each with full detail."""
    top_tokens: int = DEFAULT_TOP_TOKENS
    context: int = DEFAULT_CONTEXT


@dataclass(frozen=True)
class ReportResult:
    path: Path
    size_bytes: int
    responses: int
    positions: int
    detail_responses: int
    models: list[str]


@dataclass
class Payload:
    """What the page embeds: a JSON header and named typed arrays."""

    header: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self) -> bytes:
        """Magic, header length (u32 LE), header JSON, then every array 8-byte aligned.

        Section offsets in the header count from the first 8-byte boundary after the header.
        An array of wider items is stored byte plane by byte plane (every item's first byte,
        then every second byte, ...): gzip finds far more repeats in the high bytes that way.
        """
        table: dict[str, list[Any]] = {}
        blobs: list[bytes] = []
        offset = 0
        for name, array in self.sections.items():
            little = array.astype(array.dtype.newbyteorder("<"), copy=False)
            table[name] = [little.dtype.name, offset, len(little)]
            blob = little.view(np.uint8).reshape(-1, little.dtype.itemsize).T.tobytes()
            padding = -len(blob) % _ALIGN
            blobs.append(blob + b"\0" * padding)
            offset += len(blob) + padding
        header = json.dumps(
            {**self.header, "sections": table}, ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
        head = PAYLOAD_MAGIC + len(header).to_bytes(4, "little") + header
        head += b"\0" * (-len(head) % _ALIGN)
        return head + b"".join(blobs)


def parse_response_key(text: str) -> ResponseKey:
    """``STEM:INDEX`` as a response key (the stem may itself contain colons)."""
    stem, _, index = text.rpartition(":")
    if not stem or not index.isdigit():
        raise KlstreamError(f"{text!r} is not a response as STEM:INDEX (e.g. story-3:0)")
    return stem, int(index)


def _execute(
    con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any] | None = None
) -> pa.Table:
    return con.sql(load_sql(name), params=params or {}).to_arrow_table()


def _floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A float column as float64 with NaN for null."""
    return np.asarray(
        pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    )


def _ints(column: pa.ChunkedArray | pa.Array, dtype: type[np.generic]) -> np.ndarray:
    return np.asarray(pc.fill_null(column, 0).to_numpy(zero_copy_only=False)).astype(dtype)


def _bools(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean column, null as false."""
    return np.asarray(pc.fill_null(column, False).to_numpy(zero_copy_only=False), dtype=bool)


LOGPROB_UNITS = 10_000
"""Top-k logprobs in the page are integers of 1e-4: exact to the four decimals it shows."""
MISSING_LOGPROB = np.iinfo(np.int32).min


def _fixed_point_logprobs(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    values = _floats(column) * LOGPROB_UNITS
    return np.where(np.isnan(values), MISSING_LOGPROB, np.rint(values)).astype(np.int32)


def _json_floats(values: Iterable[float | None]) -> list[float | None]:
    """JSON has no NaN: missing figures go as null."""
    return [None if v is None or v != v else float(v) for v in values]


def _clean_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (None if isinstance(value, float) and value != value else value)
        for key, value in summary.items()
    }


def _ranges(con: duckdb.DuckDBPyConnection, only: tuple[ResponseKey, ...]) -> list[ResponseRange]:
    if only:
        return [ResponseRange(stem, index, stem, index) for stem, index in sorted(set(only))]
    return response_ranges(con)


def _range_tables(
    con: duckdb.DuckDBPyConnection,
    name: str,
    ranges: list[ResponseRange],
    extra: dict[str, Any] | None = None,
) -> Iterator[pa.Table]:
    for relation in ranged(con, name, extra or {}, ranges=ranges):
        yield relation.to_arrow_table()


@dataclass
class _Detail:
    """Responses that carry full top-k lists: their table rows, in detail order."""

    rows: list[int]
    keys: list[ResponseKey]


class _Builder:
    """Assembles the :class:`Payload` of one report from one DuckDB connection."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, run_dir: Path, options: ReportOptions
    ) -> None:
        self.con = con
        self.run_dir = run_dir
        self.options = options
        self.models = scored_models(con)
        if not self.models:
            raise NoResults(f"{run_dir} has no KL results yet")
        self.ranges = _ranges(con, options.only)
        """Never empty: a run with KL results has responses (an empty run has no KL results)."""
        self.payload = Payload()
        self.token_columns: dict[str, pa.Array] = {}
        """Token strings to encode with the dictionary, by the name of their section."""

    def build(self) -> Payload:
        keys = self._responses()
        self._run_figures()
        self._positions()
        self._detail(keys)
        self._top_tokens(keys)
        self._dictionary()
        return self.payload

    def _responses(self) -> dict[ResponseKey, int]:
        responses = pa.concat_tables(_range_tables(self.con, "report_responses", self.ranges))
        if self.options.only:
            self._require_known(self.options.only, responses)
        stems = pc.dictionary_encode(responses.column("stem").combine_chunks())
        prompts = pc.dictionary_encode(responses.column("prompt").combine_chunks())
        num_tokens = _ints(responses.column("num_tokens"), np.uint32)
        sections = self.payload.sections
        sections["response/stem"] = _ints(stems.indices, np.uint32)
        sections["response/index"] = _ints(responses.column("response_index"), np.int32)
        sections["response/prompt"] = _ints(prompts.indices, np.uint32)
        sections["response/num_tokens"] = num_tokens
        sections["response/match_text"] = _bools(responses.column("tokens_match_text")).astype(
            np.uint8
        )
        sections["response/offset"] = np.concatenate([[0], np.cumsum(num_tokens)]).astype(np.uint32)
        for m, model2 in enumerate(self.models):
            stats = pa.concat_tables(
                _range_tables(self.con, "report_response_stats", self.ranges, {"model2": model2})
            )
            for name in (
                "mean_kl",
                "max_kl",
                "total_kl",
                "mean_normalized_kl",
                "mean_kl_estimate",
                "top1_agreement",
            ):
                sections[f"response/{m}/{name}"] = _floats(stats.column(name))
            for name in ("scored", "failed", "unscored", "outside_topk"):
                sections[f"response/{m}/{name}"] = _ints(stats.column(name), np.uint32)
        self.payload.header["stems"] = stems.dictionary.to_pylist()
        self.payload.header["prompts"] = prompts.dictionary.to_pylist()
        stem_list = responses.column("stem").to_pylist()
        index_list = responses.column("response_index").to_pylist()
        return {key: row for row, key in enumerate(zip(stem_list, index_list, strict=True))}

    def _require_known(self, wanted: Iterable[ResponseKey], responses: pa.Table) -> None:
        known = set(
            zip(
                responses.column("stem").to_pylist(),
                responses.column("response_index").to_pylist(),
                strict=True,
            )
        )
        missing = [f"{stem}:{index}" for stem, index in wanted if (stem, index) not in known]
        if missing:
            raise KlstreamError(f"{self.run_dir} has no response {', '.join(missing)}")

    def _run_figures(self) -> None:
        header = self.payload.header
        header["models"] = self.models
        summaries = []
        for model2 in self.models:
            summary = _clean_summary(summarize(self.con, model2))
            figures = _execute(self.con, "report_run_figures", {"model2": model2}).to_pylist()[0]
            cost = summary["cost"] or {}
            summaries.append(
                {
                    **summary,
                    **figures,
                    **{key: cost.get(key) for key in COST_FIGURES},
                    "usage_recorded": bool(cost),
                    "resume": self._resume_command(model2),
                }
            )
        header["summaries"] = summaries
        header["title"] = self._title(summaries)
        histogram = _execute(self.con, "report_histogram").to_pylist()
        header["histogram"] = [
            [row["bin"] for row in histogram if row["model2"] == model2] for model2 in self.models
        ]
        header["histogram_counts"] = [
            [row["positions"] for row in histogram if row["model2"] == model2]
            for model2 in self.models
        ]
        by_position = _execute(self.con, "report_by_position", {"buckets": POSITION_BUCKETS})
        rows = by_position.to_pylist()
        header["by_position"] = [
            {
                "start": [r["start"] for r in rows if r["model2"] == model2],
                "width": rows[0]["width"] if rows else 1,
                "mean_kl": _json_floats(r["mean_kl"] for r in rows if r["model2"] == model2),
                "scored": [r["scored"] for r in rows if r["model2"] == model2],
            }
            for model2 in self.models
        ]

    def _resume_command(self, model2: str) -> str:
        """``klstream score`` with ``--resume`` and the settings run.json says a resumed run must
        repeat; the endpoint is not recorded, so it is the backend's default (or its
        environment variable, as for any command)."""
        words = ["klstream", "score", str(self.run_dir.resolve()), "--model2", model2]
        rows = _execute(self.con, "report_run_config", {"model2": model2}).to_pylist()
        if rows:
            config = rows[0]
            words += ["--backend", config["backend"]] if config["backend"] else []
            if config["top_logprobs"] is not None:
                words += ["--top-logprobs", str(config["top_logprobs"])]
            if config["temperature"] is not None:
                words += ["--temperature", f"{config['temperature']:g}"]
            words += ["--thinking-budget", config["thinking_budget"] or "none"]
        return shlex.join([*words, "--resume"])

    def _title(self, summaries: list[dict[str, Any]]) -> str:
        """What was compared: the inputs (their directory's name, or the stems) and the models."""
        stems = self.payload.header["stems"]
        record = inputs_record(RunDir(self.run_dir))
        input_dir = record.get("input_dir") if record else None
        files = f"{thousands(len(stems))} file" + ("" if len(stems) == 1 else "s")
        if len(stems) <= 3:
            inputs = ", ".join(stems)
        elif input_dir:
            inputs = f"{Path(input_dir).name} ({files})"
        else:
            inputs = f"{stems[0]} … {stems[-1]} ({files})"
        model1 = sorted({name for summary in summaries for name in summary["model1"] or []})
        return f"klstream: {inputs} — {', '.join(model1) or 'Model 1'} vs {', '.join(self.models)}"

    def _positions(self) -> None:
        """Per position: the token, and per Model 2 the quantized estimators and flags."""
        sections = self.payload.sections
        tokens = [
            table.column("token").combine_chunks()
            for table in _range_tables(self.con, "report_tokens", self.ranges)
        ]
        token_array = pa.concat_arrays(tokens) if tokens else pa.array([], pa.string())
        expected = int(sections["response/offset"][-1])
        if len(token_array) != expected:
            raise KlstreamError(
                f"{self.run_dir}: responses.parquet counts {expected} tokens but "
                f"positions.parquet holds {len(token_array)}; explode the run again"
            )
        self.token_columns["tokens"] = token_array
        error_positions: list[np.ndarray] = []
        error_models: list[np.ndarray] = []
        error_messages: list[pa.Array] = []
        defaults = []
        for m, model2 in enumerate(self.models):
            parts: dict[str, list[np.ndarray]] = {
                "kl": [],
                "normalized": [],
                "logratio": [],
                "estimate": [],
                "flags": [],
            }
            start = 0
            for table in _range_tables(
                self.con, "report_token_values", self.ranges, {"model2": model2}
            ):
                parts["kl"].append(KL_SCALE.encode(_floats(table.column("kl_floor"))))
                parts["normalized"].append(KL_SCALE.encode(_floats(table.column("normalized_kl"))))
                parts["logratio"].append(LOGRATIO_SCALE.encode(_floats(table.column("logratio"))))
                parts["estimate"].append(KL_SCALE.encode(_floats(table.column("kl_estimate"))))
                parts["flags"].append(self._flags(table))
                errors = table.column("error").combine_chunks()
                where = np.flatnonzero(_bools(pc.is_valid(errors)))
                error_positions.append(start + where)
                error_models.append(np.full(len(where), m))
                error_messages.append(errors.take(pa.array(where)))
                start += table.num_rows
            for name, chunks in parts.items():
                sections[f"{name}/{m}"] = (
                    np.concatenate(chunks) if chunks else np.empty(0, np.uint8)
                )
            defaults.append(
                {
                    "kl": _percentile_90(KL_SCALE, sections[f"kl/{m}"]),
                    "normalized": _percentile_90(KL_SCALE, sections[f"normalized/{m}"]),
                    "logratio": _percentile_90(
                        LOGRATIO_SCALE, sections[f"logratio/{m}"], magnitude=True
                    ),
                    "estimate": _percentile_90(KL_SCALE, sections[f"estimate/{m}"]),
                }
            )
        messages = pc.dictionary_encode(pa.concat_arrays(error_messages))
        sections["errors/position"] = np.concatenate(error_positions).astype(np.uint32)
        sections["errors/model"] = np.concatenate(error_models).astype(np.uint8)
        sections["errors/message"] = _ints(messages.indices, np.uint32)
        header = self.payload.header
        header["error_messages"] = messages.dictionary.to_pylist()
        header["thresholds"] = defaults
        header["scales"] = {
            "kl": KL_SCALE.describe(),
            "logratio": LOGRATIO_SCALE.describe(),
            "logprob_units": LOGPROB_UNITS,
            "missing_logprob": int(MISSING_LOGPROB),
        }
        header["flags"] = {
            "error": FLAG_ERROR,
            "unscored": FLAG_UNSCORED,
            "outside_topk": FLAG_OUTSIDE_TOPK,
            "top1_differs": FLAG_TOP1_DIFFERS,
        }

    @staticmethod
    def _flags(table: pa.Table) -> np.ndarray:
        status = table.column("status")
        error = _bools(pc.equal(status, schemas.KL_STATUS_ERROR))
        unscored = _bools(pc.equal(status, schemas.KL_STATUS_UNSCORED))
        outside = _bools(pc.invert(table.column("m1_token_in_m2_topk")))
        differs = _bools(pc.invert(table.column("top1_agree")))
        flags: np.ndarray = (
            error * FLAG_ERROR
            + unscored * FLAG_UNSCORED
            + outside * FLAG_OUTSIDE_TOPK
            + differs * FLAG_TOP1_DIFFERS
        ).astype(np.uint8)
        return flags

    def _detail_choice(self, rows_of: dict[ResponseKey, int]) -> _Detail:
        """Named responses first, then by rank of KL within the positions budget."""
        if self.options.only:
            keys = sorted(set(self.options.only))
            return _Detail([rows_of[key] for key in keys], keys)
        named = list(dict.fromkeys(self.options.detail))
        unknown = [key for key in named if key not in rows_of]
        if unknown:
            missing = ", ".join(f"{stem}:{index}" for stem, index in unknown)
            raise KlstreamError(f"{self.run_dir} has no response {missing} (asked for in detail)")
        chosen = list(named)
        budget = self.options.detail_positions
        taken = set(chosen)
        for stem, index, length in self.con.execute(load_sql("report_detail_ranking")).fetchall():
            if budget < length:
                break
            if (stem, index) not in taken:
                chosen.append((stem, index))
                taken.add((stem, index))
                budget -= length
        return _Detail([rows_of[key] for key in chosen], chosen)

    def _detail(self, rows_of: dict[ResponseKey, int]) -> None:
        """Full top-k lists and exact estimators of the detail responses."""
        detail = self._detail_choice(rows_of)
        sections = self.payload.sections
        self.payload.header["detail_rows"] = detail.rows
        lengths = sections["response/num_tokens"][np.array(detail.rows, dtype=np.int64)]
        sections["detail/offset"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32)
        keys = pa.table(
            {
                "stem": pa.array([stem for stem, _ in detail.keys], pa.string()),
                "response_index": pa.array([index for _, index in detail.keys], pa.int32()),
                "detail_order": pa.array(range(len(detail.keys)), pa.int32()),
            }
        )
        self.con.register("detail_keys", keys)
        stems = sorted({stem for stem, _ in detail.keys})
        try:
            model1 = _execute(self.con, "report_detail_model1", {"stems": stems})
            self._lists(model1, "detail/m1")
            sections["detail/m1/logprob"] = _floats(model1.column("logprob")).astype(np.float32)
            for m, model2 in enumerate(self.models):
                model2_table = _execute(
                    self.con, "report_detail_model2", {"model2": model2, "stems": stems}
                )
                self._lists(model2_table, f"detail/{m}")
                for name in (
                    "kl_floor",
                    "kl_lower",
                    "kl_estimate",
                    "logratio",
                    "entropy1",
                    "entropy2",
                ):
                    sections[f"detail/{m}/{name}"] = _floats(model2_table.column(name)).astype(
                        np.float32
                    )
                sections[f"detail/{m}/logprob"] = _floats(
                    model2_table.column("model2_logprob")
                ).astype(np.float32)
        finally:
            self.con.unregister("detail_keys")

    def _lists(self, table: pa.Table, prefix: str) -> None:
        """A top-k list column pair as offsets, token strings (indexed later) and logprobs."""
        tokens = table.column("top_tokens").combine_chunks()
        logprobs = table.column("top_logprobs").combine_chunks()
        lengths = _ints(pc.list_value_length(tokens), np.int64)
        self.payload.sections[f"{prefix}/offset"] = np.concatenate(
            [[0], np.cumsum(lengths)]
        ).astype(np.uint32)
        self.payload.sections[f"{prefix}/logprobs"] = _fixed_point_logprobs(
            pc.list_flatten(logprobs)
        )
        self.token_columns[f"{prefix}/tokens"] = pc.list_flatten(tokens)

    def _top_tokens(self, rows_of: dict[ResponseKey, int]) -> None:
        lists = []
        for model2 in self.models:
            query = TopQuery(model2, limit=self.options.top_tokens, context=self.options.context)
            rows = top_tokens(self.con, query).to_pylist()
            lists.append(
                [
                    {
                        "row": rows_of.get((row["stem"], row["response_index"])),
                        "stem": row["stem"],
                        "response_index": row["response_index"],
                        "position": row["position"],
                        "token": row["token"],
                        "kl": row["kl"],
                        "normalized_kl": row["normalized_kl"],
                        "kl_estimate": row["kl_estimate"],
                        "logratio": row["logratio"],
                        "before": row["context_before"],
                        "after": row["context_after"],
                    }
                    for row in rows
                ]
            )
        self.payload.header["top_tokens"] = lists

    def _dictionary(self) -> None:
        """One dictionary for every token string the page shows; arrays of indices into it."""
        columns = {
            name: pc.fill_null(column.cast(pa.large_string()), "")
            for name, column in self.token_columns.items()
        }
        encoded = pc.dictionary_encode(pa.concat_arrays(list(columns.values())))
        dictionary = encoded.dictionary
        dtype = np.uint16 if len(dictionary) <= 1 << 16 else np.uint32
        indices = _ints(encoded.indices, dtype)
        start = 0
        for name, column in columns.items():
            self.payload.sections[name] = indices[start : start + len(column)]
            start += len(column)
        self.payload.header["dictionary"] = dictionary.to_pylist()


def _percentile_90(
    scale: LogScale | SignedLogScale, codes: np.ndarray, magnitude: bool = False
) -> float | None:
    """The 90th percentile of the non-null values: the heat map's starting threshold."""
    values = scale.decode(codes[codes > 0])
    if magnitude:
        values = np.abs(values)
    return float(np.percentile(values, 90)) if len(values) else None


def build_payload(run_dir: Path, options: ReportOptions | None = None) -> Payload:
    """Everything the page shows, as a :class:`Payload`."""
    chosen = options or ReportOptions()
    with connect_scored(run_dir) as con:
        payload = _Builder(con, run_dir, chosen).build()
    payload.header["meta"] = {
        "run_dir": str(run_dir.resolve()),
        "klstream_version": __version__,
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "detail_positions": chosen.detail_positions,
        "page_of": [f"{stem}:{index}" for stem, index in sorted(set(chosen.only))],
    }
    return payload


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("klstream.output", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def _asset(name: str) -> Markup:
    """A template asset (CSS, JS) inlined verbatim; it must never contain ``</``-tags."""
    loader = _ENVIRONMENT.loader
    assert loader is not None
    source, _, _ = loader.get_source(_ENVIRONMENT, name)
    return Markup(source)


def render(payload: Payload, title: str) -> str:
    """The HTML page; the payload is gzip-compressed and base64-encoded into it."""
    data = base64.b64encode(gzip.compress(payload.encode(), compresslevel=6, mtime=0))
    page: str = _ENVIRONMENT.get_template("report.html").render(
        title=title,
        meta=payload.header["meta"],
        models=payload.header["models"],
        style=_asset("report.css"),
        script=_asset("report.js"),
        payload=data.decode("ascii"),
    )
    return page


def write_report(
    run_dir: Path, output: Path | None = None, options: ReportOptions | None = None
) -> ReportResult:
    """Write the report of ``run_dir`` to ``output`` (default ``RUN_DIR/report.html``)."""
    RunDir(run_dir).require_exploded()
    target = output or RunDir(run_dir).report
    payload = build_payload(run_dir, options)
    header = payload.header
    page_of = header["meta"]["page_of"]
    title = f"{header['title']}: {', '.join(page_of)}" if page_of else header["title"]
    html = render(payload, title)
    write_text_atomic(target, html)
    return ReportResult(
        path=target,
        size_bytes=target.stat().st_size,
        responses=len(payload.sections["response/index"]),
        positions=int(payload.sections["response/offset"][-1]),
        detail_responses=len(header["detail_rows"]),
        models=list(header["models"]),
    )
