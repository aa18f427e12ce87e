"""Real providers as they are today (README, "Gemini as of 2026-12-07"): models without logprobs,
thinking that cannot be switched off, sentinel logprobs, substituted and retired models, and the
dated price table. End to end through the real google-genai SDK over HTTP to the emulator's
profiles of each behaviour; the parser and the price table also directly."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest
from cli import invoke
from click.testing import Result
from google.genai import errors as genai_errors

from klstream.backends import open_prefill
from klstream.backends.base import ClientSettings, Endpoint, PrefillRequest
from klstream.backends.gemini import api_fault, parse_answer_body
from klstream.backends.gemini_batch import GeminiBatch
from klstream.backends.prices import (
    LONG_CONTEXT_TOKENS,
    PRICE_FIELDS,
    Usage,
    entry_warnings,
    load_prices,
    price_for,
    usage_of,
)
from klstream.backends.thinking import Refusal, ThinkingChoice, next_budget, thinking_choice
from klstream.cli import OUT_OF_THINKING
from klstream.emulator import EmulatorServer
from klstream.emulator.protocol import (
    MUST_THINK_MESSAGE,
    NO_LOGPROBS_MESSAGE,
    SENTINEL_LOGPROB,
    VERTEX_NO_LOGPROBS_MESSAGE,
    answer_body,
    build_call,
)
from klstream.errors import (
    LogprobsUnavailable,
    PriceTableError,
    UnusableAnswer,
)
from klstream.input.explode import explode
from klstream.pipeline import score as score_run
from klstream.scoring.options import ScoreOptions
from klstream.storage import schemas
from klstream.storage.rundir import RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs

Key = tuple[str, int, int]
PROMPT = "Tell story number 0 about a lighthouse keeper."


@pytest.fixture
def small_run(tmp_path: Path, toy_inputs: ToyInputs) -> Path:
    """One input file's positions: enough for each behaviour, quick with thinking on."""
    run = tmp_path / "run"
    explode(toy_inputs.directory, run, max_files=1)
    return run


def score_cli(run_dir: Path, server: EmulatorServer, model2: str, *args: object) -> Result:
    return invoke(
        "score", run_dir, "--model2", model2, "--base-url", server.base_url, "--timeout", 5, *args
    )


def vertex_cli(run_dir: Path, server: EmulatorServer, model2: str, *args: object) -> Result:
    return score_cli(run_dir, server, model2, "--backend", "vertex", "--project-id", "p", *args)


def score_rows(run_dir: Path, model2: str) -> list[dict[str, Any]]:
    parts = sorted(RunDir(run_dir).scores_dir(model2).glob("*.parquet"))
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def kl_floors(run_dir: Path, model2: str) -> dict[Key, float]:
    rows = pq.read_table(RunDir(run_dir).kl_path(model2)).to_pylist()
    assert {row["status"] for row in rows} == {schemas.KL_STATUS_SCORED}
    return {(r["stem"], r["response_index"], r["position"]): r["kl_floor"] for r in rows}


def score(run_dir: Path, server: EmulatorServer, model2: str, **options: Any) -> None:
    endpoint = Endpoint("gemini", "test-key", base_url=server.base_url, timeout_s=5.0)
    report = score_run(run_dir, ScoreOptions(model2, lookahead=1, **options), endpoint)
    assert report.remaining == 0 and report.stats.failed == 0


# --- 1: a model without logprobs stops the run at once, saying what works instead ------------


def test_the_developer_apis_no_logprobs_answer_stops_the_run_with_what_works_instead(
    small_run: Path, emulator: EmulatorServer
) -> None:
    result = score_cli(small_run, emulator, "toy-logprobsoff")
    assert result.exit_code == 5, result.output
    assert NO_LOGPROBS_MESSAGE.format(model="toy-logprobsoff") in result.stderr
    assert "Vertex AI" in result.stderr and "vLLM" in result.stderr
    assert "--backend openai --method prompt-logprobs" in result.stderr
    assert "--backend vertex --model2 gemini-2.5-flash" in result.stderr
    assert "--resume" not in result.stderr
    assert emulator.stats()["total"] == 1
    assert score_rows(small_run, "toy-logprobsoff") == []


