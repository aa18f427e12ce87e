"""Speculative lookahead end to end: the toy backend in process (real HTTP to the emulator where a
real process is killed), real Parquet, real DuckDB, the CLI in process and as a subprocess. Both
answer deterministically given the prefix, so a stored step must equal what a one-token request
at its position gives, whatever the sampling."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli import invoke, start_process
from test_score import (
    MODEL2,
    assert_parts_intact,
    identities,
    key_of,
    kl_rows,
    parquet_files,
    requested,
    resolved,
    score,
    score_cli,
    score_rows,
    wait_until,
)

import klstream
from klstream.backends.prices import Usage, load_prices
from klstream.backends.toy import ToyService
from klstream.emulator import EmulatorServer, FaultConfig, encode
from klstream.emulator.service import ServiceConfig
from klstream.input.explode import explode
from klstream.scoring import acceptance
from klstream.scoring.acceptance import AcceptanceModel
from klstream.scoring.prefill import PrefillScheduler
from klstream.scoring.score import METHODS
from klstream.scoring.session import Session
from klstream.scoring.work import acceptance_so_far
from klstream.storage import schemas
from klstream.storage.rundir import RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs

NEAR, FAR = "toy-d0.25", "toy-d8"
USAGE_COLUMNS = (
    "prompt_token_count",
    "cached_content_token_count",
    "candidates_token_count",
    "thoughts_token_count",
)
LISTS = ("top_tokens", "top_token_ids", "top_logprobs")


def toy_prices(tmp_path: Path) -> Path:
    """A price table that prices the toy models as gemini-2.0-flash."""
    entry = {
        "input": 0.1,
        "cached_input": 0.025,
        "output": 0.4,
        "batch_input": 0.05,
        "batch_cached_input": 0.025,
        "batch_output": 0.2,
        "source": "gemini-2.0-flash's prices, for the emulator",
        "date": "2025-10-01",
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"toy": entry}}), encoding="utf-8")
    return path


def assert_complete_once(run_dir: Path, model2: str, toy_inputs: ToyInputs) -> None:
    """Every position has exactly one ok row, and the answers' rows hang together: one request,
    steps 0..k-1 at consecutive positions, usage on step 0 only, never past the response."""
    rows = score_rows(run_dir, model2)
    ok = Counter(key_of(r) for r in rows if r["status"] == schemas.SCORE_OK)
    assert ok.keys() == toy_inputs.positions.keys()
    assert set(ok.values()) == {1}
    lengths = Counter((stem, index) for stem, index, _ in toy_inputs.positions)
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_request[row["request_id"]].append(row)
    for answer in by_request.values():
        answer.sort(key=lambda r: r["step"])
        first = answer[0]
        assert [r["step"] for r in answer] == list(range(len(answer)))
        assert [r["position"] for r in answer] == [
            first["position"] + s for s in range(len(answer))
        ]
        assert len(answer) <= first["lookahead"]
        assert (
            first["position"] + first["lookahead"]
            <= lengths[first["stem"], first["response_index"]]
        )
        assert all(r["prompt_token_count"] is None for r in answer[1:])
        if first["status"] == schemas.SCORE_OK:
            position = toy_inputs.positions[key_of(first)]
            assert first["prompt_token_count"] == len(encode(position.prompt)) + len(
                encode(position.prefill)
            )
            assert 1 <= first["candidates_token_count"] <= first["lookahead"]


# --- 1: lookahead stores what one token per request stores ------------------------------------


@pytest.mark.parametrize(
    ("inputs", "model2"),
    [("toy_inputs", NEAR), ("toy_inputs", FAR), ("hot_toy_inputs", NEAR)],
)
@pytest.mark.parametrize("lookahead", [4, "auto"])
def test_lookahead_results_are_the_one_token_results(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    toy: ToyService,
    inputs: str,
    model2: str,
    lookahead: int | str,
) -> None:
    toy_inputs: ToyInputs = request.getfixturevalue(inputs)
    one_token, run_dir = tmp_path / "one-token", tmp_path / "run"
    explode(toy_inputs.directory, one_token)
    explode(toy_inputs.directory, run_dir)
    baseline = score(one_token, toy, model2, lookahead=1)
    report = score(run_dir, toy, model2, lookahead=lookahead, max_concurrent=4)

    assert report.remaining == 0
    assert_complete_once(run_dir, model2, toy_inputs)
    expected, got = resolved(one_token, model2), resolved(run_dir, model2)
    for key in toy_inputs.positions:
        for column in LISTS:
            assert got[key][column] == expected[key][column], (key, column)
    assert kl_rows(run_dir, model2) == {
        key: {**row} for key, row in kl_rows(one_token, model2).items()
    }
    if lookahead == "auto":
        # auto weighs input against output tokens at gemini-2.5-flash's prices here (the toy
        # models have none): at most a few percent above one token per request, though on 210
        # positions the greedy probe's 3 requests alone are 1.5%.
        flash = load_prices()["gemini-2.5-flash"]
        assert flash.usd(report.stats.usage) <= 1.04 * flash.usd(baseline.stats.usage)
    elif inputs == "toy_inputs" and model2 == NEAR:
        assert report.stats.answers < 0.6 * len(toy_inputs.positions)


def test_auto_on_a_pair_that_never_agrees_costs_little_more_than_one_token(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    report = score(run_dir, toy, FAR, lookahead="auto", decoding="sample")
    positions = toy_inputs.positions.values()
    one_token = Usage(
        sum(len(encode(p.prompt)) + len(encode(p.prefill)) for p in positions), 0, len(positions)
    )
    flash = load_prices()["gemini-2.5-flash"]
    assert flash.usd(report.stats.usage) <= 1.05 * flash.usd(one_token)


def test_every_answer_one_token_ones_included_calibrates_the_acceptance_prediction(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a pair that never agrees auto asks for one token almost everywhere; each answer's
    chosen token is still a comparison the prediction learns from, so it ends calibrated to
    the run's rate (before, a one-token answer taught nothing), and a resumed run starts from
    the same comparisons read back from the stored results."""
    made: list[PrefillScheduler] = []

    def recording(session: Session) -> PrefillScheduler:
        made.append(PrefillScheduler(session))
        return made[-1]

    monkeypatch.setitem(METHODS, "prefill", recording)
    report = score(run_dir, toy, FAR, lookahead="auto", decoding="sample")
    assert report.remaining == 0
    rows = [r for r in score_rows(run_dir, FAR) if r["status"] == schemas.SCORE_OK]
    one_token = sum(r["lookahead"] == 1 for r in rows if r["step"] == 0)
    assert one_token > 0.8 * sum(r["step"] == 0 for r in rows)
    positions = pq.read_table(RunDir(run_dir).positions).to_pylist()
    tokens = {key_of(p): p["token_id"] for p in positions}
    agreed = sum(r["chosen_token_id"] == tokens[key_of(r)] for r in rows)
    # Every stored result is one comparison: its chosen token against Model 1's.
    model = made[0].models["sample"]
    assert model.observations == len(rows) == len(toy_inputs.positions)
    assert model.agreed == agreed
    features = acceptance.features(
        np.array([p["logprob"] for p in positions]),
        np.array([p["token_id"] == p["top_token_ids"][0] for p in positions]),
        np.array(
            [
                p["logprob"] - p["top_logprobs"][1 if p["token_id"] == p["top_token_ids"][0] else 0]
                for p in positions
            ]
        ),
    )
    prior = AcceptanceModel("sample").predict(features).mean()
    fitted = model.predict(features).mean()
    assert abs(fitted - agreed / len(rows)) < 0.05 < prior - fitted

    resumed = acceptance_so_far(run_dir, FAR)["sample"]
    assert (resumed.observations, resumed.agreed) == (model.observations, model.agreed)
    assert resumed.weights == pytest.approx(model.weights, abs=0.5)


