"""The Model 2 stage: one prefill request per position, through one global async pipeline.

DuckDB lists the positions that still lack a successful result (``sql/pending_positions.sql``),
so a resumed run asks only for what is missing. Worker tasks share an adaptive limiter
(:mod:`klstream.scoring.throttle`); each request is retried by tenacity on transient failures,
waiting as long as the server asks (RetryInfo / Retry-After) or longer. Outcomes are checkpointed as
Parquet parts (:mod:`klstream.scoring.checkpoint`) every ``checkpoint_rows`` results or
``checkpoint_seconds``. A model that can never answer as needed (no prefill, thinking that
cannot be switched off, wrong credentials) stops the run at the first sign, not after thousands
of retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import pyarrow as pa

from klstream import __version__, schemas
from klstream.atomic import sweep_stale_temporaries, write_text_atomic
from klstream.backends.gemini import Endpoint, generation_config, prefill_contents
from klstream.database import RANGE_POSITIONS, connect, ranged
from klstream.errors import ResultsExist, RunConfigMismatch
from klstream.loop import run_blocking
from klstream.metrics.kl import KlReport, compute_kl
from klstream.rundir import RunDir
from klstream.runlock import model2_writer
from klstream.scoring.caller import Caller, CallStats, Outcome, RetryPolicy, open_caller
from klstream.scoring.checkpoint import write_scores_part
from klstream.sqlfiles import load_sql

RESULTS_FORMAT = 1
"""Version of what a stored result means. It changes only when results written by one release
cannot be mixed with another's; a resumed run compares it, never the package version."""
RESULT_PARAMETERS = ("results_format", "model2", "top_logprobs", "backend", "thinking_budget")
"""The recorded parameters that change results: a resumed run must share every one."""
WORKERS_PER_SLOT = 8
"""Positions in progress per slot of ``max_concurrent``."""


@dataclass(frozen=True)
class ScoreOptions:
    model2: str
    top_logprobs: int = 20
    max_concurrent: int = 16
    policy: RetryPolicy = RetryPolicy()
    thinking_budget: int | None = 0
    checkpoint_rows: int = 256
    checkpoint_seconds: float = 10.0
    resume: bool = False
    overwrite: bool = False
    max_consecutive_failures: int = 50
    range_positions: int = RANGE_POSITIONS
    """Positions of whole responses read from DuckDB at once (bounds its memory)."""

    def recorded(self, endpoint: Endpoint) -> dict[str, Any]:
        """``run.json``: the parameters that change results, and the version that wrote them."""
        return {
            "results_format": RESULTS_FORMAT,
            "model2": self.model2,
            "top_logprobs": self.top_logprobs,
            "backend": endpoint.backend,
            "thinking_budget": self.thinking_budget,
            "written_by": __version__,
        }


@dataclass
class ScoreStats:
    """Counters for progress and the final report."""

    total: int = 0
    already_done: int = 0
    scored: int = 0
    failed: int = 0
    calls: CallStats = field(default_factory=CallStats)

    @property
    def done(self) -> int:
        return self.already_done + self.scored + self.failed


@dataclass(frozen=True)
class ScoreReport:
    stats: ScoreStats
    remaining: int
    kl: KlReport | None
    stopped_because: str | None


@dataclass(frozen=True)
class WorkItem:
    stem: str
    response_index: int
    position: int
    prompt: str
    prefill: str


def _check_run_config(run: RunDir, options: ScoreOptions, endpoint: Endpoint) -> None:
    """Refuse to mix results of different configurations under one model2."""
    scores_dir = run.scores_dir(options.model2)
    has_parts = run.has_scores(options.model2)
    config_path = run.run_config(options.model2)
    wanted = options.recorded(endpoint)
    if has_parts and options.overwrite:
        shutil.rmtree(scores_dir)
        run.kl_path(options.model2).unlink(missing_ok=True)
    elif has_parts and not options.resume:
        raise ResultsExist(
            f"{scores_dir} already holds results for {options.model2!r}", options.model2
        )
    elif has_parts and config_path.is_file():
        recorded = json.loads(config_path.read_text(encoding="utf-8"))
        # Runs written before results_format existed stored results of format 1.
        recorded.setdefault("results_format", 1)
        differences = [
            f"{key}: recorded {recorded.get(key)!r}, now {wanted[key]!r}"
            for key in RESULT_PARAMETERS
            if recorded.get(key) != wanted[key]
        ]
        if differences:
            raise RunConfigMismatch(config_path, differences)
    scores_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, json.dumps(wanted, indent=2) + "\n")


