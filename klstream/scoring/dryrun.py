"""What scoring would take, before spending anything: requests, tokens, USD and time at a quota.

Nothing is sent, unless calibration is asked for. The estimate reads the pending positions per
prompt (``sql/dry_run.sql``). A request at position i sends the prompt and Model 1's i tokens
before it: Model 1's tokens are counted exactly (the service re-tokenizes the prefill, so where
Model 1's tokens do not reproduce their text the count can differ a little); the prompt's tokens
are not known without the service's tokenizer and are estimated at
:data:`~klstream.scoring.lookahead.CHARS_PER_TOKEN` characters per token. Calibration (K real
requests, at position 0 of K responses, one per prompt first) has the service count the prompts
it visits exactly, sets the characters per token of the others, and measures how often Model 2's
generated tokens are Model 1's.

One token per request is exact but for the prompts' tokens. With lookahead, each request covers
1 + q + ... + q^(N-1) positions on average when each generated token is Model 1's with
probability q (:func:`~klstream.scoring.lookahead.expected_steps`), and the requests spread over
a response's positions as one-token requests do: an estimate. Without calibration q is Model 1's
agreement with itself (the mean probability of its own tokens; for greedy decoding, the share of
positions where its token is its own top one), which is what Model 2 would reach if it were
Model 1: an optimistic guess. ``auto`` decoding is estimated as sampling until a run's greedy
probe (recorded in ``run.json``) has allowed greedy.

In batch mode (``options.batch``) decoding is sampling, and the run works in rounds
(:func:`~klstream.scoring.lookahead.batch_rounds`): the estimate adds the rounds, requests,
tokens and USD at batch prices of the batch lookahead
(:func:`~klstream.scoring.lookahead.batch_lookahead`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from klstream.backends import open_prefill
from klstream.backends.base import AUTO_THINKING, Endpoint
from klstream.backends.prices import Price, Usage, load_prices, price_for
from klstream.backends.thinking import ThinkingChoice, family_minimum, thinking_choice
from klstream.backends.transport import Caller, CallStats
from klstream.loop import run_blocking
from klstream.numbers import thousands
from klstream.scoring import lookahead
from klstream.scoring.lookahead import AcceptanceCounts, Token
from klstream.scoring.options import ScoreOptions
from klstream.scoring.prefill import AUTO_PRICES_FALLBACK
from klstream.scoring.work import WorkItem, chosen_tokens, prefill_request
from klstream.storage.database import connect
from klstream.storage.rundir import RunDir
from klstream.storage.sqlfiles import load_sql

CALIBRATION_STEPS = 8
"""Tokens each calibration request asks for: enough runs of agreement to measure it."""


@dataclass(frozen=True)
class DryRunOptions:
    calibrate: int = 0
    """Real requests to send to measure prompt tokens and acceptance (0: send nothing)."""
    rpm: float | None = None
    """Requests per minute the quota allows, for the wall time."""
    tpm: float | None = None
    """Tokens (input and output) per minute the quota allows, for the wall time."""


@dataclass(frozen=True)
class Estimate:
    """What one way of scoring the pending positions takes."""

    label: str
    lookahead: float
    """Tokens asked for per request (a mean, for ``auto``)."""
    requests: int
    input_tokens: int
    output_tokens: int
    usd: float | None
    batch_usd: float | None
    minutes: float | None
    """Wall time at the quota (None when no quota was given)."""


@dataclass(frozen=True)
class BatchEstimate:
    """What a batch run in rounds takes."""

    lookahead: int
    max_rounds: int
    rounds: int
    requests: int
    input_tokens: int
    output_tokens: int
    uncovered: int
    """Positions expected to be left after ``max_rounds`` rounds."""
    usd: float | None
    """At batch prices."""


@dataclass(frozen=True)
class DryRunReport:
    model2: str
    positions: int
    responses: int
    prompts: int
    acceptance: float
    """The chance a generated token is Model 1's, per step."""
    measured_acceptance: bool
    """Whether the acceptance comes from calibration (else from Model 1's self-agreement)."""
    counted_prompts: int
    """Prompts whose tokens the service counted during calibration."""
    calibration: Usage
    calibration_requests: int
    price: Price | None
    decoding: str
    one_token: Estimate
    """One token per request: the worst case, and the spec's method."""
    lookahead: Estimate
    """The run's lookahead setting, estimated."""
    batch: BatchEstimate | None = None
    """Batch mode in rounds, when the run is a batch run."""
    thinking: float = 0.0
    """Thought tokens per request, counted among the output tokens (billed as output)."""
    thinking_source: str = ""
    """Where ``thinking`` comes from."""


