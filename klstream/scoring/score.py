"""The Model 2 stage: score every pending position of a run directory with one of the ways of
scoring (:data:`METHODS`), in a session that owns nothing of any one of them.

:func:`score_positions_async` takes the run's writer lock, sweeps what killed runs left
half-written, makes the scheduler (which checks what it must), checks the run configuration
(:mod:`klstream.scoring.runconfig`), counts what is pending, and runs the scheduler with
SIGINT/SIGTERM stopping it cleanly; whatever happens, what was answered is checkpointed. The KL
pass that follows is the pipeline's (:func:`klstream.pipeline.score_async`).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from klstream.backends.base import Endpoint
from klstream.backends.prices import Price, load_prices, price_for
from klstream.preflight import Capabilities
from klstream.scoring.batch import BatchScheduler
from klstream.scoring.options import ScoreOptions
from klstream.scoring.pool import StopRun, stopping_on_signals
from klstream.scoring.prefill import PrefillScheduler
from klstream.scoring.prompt_logprobs import PromptLogprobsScheduler
from klstream.scoring.runconfig import check_run_config, result_parameters
from klstream.scoring.session import (
    BatchSummary,
    ProgressCallback,
    Scheduler,
    ScoreStats,
    Session,
)
from klstream.scoring.work import count_pending
from klstream.storage.atomic import sweep_stale_temporaries
from klstream.storage.health import require_readable_inputs
from klstream.storage.replacement import has_results
from klstream.storage.rundir import RunDir
from klstream.storage.runlock import model2_writer

if TYPE_CHECKING:
    from klstream.metrics.kl import KlReport

METHODS: dict[str, Callable[[Session], Scheduler]] = {
    "prefill": PrefillScheduler,
    "prompt-logprobs": PromptLogprobsScheduler,
}
"""The ways of asking Model 2 online, by ``--method`` name."""
BATCH: Callable[[Session], Scheduler] = BatchScheduler
"""Batch jobs: the prefill requests, submitted in bulk (``--batch``)."""


@dataclass(frozen=True)
class ScoreReport:
    stats: ScoreStats
    remaining: int
    kl: KlReport | None
    """The KL pass's report, when the pipeline ran it (:func:`klstream.pipeline.score_async`)."""
    stopped_because: str | None
    batch: BatchSummary | None = None
    """Where a batch run left its jobs; None for an online run."""
    price: Price | None = None
    """The price entry the run's costs are reckoned with (None: Model 2 has none)."""
    decoding: str = "sample"
    """How lookahead tokens were generated: ``sample`` or ``greedy``."""
    capabilities: Capabilities | None = None
    """What the run's first answer showed (None when it made no request); ``run.json`` keeps
    it under ``capabilities``."""


def scheduler_for(options: ScoreOptions) -> Callable[[Session], Scheduler]:
    """The scheduler of ``options``: batch jobs, or the online method's."""
    return BATCH if options.batch is not None else METHODS[options.method]


async def score_positions_async(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: ProgressCallback | None = None,
    stale_outputs: Sequence[Path] = (),
) -> ScoreReport:
    """Score every pending position of ``run_dir`` against ``options.model2`` (no KL pass).

    One process at a time scores a Model 2 of a run directory (:mod:`klstream.storage.runlock`);
    it starts by removing what killed runs left half-written. Under ``options.overwrite`` the
    results replaced are kept until the new run's first answer, and then removed with
    ``stale_outputs``, the outputs made from them (:mod:`klstream.storage.replacement`).
    """
    run = RunDir(run_dir)
    run.require_exploded()
    require_readable_inputs(run)
    with model2_writer(run, options.model2):
        sweep_stale_temporaries(run.scores_dir(options.model2))
        sweep_stale_temporaries(run.kl_path(options.model2).parent)
        created = not run.scores_dir(options.model2).exists()
        try:
            return await _score_locked(run, options, endpoint, on_progress, stale_outputs)
        except BaseException:
            if created:
                _forget_if_unanswered(run, options.model2)
            raise


def _holds_work(run: RunDir, model2: str) -> bool:
    """Whether ``model2`` has results (parts, journaled answers) or batch jobs in ``run``: what
    a resumed run continues."""
    return has_results(run, model2) or bool(run.batch_manifests(model2))


def _nothing_to_resume(run: RunDir, model2: str) -> str | None:
    """What a resumed run says when ``model2`` has no result and no batch job in ``run``."""
    if _holds_work(run, model2):
        return None
    others = sorted({parts[0].parent.name for parts in run.parts_by_model2() if parts})
    here = f" (the results here are for {', '.join(others)})" if others else ""
    return f"nothing to resume for {model2} in {run.root}: starting a full run{here}"


def _forget_if_unanswered(run: RunDir, model2: str) -> None:
    """Remove the scores folder a failed run made before any answer (a model name the service
    does not know, say): it holds only the run.json, which would list the model among the
    run's Model 2s (the ``run_configs`` view) as if it had been scored."""
    if _holds_work(run, model2) or run.greedy_probe_log(model2).exists():
        return
    shutil.rmtree(run.scores_dir(model2), ignore_errors=True)


async def _score_locked(
    run: RunDir,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: ProgressCallback | None,
    stale_outputs: Sequence[Path],
) -> ScoreReport:
    prices = load_prices(options.prices)
    price = price_for(options.model2, prices)
    stats = ScoreStats()
    session = Session(run, options, endpoint, stats, {}, prices, price, on_progress)
    scheduler = scheduler_for(options)(session)
    check = check_run_config(run, options, endpoint, price, stale_outputs)
    session.config, session.replacement = check.config, check.replacement
    stats.quarantined = [path.name for path in check.quarantined]
    if options.resume:
        stats.nothing_to_resume = _nothing_to_resume(run, options.model2)
    stopped: str | None = None
    try:
        stats.recovered = await session.checkpoint.open(result_parameters(check.config))
        stats.total, stats.already_done = await asyncio.to_thread(
            count_pending, run.root, options.model2
        )
        if on_progress is not None:
            on_progress(stats)
        with stopping_on_signals():
            await scheduler.run()
    except StopRun as stop:
        stopped = str(stop)
    except asyncio.CancelledError as cancelled:
        stopped = str(cancelled.args[0]) if cancelled.args else "cancelled"
    finally:
        await session.checkpoint.close()
        if session.replacement is not None:
            await asyncio.to_thread(session.replacement.restore)
    return ScoreReport(
        stats,
        stats.remaining,
        None,
        stopped,
        batch=scheduler.batch_summary(),
        price=price,
        decoding=scheduler.decoding,
        capabilities=session.capabilities,
    )
