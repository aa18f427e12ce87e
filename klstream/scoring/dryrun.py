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

One token per request is exact but for the prompts' tokens. With lookahead the estimate follows
the scheduler: each response's pending positions are cut into the same pieces, and along each
piece the chance that a request starts at each position (:func:`~klstream.scoring.acceptance.
chain_starts`) follows from the lookahead asked there (for ``auto``, what the scheduler would
choose from the same prediction and prices) and the predicted chance that Model 2 generates
Model 1's token at each position (:class:`~klstream.scoring.acceptance.AcceptanceModel`).
Without calibration that prediction is its prior (under sampling, Model 1's own probability of
its token; greedy, whether it is Model 1's top token): what Model 2 would reach if it were
Model 1, an optimistic guess. Calibration fits it to the comparisons of its answers. Decoding
is what the run will use: greedy where ``--lookahead-decoding greedy``, or ``auto`` where a
run's greedy probe (recorded in ``run.json``) allowed it or, calibrating, where the calibration's
own comparison of a one-token answer with each greedy answer's first step passes the same test;
sampling otherwise.

In batch mode (``options.batch``) decoding is sampling, and the run works in rounds
(:func:`~klstream.scoring.lookahead.batch_rounds`): the estimate adds the rounds, requests,
tokens and USD at batch prices of the batch lookahead
(:func:`~klstream.scoring.lookahead.batch_lookahead`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from klstream.backends import checks, open_prefill
from klstream.backends.base import AUTO_THINKING, Endpoint
from klstream.backends.prices import Price, Usage, load_prices, price_for
from klstream.backends.thinking import ThinkingChoice, family_minimum, thinking_choice
from klstream.backends.transport import Caller, CallStats
from klstream.loop import run_blocking
from klstream.numbers import thousands
from klstream.scoring import acceptance, lookahead
from klstream.scoring.acceptance import AcceptanceModel
from klstream.scoring.lookahead import Token
from klstream.scoring.options import ScoreOptions
from klstream.scoring.prefill import AUTO_PRICES_FALLBACK
from klstream.scoring.work import (
    WorkItem,
    chosen_tokens,
    count_pending,
    pending_responses,
    prefill_request,
)
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
    """The predicted chance a generated token is Model 1's, averaged over the pending
    positions."""
    measured_acceptance: bool
    """Whether the prediction is calibrated (else its prior, Model 1's self-agreement)."""
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
    models: dict[str, AcceptanceModel]
    """Per decoding, the acceptance prediction fitted to the answers' comparisons."""
    greedy_deviations: list[float]
    """Per site where ``auto`` decoding was to be settled, the largest deviation of a one-token
    answer's logprobs from the greedy answer's first step
    (:func:`~klstream.backends.checks.deviation`)."""
    usage: Usage
    requests: int
    """HTTP requests sent."""
    answers: int
    thinking: ThinkingChoice | None
    """The budget ``--thinking-budget auto`` found, if it was asked to find one."""


async def _calibrate(
    run_dir: Path,
    options: ScoreOptions,
    sites: int,
    decoding: str,
    endpoint: Endpoint,
    settle_greedy: bool,
) -> Calibration:
    """Requests at position 0 of ``sites`` responses: each prompt's token count, the
    comparisons of generated tokens with Model 1's, the usage, the number of HTTP requests and
    answers, and the thinking budget found. With ``settle_greedy`` the requests are greedy and
    each site adds a one-token request at the run's temperature, whose logprobs the greedy
    answer's first step must match for greedy decoding (the run's probe's test)."""
    rows = await asyncio.to_thread(_calibration_rows, run_dir, sites)
    prompt_tokens: dict[str, int] = {}
    models = {name: AcceptanceModel(name) for name in acceptance.PRIORS}
    usage, stats = Usage(), CallStats()
    deviations: list[float] = []
    answers = 0
    caller = Caller(endpoint, options.policy, options.max_concurrent, stats)
    async with open_prefill(endpoint, options.settings) as prefill:

        async def ask(site: list[dict[str, Any]], steps: int, how: str) -> Any:
            nonlocal answers
            first = site[0]
            item = WorkItem(
                first["stem"], first["response_index"], 0, first["prompt"], "", steps, how
            )
            answer = (await caller.generate(prefill, prefill_request(options, item))).value
            if answer is None:
                return None
            answers += 1
            usage.add(answer.usage)
            prompt_tokens[first["prompt"]] = answer.usage.prompt_tokens
            tokens = [Token(row["token"], row["token_id"]) for row in site]
            chosen = chosen_tokens(answer)
            taken = lookahead.accept(len(answer.steps), chosen, tokens, 0, steps).steps
            agreed = lookahead.compared(chosen[:taken], tokens, 0)
            models[how].observe(acceptance.row_features(site[: len(agreed)]), agreed)
            return answer

        async def visit(site: list[dict[str, Any]]) -> None:
            answer = await ask(site, CALIBRATION_STEPS, "greedy" if settle_greedy else decoding)
            if answer is None or not settle_greedy:
                return
            single = await ask(site, 1, "sample")
            if single is not None:
                deviations.append(checks.deviation(answer.steps[0].top, single.steps[0].top))

        groups = groupby(rows, key=lambda row: (row["stem"], row["response_index"]))
        await asyncio.gather(*(visit(list(site)) for _, site in groups))
        choice = thinking_choice(prefill)
    return Calibration(prompt_tokens, models, deviations, usage, stats.requests, answers, choice)


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


def _recorded_decoding(run_dir: Path, model2: str) -> str | None:
    """The decoding an earlier run's greedy probe (in ``run.json``) settled on, if any."""
    path = RunDir(run_dir).run_config(model2)
    if not path.is_file():
        return None
    probe = json.loads(path.read_text(encoding="utf-8")).get("greedy_probe") or {}
    found = probe.get("decoding")
    return found if found in acceptance.PRIORS else None


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


@dataclass
class Planned:
    """Expected requests and tokens of the lookahead over the pending positions, and the sum of
    the predicted acceptance there."""

    requests: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    """Tokens asked for, without thoughts."""
    acceptance: float = 0.0


async def _planned(
    run_dir: Path,
    options: ScoreOptions,
    model: AcceptanceModel,
    prompt_size: dict[str, float],
    thinking: float,
    weigh: Price | None,
) -> Planned:
    """What the scheduler's requests are expected to be: the same pieces of each response
    (:func:`~klstream.scoring.lookahead.segments`), the same lookahead at each request (for
    ``auto``, chosen from ``model``'s prediction and ``weigh``'s prices, with input tokens of
    ``prompt_size`` per prompt plus the position), and the chance a request starts at each
    position (:func:`~klstream.scoring.acceptance.chain_starts`)."""
    total, done = await asyncio.to_thread(count_pending, run_dir, options.model2)
    cap = lookahead.segment_cap(total - done, options.max_concurrent, options.lookahead == 1)
    planned = Planned()
    async for response in pending_responses(run_dir, options.model2, options.range_positions):
        size = prompt_size.get(response.prompt, 0.0)
        predicted = model.predict(response.features)
        for start, end in lookahead.segments(response.pending, cap, predicted):
            accept = predicted[start:end]
            inputs = size + np.arange(start, end, dtype=np.float64)
            if options.lookahead != "auto":
                asked = np.minimum(options.lookahead, end - np.arange(start, end))
            elif weigh is None:
                asked = np.minimum(2, end - np.arange(start, end))
            else:
                asked = acceptance.auto_lookaheads(
                    accept,
                    inputs * weigh.input + thinking * weigh.output,
                    weigh.output,
                    lookahead.AUTO_MAX_LOOKAHEAD,
                )
            starts = acceptance.chain_starts(accept, asked)
            planned.requests += float(starts.sum())
            planned.input_tokens += float(starts @ inputs)
            planned.output_tokens += float(starts @ asked)
            planned.acceptance += float(accept.sum())
    return planned


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
    probed = options.batch is None and options.lookahead != 1 and options.decoding != "sample"
    recorded = _recorded_decoding(run_dir, options.model2)
    decoding = "sample"
    if probed and (options.decoding == "greedy" or recorded == "greedy"):
        decoding = "greedy"
    settle_greedy = probed and options.decoding == "auto" and recorded is None

    calibrated = None
    if dry.calibrate and endpoint is not None and total_positions:
        calibrated = await _calibrate(
            run_dir, options, dry.calibrate, decoding, endpoint, settle_greedy
        )
        deviations = calibrated.greedy_deviations
        if deviations and statistics.median(deviations) <= checks.JITTER_NATS:
            decoding = "greedy"
    prompt_tokens = calibrated.prompt_tokens if calibrated else {}
    model = calibrated.models[decoding] if calibrated else AcceptanceModel(decoding)
    prompts = table.column("prompt").to_pylist()
    chars = columns["prompt_chars"].astype(np.float64)
    counted = np.array([prompt in prompt_tokens for prompt in prompts], dtype=bool)
    per_char = 1.0 / lookahead.CHARS_PER_TOKEN
    if counted.any():
        per_char = sum(prompt_tokens.values()) / max(chars[counted].sum(), 1.0)
    prompt_size = np.where(
        counted, [prompt_tokens.get(p, 0) for p in prompts], np.round(chars * per_char)
    )

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
    sizes = dict(zip(prompts, prompt_size.tolist(), strict=True))
    planned = await _planned(
        run_dir, options, model, sizes, thinking, price or prices.get(AUTO_PRICES_FALLBACK)
    )
    mean_asked = planned.output_tokens / planned.requests if planned.requests else 1.0
    estimate = _estimate(
        f"lookahead {options.lookahead} (N = {mean_asked:.1f} on average)"
        if options.lookahead == "auto"
        else f"lookahead {options.lookahead}",
        np.array([planned.requests]),
        np.array([planned.input_tokens]),
        np.array([planned.output_tokens + planned.requests * thinking]),
        mean_asked,
        price,
        dry,
    )
    acceptance_rate = planned.acceptance / total_positions if total_positions else 0.0
    batch = None
    if options.batch is not None:
        tokens = lookahead.batch_lookahead(options.lookahead)
        rounds = lookahead.batch_rounds(
            acceptance_rate, tokens, total_positions, options.batch.max_rounds
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
        acceptance_rate,
        calibrated is not None and model.observations > 0,
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