def _prompt_rows(run_dir: Path, model2: str) -> pa.Table:
    with connect(run_dir) as con:
        table: pa.Table = con.sql(load_sql("dry_run"), params={"model2": model2}).to_arrow_table()
    return table


def _calibration_rows(run_dir: Path, sites: int) -> list[dict[str, Any]]:
    with connect(run_dir) as con:
        params = {"sites": sites, "max_positions": CALIBRATION_STEPS}
        rows: list[dict[str, Any]] = (
            con.sql(load_sql("calibration_sites"), params=params).to_arrow_table().to_pylist()
        )
    return rows


@dataclass(frozen=True)
class Calibration:
    """What the calibration requests measured."""

    prompt_tokens: dict[str, int]
    """Each visited prompt's token count, as the service counted it."""
    counts: AcceptanceCounts
    usage: Usage
    requests: int
    """HTTP requests sent."""
    answers: int
    thinking: ThinkingChoice | None
    """The budget ``--thinking-budget auto`` found, if it was asked to find one."""


async def _calibrate(
    run_dir: Path, options: ScoreOptions, sites: int, decoding: str, endpoint: Endpoint
) -> Calibration:
    """Requests at position 0 of ``sites`` responses: each prompt's token count, the agreement
    of generated tokens with Model 1's, the usage, the number of HTTP requests and answers, and
    the thinking budget found."""
    rows = await asyncio.to_thread(_calibration_rows, run_dir, sites)
    prompt_tokens: dict[str, int] = {}
    counts, usage, stats = AcceptanceCounts(), Usage(), CallStats()
    answers = 0
    caller = Caller(endpoint, options.policy, options.max_concurrent, stats)
    async with open_prefill(endpoint, options.settings) as prefill:

        async def visit(site: list[dict[str, Any]]) -> None:
            nonlocal answers
            prompt = site[0]["prompt"]
            first = site[0]
            item = WorkItem(
                first["stem"], first["response_index"], 0, prompt, "", CALIBRATION_STEPS, decoding
            )
            outcome = await caller.generate(prefill, prefill_request(options, item))
            answer = outcome.value
            if answer is None:
                return
            answers += 1
            usage.add(answer.usage)
            prompt_tokens[prompt] = answer.usage.prompt_tokens
            tokens = [Token(row["token"], row["token_id"]) for row in site]
            chosen = chosen_tokens(answer)
            counts.add(lookahead.accept(len(answer.steps), chosen, tokens, 0, CALIBRATION_STEPS))

        groups = groupby(rows, key=lambda row: (row["stem"], row["response_index"]))
        await asyncio.gather(*(visit(list(site)) for _, site in groups))
        choice = thinking_choice(prefill)
    return Calibration(prompt_tokens, counts, usage, stats.requests, answers, choice)


def _thinking_per_request(
    options: ScoreOptions, calibration: Calibration | None
) -> tuple[float, str]:
    """Thought tokens each request is expected to bill as output, and where the figure comes
    from: measured by calibration, else the budget the run sends (for ``auto``, the one
    calibration found, else the documented minimum of a family that cannot stop thinking)."""
    if calibration is not None and calibration.answers and calibration.usage.thoughts_tokens:
        return calibration.usage.thoughts_tokens / calibration.answers, "measured by calibration"
    budget = options.thinking_budget
    if budget == AUTO_THINKING:
        if calibration is not None and calibration.thinking is not None:
            budget = calibration.thinking.budget
        else:
            family = family_minimum(options.model2)
            if family is None:
                return 0.0, "none: thinking off (budget 0) assumed until calibrated"
            return float(family.budget), (
                f"{family.family} cannot stop thinking, so auto sends its minimum; {family.source}"
            )
    if isinstance(budget, int) and budget > 0:
        return float(budget), f"the thinking budget of {budget}, spent in full"
    if budget is None:
        return 0.0, "unknown: no thinking config is sent; calibrate to measure it"
    return 0.0, "none: thinking off (budget 0)"


def _probe_allowed_greedy(run_dir: Path, model2: str) -> bool:
    """Whether an earlier run's greedy probe (in ``run.json``) allowed greedy decoding; before
    any probe, ``auto`` is estimated as sampling."""
    path = RunDir(run_dir).run_config(model2)
    if not path.is_file():
        return False
    probe = json.loads(path.read_text(encoding="utf-8")).get("greedy_probe") or {}
    return bool(probe.get("decoding") == "greedy")