def test_vertexs_no_logprobs_answer_stops_the_run_too(
    small_run: Path, emulator: EmulatorServer
) -> None:
    result = vertex_cli(small_run, emulator, "toy-logprobsoff")
    assert result.exit_code == 5, result.output
    assert "Logprobs is not supported for this model" in result.stderr
    assert "--backend openai --method prompt-logprobs" in result.stderr
    assert emulator.stats()["total"] == 1


@pytest.mark.parametrize(
    "message",
    [
        "Logprobs is not enabled for models/gemini-2.5-pro",
        "Logprobs is not enabled for this model",
        "Logprobs is not supported for the current model.",
        VERTEX_NO_LOGPROBS_MESSAGE,
    ],
)
def test_every_wording_of_no_logprobs_is_a_model_that_cannot_score(message: str) -> None:
    body = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
    error = genai_errors.ClientError(400, body, SimpleNamespace(headers={}))
    with pytest.raises(LogprobsUnavailable, match="open-weight model on a vLLM server") as raised:
        api_fault(error, 0, "gemini-2.5-pro", "vertex")
    assert raised.value.exit_code == 5
    # Vertex with a 2.5 model already is the first suggestion, so it is not made again.
    assert "Gemini 2.5 model on Vertex AI" not in str(raised.value)


# --- 2: --thinking-budget auto --------------------------------------------------------------


def choose(server: EmulatorServer, model: str) -> ThinkingChoice:
    """The budget ``auto`` settles on for ``model``, after one request (which it answers, its
    thoughts spending the budget)."""

    async def go() -> ThinkingChoice:
        endpoint = Endpoint("gemini", "test-key", base_url=server.base_url)
        async with open_prefill(endpoint, ClientSettings.of(model, 4, "auto")) as prefill:
            answer = await prefill.generate(PrefillRequest(PROMPT, "The", 5))
            choice = thinking_choice(prefill)
        assert choice is not None and len(answer.steps) == 1
        assert answer.usage.thoughts_tokens == (choice.budget or 0)
        return choice

    return asyncio.run(go())


def test_auto_thinking_takes_the_documented_minimum_of_a_model_that_must_think(
    emulator: EmulatorServer,
) -> None:
    choice = choose(emulator, "gemini-2.5-pro-toy-mustthink128")
    assert choice.budget == 128
    assert "gemini-2.5-pro's documented minimum" in choice.reason
    assert [(r.budget, r.reply) for r in choice.refused] == [(0, MUST_THINK_MESSAGE)]
    assert choice.recorded()["refused"] == [{"budget": 0, "reply": MUST_THINK_MESSAGE}]


def test_auto_thinking_climbs_the_documented_minimums_for_an_unknown_family(
    emulator: EmulatorServer,
) -> None:
    choice = choose(emulator, "toy-mustthink512")
    assert choice.budget == 512
    assert [r.budget for r in choice.refused] == [0, 128]
    assert choose(emulator, "toy-d0.5").budget == 0
    assert choose(emulator, "toy-d0.5").refused == ()


def test_a_minimum_named_in_the_refusal_comes_first() -> None:
    named = next_budget("gemini-2.5-pro", Refusal(0, "budget must be in the range 256 to 32768"))
    assert named is not None and named[0] == 256 and "names 256" in named[1]
    drop = Refusal(0, "Thinking can't be disabled for this model. Remove 'thinking_config'")
    assert next_budget("gemini-2.5-pro", drop) == (
        None,
        "the service refused a budget of 0 and asked for no thinking config",
    )
    assert next_budget("x", Refusal(None, "no")) is None


