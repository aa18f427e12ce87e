"""--dry-run on the demo's data (examples/prompts.txt sampled from `toy` as `make demo` does):
its request and token counts are what a --lookahead 1 run then reports, exactly once the service
has counted the prompts (--calibrate), within the documented approximation before. The service
is the toy backend in process: these are counts, not wire formats."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli import invoke

import klstream
from klstream.backends.toy import ToyService
from klstream.emulator import encode
from klstream.emulator.service import ServiceConfig
from klstream.input.sample import SampleOptions, sample
from klstream.scoring.dryrun import DryRunOptions, DryRunReport, dry_run
from klstream.scoring.options import ScoreOptions
from klstream.storage.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
MODEL2 = "toy-d0.5"


@pytest.fixture(scope="module")
def server() -> Iterator[ToyService]:
    """One service for the module, which its demo inputs are sampled from."""
    with ToyService() as service:
        yield service


@pytest.fixture(scope="module")
def demo_inputs(server: ToyService, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's Model 1 responses: every bundled prompt, 3 samples of up to 60 tokens."""
    directory = tmp_path_factory.mktemp("demo") / "responses"
    options = SampleOptions("toy", num_samples=3, max_tokens=60, seed=1)
    sample(ROOT / "examples" / "prompts.txt", directory, options, server.endpoint())
    return directory


@pytest.fixture
def demo_run(demo_inputs: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    klstream.explode(demo_inputs, run_dir)
    return run_dir


def snapshot(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def prompt_part(run_dir: Path) -> int:
    """The prompt tokens all one-token requests send, as the emulator's tokenizer counts them."""
    prompts = {
        (r["stem"], r["response_index"]): r["prompt"]
        for r in pq.read_table(RunDir(run_dir).responses).to_pylist()
    }
    positions = pq.read_table(RunDir(run_dir).positions, columns=["stem", "response_index"])
    keys = zip(*(positions.column(c).to_pylist() for c in ("stem", "response_index")), strict=True)
    return sum(len(encode(prompts[key])) for key in keys)


def test_dry_run_counts_are_what_a_one_token_run_then_reports(
    demo_run: Path, server: ToyService
) -> None:
    options = ScoreOptions(MODEL2, lookahead=1)
    before, requests_before = snapshot(demo_run), len(server.requests)
    guessed = dry_run(demo_run, options, DryRunOptions())
    assert snapshot(demo_run) == before and len(server.requests) == requests_before
    calibrated = dry_run(demo_run, options, DryRunOptions(calibrate=5), server.endpoint())
    assert calibrated.calibration_requests == 5 and calibrated.counted_prompts == 5
    assert len(server.requests) == requests_before + 5
    assert snapshot(demo_run) == before

    report = klstream.score(demo_run, options, server.endpoint())
    stats = report.stats
    for estimate in (guessed.one_token, calibrated.one_token):
        assert estimate.requests == stats.calls.requests == stats.total
        assert estimate.output_tokens == stats.usage.candidates_tokens
    assert calibrated.one_token.input_tokens == stats.usage.prompt_tokens
    # Before calibration, the prompts' tokens are estimated from their characters (4 a token):
    # off by at most half of them, Model 1's tokens counted exactly.
    error = abs(guessed.one_token.input_tokens - stats.usage.prompt_tokens)
    assert error <= 0.5 * prompt_part(demo_run)
    assert guessed.one_token.usd is None  # the toy models have no price


def test_the_lookahead_estimate_lies_between_its_bounds(
    demo_run: Path, server: ToyService, tmp_path: Path
) -> None:
    options = ScoreOptions(MODEL2, decoding="sample")
    report: DryRunReport = dry_run(
        demo_run, options, DryRunOptions(calibrate=15, rpm=600.0), server.endpoint()
    )
    assert 0.3 < report.acceptance < 0.95 and report.measured_acceptance
    one, ahead = report.one_token, report.lookahead
    assert ahead.requests < 0.8 * one.requests
    assert ahead.input_tokens < one.input_tokens
    assert one.output_tokens < ahead.output_tokens <= ahead.requests * 32
    assert one.minutes == pytest.approx(one.requests / 600.0)

    scored = klstream.score(demo_run, options, server.endpoint())
    assert scored.stats.answers < one.requests
    assert scored.stats.answers == pytest.approx(ahead.requests, rel=0.25)


def test_the_cli_prints_the_range_and_sends_nothing(
    demo_inputs: Path, demo_run: Path, tmp_path: Path
) -> None:
    result = invoke("score", demo_run, "--model2", "gemini-2.5-flash", "--dry-run", "--tpm", 1e6)
    assert result.exit_code == 0, result.output
    assert "nothing sent" in result.output
    assert re.search(r"one token per request\s+\d", result.output)
    assert re.search(r"lookahead auto \(N = [\d.]+ on average\)", result.output)
    assert "gemini-2.5-flash's list prices" in result.output and "minutes" in result.output
    assert not RunDir(demo_run).scores_dir("gemini-2.5-flash").exists()

    out = tmp_path / "out"
    whole = invoke(
        "run", "--input-dir", demo_inputs, "--output-dir", out, "--model2", MODEL2, "--dry-run"
    )
    assert whole.exit_code == 0, whole.output
    assert "positions to score in 15 responses (5 prompts)" in whole.output
    assert not out.exists()

    alone = invoke("score", demo_run, "--model2", MODEL2, "--calibrate", "3")
    assert alone.exit_code == 2 and "--calibrate goes with --dry-run" in alone.output


def test_the_batch_dry_run_prints_rounds_and_batch_usd(demo_run: Path) -> None:
    result = invoke(
        "score", demo_run, "--model2", "gemini-2.5-flash", "--dry-run", "--batch",
        "--lookahead", "4", "--max-rounds", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    found = re.search(
        r"batch, lookahead 4 \(sampled\), at most 3 rounds: (\d) rounds, ([\d,]+) requests, "
        r".* USD batch (\d+\.\d+)",
        result.output,
    )
    assert found, result.output
    one_token = re.search(r"one token per request\s+([\d,]+)", result.output)
    assert one_token
    assert 1 <= int(found[1]) <= 3
    assert int(found[2].replace(",", "")) < int(one_token[1].replace(",", ""))
    assert float(found[3]) > 0
    assert not RunDir(demo_run).scores_dir("gemini-2.5-flash").exists()


@pytest.mark.parametrize(("scaled_logprobs", "decoding"), [(False, "greedy"), (True, "sample")])
def test_the_calibrated_dry_run_predicts_the_decoding_the_run_then_uses(
    demo_run: Path, toy: ToyService, scaled_logprobs: bool, decoding: str
) -> None:
    """A new run with ``--lookahead-decoding auto`` settles its decoding with the greedy probe;
    calibrating, the dry run applies the same test first (before, it assumed sampling until a
    run had probed, and so predicted the requests of a decoding the run did not use)."""
    toy.set_service(ServiceConfig(scaled_logprobs=scaled_logprobs))
    options = ScoreOptions(MODEL2, lookahead="auto")
    predicted = dry_run(demo_run, options, DryRunOptions(calibrate=5), toy.endpoint())
    assert predicted.calibration_requests == 10  # a greedy and a one-token request per site
    scored = klstream.score(demo_run, options, toy.endpoint())
    assert predicted.decoding == scored.decoding == decoding
    assert scored.stats.calls.requests == pytest.approx(predicted.lookahead.requests, rel=0.3)
