"""Stage 1 of the dataflow: explode Model 1's JSON files into one Parquet row per token position.

Every later stage reads ``positions.parquet`` and ``responses.parquet`` instead of the JSON, so the
input is validated once, here, and each problem is reported with its file and the JSON path of the
offending field. Files are parsed one at a time, so memory is bounded by the largest input file.
"""

from __future__ import annotations

import contextlib
import json
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate, islice
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from klstream import atomic
from klstream.errors import InputError, InputsChanged, KlstreamError
from klstream.input.manifest import input_changes, write_manifest
from klstream.rundir import RunDir
from klstream.runlock import positions_writer
from klstream.schemas import POSITIONS, RESPONSES, SKIPPED

ROW_GROUP_BYTES = 32 * 2**20
"""Arrow bytes gathered before a row group is written. One row group per input file would leave
thousands of tiny row groups that slow every later scan; this buffer stays small next to the parsed
JSON of a single file, so memory remains bounded by the largest file."""

POSITIONS_DICTIONARY_COLUMNS = [
    "stem",
    "response_index",
    "token",
    "token_id",
    "top_tokens.list.element",
    "top_token_ids.list.element",
]
"""The repetitive ``positions`` columns worth dictionary-encoding. Trying it on the nearly unique
logprobs, as Parquet does by default, about doubles the write time for no gain in size."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_SHOWN_CHARS = 60


@dataclass(frozen=True)
class ExplodeReport:
    """What an explode run wrote, for the CLI summary."""

    files: int
    """Input files read, including files skipped whole under ``skip_invalid``."""
    responses: int
    positions: int
    skipped: int
    """Rows of ``skipped.parquet``: skipped responses plus files skipped whole."""
    responses_text_mismatch: int
    """Responses whose tokens do not reproduce their text, so prefills differ from that text."""
    positions_path: Path
    responses_path: Path
    skipped_path: Path | None


def explode(
    input_dir: Path,
    run_dir: Path,
    *,
    pattern: str = "*.json",
    max_files: int | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
) -> ExplodeReport:
    """Validate every input file and write ``positions.parquet`` and ``responses.parquet``.

    Outputs appear only once every file has been read: on any error nothing in ``run_dir``
    changes. With ``skip_invalid`` a malformed response (or file) is recorded in
    ``skipped.parquet`` and left out instead of failing the run. Without it, a
    ``skipped.parquet`` left by an earlier run is removed, as it no longer describes the outputs.
    """
    files = input_files(input_dir, pattern, max_files)
    run = RunDir(run_dir)
    created_run_dir = _prepare_run_dir(run_dir)
    try:
        with positions_writer(run):
            totals = _explode_locked(
                run, input_dir, files, pattern, max_files, skip_invalid, overwrite
            )
    except BaseException:
        if created_run_dir:
            run.positions_lock.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    return ExplodeReport(
        files=len(files),
        responses=totals.responses,
        positions=totals.positions,
        skipped=totals.skipped,
        responses_text_mismatch=totals.responses_text_mismatch,
        positions_path=run.positions,
        responses_path=run.responses,
        skipped_path=run.skipped if skip_invalid else None,
    )


def _explode_locked(
    run: RunDir,
    input_dir: Path,
    files: list[Path],
    pattern: str,
    max_files: int | None,
    skip_invalid: bool,
    overwrite: bool,
) -> _Totals:
    """Write the outputs while holding the run's lock. The old manifest goes before the new
    positions replace the old ones and the new manifest comes after, so a manifest never
    describes positions it did not produce."""
    positions_path, responses_path, skipped_path = run.positions, run.responses, run.skipped
    if positions_path.exists() and not overwrite:
        raise KlstreamError(
            f"{positions_path} already exists: pass --overwrite to replace it, "
            "or pick another run dir"
        )
    later_stages = [stage for stage in run.stage_dirs if stage.is_dir()]
    if any(any(stage.iterdir()) for stage in later_stages):
        raise KlstreamError(
            f"{run.root} holds Model 2 results (scores/, kl/) keyed to its current positions; "
            "replacing the positions would silently mismatch them. Use a new run dir, or move "
            "those results away first"
        )
    atomic.sweep_stale_temporaries(run.root)
    positions_tmp = atomic.temporary_sibling(positions_path)
    responses_tmp = atomic.temporary_sibling(responses_path)
    skipped_tmp = atomic.temporary_sibling(skipped_path) if skip_invalid else None
    try:
        totals = _write_outputs(files, positions_tmp, responses_tmp, skipped_tmp)
        run.inputs_manifest.unlink(missing_ok=True)
        if skipped_tmp is not None:
            atomic.commit(skipped_tmp, skipped_path)
        else:
            skipped_path.unlink(missing_ok=True)
        atomic.commit(responses_tmp, responses_path)
        atomic.commit(positions_tmp, positions_path)
    finally:
        for temporary in (positions_tmp, responses_tmp, skipped_tmp):
            if temporary is not None:
                temporary.unlink(missing_ok=True)
    write_manifest(run.inputs_manifest, input_dir, files, pattern, max_files)
    return totals


def inputs_changed(
    input_dir: Path, run_dir: Path, pattern: str = "*.json", max_files: int | None = None
) -> InputsChanged | None:
    """How the files explode would read now differ from those ``run_dir``'s positions were built
    from; None when they are the same, or when the run records no inputs (older releases)."""
    files = input_files(input_dir, pattern, max_files)
    return input_changes(RunDir(run_dir).inputs_manifest, run_dir, input_dir, files)


def input_files(input_dir: Path, pattern: str, max_files: int | None) -> list[Path]:
    """The files to read, in stem order, which is the row order of every output."""
    if max_files is not None and max_files < 1:
        raise KlstreamError(f"--max-files must be at least 1, got {max_files}")
    if not input_dir.exists():
        raise KlstreamError(f"input directory {input_dir} does not exist")
    if not input_dir.is_dir():
        raise KlstreamError(f"input path {input_dir} is not a directory")
    try:
        matched = sorted(path for path in input_dir.glob(pattern) if path.is_file())
    except (ValueError, NotImplementedError) as error:
        raise KlstreamError(f"invalid --pattern {pattern!r}: {error}") from error
    if not matched:
        empty = " (the directory is empty)" if not any(input_dir.iterdir()) else ""
        raise KlstreamError(
            f"no input files: --pattern {pattern!r} matches no file in {input_dir}{empty}"
        )
    files = matched[:max_files]
    by_stem: dict[str, Path] = {}
    for path in files:
        if not _encodable(str(path)):
            raise KlstreamError(f"input file name {str(path)!r} is not valid UTF-8: rename it")
        first = by_stem.setdefault(path.stem, path)
        if first is not path:
            raise KlstreamError(
                f"input files {first} and {path} have the same stem {path.stem!r}; the stem "
                "identifies a file in every output, so narrow --pattern or rename one of them"
            )
    return sorted(files, key=lambda path: path.stem)


def _prepare_run_dir(run_dir: Path) -> bool:
    """Create ``run_dir`` if needed; True when this call created it, so a failure can remove it."""
    if run_dir.is_dir():
        return False
    if run_dir.exists():
        raise KlstreamError(f"run dir {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise KlstreamError(f"cannot create run dir {run_dir}: {error}") from error
    return True


@dataclass
class _Totals:
    responses: int = 0
    positions: int = 0
    skipped: int = 0
    responses_text_mismatch: int = 0


def _write_outputs(
    files: list[Path], positions_tmp: Path, responses_tmp: Path, skipped_tmp: Path | None
) -> _Totals:
    """Read the files one by one into the temporary outputs; the caller renames them into place.

    Problems are recorded into ``skipped_tmp`` when it is given, and raised otherwise.
    """
    totals = _Totals()
    skipped_rows: list[dict[str, object]] = []
    with (
        _RowGroupWriter(positions_tmp, POSITIONS, POSITIONS_DICTIONARY_COLUMNS) as positions_out,
        _RowGroupWriter(responses_tmp, RESPONSES) as responses_out,
    ):
        for path in files:
            exploded = _explode_file(path, skip_invalid=skipped_tmp is not None)
            positions_out.write(exploded.positions)
            responses_out.write(exploded.responses)
            skipped_rows.extend(exploded.skipped)
            totals.positions += exploded.positions.num_rows
            totals.responses += exploded.responses.num_rows
            totals.responses_text_mismatch += exploded.text_mismatches
    totals.skipped = len(skipped_rows)
    if skipped_tmp is not None:
        skipped = pa.Table.from_pylist(skipped_rows, schema=SKIPPED)
        pq.write_table(skipped, skipped_tmp, compression="zstd")
    return totals


class _RowGroupWriter:
    """A Parquet writer that gathers the small per-file tables into row groups of a useful size."""

    def __init__(
        self, path: Path, schema: pa.Schema, dictionary_columns: list[str] | None = None
    ) -> None:
        use_dictionary = True if dictionary_columns is None else dictionary_columns
        self._writer = pq.ParquetWriter(
            path, schema, compression="zstd", use_dictionary=use_dictionary
        )
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        if self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending))
            self._pending = []
            self._pending_bytes = 0

    def __enter__(self) -> _RowGroupWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Flush only on success: after an error the file is deleted, so just release it."""
        try:
            if exc_type is None:
                self._flush()
        finally:
            self._writer.close()


