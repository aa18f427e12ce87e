"""Stage 1 of the dataflow: explode Model 1's JSON files into one Parquet row per token position.

Every later stage reads ``positions.parquet`` and ``responses.parquet`` instead of the JSON, so the
input is validated once, here (the checks themselves live in :mod:`klstream.input.validate`), and
each problem is reported with its file and the JSON path of the offending field. Files are parsed
one at a time, so memory is bounded by the largest input file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import accumulate, islice
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from klstream.errors import (
    InputError,
    InputsChanged,
    InputSelectionError,
    PositionsExist,
    RunDirError,
)
from klstream.input.manifest import input_changes, write_manifest
from klstream.input.validate import (
    Invalid,
    ValidResponse,
    encodable,
    file_fields,
    read_json,
    validate_response,
)
from klstream.storage import atomic
from klstream.storage.health import inputs_record
from klstream.storage.rundir import RunDir
from klstream.storage.runlock import positions_writer
from klstream.storage.schemas import POSITIONS, RESPONSES, SKIPPED

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
        raise PositionsExist(f"{positions_path} already exists")
    later_stages = [stage for stage in run.stage_dirs if stage.is_dir()]
    if any(any(stage.iterdir()) for stage in later_stages) and not same_inputs(
        run, input_dir, files, pattern, max_files
    ):
        raise RunDirError(
            f"{run.root} holds Model 2 results (scores/, kl/) keyed to its current positions; "
            "replacing the positions with those of other input files would silently mismatch "
            "them. Use a new run dir, or move those results away first"
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


def same_inputs(
    run: RunDir, input_dir: Path, files: list[Path], pattern: str, max_files: int | None
) -> bool:
    """Whether the run's record says its positions were built from these very files, the same
    way: exploding them again gives the same positions (rebuilding damaged ones), so the
    results keyed to them stay right."""
    record = inputs_record(run)
    return (
        record is not None
        and record.get("pattern") == pattern
        and record.get("max_files") == max_files
        and input_changes(run, input_dir, files) is None
    )


def inputs_changed(
    input_dir: Path, run_dir: Path, pattern: str = "*.json", max_files: int | None = None
) -> InputsChanged | None:
    """How the files explode would read now differ from those ``run_dir``'s positions were built
    from; None when they are the same, or when the run records no inputs (older releases)."""
    files = input_files(input_dir, pattern, max_files)
    return input_changes(RunDir(run_dir), input_dir, files)


def inputs_current(
    input_dir: Path, run_dir: Path, pattern: str = "*.json", max_files: int | None = None
) -> bool:
    """Whether ``run_dir``'s positions were built from the files explode would read now, the
    same way (:func:`same_inputs`): exploding them again keeps the results keyed to them."""
    files = input_files(input_dir, pattern, max_files)
    return same_inputs(RunDir(run_dir), input_dir, files, pattern, max_files)


def input_files(input_dir: Path, pattern: str, max_files: int | None) -> list[Path]:
    """The files to read, in stem order, which is the row order of every output."""
    if max_files is not None and max_files < 1:
        raise InputSelectionError(f"max_files must be at least 1, got {max_files}")
    if not input_dir.exists():
        raise InputSelectionError(f"input directory {input_dir} does not exist")
    if not input_dir.is_dir():
        raise InputSelectionError(f"input path {input_dir} is not a directory")
    try:
        matched = sorted(path for path in input_dir.glob(pattern) if path.is_file())
    except (ValueError, NotImplementedError) as error:
        raise InputSelectionError(f"invalid file pattern {pattern!r}: {error}") from error
    if not matched:
        empty = " (the directory is empty)" if not any(input_dir.iterdir()) else ""
        raise InputSelectionError(
            f"no input files: the pattern {pattern!r} matches no file in {input_dir}{empty}"
        )
    files = matched[:max_files]
    by_stem: dict[str, Path] = {}
    for path in files:
        if not encodable(str(path)):
            raise InputSelectionError(
                f"input file name {str(path)!r} is not valid UTF-8: rename it"
            )
        first = by_stem.setdefault(path.stem, path)
        if first is not path:
            raise InputSelectionError(
                f"input files {first} and {path} have the same stem {path.stem!r}; the stem "
                "identifies a file in every output, so narrow the pattern or rename one of them"
            )
    return sorted(files, key=lambda path: path.stem)


def _prepare_run_dir(run_dir: Path) -> bool:
    """Create ``run_dir`` if needed; True when this call created it, so a failure can remove it."""
    if run_dir.is_dir():
        return False
    if run_dir.exists():
        raise RunDirError(f"run dir {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise RunDirError(f"cannot create run dir {run_dir}: {error}") from error
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


@dataclass
class _ExplodedFile:
    positions: pa.Table
    responses: pa.Table
    skipped: list[dict[str, object]]
    text_mismatches: int


def _explode_file(path: Path, *, skip_invalid: bool) -> _ExplodedFile:
    """Read one file; a problem with the whole file skips it, one inside a response skips that."""
    source, stem = str(path), path.stem

    def skip(response_index: int | None, problem: Invalid) -> dict[str, object]:
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
        prompt, file_model, responses = file_fields(read_json(path))
    except Invalid as problem:
        skipped_file = [skip(None, problem)]
        return _ExplodedFile(POSITIONS.empty_table(), RESPONSES.empty_table(), skipped_file, 0)
    rows = _FileRows()
    skipped = []
    for index, response in enumerate(responses):
        try:
            rows.add(index, validate_response(response, file_model))
        except Invalid as problem:
            skipped.append(skip(index, problem.under(f"$.responses[{index}]")))
    mismatches = rows.tokens_match_text.count(False)
    return _ExplodedFile(
        rows.positions_table(stem), rows.responses_table(stem, prompt, source), skipped, mismatches
    )


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

    def add(self, index: int, response: ValidResponse) -> None:
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
