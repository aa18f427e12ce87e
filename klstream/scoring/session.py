"""One scoring run as every scheduler sees it, and the one interface a scheduler implements.

:class:`Session` holds what a run shares whatever the way of scoring: its options, endpoint and
run directory, the configuration recorded in ``run.json``, the price entry, the counters
(:class:`ScoreStats`), the checkpoint, the probe, and the accounting of every result
(:meth:`Session.record`: counts, the stop after too many failures in a row, progress).
A :class:`Scheduler` decides which requests to make; :mod:`klstream.scoring.score` picks one
from its table and runs it in a session.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from klstream.backends.base import AUTO_THINKING, Answer, ClientSettings, Endpoint, Prefill
from klstream.backends.checks import served_elsewhere
from klstream.backends.prices import Price, Usage
from klstream.backends.thinking import thinking_choice
from klstream.backends.transport import Caller, CallStats
from klstream.errors import ModelSubstituted
from klstream.numbers import thousands
from klstream.preflight import Capabilities, answer_capabilities
from klstream.scoring.checkpoint import Checkpointer
from klstream.scoring.options import ScoreOptions
from klstream.scoring.pool import Probe, StopRun
from klstream.scoring.runconfig import result_parameters, save_config
from klstream.storage import schemas
from klstream.storage.replacement import Replacement
from klstream.storage.rundir import RunDir


@dataclass
class BatchProgress:
    """What a batch run waits on, for the progress line."""

    jobs: Counter[str] = field(default_factory=Counter)
    """Jobs by state: the service's state once submitted, else the manifest's stage."""
    service_done: int = 0
    service_total: int = 0
    """Lines the services report done, of the lines of jobs that report counts."""


@dataclass
class ScoreStats:
    """Counters for progress and the final report."""

    total: int = 0
    already_done: int = 0
    scored: int = 0
    failed: int = 0
    answers: int = 0
    """Successful requests, each covering one or more positions."""
    usage: Usage = field(default_factory=Usage)
    """Token usage of every answer, the greedy probe's included."""
    calls: CallStats = field(default_factory=CallStats)
    batch: BatchProgress | None = None
    """Set while batch jobs are being waited for."""
    recovered: int = 0
    """Answers a killed run had journaled, stored at the start of this one."""
    served_elsewhere: Counter[str] = field(default_factory=Counter)
    """Answers the service says another model gave than the one asked for, by that model."""
    quarantined: list[str] = field(default_factory=list)
    """Damaged parts moved to quarantine at the start: their positions are pending again."""
    nothing_to_resume: str | None = None
    """Set when a run asked to resume finds nothing of its Model 2 to resume (no result, no
    batch job) and so starts a full run: the sentence that says so, naming the Model 2s that
    do have results here (a mistyped name is then plain to see)."""

    @property
    def done(self) -> int:
        return self.already_done + self.scored + self.failed

    @property
    def remaining(self) -> int:
        """Positions still without a successful result."""
        return self.total - self.already_done - self.scored


@dataclass(frozen=True)
class BatchSummary:
    """Where a batch run left its jobs."""

    jobs: dict[str, int]
    live_jobs: int
    positions_in_jobs: int
    """Lines (positions asked at) held by jobs not yet collected."""
    waited: bool
    rounds: int = 1
    """Rounds of jobs this run submitted or continued (more than 1 only with lookahead)."""


ProgressCallback = Callable[[ScoreStats], None]


