"""The whole dataflow in one call: explode → score → KL pass → export → report.

``klstream run`` is :func:`run` behind click, and ``klstream score`` is :func:`score` (scoring,
then the KL pass); a notebook calls them or awaits :func:`run_async` and :func:`score_async`.
The run directory lives inside the output directory
(:attr:`klstream.storage.rundir.ExportDir.workspace`), so one folder holds the spec's files and the
Parquet tables they came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from klstream.backends.base import Endpoint
from klstream.errors import ExportFailed, OutputError, RunExists, describe_os_error
from klstream.input.explode import (
    ExplodeReport,
    explode,
    input_files,
    inputs_changed,
    inputs_current,
)
from klstream.loop import run_blocking
from klstream.metrics.kl import compute_kl
from klstream.output.export import ExportReport, export
from klstream.output.report import ReportResult, write_report
from klstream.scoring.dryrun import DryRunOptions, DryRunReport, dry_run_async
from klstream.scoring.options import ScoreOptions
from klstream.scoring.score import ScoreReport, score_positions_async
from klstream.scoring.session import ScoreStats
from klstream.storage.health import damaged_positions, require_readable_inputs
from klstream.storage.rundir import ExportDir, RunDir
from klstream.storage.runlock import model2_writer, positions_writer


@dataclass(frozen=True)
class RunOptions:
    """What to read and how to score it."""

    score: ScoreOptions
    pattern: str = "*.json"
    max_files: int | None = None
    report: bool = True
    """Write the HTML report beside the exported files."""


@dataclass(frozen=True)
class RunReport:
    """What each stage did. ``exported`` is None while positions remain unscored."""

    run_dir: Path
    exploded: ExplodeReport | None
    """None when an earlier run's positions, from the same input files, were reused."""
    scored: ScoreReport
    exported: ExportReport | None
    report: ReportResult | None
    """None while positions remain unscored, or when no report was asked for."""


async def score_async(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
    stale_outputs: Sequence[Path] = (),
) -> ScoreReport:
    """Score every pending position of ``run_dir`` against ``options.model2``
    (:func:`klstream.scoring.score.score_positions_async`), then run the KL pass over whatever
    has a result, so that an export can follow at once. ``stale_outputs`` are files made from
    the results an ``overwrite`` replaces, removed with them."""
    scored = await score_positions_async(run_dir, options, endpoint, on_progress, stale_outputs)
    if not scored.stats.done:
        return scored
    kl = await asyncio.to_thread(compute_kl, run_dir, options.model2)
    return replace(scored, kl=kl)


def score(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
) -> ScoreReport:
    """:func:`score_async`, blocking; inside a running event loop (Jupyter) it runs in a thread."""
    return run_blocking(score_async(run_dir, options, endpoint, on_progress))


async def run_async(
    input_dir: Path,
    output_dir: Path,
    options: RunOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
    on_exploded: Callable[[ExplodeReport], None] | None = None,
) -> RunReport:
    """Explode ``input_dir`` (unless its positions are already there), score every position,
    export when complete, and write the report.

    The whole run holds its run directory's lock (:mod:`klstream.storage.runlock`): a second
    ``run`` of the same output directory is refused at once. Positions built from other input
    files than the ones given now are replaced under ``overwrite`` and refused under ``resume``.
    """
    exports = ExportDir(output_dir)
    run = exports.workspace
    created, created_output = not run.root.exists(), not output_dir.exists()
    if created:  # a mistyped input directory creates nothing
        await asyncio.to_thread(input_files, input_dir, options.pattern, options.max_files)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the run directory: {describe_os_error(error)}") from error
    try:
        with positions_writer(run), model2_writer(run, options.score.model2):
            stale = exports.outputs()
            exploded = await _explode_unless_current(input_dir, run, options, stale, on_exploded)
            scored = await score_async(run.root, options.score, endpoint, on_progress, stale)
            exported = report = None
            if not scored.remaining:
                exported = await _export(run, output_dir, options.score.model2)
                if options.report:
                    report = await asyncio.to_thread(write_report, run.root, exports.report)
    except BaseException:
        if created and not run.is_exploded():
            _remove_empty_workspace(run)
            if created_output:
                with contextlib.suppress(OSError):
                    output_dir.rmdir()
        raise
    return RunReport(run.root, exploded, scored, exported, report)


