"""The Model 2 stage: prefill requests with speculative lookahead, in one global async pipeline.

DuckDB lists the positions that still lack a successful result (``sql/pending_positions.sql``),
so a resumed run asks only for what is missing. Each response's pending positions form chains
(:mod:`klstream.scoring.lookahead`): a request at the chain's next position asks for up to N
tokens, and every step whose generated predecessors are Model 1's tokens is stored as that
position's result, so the next request starts at the first position not yet covered. Requests
within a chain go in increasing position (each prefix extends the last, which the service's
implicit cache rewards); many chains run at once. Worker tasks share an adaptive limiter
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
import math
import shutil
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pyarrow as pa

from klstream import __version__
from klstream.backends.base import Answer, Endpoint, Generated, PrefillRequest
from klstream.backends.prices import Price, Usage, load_prices, price_for
from klstream.errors import GreedyInconsistent, MethodUnsupported, ResultsExist, RunConfigMismatch
from klstream.loop import run_blocking
from klstream.metrics.kl import KlReport, compute_kl
from klstream.scoring import lookahead
from klstream.scoring.caller import Caller, CallStats, Outcome, RetryPolicy, open_caller
from klstream.scoring.checkpoint import write_scores_part
from klstream.scoring.lookahead import AcceptanceCounts, Token
from klstream.storage import schemas
from klstream.storage.atomic import sweep_stale_temporaries, write_text_atomic
from klstream.storage.database import RANGE_POSITIONS, connect, ranged
from klstream.storage.rundir import RunDir
from klstream.storage.runlock import model2_writer
from klstream.storage.sqlfiles import load_sql

if TYPE_CHECKING:
    from klstream.scoring.batch import BatchOptions, BatchSummary
    from klstream.scoring.prompt_logprobs import PromptLogprobsScorer

RESULTS_FORMAT = 1
"""Version of what a stored result means. It changes only when results written by one release
cannot be mixed with another's; a resumed run compares it, never the package version."""
RESULT_PARAMETERS = (
    "results_format",
    "model2",
    "top_logprobs",
    "backend",
    "thinking_budget",
    "temperature",
)
"""The recorded parameters that change results: a resumed run must share every one. The
lookahead and its decoding do not: a step is stored only when it is the distribution a one-token
request gives (greedy only where the consistency probe found the logprobs independent of the
sampling settings)."""
DEFAULT_TEMPERATURE = 1.0
"""Gemini's default sampling temperature: what runs recorded before ``temperature`` was sent."""
AUTO_PRICES_FALLBACK = "gemini-2.5-flash"
"""Whose prices ``--lookahead auto`` weighs input against output tokens with when Model 2 has no
entry in the price table (the toy models of the emulator, say)."""
PROBE_SITES = 3
"""Chains the greedy consistency probe starts with: one greedy request each, the only requests
spent on the probe alone."""
PROBE_STEPS = 4
"""Tokens each greedy probe request asks for: its accepted steps are compared with one-token
answers at the same prefixes."""

WORKERS_PER_SLOT = 8
"""Chains in progress per slot of ``max_concurrent``: while some wait out a back-off, others
use the slots; the limiter alone bounds the requests in flight."""