def result_row(item: WorkItem, model2: str, outcome: Outcome) -> dict[str, Any]:
    """One row of the SCORES schema for a position's outcome."""
    answer = outcome.answer
    row: dict[str, Any] = {
        "stem": item.stem,
        "response_index": item.response_index,
        "position": item.position,
        "model2": model2,
        "status": schemas.SCORE_OK if answer else schemas.SCORE_ERROR,
        "top_tokens": None,
        "top_token_ids": None,
        "top_logprobs": None,
        "chosen_token": None,
        "chosen_token_id": None,
        "chosen_logprob": None,
        "finish_reason": answer.finish_reason if answer else None,
        "attempts": outcome.attempts,
        "latency_ms": outcome.latency_ms,
        "error": outcome.error,
        "scored_at": datetime.now(UTC),
    }
    if answer:
        step = answer.steps[0]
        row.update(
            top_tokens=[c.token for c in step.top],
            top_token_ids=[c.token_id for c in step.top],
            top_logprobs=[c.logprob for c in step.top],
            chosen_token=step.chosen.token,
            chosen_token_id=step.chosen.token_id,
            chosen_logprob=step.chosen.logprob,
        )
    return row


class _Checkpointer:
    """Buffers result rows and writes them as a part every N rows or T seconds."""

    def __init__(self, run: RunDir, model2: str, rows: int, seconds: float) -> None:
        self.run, self.model2, self.rows, self.seconds = run, model2, rows, seconds
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.lock = asyncio.Lock()
        self.writes: set[asyncio.Future[Path]] = set()

    async def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows or time.monotonic() - self.last_flush >= self.seconds:
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            rows, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
            if rows:
                table = pa.Table.from_pylist(rows, schema=schemas.SCORES)
                # The rows have left the buffer: a cancelled caller (a stop, SIGINT) must not
                # cancel their write, which close() waits for instead.
                write = asyncio.get_running_loop().run_in_executor(
                    None, write_scores_part, self.run, self.model2, table
                )
                self.writes.add(write)
                write.add_done_callback(self.writes.discard)
                await asyncio.shield(write)

    async def close(self) -> None:
        """Write what is buffered and wait for every write, cancelled callers' included."""
        await self.flush()
        await asyncio.gather(*self.writes)


class _Stop(Exception):
    """Raised inside the pipeline to end it early with a reason."""