# --- 2: thinking is not a step ------------------------------------------------------------------


def test_thinking_tokens_are_not_taken_as_steps(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    one_token = run_dir.parent / "one-token"
    explode(toy_inputs.directory, one_token)
    score(one_token, toy, "toy-thinking", lookahead=1)
    report = score(run_dir, toy, "toy-thinking", lookahead=6, thinking_budget=2)

    assert report.remaining == 0
    assert report.stats.usage.thoughts_tokens == 2 * report.stats.calls.requests
    expected, got = resolved(one_token, "toy-thinking"), resolved(run_dir, "toy-thinking")
    assert all(got[key]["top_tokens"] == expected[key]["top_tokens"] for key in expected)
    for row in score_rows(run_dir, "toy-thinking"):
        assert row["step"] < 6  # 6 answer tokens asked for, thinking besides
        assert row["thoughts_token_count"] in (None, 2)


# --- 3: kill -9, then --resume -------------------------------------------------------------------


def test_sigkill_with_lookahead_then_resume_repeats_no_stored_position(
    tmp_path: Path, run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, toy: ToyService
) -> None:
    emulator.set_faults(FaultConfig(latency_ms=20))
    command = [
        "score",
        run_dir,
        "--model2",
        MODEL2,
        "--base-url",
        emulator.base_url,
        "--checkpoint-rows",
        "4",
        "--max-concurrent",
        "3",
        "--lookahead",
        "4",
        "--lookahead-decoding",
        "sample",
    ]
    not_flushed = identities(toy_inputs)
    for attempt, more_parts in enumerate([1, 2, 3, None]):
        parts_before = len(parquet_files(run_dir))
        started = time.monotonic()
        process = start_process(*command, *(["--resume"] if attempt else []))
        if more_parts is None:
            _, stderr = process.communicate()
            assert process.returncode == 0, stderr
        else:
            target = parts_before + more_parts
            wait_until(process, lambda: len(parquet_files(run_dir)) >= target)  # noqa: B023
            process.kill()
            _, stderr = process.communicate()
            assert process.returncode == -signal.SIGKILL, f"ended before the kill: {stderr}"
        asked = requested(r for r in emulator.requests if r.time >= started)
        asked.pop(("", ""), None)
        assert set(asked) <= set(not_flushed)
        assert_parts_intact(run_dir)
        # An answer's rows are never split between parts.
        parts_of_request: dict[str, set[Path]] = defaultdict(set)
        for part in parquet_files(run_dir):
            for row in pq.read_table(part).to_pylist():
                parts_of_request[row["request_id"]].add(part)
        assert all(len(parts) == 1 for parts in parts_of_request.values())
        flushed = {key_of(r) for r in score_rows(run_dir) if r["status"] == schemas.SCORE_OK}
        not_flushed = identities(toy_inputs, toy_inputs.positions.keys() - flushed)

    assert_complete_once(run_dir, MODEL2, toy_inputs)
    one_token = tmp_path / "one-token"
    explode(toy_inputs.directory, one_token)
    score(one_token, toy)  # the same answers, sooner
    expected, got = resolved(one_token), resolved(run_dir)
    assert all(got[k]["top_logprobs"] == expected[k]["top_logprobs"] for k in expected)


# --- 4: greedy only where the service's logprobs do not depend on the temperature ---------------


def test_auto_decoding_probes_once_and_goes_greedy_on_a_consistent_service(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    first = score(run_dir, toy, NEAR, lookahead="auto", max_consecutive_failures=50)
    config = json.loads(RunDir(run_dir).run_config(NEAR).read_text(encoding="utf-8"))
    probe = config["greedy_probe"]
    assert probe["decoding"] == "greedy" and probe["median_deviation"] == 0.0
    assert probe["compared"] >= 3
    assert first.decoding == "greedy"
    assert first.stats.calls.requests == first.stats.answers + probe["requests"]
    decodings = Counter(r["decoding"] for r in score_rows(run_dir, NEAR))
    assert decodings["greedy"] > decodings["sample"] > 0  # the first requests sample

    # The probe is not run again for this model2 and run directory.
    dropped = parquet_files(run_dir, NEAR)[-1]
    dropped.unlink()
    again = score(run_dir, toy, NEAR, lookahead="auto", resume=True)
    assert again.decoding == "greedy" and again.remaining == 0
    assert again.stats.calls.requests == again.stats.answers
    assert_complete_once(run_dir, NEAR, toy_inputs)


def test_greedy_is_refused_when_the_logprobs_follow_the_temperature(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    toy.set_service(ServiceConfig(scaled_logprobs=True))
    refused = score_cli(run_dir, toy, NEAR, "--lookahead-decoding", "greedy")
    assert refused.exit_code == 5
    assert "do not depend on the sampling temperature" in refused.stderr
    assert "--lookahead-decoding sample" in refused.stderr
    config = json.loads(RunDir(run_dir).run_config(NEAR).read_text(encoding="utf-8"))
    assert config["greedy_probe"]["decoding"] == "sample"
    assert config["greedy_probe"]["median_deviation"] is None  # greedy lists only its token

    fallback = score_cli(run_dir, toy, NEAR, "--resume")
    assert fallback.exit_code == 0, fallback.output
    assert "sample decoding" in fallback.output
    assert {r["decoding"] for r in score_rows(run_dir, NEAR)} == {"sample"}
    assert_complete_once(run_dir, NEAR, toy_inputs)


# --- 5: what it cost ------------------------------------------------------------------------------


def test_costs_add_up_from_every_answers_usage(
    tmp_path: Path, run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    toy.set_service(ServiceConfig(cache_min_tokens=12))
    result = score_cli(run_dir, toy, NEAR, "--prices", toy_prices(tmp_path))
    assert result.exit_code == 0, result.output
    assert "per position" in result.output and "toy's list prices of 2025-10-01" in result.output

    rows = [r for r in score_rows(run_dir, NEAR) if r["step"] == 0]
    probe = json.loads(RunDir(run_dir).run_config(NEAR).read_text())["greedy_probe"]
    prompt = sum(r["prompt_token_count"] for r in rows) + probe["prompt_token_count"]
    cached = sum(r["cached_content_token_count"] for r in rows)
    cached += probe["cached_content_token_count"]
    output = sum(r["candidates_token_count"] for r in rows) + probe["candidates_token_count"]
    assert cached > 0

    query = invoke("query", run_dir, "SELECT * FROM costs", "--format", "json")
    assert query.exit_code == 0, query.output
    (cost,) = [json.loads(line) for line in query.output.splitlines()]
    positions = len(toy_inputs.positions)
    assert cost["requests"] == len(rows) + probe["requests"]
    assert cost["positions"] == positions
    assert cost["requests_per_position"] == pytest.approx(cost["requests"] / positions)
    assert cost["uncached_input_tokens"] + cost["cached_input_tokens"] == prompt
    assert cost["cached_input_tokens"] == cached
    assert cost["output_tokens"] == output
    usd = ((prompt - cached) * 0.1 + cached * 0.025 + output * 0.4) / 1e6
    assert cost["usd"] == pytest.approx(usd)
    assert cost["batch_usd"] == pytest.approx(
        ((prompt - cached) * 0.05 + cached * 0.025 + output * 0.2) / 1e6
    )
    assert cost["priced_as"] == "toy"

    exported = invoke("export", run_dir, "-o", tmp_path / "out")
    assert exported.exit_code == 0, exported.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cost"]["usd"] == pytest.approx(usd)
    assert summary["cost"]["lookahead_hazards"] == 0
    assert "Cost (list):" in exported.output


def test_steps_in_responses_whose_tokens_miss_their_text_are_flagged(
    tmp_path: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(toy_inputs.directory, inputs)
    document = json.loads((inputs / "story-0.json").read_text(encoding="utf-8"))
    document["responses"][0]["text"] = "a text the tokens do not spell"
    (inputs / "story-0.json").write_text(json.dumps(document), encoding="utf-8")
    run_dir = tmp_path / "run"
    explode(inputs, run_dir)
    score(run_dir, toy, NEAR, lookahead=8, decoding="sample")

    steps = {
        key_of(r)
        for r in score_rows(run_dir, NEAR)
        if r["step"] > 0 and (r["stem"], r["response_index"]) == ("story-0", 0)
    }
    assert steps
    with klstream.connect(run_dir) as con:
        flagged = con.sql("SELECT stem, response_index, position FROM lookahead_hazards").fetchall()
        assert set(flagged) == steps
        assert klstream.summary(run_dir, NEAR)["cost"]["lookahead_hazards"] == len(steps)


def test_parts_written_before_usage_was_recorded_still_export(
    tmp_path: Path, run_dir: Path, toy: ToyService
) -> None:
    score(run_dir, toy, NEAR)
    added = {"request_id", "step", "lookahead", "decoding", *USAGE_COLUMNS}
    older = [field.name for field in schemas.SCORES if field.name not in added]
    for part in parquet_files(run_dir, NEAR):
        pq.write_table(pq.read_table(part, columns=older), part)
    summary = klstream.export(run_dir, tmp_path / "out").summary
    assert summary["cost"] is None and summary["scored"] == summary["positions"]