Lookahead = int | Literal["auto"]
Decoding = Literal["auto", "greedy", "sample"]
ScoringMethod = Literal["prefill", "prompt-logprobs"]
"""``prefill``: one request per position, the prefix as the model's own turn. ``prompt-logprobs``
(vLLM): one request per response, whose prompt logprobs give every position at once
(:mod:`klstream.scoring.prompt_logprobs`). Both give the same values where both apply, so a run
may mix them: a resumed run can fill with one what the other left."""


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
    method: ScoringMethod = "prefill"
    batch: BatchOptions | None = None
    """Score through batch jobs (:mod:`klstream.scoring.batch`) instead of online calls."""
    lookahead: Lookahead = "auto"
    """Tokens each request asks for, or ``auto``: per response, the number that minimises the
    estimated billed cost per position from the runs of accepted steps seen so far."""
    decoding: Decoding = "auto"
    """How lookahead tokens are generated: ``sample`` at ``temperature``, ``greedy``
    (temperature 0, refused unless the consistency probe passes), or ``auto`` (greedy when the
    probe passes, else sampling)."""
    temperature: float = DEFAULT_TEMPERATURE
    prices: Path | None = None
    """A price table over the shipped one (the layout of ``klstream/backends/prices.json``)."""

    def recorded(self, endpoint: Endpoint, price: Price | None) -> dict[str, Any]:
        """``run.json``: the parameters that change results, the version that wrote them, the
        lookahead settings and the price entry the run's costs are reckoned with."""
        return {
            "results_format": RESULTS_FORMAT,
            "model2": self.model2,
            "top_logprobs": self.top_logprobs,
            "backend": endpoint.backend,
            "thinking_budget": self.thinking_budget,
            "temperature": self.temperature,
            "written_by": __version__,
            "lookahead": self.lookahead,
            "decoding": self.decoding,
            "prices": price.recorded() if price else None,
            "greedy_probe": None,
        }


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

    @property
    def done(self) -> int:
        return self.already_done + self.scored + self.failed


@dataclass(frozen=True)
class ScoreReport:
    stats: ScoreStats
    remaining: int
    kl: KlReport | None
    stopped_because: str | None
    batch: BatchSummary | None = None
    """Where a batch run left its jobs; None for an online run."""
    price: Price | None = None
    """The price entry the run's costs are reckoned with (None: Model 2 has none)."""
    decoding: str = "sample"
    """How lookahead tokens were generated: ``sample`` or ``greedy``."""


@dataclass(frozen=True)
class WorkItem:
    """One request: at ``position``, after ``prefill``, asking for ``max_tokens`` tokens."""

    stem: str
    response_index: int
    position: int
    prompt: str
    prefill: str
    max_tokens: int = 1
    decoding: str = "sample"


@dataclass
class _Response:
    """One response's Model 1 tokens, shared by the chains that cover its pending positions."""

    stem: str
    response_index: int
    prompt: str
    tokens: list[Token]
    offsets: list[int]
    text: str
    """Model 1's tokens concatenated: prefills are cut from it."""
    counts: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    measured: tuple[int, int] | None = None
    """(position, input tokens) of the latest answer: later requests extend that input."""

    def request(self, position: int, max_tokens: int, decoding: str) -> WorkItem:
        prefill = self.text[: self.offsets[position]]
        return WorkItem(
            self.stem, self.response_index, position, self.prompt, prefill, max_tokens, decoding
        )

    def input_tokens(self, position: int) -> float:
        """Input tokens of a request at ``position``: measured, else the prompt's characters
        over :data:`~klstream.scoring.lookahead.CHARS_PER_TOKEN` and Model 1's tokens."""
        if self.measured is not None:
            at, tokens = self.measured
            return float(tokens + position - at)
        return len(self.prompt) / lookahead.CHARS_PER_TOKEN + position


@dataclass
class _Chain:
    """Pending positions ``next`` to ``end`` of one response, covered request after request."""

    response: _Response
    next: int
    end: int

    @property
    def done(self) -> bool:
        return self.next >= self.end


def prefill_request(options: ScoreOptions, item: WorkItem) -> PrefillRequest:
    """The request for ``item``: greedy at temperature 0, else at the run's temperature."""
    temperature = 0.0 if item.decoding == "greedy" else options.temperature
    return PrefillRequest(
        item.prompt, item.prefill, options.top_logprobs, item.max_tokens, temperature
    )


def _response_of(rows: list[dict[str, Any]]) -> _Response:
    """A response from its rows in position order (the prompt on the first)."""
    tokens = [Token(row["token"], row["token_id"]) for row in rows]
    return _Response(
        rows[0]["stem"],
        rows[0]["response_index"],
        rows[0]["prompt"],
        tokens,
        [row["char_offset"] for row in rows],
        "".join(token.text for token in tokens),
    )