class _Invalid(Exception):
    """A malformed field, located relative to the value being read; callers prepend their part."""

    def __init__(self, json_path: str, reason: str) -> None:
        super().__init__(json_path, reason)
        self.json_path = json_path
        self.reason = reason

    def under(self, prefix: str) -> _Invalid:
        return _Invalid(prefix + self.json_path, self.reason)


@dataclass
class _ExplodedFile:
    positions: pa.Table
    responses: pa.Table
    skipped: list[dict[str, object]]
    text_mismatches: int


def _explode_file(path: Path, *, skip_invalid: bool) -> _ExplodedFile:
    """Read one file; a problem with the whole file skips it, one inside a response skips that."""
    source, stem = str(path), path.stem

    def skip(response_index: int | None, problem: _Invalid) -> dict[str, object]:
        """The ``skipped.parquet`` row for ``problem``, or raise it when not skipping."""
        if not skip_invalid:
            raise InputError(source, problem.json_path, problem.reason) from None
        return {
            "source_path": source,
            "stem": stem,
            "response_index": response_index,
            "json_path": problem.json_path,
            "reason": problem.reason,
        }

    try:
        prompt, file_model, responses = _file_fields(_read_json(path))
    except _Invalid as problem:
        skipped_file = [skip(None, problem)]
        return _ExplodedFile(POSITIONS.empty_table(), RESPONSES.empty_table(), skipped_file, 0)
    rows = _FileRows()
    skipped = []
    for index, response in enumerate(responses):
        try:
            rows.add(index, _explode_response(response, file_model))
        except _Invalid as problem:
            skipped.append(skip(index, problem.under(f"$.responses[{index}]")))
    mismatches = rows.tokens_match_text.count(False)
    return _ExplodedFile(
        rows.positions_table(stem), rows.responses_table(stem, prompt, source), skipped, mismatches
    )


