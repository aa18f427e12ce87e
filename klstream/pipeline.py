"""The whole dataflow in one call: explode → score (→ KL pass) → export → report.

``klstream run`` is this function behind click; a notebook calls :func:`run` or awaits
:func:`run_async`. The run directory lives inside the output directory
(:attr:`klstream.rundir.ExportDir.workspace`), so one folder holds the spec's files and the
Parquet tables they came from.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from klstream.backends.base import Endpoint
from klstream.errors import RunExists
from klstream.input.explode import ExplodeReport, explode
from klstream.loop import run_blocking
from klstream.output.export import ExportReport, export
from klstream.output.report import ReportResult, write_report
from klstream.rundir import ExportDir
from klstream.scoring.dryrun import DryRunOptions, DryRunReport, dry_run_async
from klstream.scoring.score import ScoreOptions, ScoreReport, ScoreStats, score_async


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
    """None when an earlier run's positions were reused (resume)."""
    scored: ScoreReport
    exported: ExportReport | None
    report: ReportResult | None
    """None while positions remain unscored, or when no report was asked for."""


async def run_async(
    input_dir: Path,
    output_dir: Path,
    options: RunOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
    on_exploded: Callable[[ExplodeReport], None] | None = None,
) -> RunReport:
    """Explode ``input_dir`` (unless resuming), score every position, export when complete."""
    exports = ExportDir(output_dir)
    run = exports.workspace
    exploded: ExplodeReport | None = None
    if run.is_exploded():
        if not (options.score.resume or options.score.overwrite):
            raise RunExists(f"{run.root} already holds a run")
    else:
        exploded = await asyncio.to_thread(
            explode, input_dir, run.root, pattern=options.pattern, max_files=options.max_files
        )
        if on_exploded is not None:
            on_exploded(exploded)
    scored = await score_async(run.root, options.score, endpoint, on_progress)
    exported = report = None
    if not scored.remaining:
        exported = await asyncio.to_thread(export, run.root, output_dir, options.score.model2)
        if options.report:
            report = await asyncio.to_thread(write_report, run.root, exports.report)
    return RunReport(run.root, exploded, scored, exported, report)


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