def _read_config(path: Path) -> dict[str, Any]:
    recorded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    # Runs written before these were recorded stored results of format 1, at the default
    # temperature.
    recorded.setdefault("results_format", 1)
    recorded.setdefault("temperature", DEFAULT_TEMPERATURE)
    return recorded


def _check_run_config(
    run: RunDir, options: ScoreOptions, endpoint: Endpoint, price: Price | None
) -> dict[str, Any]:
    """Refuse to mix results of different configurations under one model2; return what
    ``run.json`` now says, with the greedy probe's outcome of an earlier run of the same
    configuration kept (the probe runs once per Model 2 and run directory)."""
    scores_dir = run.scores_dir(options.model2)
    has_parts = run.has_scores(options.model2)
    config_path = run.run_config(options.model2)
    wanted = options.recorded(endpoint, price)
    if config_path.is_file() and not options.overwrite:
        earlier = _read_config(config_path)
        if all(earlier.get(key) == wanted[key] for key in RESULT_PARAMETERS):
            wanted["greedy_probe"] = earlier.get("greedy_probe")
    if has_parts and options.overwrite:
        shutil.rmtree(scores_dir)
        run.kl_path(options.model2).unlink(missing_ok=True)
    elif has_parts and not options.resume:
        raise ResultsExist(
            f"{scores_dir} already holds results for {options.model2!r}", options.model2
        )
    elif has_parts and config_path.is_file():
        recorded = _read_config(config_path)
        differences = [
            f"{key}: recorded {recorded.get(key)!r}, now {wanted[key]!r}"
            for key in RESULT_PARAMETERS
            if recorded.get(key) != wanted[key]
        ]
        if differences:
            raise RunConfigMismatch(config_path, differences)
    scores_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, json.dumps(wanted, indent=2) + "\n")
    return wanted


def _lists(step: Generated) -> dict[str, Any]:
    return {
        "top_tokens": [c.token for c in step.top],
        "top_token_ids": [c.token_id for c in step.top],
        "top_logprobs": [c.logprob for c in step.top],
        "chosen_token": step.chosen.token,
        "chosen_token_id": step.chosen.token_id,
        "chosen_logprob": step.chosen.logprob,
    }


def _usage_columns(answer: Answer | None) -> dict[str, int | None]:
    usage = answer.usage if answer else None
    return {
        "prompt_token_count": usage.prompt_tokens if usage else None,
        "cached_content_token_count": usage.cached_tokens if usage else None,
        "candidates_token_count": usage.candidates_tokens if usage else None,
        "thoughts_token_count": usage.thoughts_tokens if usage else None,
    }


_NO_LISTS = dict.fromkeys(
    (
        "top_tokens",
        "top_token_ids",
        "top_logprobs",
        "chosen_token",
        "chosen_token_id",
        "chosen_logprob",
    )
)
_NO_USAGE = _usage_columns(None)


def result_rows(
    item: WorkItem,
    model2: str,
    outcome: Outcome,
    steps: int = 1,
    source: str = schemas.SOURCE_ONLINE,
) -> list[dict[str, Any]]:
    """The SCORES rows of one request: its answer's first ``steps`` steps as the results of
    ``item.position`` onward, or its failure at ``item.position``. They are committed together.
    """
    answer = outcome.answer
    shared: dict[str, Any] = {
        "stem": item.stem,
        "response_index": item.response_index,
        "model2": model2,
        "status": schemas.SCORE_OK if answer else schemas.SCORE_ERROR,
        "finish_reason": answer.finish_reason if answer else None,
        "attempts": outcome.attempts,
        "latency_ms": outcome.latency_ms,
        "error": outcome.error,
        "scored_at": datetime.now(UTC),
        "source": source,
        "request_id": uuid.uuid4().hex,
        "lookahead": item.max_tokens,
        "decoding": item.decoding,
    }
    if answer is None:
        return [{**shared, **_NO_LISTS, **_NO_USAGE, "position": item.position, "step": 0}]
    return [
        {
            **shared,
            **_lists(answer.steps[step]),
            **(_usage_columns(answer) if step == 0 else _NO_USAGE),
            "position": item.position + step,
            "step": step,
        }
        for step in range(steps)
    ]