def test_auto_thinking_scores_a_model_that_must_think_and_counts_its_thoughts(
    small_run: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    model2 = "gemini-2.5-pro-toy-mustthink128"
    result = score_cli(small_run, emulator, model2, "--lookahead", "1")
    assert result.exit_code == 0, result.stderr
    rows = score_rows(small_run, model2)
    assert {row["status"] for row in rows} == {schemas.SCORE_OK}
    assert {row["thoughts_token_count"] for row in rows} == {128}
    assert f"({128 * len(rows):,} thinking)" in result.output
    # The toy's thoughts leave its answer's distribution alone, so the values are those of
    # the same model without the flag.
    score(small_run, emulator, "gemini-2.5-pro-toy")
    assert kl_floors(small_run, model2) == kl_floors(small_run, "gemini-2.5-pro-toy")


def test_no_two_thinking_hints_point_at_each_other(
    small_run: Path, emulator: EmulatorServer
) -> None:
    refused = score_cli(small_run, emulator, "toy-mustthink128", "--thinking-budget", "0")
    assert refused.exit_code == 5
    assert MUST_THINK_MESSAGE in refused.stderr
    assert "--thinking-budget auto" in refused.stderr

    unbounded = score_cli(small_run, emulator, "toy-mustthink128", "--thinking-budget", "none")
    assert unbounded.exit_code == 5
    assert "--thinking-budget 0, or auto" in unbounded.stderr

    hopeless = score_cli(small_run, emulator, "toy-mustthink100000")
    assert hopeless.exit_code == 5
    assert OUT_OF_THINKING in hopeless.stderr and "--thinking-budget" not in hopeless.stderr


def test_the_dry_run_counts_the_thinking_auto_will_pay_for(
    small_run: Path, emulator: EmulatorServer
) -> None:
    model2 = "gemini-2.5-pro-toy-mustthink128"
    estimate = score_cli(small_run, emulator, model2, "--dry-run", "--lookahead", "1")
    assert estimate.exit_code == 0, estimate.output
    assert "thinking: 128 tokens per request" in estimate.output
    positions = pq.read_metadata(RunDir(small_run).positions).num_rows
    assert f"{positions * 129:,}" in estimate.output
    calibrated = score_cli(
        small_run, emulator, model2, "--dry-run", "--lookahead", "1", "--calibrate", 2
    )
    assert calibrated.exit_code == 0, calibrated.output
    assert "thinking: 128 tokens per request, in the output tokens (measured" in calibrated.output


# --- 3: invalid logprobs are absent, not values ----------------------------------------------


def test_sentinel_padding_is_dropped_counted_and_leaves_the_kl_as_without_it(
    small_run: Path, emulator: EmulatorServer
) -> None:
    score(small_run, emulator, "toy-d0.5")
    score(small_run, emulator, "toy-d0.5-padded")
    plain, padded = score_rows(small_run, "toy-d0.5"), score_rows(small_run, "toy-d0.5-padded")
    assert {row["dropped_logprobs"] for row in plain} == {0}
    assert {row["dropped_logprobs"] for row in padded} == {2}
    assert [row["top_logprobs"] for row in padded] == [row["top_logprobs"] for row in plain]
    assert kl_floors(small_run, "toy-d0.5-padded") == kl_floors(small_run, "toy-d0.5")


def test_geminis_sentinels_after_a_certain_token_never_become_the_floor(
    small_run: Path, emulator: EmulatorServer
) -> None:
    score(small_run, emulator, "toy-d0.5-sentinels")
    rows = score_rows(small_run, "toy-d0.5-sentinels")
    padded = [row for row in rows if row["dropped_logprobs"]]
    assert padded, "no step of the inputs is certain enough to be padded"
    for row in padded:
        assert row["top_logprobs"] == [0.0] and row["dropped_logprobs"] == 19
    assert all(lp > -1e4 for row in rows for lp in row["top_logprobs"])
    floors = kl_floors(small_run, "toy-d0.5-sentinels")
    assert all(math.isfinite(value) and value < 50 for value in floors.values())


def answer_json(top: list[Any], chosen: Any | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"topCandidates": [{"candidates": top}]}
    if chosen is not None:
        result["chosenCandidates"] = [chosen]
    return {
        "candidates": [{"content": {"parts": [{"text": "a"}]}, "logprobsResult": result}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1},
        "modelVersion": "gemini-2.5-flash-preview-05-20",
    }


def entry(token: str, logprob: Any, token_id: int | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"token": token, "tokenId": token_id if token_id is not None else 1}
    if logprob is not ...:
        raw["logProbability"] = logprob
    return raw


def test_the_parser_leaves_out_every_unusable_logprob_and_counts_it() -> None:
    top = [
        entry("a", -0.1, 1),
        entry("b", SENTINEL_LOGPROB, 2),
        entry("c", float("nan"), 3),
        entry("d", float("-inf"), 4),
        entry("e", 0.5, 5),
        entry("f", None, 6),
        entry("g", ..., 7),
        entry("h", -2.5, 8),
    ]
    answer = parse_answer_body(answer_json(top, entry("a", -0.1, 1)), 0)
    (step,) = answer.steps
    assert [(c.token, c.logprob) for c in step.top] == [("a", -0.1), ("h", -2.5)]
    assert step.dropped == 6 and step.chosen.token == "a" and step.chosen_reported
    assert answer.served_model == "gemini-2.5-flash-preview-05-20"


def test_a_chosen_token_without_a_usable_logprob_takes_its_list_entry() -> None:
    listed = [entry("a", -0.1, 1), entry("b", -2.4, 2)]
    (step,) = parse_answer_body(answer_json(listed, entry("b", None, 2)), 0).steps
    assert (step.chosen.token, step.chosen.logprob, step.chosen_reported) == ("b", -2.4, True)
    (unknown,) = parse_answer_body(answer_json(listed, entry("z", None, 9)), 0).steps
    assert not unknown.chosen_reported


def test_a_list_of_nothing_but_sentinels_is_an_unusable_answer() -> None:
    top = [entry("a", SENTINEL_LOGPROB, 1), entry("b", SENTINEL_LOGPROB, 2)]
    with pytest.raises(UnusableAnswer, match="2 entries without a usable logprob"):
        parse_answer_body(answer_json(top), 0)


# --- 4: the model that answered --------------------------------------------------------------


def test_the_served_model_is_recorded_and_shows_a_substitution(
    small_run: Path, emulator: EmulatorServer
) -> None:
    score(small_run, emulator, "toy-d0.5")
    score(small_run, emulator, "toy-d0.5-rerouted")
    assert {row["served_model"] for row in score_rows(small_run, "toy-d0.5")} == {"toy-d0.5"}
    rerouted = score_rows(small_run, "toy-d0.5-rerouted")
    assert {row["served_model"] for row in rerouted} == {"toy"}


def test_batch_output_lines_carry_the_served_model() -> None:
    request = {"generationConfig": {"responseLogprobs": True, "logprobs": 3}}
    call = build_call(request, PROMPT, "The", "toy-d1-rerouted", "v1beta")
    body = answer_body(call, with_logprobs=True, vertex=False)
    jobs = GeminiBatch(Endpoint("gemini", "k", base_url="http://127.0.0.1:9"), ClientSettings("m"))
    line = jobs.decode_line(json.dumps({"key": "k1", "response": body}).encode())
    assert line.answer is not None and line.answer.served_model == "toy"


# --- 5: retired models and the price table ---------------------------------------------------


def test_a_retired_model_stops_the_run_saying_when_it_was_retired(
    small_run: Path, emulator: EmulatorServer
) -> None:
    result = score_cli(small_run, emulator, "gemini-2.0-flash-toy-retired")
    assert result.exit_code == 5, result.output
    assert "404 NOT_FOUND" in result.stderr
    assert "gemini-2.0-flash was retired on 2026-06-01" in result.stderr
    assert "klstream prices" in result.stderr
    assert result.stderr.count("warning:") == 1


@pytest.mark.parametrize(
    ("value", "shown"),
    [("NaN", "nan"), ("Infinity", "inf"), ("1e308", "1e+308"), ("-1", "-1"), ('"1"', "'1'")],
)
def test_a_price_that_is_not_a_price_is_refused_naming_the_file_and_field(
    small_run: Path, emulator: EmulatorServer, tmp_path: Path, value: str, shown: str
) -> None:
    bad = tmp_path / "prices.json"
    fields = ", ".join(f'"{key}": {value if key == "output" else 1}' for key in PRICE_FIELDS)
    bad.write_text(f'{{"models": {{"mine": {{{fields}, "source": "s", "date": "2026-12-01"}}}}}}')
    result = score_cli(small_run, emulator, "toy-d0.5", "--prices", bad)
    assert result.exit_code == 3
    assert f"{bad}: models.mine.output must be a price" in result.stderr
    assert f"got {shown}" in result.stderr
    assert emulator.stats()["total"] == 0
    assert invoke("prices", "--prices", bad).exit_code == 3


def test_an_old_price_file_still_reads_and_its_age_is_warned_about(
    small_run: Path, emulator: EmulatorServer, tmp_path: Path
) -> None:
    old = tmp_path / "prices.json"
    rates = dict.fromkeys(PRICE_FIELDS, 0.5)
    old.write_text(json.dumps({"models": {"toy": {**rates, "source": "me", "date": "2025-01-02"}}}))
    entry = price_for("toy-d0.5", load_prices(old))
    assert entry is not None and entry.retired is None and entry.long_context is None
    result = score_cli(small_run, emulator, "toy-d0.5", "--prices", old, "--lookahead", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("toy's prices were read on 2025-01-02") == 1
    assert "`klstream prices --model toy-d0.5`" in result.stderr


def test_the_shipped_table_is_dated_sourced_and_holds_the_long_context_tier() -> None:
    table = load_prices()
    assert {"gemini-2.5-pro", "gemini-2.5-flash", "gemini-3.1-pro-preview", "gemini-2.0-flash"} <= (
        table.keys()
    )
    for price in table.values():
        assert price.source.startswith("https://") and date.fromisoformat(price.date)
        assert price.batch_input == price.input / 2 and price.batch_output == price.output / 2
    assert table["gemini-2.0-flash"].retired == "2026-06-01"
    pro = table["gemini-2.5-pro"]
    short = usage_of({"promptTokenCount": 1000, "candidatesTokenCount": 10})
    long = usage_of({"promptTokenCount": LONG_CONTEXT_TOKENS + 1, "candidatesTokenCount": 10})
    assert pro.usd(short) == pytest.approx((1000 * 1.25 + 10 * 10.0) / 1e6)
    assert pro.usd(long) == pytest.approx(((LONG_CONTEXT_TOKENS + 1) * 2.5 + 10 * 15.0) / 1e6)
    both = Usage()
    both.add(short)
    both.add(long)
    assert pro.usd(both) == pytest.approx(pro.usd(short) + pro.usd(long))
    assert entry_warnings(table["gemini-3.6-flash"], date(2027, 1, 2)) == [
        "gemini-3.6-flash's prices held until 2026-12-31 (from 2027-01-01: input $1.50, output "
        "$7.50 (batch half of that))"
    ]


def test_the_prices_command_shows_what_a_run_would_use() -> None:
    listed = invoke("prices")
    assert listed.exit_code == 0
    assert "gemini-3.1-pro-preview: input $2, cached $0.2, output $12" in listed.output
    assert "retired: 2026-06-01" in listed.output

    one = invoke("prices", "--model", "gemini-2.5-pro-preview-06-05")
    assert one.exit_code == 0
    lines = one.output.splitlines()
    assert lines[0] == (
        "gemini-2.5-pro-preview-06-05 is priced by the entry gemini-2.5-pro of "
        "klstream/backends/prices.json"
    )
    age = (date.today() - date(2026, 10, 8)).days
    assert f"  read 2026-10-08 ({age} days ago) from https://ai.google.dev" in one.output
    assert "prompts over 200,000 tokens: input $2.5" in one.output
    assert "retired: no" in one.output

    retired = invoke("prices", "--model", "gemini-2.0-flash")
    assert "warning: gemini-2.0-flash was retired on 2026-06-01" in retired.output
    assert "no price entry matches" in invoke("prices", "--model", "llama").output


def test_the_price_table_refuses_a_malformed_tier_or_date(tmp_path: Path) -> None:
    rates = dict.fromkeys(PRICE_FIELDS, 1.0)
    base = {**rates, "source": "s", "date": "2026-12-01"}
    for extra, field in (
        ({"retired": "June"}, "models.m.retired must be a date"),
        ({"long_context": {"input": 1}}, "models.m.long_context needs `above_tokens`"),
        (
            {"long_context": {**rates, "above_tokens": 5, "output": float("inf")}},
            "models.m.long_context.output must be a price",
        ),
    ):
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"models": {"m": {**base, **extra}}}))
        with pytest.raises(PriceTableError, match=field):
            load_prices(path)