class Session:
    """One run's shared state and the accounting of its results."""

    def __init__(
        self,
        run: RunDir,
        options: ScoreOptions,
        endpoint: Endpoint,
        stats: ScoreStats,
        config: dict[str, Any],
        prices: dict[str, Price],
        price: Price | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.run, self.options, self.endpoint, self.stats = run, options, endpoint, stats
        self.config = config
        """What ``run.json`` says; the greedy probe's outcome and what the first answer showed
        are added to it."""
        self.prices, self.price = prices, price
        self.on_progress = on_progress
        self.checkpoint = Checkpointer(
            run, options.model2, options.checkpoint_rows, options.checkpoint_seconds
        )
        self.probe = Probe(endpoint.url, options.policy.probe_budget_s, stats.calls)
        self.replacement: Replacement | None = None
        """An overwrite in progress, committed at the run's first answer."""
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.capabilities: Capabilities | None = None
        """What this run's first answer showed, once it has come."""

    @property
    def settings(self) -> ClientSettings:
        """What every request of the run shares, with the thinking budget ``run.json`` settled
        on: a resumed ``auto`` sends what the first run found, and never searches again."""
        options = self.options
        budget = self.config.get("thinking_budget", options.thinking_budget)
        return ClientSettings.of(options.model2, options.max_concurrent, budget)

    def answered(self, prefill: Prefill, answer: Answer) -> None:
        """After an answer by prefill: at the run's first, the budget ``auto`` settled on (into
        ``run.json`` and every part from then on) and what the answer shows
        (:func:`~klstream.preflight.answer_capabilities`, the check's own judgement)."""
        if self.capabilities is not None:
            return
        choice = thinking_choice(prefill)
        if self.config.get("thinking_budget") == AUTO_THINKING and choice is not None:
            self.config["thinking_budget"] = choice.budget
            self.config["thinking"] = choice.recorded()
            self.checkpoint.config = result_parameters(self.config)
        budget = self.config.get("thinking_budget", self.options.thinking_budget)
        options = self.options
        self.judged(answer_capabilities(answer, options.top_logprobs, options.model2, budget))

    def judged(self, capabilities: Capabilities) -> None:
        """The run's first answer, judged: recorded in ``run.json`` under ``capabilities``."""
        self.capabilities = capabilities
        self.config["capabilities"] = capabilities.recorded()
        save_config(self.run, self.options.model2, self.config)

    def _check_served(self, rows: list[dict[str, Any]]) -> None:
        """Count the answers another model gave; stop at the first under
        ``require_model_version``."""
        answered = rows[0] if rows and rows[0]["status"] == schemas.SCORE_OK else None
        served = answered["served_model"] if answered else None
        if served is None or not served_elsewhere(served, self.options.model2):
            return
        self.stats.served_elsewhere[served] += 1
        if self.options.require_model_version:
            raise ModelSubstituted(
                f"the service says {served} answered where {self.options.model2} was asked"
            )

    def caller(self, max_concurrent: int | None = None) -> Caller:
        """A caller to the endpoint with the run's retry policy, counted in the run's stats,
        throttled at ``max_concurrent`` (the run's by default)."""
        ceiling = max_concurrent or self.options.max_concurrent
        return Caller(self.endpoint, self.options.policy, ceiling, self.stats.calls)

    async def record(
        self, rows: list[dict[str, Any]], answered: bool, usage: Usage | None = None
    ) -> None:
        """Count and checkpoint the rows of one request (``answered``: it got an answer, whose
        ``usage`` is the run's cost). Counted before the checkpoint's await: the rows are
        buffered at once, so they are saved even if the run is cancelled during a flush, and
        the counts must include them. Too many failed positions in a row stop the run."""
        stats = self.stats
        self._check_served(rows)
        scored = sum(row["status"] == schemas.SCORE_OK for row in rows)
        stats.scored += scored
        stats.failed += len(rows) - scored
        if usage is not None:
            stats.usage.add(usage)
            stats.answers += 1
        if answered:
            self.consecutive_failures = 0
            if self.replacement is not None and not self.replacement.committed:
                await asyncio.to_thread(self.replacement.commit)
        else:
            self.consecutive_failures += len(rows)
            self.last_error = rows[-1]["error"] if rows else None
        await self.checkpoint.add(rows)
        if self.consecutive_failures >= self.options.max_consecutive_failures:
            raise StopRun(
                f"{thousands(self.consecutive_failures)} positions in a row failed; the last said: "
                f"{self.last_error}"
            )
        if self.on_progress:
            self.on_progress(stats)


class Scheduler(ABC):
    """One way of scoring the session's pending positions."""

    decoding = "sample"
    """How lookahead tokens were generated: ``sample`` or ``greedy``."""

    def __init__(self, session: Session) -> None:
        """Made before the run configuration is checked: whatever the scheduler must check or
        clean up first is done here."""
        self.session = session

    @abstractmethod
    async def run(self) -> None:
        """Ask for the pending positions and record every outcome; :class:`StopRun` ends the
        run early with a reason."""

    def batch_summary(self) -> BatchSummary | None:
        """Where the run left its batch jobs; None for online scoring."""
        return None