class Checkpointer:
    """Buffers result rows and writes them as a part every N rows or T seconds."""

    def __init__(self, run: RunDir, model2: str, rows: int, seconds: float) -> None:
        self.run, self.model2, self.rows, self.seconds = run, model2, rows, seconds
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.lock = asyncio.Lock()
        self.writes: set[asyncio.Future[Path]] = set()

    async def add(self, rows: list[dict[str, Any]]) -> None:
        """Buffer one answer's rows at once, so no part holds only some of them."""
        self.buffer.extend(rows)
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


W = TypeVar("W")


async def work_through(
    items: AsyncIterator[W],
    handle: Callable[[W], Awaitable[None]],
    workers: int,
    checkpoint: Checkpointer,
    flush_seconds: float,
) -> None:
    """Hand ``items``, in order, to ``workers`` tasks running ``handle`` while ``checkpoint`` is
    flushed every ``flush_seconds`` (results that trickle in during long back-offs still reach
    disk); the first failure stops them all."""
    queue: asyncio.Queue[W | None] = asyncio.Queue(maxsize=2 * workers)

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            await handle(item)

    async def feed() -> None:
        async for item in items:
            await queue.put(item)
        for _ in range(workers):
            await queue.put(None)

    async def flush_every_interval() -> None:
        while True:
            await asyncio.sleep(flush_seconds)
            await checkpoint.flush()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    feeding = asyncio.create_task(feed())
    flushing = asyncio.create_task(flush_every_interval())
    try:
        done, _ = await asyncio.wait([feeding, *tasks], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in [feeding, flushing, *tasks]:
            task.cancel()
        await asyncio.gather(feeding, flushing, *tasks, return_exceptions=True)


class StopRun(Exception):
    """Raised inside the pipeline to end it early with a reason."""


class _Scorer:
    def __init__(
        self,
        run_dir: Path,
        options: ScoreOptions,
        endpoint: Endpoint,
        stats: ScoreStats,
        on_progress: Callable[[ScoreStats], None] | None,
        config: dict[str, Any],
        prices: dict[str, Price],
    ) -> None:
        self.run_dir, self.options, self.endpoint, self.stats = run_dir, options, endpoint, stats
        self.on_progress = on_progress
        self.checkpoint = Checkpointer(
            RunDir(run_dir),
            options.model2,
            options.checkpoint_rows,
            options.checkpoint_seconds,
        )
        self.config = config
        """What ``run.json`` says; the greedy probe's outcome is added to it."""
        self.price = price_for(options.model2, prices)
        self.auto_price = self.price or prices.get(AUTO_PRICES_FALLBACK)
        self.decoding = "sample"
        self.counts = AcceptanceCounts()
        self.consecutive_failures = 0
        self.last_error: str | None = None

    def _lookahead_for(self, chain: _Chain) -> int:
        """Tokens to ask for at the chain's next position: the fixed lookahead, or the cheapest
        expected cost per position given the acceptance so far (``auto``); never past its end."""
        left = chain.end - chain.next
        if self.options.lookahead != "auto":
            return min(self.options.lookahead, left)
        price = self.auto_price
        if price is None:
            return min(2, left)
        usage, answers = self.stats.usage, max(self.stats.answers, 1)
        cached = usage.cached_share
        input_price = price.input * (1.0 - cached) + price.cached_input * cached
        thinking = usage.thoughts_tokens / answers * price.output
        rate = chain.response.counts.rate(self.counts.rate(0.5, 2.0), lookahead.PRIOR_WEIGHT)
        request_cost = chain.response.input_tokens(chain.next) * input_price + thinking
        warm = self.counts.matched + self.counts.broke >= lookahead.WARM_UP_TOKENS
        most = min(lookahead.AUTO_MAX_LOOKAHEAD if warm else 2, left)
        return lookahead.cheapest_lookahead(rate, request_cost, price.output, most)

    async def step(
        self,
        caller: Caller,
        chain: _Chain,
        max_tokens: int | None = None,
        probe_deadline: float | None = None,
    ) -> Answer | None:
        """One request at the chain's next position (asking for ``max_tokens``, else what the
        lookahead says); its accepted steps are stored together and the chain moves past them
        (past the position alone when the request failed). With a ``probe_deadline`` the request
        is a probe (:meth:`Caller.retried`)."""
        response = chain.response
        tokens = self._lookahead_for(chain) if max_tokens is None else max_tokens
        item = response.request(chain.next, tokens, self.decoding if tokens > 1 else "sample")
        outcome = await caller.call(prefill_request(self.options, item), probe_deadline)
        # Counted before the checkpoint's await: the rows are buffered at once, so they are saved
        # even if the run is cancelled during a flush, and the counts must include them.
        answer = outcome.answer
        covered = 1
        if answer:
            chosen = [
                Token(s.chosen.token, s.chosen.token_id) if s.chosen_reported else None
                for s in answer.steps
            ]
            acceptance = lookahead.accept(
                len(answer.steps), chosen, response.tokens, item.position, item.max_tokens
            )
            response.counts.add(acceptance)
            self.counts.add(acceptance)
            if answer.usage.prompt_tokens:
                response.measured = (item.position, answer.usage.prompt_tokens)
            covered = acceptance.steps
            self.stats.usage.add(answer.usage)
            self.stats.answers += 1
            self.stats.scored += covered
            self.consecutive_failures = 0
        else:
            self.stats.failed += 1
            self.consecutive_failures += 1
            self.last_error = outcome.error
        chain.next += covered
        await self.checkpoint.add(result_rows(item, self.options.model2, outcome, covered))
        if not answer and self.consecutive_failures >= self.options.max_consecutive_failures:
            raise StopRun(
                f"{self.consecutive_failures} positions in a row failed; the last "
                f"said: {outcome.error}"
            )
        if self.on_progress:
            self.on_progress(self.stats)
        return answer

    async def run(self, chains: AsyncIterator[_Chain]) -> None:
        """Probe with the first requests one at a time, then score the rest concurrently."""
        options = self.options
        async with open_caller(
            self.endpoint,
            options.model2,
            options.policy,
            options.max_concurrent,
            options.thinking_budget,
            self.stats.calls,
        ) as caller:
            await self._probe_then_pipeline(caller, chains)

    async def _probe_then_pipeline(self, caller: Caller, chains: AsyncIterator[_Chain]) -> None:
        """The first requests go one at a time, as probes with a short shared budget until one
        succeeds (:meth:`Caller.retried`): an endpoint that answers nothing usable stops the run
        in well under a minute. Once one has succeeded, every call has the full retry budget."""
        started_at = time.monotonic()
        deadline = started_at + self.options.policy.probe_budget_s
        probed_prefill = False
        probes = 0

        def probing() -> bool:
            return not (probed_prefill or probes >= 3 or time.monotonic() >= deadline)

        async for first in chains:
            while not first.done and probing():
                probed_prefill = probed_prefill or bool(first.response.offsets[first.next])
                probe = deadline if self.stats.scored == 0 else None
                await self.step(caller, first, probe_deadline=probe)
                probes += 1
            if not probing():
                break
        else:
            return
        if self.stats.scored == 0:
            first_requests = "the first request" if probes == 1 else f"the first {probes} requests"
            raise StopRun(
                f"{first_requests} to {caller.client.endpoint.url} failed "
                f"({self.stats.calls.requests} attempts in {time.monotonic() - started_at:.0f} s); "
                f"the last said: {self.last_error}"
            )
        started = [first]
        if self._probe_needed():
            sites = [] if first.done else [first]
            async for chain in chains:
                started.append(chain)
                sites.append(chain)
                if len(sites) >= PROBE_SITES:
                    break
            await self._choose_decoding(caller, sites)

        async def chains_to_go() -> AsyncIterator[_Chain]:
            for chain in started:
                if not chain.done:
                    yield chain
            async for chain in chains:
                yield chain

        async def cover(chain: _Chain) -> None:
            while not chain.done:
                await self.step(caller, chain)

        await work_through(
            chains_to_go(),
            cover,
            WORKERS_PER_SLOT * self.options.max_concurrent,
            self.checkpoint,
            self.options.checkpoint_seconds,
        )

    def _probe_needed(self) -> bool:
        options = self.options
        return options.lookahead != 1 and options.decoding != "sample"

    async def _choose_decoding(self, caller: Caller, sites: list[_Chain]) -> None:
        """Sample, or greedy where the consistency probe (run once per Model 2 and run
        directory, its outcome kept in ``run.json``) finds greedy steps' logprobs equal to
        one-token answers' at the run's temperature."""
        probe = self.config.get("greedy_probe")
        if probe is None:
            probe = await self._probe_greedy(caller, sites)
            if probe["decoding"] is not None:
                self.config["greedy_probe"] = probe
                config_path = RunDir(self.run_dir).run_config(self.options.model2)
                write_text_atomic(config_path, json.dumps(self.config, indent=2) + "\n")
        if probe["decoding"] == "greedy":
            self.decoding = "greedy"
        elif self.options.decoding == "greedy":
            raise GreedyInconsistent(
                f"greedy lookahead needs logprobs that do not depend on the sampling "
                f"temperature, and {self.options.model2}'s do not pass that check: "
                f"{probe['finding']}"
            )

    async def _probe_greedy(self, caller: Caller, sites: list[_Chain]) -> dict[str, Any]:
        """At the next position of each chain in ``sites``, a greedy request, then one-token
        requests at the run's temperature at its accepted steps' positions (stored as those
        positions' results, as any one-token answer). Greedy passes when the median deviation
        of their logprobs (:func:`~klstream.scoring.lookahead.deviation`) is within the
        tolerance. Only the greedy requests are spent on the probe alone."""
        usage = Usage()
        deviations: list[float] = []
        failed = False
        requests = 0

        async def compare(chain: _Chain) -> None:
            nonlocal failed, requests
            item = chain.response.request(chain.next, PROBE_STEPS, "greedy")
            outcome = await caller.call(prefill_request(self.options, item))
            requests += outcome.attempts
            greedy = outcome.answer
            if greedy is None:
                failed = True
                return
            usage.add(greedy.usage)
            chosen = [Token(s.chosen.token, s.chosen.token_id) for s in greedy.steps]
            accepted = lookahead.accept(
                len(greedy.steps), chosen, chain.response.tokens, item.position, PROBE_STEPS
            )
            steps = min(accepted.steps, chain.end - chain.next)
            for step in range(steps):
                single = await self.step(caller, chain, max_tokens=1)
                if single is None:
                    failed = True
                    return
                deviations.append(
                    lookahead.deviation(_top(greedy.steps[step]), _top(single.steps[0]))
                )

        await asyncio.gather(*(compare(chain) for chain in sites))
        self.stats.usage.add(usage)
        record: dict[str, Any] = {
            "decoding": None,
            "compared": len(deviations),
            "median_deviation": None,
            "tolerance": lookahead.GREEDY_TOLERANCE,
            "requests": requests,
            "prompt_token_count": usage.prompt_tokens,
            "cached_content_token_count": usage.cached_tokens,
            "candidates_token_count": usage.candidates_tokens,
            "thoughts_token_count": usage.thoughts_tokens,
        }
        if failed or not deviations:
            record["finding"] = "the probe's requests failed, so nothing could be compared"
            return record
        median = statistics.median(deviations)
        missing = sum(d == math.inf for d in deviations)
        record.update(
            decoding="greedy" if median <= lookahead.GREEDY_TOLERANCE else "sample",
            median_deviation=None if median == math.inf else median,
            finding=(
                f"the one-token answers' top tokens are missing from the greedy answers' "
                f"logprobs at {missing} of {len(deviations)} positions"
                if median == math.inf
                else f"the median largest deviation is {median:.3g} nats over "
                f"{len(deviations)} positions (tolerance {lookahead.GREEDY_TOLERANCE:g})"
            ),
        )
        return record


async def pending_responses(
    run_dir: Path, model2: str, range_positions: int
) -> AsyncIterator[list[dict[str, Any]]]:
    """Stream the responses with a position lacking a successful result, in key order: every
    position's row of ``sql/pending_positions.sql``, each with whether it is pending.

    One range of whole responses at a time (:func:`klstream.storage.database.ranged`), read in a
    worker thread, so neither memory nor the event loop depends on the size of the run.
    """
    with connect(run_dir) as con:
        ranges = ranged(con, "pending_positions", {"model2": model2}, range_positions)

        def next_range_rows() -> list[dict[str, Any]] | None:
            relation = next(ranges, None)
            return None if relation is None else relation.to_arrow_table().to_pylist()

        while (rows := await asyncio.to_thread(next_range_rows)) is not None:
            for _, response in groupby(rows, key=lambda r: (r["stem"], r["response_index"])):
                yield list(response)


def _top(step: Generated) -> list[tuple[Token, float]]:
    return [(Token(c.token, c.token_id), c.logprob) for c in step.top]


async def _pending_chains(
    run_dir: Path, model2: str, range_positions: int, cap: int
) -> AsyncIterator[_Chain]:
    """Stream the chains over the positions without a successful result, in key order: each
    response's runs of pending positions, cut into pieces of at most ``cap``."""
    async for rows in pending_responses(run_dir, model2, range_positions):
        response = _response_of(rows)
        pending = [row["pending"] for row in rows]
        for start, end in lookahead.segments(pending, cap):
            yield _Chain(response, start, end)


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

    One process at a time scores a Model 2 of a run directory (:mod:`klstream.storage.runlock`); it
    starts by removing what killed runs left half-written.
    """
    if options.batch is not None:
        from klstream.scoring.batch import score_batch_async

        return await score_batch_async(run_dir, options, endpoint, on_progress)
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
    if options.method == "prompt-logprobs" and endpoint.backend != "openai":
        raise MethodUnsupported(
            f"prompt logprobs come from OpenAI-compatible servers such as vLLM, not from the "
            f"{endpoint.backend} backend"
        )
    prices = load_prices(options.prices)
    price = price_for(options.model2, prices)
    config = _check_run_config(run, options, endpoint, price)
    positions, done = _count_pending(run_dir, options.model2)
    stats = ScoreStats(total=positions, already_done=done)
    scorer: _Scorer | PromptLogprobsScorer
    if options.method == "prompt-logprobs":
        from klstream.scoring.prompt_logprobs import PromptLogprobsScorer

        scorer = PromptLogprobsScorer(run_dir, options, endpoint, stats, on_progress)
    else:
        scorer = _Scorer(run_dir, options, endpoint, stats, on_progress, config, prices)
    cap = lookahead.segment_cap(positions - done, options.max_concurrent, options.lookahead == 1)
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
        if isinstance(scorer, _Scorer):
            await scorer.run(_pending_chains(run_dir, options.model2, options.range_positions, cap))
        else:
            await scorer.run(pending_responses(run_dir, options.model2, options.range_positions))
    except StopRun as stop:
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
    decoding = scorer.decoding if isinstance(scorer, _Scorer) else "sample"
    return ScoreReport(stats, remaining, kl, stopped, price=price, decoding=decoding)


def score(
    run_dir: Path,
    options: ScoreOptions,
    endpoint: Endpoint,
    on_progress: Callable[[ScoreStats], None] | None = None,
) -> ScoreReport:
    """:func:`score_async`, blocking; inside a running event loop (Jupyter) it runs in a thread."""
    return run_blocking(score_async(run_dir, options, endpoint, on_progress))