def _read_json(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise _Invalid("$", f"cannot read the file: {error.strerror or error}") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = f"0x{raw[error.start]:02x}"
        reason = f"not valid UTF-8: byte {byte} at offset {error.start} ({error.reason})"
        raise _Invalid("$", reason) from error
    del raw  # free the bytes before json builds the much larger parsed objects
    if not text.strip():
        raise _Invalid("$", "invalid JSON: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _Invalid(
            "$", f"invalid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except ValueError as error:
        raise _Invalid("$", f"invalid JSON: {error}") from error
    except RecursionError as error:
        raise _Invalid("$", "invalid JSON: nested too deeply to parse") from error


def _file_fields(document: object) -> tuple[str, str | None, list[object]]:
    """The prompt, the file-level model (the fallback for responses naming none), the responses."""
    if type(document) is not dict:
        raise _Invalid("$", f"expected a JSON object at the top level, got {_describe(document)}")
    try:
        prompt = _string(document, "prompt")
        file_model = _string(document, "model") if document.get("model") is not None else None
        responses = document.get("responses")
        if type(responses) is not list:
            raise _field_problem(document, "responses", "a list")
    except _Invalid as problem:
        raise problem.under("$") from None
    return prompt, file_model, responses


@dataclass
class _Response:
    """One validated response, as flat column values."""

    model1: str
    text: str
    tokens_match_text: bool
    tokens: list[str]
    token_ids: list[int | None]
    logprobs: list[float]
    top_counts: list[int]
    top_tokens: list[str]
    top_token_ids: list[int | None]
    top_logprobs: list[float]


def _explode_response(response: object, file_model: str | None) -> _Response:
    """Validate one response; paths in the errors it raises are relative to the response."""
    if type(response) is not dict:
        raise _Invalid("", f"expected an object, got {_describe(response)}")
    text = _string(response, "text")
    if response.get("model") is not None:
        model1 = _string(response, "model")
    elif file_model is not None:
        model1 = file_model
    else:
        raise _Invalid(
            ".model",
            "missing required key 'model': neither the response nor the file names its model",
        )
    logprobs = response.get("logprobs")
    if type(logprobs) is not dict:
        raise _field_problem(response, "logprobs", "an object")
    content = logprobs.get("content")
    if type(content) is not list:
        raise _field_problem(logprobs, "content", "a list").under(".logprobs")

    tokens: list[str] = []
    token_ids: list[int | None] = []
    chosen_logprobs: list[float] = []
    top_counts: list[int] = []
    top_tokens: list[str] = []
    top_token_ids: list[int | None] = []
    top_logprobs: list[float] = []
    for position, entry in enumerate(content):
        try:
            token, token_id, logprob = _scored_token(entry)
            alternatives = entry.get("top_logprobs")
            if type(alternatives) is not list or not alternatives:
                raise _field_problem(entry, "top_logprobs", "a non-empty list")
            for rank, alternative in enumerate(alternatives):
                try:
                    top_token, top_token_id, top_logprob = _scored_token(alternative)
                except _Invalid as problem:
                    raise problem.under(f".top_logprobs[{rank}]") from None
                top_tokens.append(top_token)
                top_token_ids.append(top_token_id)
                top_logprobs.append(top_logprob)
        except _Invalid as problem:
            raise problem.under(f".logprobs.content[{position}]") from None
        tokens.append(token)
        token_ids.append(token_id)
        chosen_logprobs.append(logprob)
        top_counts.append(len(alternatives))

    bad = _first_unencodable(tokens)
    if bad is not None:
        raise _Invalid(f".logprobs.content[{bad}].token", _unencodable_reason(tokens[bad]))
    bad = _first_unencodable(top_tokens)
    if bad is not None:
        ends = list(accumulate(top_counts))
        position = bisect_right(ends, bad)
        rank = bad - (ends[position - 1] if position else 0)
        raise _Invalid(
            f".logprobs.content[{position}].top_logprobs[{rank}].token",
            _unencodable_reason(top_tokens[bad]),
        )
    return _Response(
        model1=model1,
        text=text,
        tokens_match_text="".join(tokens) == text,
        tokens=tokens,
        token_ids=token_ids,
        logprobs=chosen_logprobs,
        top_counts=top_counts,
        top_tokens=top_tokens,
        top_token_ids=top_token_ids,
        top_logprobs=top_logprobs,
    )


def _scored_token(entry: object) -> tuple[str, int | None, float]:
    """Validate one ``{token, logprob, token_id?}`` object: a chosen token or an alternative.

    This runs for every top-k entry, so the common case is a few exact type checks.
    """
    if type(entry) is not dict:
        raise _Invalid("", f"expected an object, got {_describe(entry)}")
    token = entry.get("token")
    if type(token) is not str:
        raise _field_problem(entry, "token", "a string")
    logprob = entry.get("logprob")
    if type(logprob) is not float:
        logprob = _integral_logprob(entry)
    if not -math.inf < logprob <= 0.0:
        raise _Invalid(".logprob", f"expected a finite number <= 0, got {_describe(logprob)}")
    token_id = entry.get("token_id")
    if token_id is not None and (
        type(token_id) is not int or not _INT64_MIN <= token_id <= _INT64_MAX
    ):
        raise _token_id_problem(token_id)
    return token, token_id, logprob


def _token_id_problem(token_id: object) -> _Invalid:
    if type(token_id) is int:
        reason = f"expected an integer that fits in 64 bits, got {_describe(token_id)}"
        return _Invalid(".token_id", reason)
    return _Invalid(".token_id", f"expected an integer or null, got {_describe(token_id)}")


def _integral_logprob(entry: dict[str, object]) -> float:
    """A logprob written as a JSON integer such as ``0``; any other non-float is an error."""
    logprob = entry.get("logprob")
    if type(logprob) is not int:
        raise _field_problem(entry, "logprob", "a number")
    try:
        return float(logprob)
    except OverflowError:
        reason = f"expected a finite number <= 0, got {_describe(logprob)}"
        raise _Invalid(".logprob", reason) from None


def _string(obj: dict[str, object], key: str) -> str:
    """A required string field, which must also be storable as UTF-8."""
    value = obj.get(key)
    if type(value) is not str:
        raise _field_problem(obj, key, "a string")
    if not _encodable(value):
        raise _Invalid(f".{key}", _unencodable_reason(value))
    return value


def _field_problem(obj: dict[str, object], key: str, expected: str) -> _Invalid:
    """Explain why ``obj[key]`` failed its type check: absent, or of the wrong kind."""
    if key not in obj:
        return _Invalid(f".{key}", f"missing required key {key!r}")
    return _Invalid(f".{key}", f"expected {expected}, got {_describe(obj[key])}")


def _first_unencodable(strings: list[str]) -> int | None:
    """Index of the first string Arrow cannot store as UTF-8: one holding a lone surrogate, which
    a JSON escape such as ``"\\ud83d"`` produces. One encode of the concatenation keeps the common
    case fast; joining never creates a surrogate, so a failure means some single string has one."""
    try:
        "".join(strings).encode()
    except UnicodeEncodeError:
        return next(index for index, value in enumerate(strings) if not _encodable(value))
    return None


def _encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unencodable_reason(value: str) -> str:
    return (
        f"expected valid Unicode text, got {_describe(value)}, which holds a lone UTF-16 surrogate"
    )


def _describe(value: object) -> str:
    """Show a value as the JSON file writes it, so a reason reads 'got true', not 'got True'."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    shown = json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()
    return shown if len(shown) <= _MAX_SHOWN_CHARS else shown[:_MAX_SHOWN_CHARS] + "..."


@dataclass
class _FileRows:
    """The columns of one file's valid responses, as flat lists turned into Arrow arrays at once."""

    response_index: list[int] = field(default_factory=list)
    model1: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    tokens_match_text: list[bool] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    char_offset: list[int] = field(default_factory=list)
    token: list[str] = field(default_factory=list)
    token_id: list[int | None] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
    top_counts: list[int] = field(default_factory=list)
    top_tokens: list[str] = field(default_factory=list)
    top_token_ids: list[int | None] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def add(self, index: int, response: _Response) -> None:
        num_tokens = len(response.tokens)
        self.response_index.append(index)
        self.model1.append(response.model1)
        self.text.append(response.text)
        self.num_tokens.append(num_tokens)
        self.tokens_match_text.append(response.tokens_match_text)
        self.position.extend(range(num_tokens))
        self.char_offset.extend(
            islice(accumulate(map(len, response.tokens), initial=0), num_tokens)
        )
        self.token.extend(response.tokens)
        self.token_id.extend(response.token_ids)
        self.logprob.extend(response.logprobs)
        self.top_counts.extend(response.top_counts)
        self.top_tokens.extend(response.top_tokens)
        self.top_token_ids.extend(response.top_token_ids)
        self.top_logprobs.extend(response.top_logprobs)

    def positions_table(self, stem: str) -> pa.Table:
        rows = len(self.token)
        offsets = pa.array(np.cumsum([0, *self.top_counts], dtype=np.int32), pa.int32())
        response_index = np.repeat(np.asarray(self.response_index, np.int32), self.num_tokens)
        return pa.Table.from_arrays(
            [
                pa.repeat(stem, rows),
                pa.array(response_index, pa.int32()),
                pa.array(self.position, pa.int32()),
                pa.array(self.token, pa.string()),
                pa.array(self.token_id, pa.int64()),
                pa.array(self.logprob, pa.float64()),
                pa.ListArray.from_arrays(offsets, pa.array(self.top_tokens, pa.string())),
                pa.ListArray.from_arrays(offsets, pa.array(self.top_token_ids, pa.int64())),
                pa.ListArray.from_arrays(offsets, pa.array(self.top_logprobs, pa.float64())),
                pa.array(self.char_offset, pa.int64()),
            ],
            schema=POSITIONS,
        )

    def responses_table(self, stem: str, prompt: str, source: str) -> pa.Table:
        rows = len(self.response_index)
        return pa.Table.from_arrays(
            [
                pa.repeat(stem, rows),
                pa.array(self.response_index, pa.int32()),
                pa.repeat(prompt, rows),
                pa.array(self.model1, pa.string()),
                pa.array(self.text, pa.string()),
                pa.array(self.num_tokens, pa.int32()),
                pa.array(self.tokens_match_text, pa.bool_()),
                pa.repeat(source, rows),
            ],
            schema=RESPONSES,
        )