class _Scorer:
    def __init__(
        self,
        run_dir: Path,
        options: ScoreOptions,
        endpoint: Endpoint,
        stats: ScoreStats,
        on_progress: Callable[[ScoreStats], None] | None,
    ) -> None:
        self.options, self.endpoint, self.stats = options, endpoint, stats
        self.on_progress = on_progress
        self.checkpoint = _Checkpointer(
            RunDir(run_dir),
            options.model2,
            options.checkpoint_rows,
            options.checkpoint_seconds,
        )
        self.config = generation_config(options.top_logprobs, options.thinking_budget)
        self.consecutive_failures = 0
        self.last_error: str | None = None

    async def score_one(
        self, caller: Caller, item: WorkItem, probe_deadline: float | None = None
    ) -> None:
        outcome = await caller.call(
            prefill_contents(item.prompt, item.prefill), self.config, probe_deadline
        )
        # Counted before the checkpoint's await: the row is buffered at once, so it is saved even
        # if the run is cancelled during a flush, and the counts must include it.
        if outcome.answer:
            self.stats.scored += 1
            self.consecutive_failures = 0
        else:
            self.stats.failed += 1
            self.consecutive_failures += 1
            self.last_error = outcome.error
        await self.checkpoint.add(result_row(item, self.options.model2, outcome))
        if not outcome.answer and (
            self.consecutive_failures >= self.options.max_consecutive_failures
        ):
            raise _Stop(
                f"{self.consecutive_failures} positions in a row failed; the last "
                f"said: {outcome.error}"
            )
        if self.on_progress:
            self.on_progress(self.stats)

    async def run(self, items: AsyncIterator[WorkItem]) -> None:
        """Probe with the first items one at a time, then score the rest concurrently."""
        options = self.options
        async with open_caller(
            self.endpoint,
            options.model2,
            options.policy,
            options.max_concurrent,
            options.thinking_budget,
            self.stats.calls,
        ) as caller:
            await self._probe_then_pipeline(caller, items)

    async def _probe_then_pipeline(self, caller: Caller, items: AsyncIterator[WorkItem]) -> None:
        """The first items go one at a time, as probes with a short shared budget until one
        succeeds (:meth:`Caller.call`): an endpoint that answers nothing usable stops the run
        in well under a minute. Once one has succeeded, every call has the full retry budget."""
        started = time.monotonic()
        deadline = started + self.options.policy.probe_budget_s
        probed_prefill = False
        probes = 0
        async for item in items:
            await self.score_one(caller, item, deadline if self.stats.scored == 0 else None)
            probes += 1
            probed_prefill = probed_prefill or bool(item.prefill)
            if probed_prefill or probes >= 3 or time.monotonic() >= deadline:
                break
        else:
            return
        if self.stats.scored == 0:
            first = "the first request" if probes == 1 else f"the first {probes} requests"
            raise _Stop(
                f"{first} to {self.endpoint.url} failed ({self.stats.calls.requests} attempts in "
                f"{time.monotonic() - started:.0f} s); the last said: {self.last_error}"
            )
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(
            maxsize=4 * self.options.max_concurrent
        )

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                await self.score_one(caller, item)

        async def flush_every_interval() -> None:
            """Results that trickle in (long back-offs) still reach disk every T seconds."""
            while True:
                await asyncio.sleep(self.options.checkpoint_seconds)
                await self.checkpoint.flush()

        # More positions in progress than slots: while some wait out a back-off, others use the
        # slots; the limiter alone bounds the requests in flight.
        workers = [
            asyncio.create_task(worker())
            for _ in range(WORKERS_PER_SLOT * self.options.max_concurrent)
        ]
        feeding = asyncio.create_task(self._feed(items, queue, len(workers)))
        flushing = asyncio.create_task(flush_every_interval())
        try:
            done, _ = await asyncio.wait([feeding, *workers], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in [feeding, flushing, *workers]:
                task.cancel()
            await asyncio.gather(feeding, flushing, *workers, return_exceptions=True)

    @staticmethod
    async def _feed(
        items: AsyncIterator[WorkItem], queue: asyncio.Queue[WorkItem | None], workers: int
    ) -> None:
        async for item in items:
            await queue.put(item)
        for _ in range(workers):
            await queue.put(None)


def _response_items(rows: list[dict[str, Any]]) -> list[WorkItem]:
    """The pending positions of one response, each with its prefill cut from the token text."""
    token_text = "".join(row["token"] for row in rows)
    prompt = rows[0]["prompt"]
    return [
        WorkItem(
            row["stem"],
            row["response_index"],
            row["position"],
            prompt,
            token_text[: row["char_offset"]],
        )
        for row in rows
        if row["pending"]
    ]


async def _pending_items(
    run_dir: Path, model2: str, range_positions: int
) -> AsyncIterator[WorkItem]:
    """Stream the positions without a successful result, in key order, with their requests.

    One range of whole responses at a time (:func:`klstream.database.ranged`), read in a worker
    thread, so neither memory nor the event loop depends on the size of the run.
    """
    with connect(run_dir) as con:
        ranges = ranged(con, "pending_positions", {"model2": model2}, range_positions)

        def next_range_rows() -> list[dict[str, Any]] | None:
            relation = next(ranges, None)
            return None if relation is None else relation.to_arrow_table().to_pylist()

        while (rows := await asyncio.to_thread(next_range_rows)) is not None:
            for _, response in groupby(rows, key=lambda r: (r["stem"], r["response_index"])):
                for item in _response_items(list(response)):
                    yield item


def _count_pending(run_dir: Path, model2: str) -> tuple[int, int]:
    with connect(run_dir) as con:
        counts = con.execute(load_sql("pending_count"), {"model2": model2}).fetchone()
    assert counts is not None
    return int(counts[0]), int(counts[1])


async def score_async(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
) -> ScoreReport:
    """Score every pending position of ``run_dir`` against ``options.model2``, then run KL.

    One process at a time scores a Model 2 of a run directory (:mod:`klstream.runlock`); it
    starts by removing what killed runs left half-written.
    """
    run = RunDir(run_dir)
    run.require_exploded()
    with model2_writer(run, options.model2):
        sweep_stale_temporaries(run.scores_dir(options.model2))
        sweep_stale_temporaries(run.kl_path(options.model2).parent)
        return await _score_locked(run, options, endpoint, on_progress)


async def _score_locked(
    run: RunDir,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None,
) -> ScoreReport:
    run_dir = run.root
    _check_run_config(run, options, endpoint)
    positions, done = _count_pending(run_dir, options.model2)
    stats = ScoreStats(total=positions, already_done=done)
    scorer = _Scorer(run_dir, options, endpoint, stats, on_progress)
    stopped: str | None = None
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None

    def stop_on(signum: signal.Signals) -> None:
        current.cancel(f"stopped by {signum.name}")

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop_on, signum)
    try:
        await scorer.run(_pending_items(run_dir, options.model2, options.range_positions))
    except _Stop as stop:
        stopped = str(stop)
    except asyncio.CancelledError as cancelled:
        stopped = str(cancelled.args[0]) if cancelled.args else "cancelled"
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
        await scorer.checkpoint.close()
    remaining = stats.total - stats.already_done - stats.scored
    kl = (
        await asyncio.to_thread(compute_kl, run_dir, options.model2)
        if (stats.already_done + stats.scored + stats.failed)
        else None
    )
    return ScoreReport(stats=stats, remaining=remaining, kl=kl, stopped_because=stopped)


def score(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
) -> ScoreReport:
    """:func:`score_async`, blocking; inside a running event loop (Jupyter) it runs in a thread."""
    return run_blocking(score_async(run_dir, options, endpoint, on_progress))