def _minutes(requests: float, tokens: float, dry: DryRunOptions) -> float | None:
    limits = [requests / dry.rpm if dry.rpm else None, tokens / dry.tpm if dry.tpm else None]
    known = [value for value in limits if value is not None]
    return max(known) if known else None


def _estimate(
    label: str,
    requests: np.ndarray,
    input_tokens: np.ndarray,
    output_tokens: np.ndarray,
    asked: float,
    price: Price | None,
    dry: DryRunOptions,
) -> Estimate:
    total = Usage(int(round(input_tokens.sum())), 0, int(round(output_tokens.sum())), 0)
    count = int(round(requests.sum()))
    return Estimate(
        label,
        asked,
        count,
        total.prompt_tokens,
        total.candidates_tokens,
        price.usd(total) if price else None,
        price.usd(total, batch=True) if price else None,
        _minutes(count, total.prompt_tokens + total.candidates_tokens, dry),
    )


async def dry_run_async(
    run_dir: Path,
    options: ScoreOptions,
    dry: DryRunOptions,
    endpoint: Endpoint | None = None,
) -> DryRunReport:
    """Estimate what scoring ``run_dir``'s pending positions with ``options`` takes; with
    ``dry.calibrate`` (and an ``endpoint``), measure first with that many requests."""
    RunDir(run_dir).require_exploded()
    prices = load_prices(options.prices)
    price = price_for(options.model2, prices)
    table = await asyncio.to_thread(_prompt_rows, run_dir, options.model2)
    columns = {
        name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names
    }
    positions = columns["positions"].astype(np.float64)
    total_positions = int(positions.sum())
    greedy = options.batch is None and (
        options.decoding == "greedy"
        or (options.decoding == "auto" and _probe_allowed_greedy(run_dir, options.model2))
    )
    decoding = "greedy" if greedy else "sample"

    calibrated = None
    if dry.calibrate and endpoint is not None and total_positions:
        calibrated = await _calibrate(run_dir, options, dry.calibrate, decoding, endpoint)
    prompt_tokens = calibrated.prompt_tokens if calibrated else {}
    counts = calibrated.counts if calibrated else AcceptanceCounts()
    prompts = table.column("prompt").to_pylist()
    chars = columns["prompt_chars"].astype(np.float64)
    counted = np.array([prompt in prompt_tokens for prompt in prompts], dtype=bool)
    per_char = 1.0 / lookahead.CHARS_PER_TOKEN
    if counted.any():
        per_char = sum(prompt_tokens.values()) / max(chars[counted].sum(), 1.0)
    prompt_size = np.where(
        counted, [prompt_tokens.get(p, 0) for p in prompts], np.round(chars * per_char)
    )
    measured = counts.matched + counts.broke > 0
    if measured:
        acceptance = counts.matched / (counts.matched + counts.broke)
    else:
        agreement = columns["own_top" if greedy else "own_probability"].astype(np.float64)
        acceptance = float(agreement.sum() / total_positions) if total_positions else 0.0

    thinking, thinking_source = _thinking_per_request(options, calibrated)
    one_input = positions * prompt_size + columns["position_sum"].astype(np.float64)
    one_token = _estimate(
        "one token per request",
        positions,
        one_input,
        positions * (1 + thinking),
        1.0,
        price,
        dry,
    )

    mean_input = np.divide(one_input, positions, out=np.zeros_like(one_input), where=positions > 0)
    if options.lookahead == "auto":
        weigh = price or prices.get(AUTO_PRICES_FALLBACK)
        asked = np.array(
            [
                lookahead.cheapest_lookahead(
                    acceptance,
                    size * weigh.input + thinking * weigh.output,
                    weigh.output,
                    lookahead.AUTO_MAX_LOOKAHEAD,
                )
                if weigh
                else 2
                for size in mean_input
            ],
            dtype=np.float64,
        )
    else:
        asked = np.full(len(positions), float(options.lookahead))
    covered = lookahead.expected_steps(acceptance, asked.astype(np.int64))
    requests = np.maximum(columns["runs"].astype(np.float64), positions / covered)
    share = np.divide(requests, positions, out=np.zeros_like(requests), where=positions > 0)
    mean_asked = float((asked * requests).sum() / requests.sum()) if requests.sum() else 1.0
    estimate = _estimate(
        f"lookahead {options.lookahead} (N = {mean_asked:.1f} on average)"
        if options.lookahead == "auto"
        else f"lookahead {options.lookahead}",
        requests,
        one_input * share,
        requests * (asked + thinking),
        mean_asked,
        price,
        dry,
    )
    batch = None
    if options.batch is not None:
        tokens = lookahead.batch_lookahead(options.lookahead)
        rounds = lookahead.batch_rounds(
            acceptance, tokens, total_positions, options.batch.max_rounds
        )
        share = rounds.requests / total_positions if total_positions else 0.0
        usage = Usage(
            int(round(one_input.sum() * share)),
            0,
            int(round(rounds.output_tokens + rounds.requests * thinking)),
            0,
        )
        batch = BatchEstimate(
            tokens,
            options.batch.max_rounds,
            rounds.rounds,
            int(round(rounds.requests)),
            usage.prompt_tokens,
            usage.candidates_tokens,
            int(round(rounds.uncovered)),
            price.usd(usage, batch=True) if price else None,
        )
    return DryRunReport(
        options.model2,
        total_positions,
        int(columns["responses"].sum()),
        len(prompts),
        acceptance,
        measured,
        int(counted.sum()),
        calibrated.usage if calibrated else Usage(),
        calibrated.requests if calibrated else 0,
        price,
        decoding,
        one_token,
        estimate,
        batch,
        thinking,
        thinking_source,
    )