async def _explode_unless_current(
    input_dir: Path,
    run: RunDir,
    options: RunOptions,
    stale_outputs: list[Path],
    on_exploded: Callable[[ExplodeReport], None] | None,
) -> ExplodeReport | None:
    """Explode, or keep the positions already there when they come from the same input files
    (exploding those again when the positions are damaged: the results keyed to them stay).

    New positions from other inputs invalidate every Model 2's results and the outputs made
    from them, so those go first.
    """
    score = options.score
    if run.is_exploded():
        if not (score.resume or score.overwrite):
            raise RunExists(f"{run.root} already holds a run")
        changes = await asyncio.to_thread(
            inputs_changed, input_dir, run.root, options.pattern, options.max_files
        )
        if changes is not None and not score.overwrite:
            raise changes
        same = changes is None and await asyncio.to_thread(
            inputs_current, input_dir, run.root, options.pattern, options.max_files
        )
        if same or not score.overwrite:
            if damaged_positions(run) is None:
                return None
            if not same:
                require_readable_inputs(run)
        else:
            for stage in run.stage_dirs:
                shutil.rmtree(stage, ignore_errors=True)
            for path in stale_outputs:
                path.unlink(missing_ok=True)
    exploded = await asyncio.to_thread(
        explode,
        input_dir,
        run.root,
        pattern=options.pattern,
        max_files=options.max_files,
        overwrite=True,
    )
    if on_exploded is not None:
        on_exploded(exploded)
    return exploded


async def _export(run: RunDir, output_dir: Path, model2: str) -> ExportReport:
    """The export of a complete run; when it cannot be written, say that the scores are kept."""
    try:
        return await asyncio.to_thread(export, run.root, output_dir, model2)
    except OutputError as error:
        raise ExportFailed(
            f"every position is scored and kept in {run.root}, but the export failed: {error}",
            run.root,
            output_dir,
            model2,
        ) from error


def _remove_empty_workspace(run: RunDir) -> None:
    """Undo the creation of a workspace that never got positions (bad input, say)."""
    for lock in (run.positions_lock, *run.model2_locks()):
        lock.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run.root.rmdir()


def run(
    input_dir: Path,
    output_dir: Path,
    options: RunOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
    on_exploded: Callable[[ExplodeReport], None] | None = None,
) -> RunReport:
    """:func:`run_async`, blocking; inside a running event loop it runs in a thread."""
    return run_blocking(
        run_async(input_dir, output_dir, options, endpoint, on_progress, on_exploded)
    )


async def dry_run_inputs_async(
    input_dir: Path,
    output_dir: Path,
    options: RunOptions,
    dry: DryRunOptions,
    endpoint: Endpoint | None = None,
) -> DryRunReport:
    """What :func:`run_async` would take: over its run directory when it exists, else over the
    inputs exploded into a temporary one (explode sends nothing), which is then removed."""
    run = ExportDir(output_dir).workspace
    if run.is_exploded():
        return await dry_run_async(run.root, options.score, dry, endpoint)
    with tempfile.TemporaryDirectory(prefix="klstream-dry-run-") as scratch:
        run_dir = Path(scratch) / "run"
        await asyncio.to_thread(
            explode, input_dir, run_dir, pattern=options.pattern, max_files=options.max_files
        )
        return await dry_run_async(run_dir, options.score, dry, endpoint)


def dry_run_inputs(
    input_dir: Path,
    output_dir: Path,
    options: RunOptions,
    dry: DryRunOptions,
    endpoint: Endpoint | None = None,
) -> DryRunReport:
    """:func:`dry_run_inputs_async`, blocking."""
    return run_blocking(dry_run_inputs_async(input_dir, output_dir, options, dry, endpoint))