def dry_run(
    run_dir: Path,
    options: ScoreOptions,
    dry: DryRunOptions,
    endpoint: Endpoint | None = None,
) -> DryRunReport:
    """:func:`dry_run_async`, blocking; inside a running event loop it runs in a thread."""
    return run_blocking(dry_run_async(run_dir, options, dry, endpoint))


def format_dry_run(report: DryRunReport) -> str:
    """The estimate as a table: one token per request (the worst case) to the lookahead's."""
    sent = (
        f"{thousands(report.calibration_requests)} calibration requests sent"
        if report.calibration_requests
        else "nothing sent"
    )
    prompt_source = (
        f"counted by the service for {thousands(report.counted_prompts)} of "
        f"{thousands(report.prompts)} prompts, "
        "the others at their characters per token"
        if report.counted_prompts
        else f"estimated at {lookahead.CHARS_PER_TOKEN:g} characters per token"
    )
    acceptance_source = (
        "measured by calibration"
        if report.measured_acceptance
        else "Model 1's agreement with itself, an optimistic guess until calibrated"
    )
    lines = [
        f"dry run for {report.model2}: {thousands(report.positions)} positions to score in "
        f"{thousands(report.responses)} responses ({thousands(report.prompts)} prompts); {sent}",
        f"prompt tokens: {prompt_source}",
        f"a generated token is Model 1's with probability {report.acceptance:.2f} "
        f"({report.decoding} decoding; {acceptance_source})",
        f"thinking: {report.thinking:,.0f} tokens per request, in the output tokens "
        f"({report.thinking_source})",
    ]
    minutes = report.one_token.minutes is not None
    header = f"{'':<38}{'requests':>12}{'input tokens':>15}{'output tokens':>15}"
    header += f"{'USD':>12}{'USD batch':>12}" + (f"{'minutes':>10}" if minutes else "")
    lines.append(header)
    for estimate in (report.one_token, report.lookahead):
        usd = "n/a" if estimate.usd is None else f"{estimate.usd:.4f}"
        batch = "n/a" if estimate.batch_usd is None else f"{estimate.batch_usd:.4f}"
        line = (
            f"{estimate.label:<38}{thousands(estimate.requests):>12}{thousands(estimate.input_tokens):>15}"
            f"{thousands(estimate.output_tokens):>15}{usd:>12}{batch:>12}"
        )
        if estimate.minutes is not None:
            line += f"{estimate.minutes:>10.1f}"
        lines.append(line)
    rounds = report.batch
    if rounds is not None:
        usd = "n/a" if rounds.usd is None else f"{rounds.usd:.4f}"
        left = f", about {thousands(rounds.uncovered)} positions left" if rounds.uncovered else ""
        lines.append(
            f"batch, lookahead {rounds.lookahead} (sampled), at most {rounds.max_rounds} rounds: "
            f"{rounds.rounds} rounds, {thousands(rounds.requests)} requests, "
            f"{thousands(rounds.input_tokens)} input "
            f"tokens, {thousands(rounds.output_tokens)} output tokens, USD batch {usd}{left}"
        )
    if report.price is None:
        lines.append("no price known for this model: USD is n/a")
    else:
        lines.append(
            f"at {report.price.model}'s list prices of {report.price.date} "
            f"({report.price.source}), no cached input assumed"
        )
    return "\n".join(lines)
