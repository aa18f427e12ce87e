"""The Model 2 stage end to end: real Parquet parts, real DuckDB, and the CLI in process or as a
subprocess (``cli.py``). The scheduling, checkpoint, resume and accounting tests ask the toy
backend in process (the ``toy`` fixture); real processes, the key, the Vertex AI path and the
Gemini backend's wording go over real HTTP to the emulator through the real google-genai SDK.

Both answer from toy models whose exact distributions the tests recompute, so every value
written can be checked against what the server's model really is, not only against itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow.parquet as pq
import pytest
from cli import CREDENTIAL_VARIABLES, invoke, start_process
from click.testing import Result
from toylog import tally

from klstream.backends import endpoint_from_environment, open_prefill
from klstream.backends.base import ClientSettings, Endpoint, PrefillRequest
from klstream.backends.throttle import AdaptiveLimiter
from klstream.backends.toy import ToyService
from klstream.backends.transport import Caller, CallStats, RetryPolicy
from klstream.emulator import EmulatorServer, FaultConfig, ToyModel, encode
from klstream.emulator.toymodel import Candidate, top_k
from klstream.input.explode import explode
from klstream.metrics import reference
from klstream.pipeline import score as score_run
from klstream.scoring.options import ScoreOptions
from klstream.scoring.prefill import WORKERS_PER_SLOT
from klstream.scoring.score import ScoreReport
from klstream.scoring.session import ScoreStats
from klstream.storage import schemas
from klstream.storage.database import connect
from klstream.storage.rundir import RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs, ToyPosition

Key = tuple[str, int, int]
MODEL2 = "toy-d0.5"
FAST = RetryPolicy(max_retries=8, backoff_initial_s=0.01, backoff_max_s=0.05)
PART_NAME = re.compile(r"part-\d{20}-(\d+-\d{6}|seg-\d{8}-[0-9a-f]{16})\.parquet")
Service = EmulatorServer | ToyService
"""What a run asks: the HTTP emulator through the Gemini backend, or the toy backend."""


# --- running the stage ---------------------------------------------------------------------


def endpoint(server: Service, timeout_s: float = 5.0) -> Endpoint:
    if isinstance(server, ToyService):
        return server.endpoint(timeout_s)
    return Endpoint("gemini", "test-key", base_url=server.base_url, timeout_s=timeout_s)


def service_flags(server: Service) -> list[str]:
    """The CLI's flags that point a run at ``server``."""
    if isinstance(server, ToyService):
        return ["--backend", "toy", "--base-url", server.url]
    return ["--base-url", server.base_url]


def score(
    run_dir: Path,
    server: Service,
    model2: str = MODEL2,
    *,
    timeout_s: float = 5.0,
    on_progress: Callable[[ScoreStats], None] | None = None,
    **options: Any,
) -> ScoreReport:
    """The library entry point, with back-offs short enough for tests, one position per request
    (the tests of lookahead are in test_lookahead.py)."""
    options.setdefault("policy", FAST)
    options.setdefault("lookahead", 1)
    return score_run(
        run_dir, ScoreOptions(model2, **options), endpoint(server, timeout_s), on_progress
    )


def score_cli(run_dir: Path, server: Service, model2: str = MODEL2, *args: object) -> Result:
    return invoke("score", run_dir, "--model2", model2, *service_flags(server), *args)


# --- reading what it wrote -----------------------------------------------------------------


def key_of(row: dict[str, Any]) -> Key:
    return row["stem"], row["response_index"], row["position"]


def parquet_files(run_dir: Path, model2: str = MODEL2) -> list[Path]:
    return sorted(RunDir(run_dir).scores_dir(model2).glob("*.parquet"))


def score_rows(run_dir: Path, model2: str = MODEL2) -> list[dict[str, Any]]:
    """Every row of every part, read with plain pyarrow, one file at a time."""
    return [
        row for part in parquet_files(run_dir, model2) for row in pq.read_table(part).to_pylist()
    ]


def resolved(run_dir: Path, model2: str = MODEL2) -> dict[Key, dict[str, Any]]:
    """The outcome that counts per key, as the SCORES contract says: newest ok, else newest."""
    best: dict[Key, dict[str, Any]] = {}
    for row in score_rows(run_dir, model2):
        kept = best.get(key_of(row))
        if kept is None or (row["status"] == "ok", row["scored_at"]) > (
            kept["status"] == "ok",
            kept["scored_at"],
        ):
            best[key_of(row)] = row
    return best


def kl_rows(run_dir: Path, model2: str = MODEL2) -> dict[Key, dict[str, Any]]:
    return {key_of(row): row for row in pq.read_table(RunDir(run_dir).kl_path(model2)).to_pylist()}


def server_top(model2: str, position: ToyPosition, k: int = 20) -> list[Candidate]:
    """The server's own top-k at a position: its model, after the prefill re-tokenized."""
    logprobs = ToyModel.for_name(model2).next_token_logprobs(
        position.prompt, encode(position.prefill)
    )
    return top_k(logprobs, k)


def assert_server_values(run_dir: Path, model2: str, toy_inputs: ToyInputs, k: int = 20) -> None:
    """Every position's resolved result is ok and is exactly the server's top-k there."""
    results = resolved(run_dir, model2)
    assert results.keys() == toy_inputs.positions.keys()
    for key, position in toy_inputs.positions.items():
        row = results[key]
        assert row["status"] == schemas.SCORE_OK, (key, row["error"])
        expected = server_top(model2, position, k)
        assert row["top_token_ids"] == [c.token_id for c in expected], key
        assert row["top_tokens"] == [c.token for c in expected], key
        assert row["top_logprobs"] == pytest.approx(
            [c.logprob for c in expected], rel=1e-12, abs=1e-12
        ), key


def assert_failure_rows(rows: list[dict[str, Any]], error: str) -> None:
    """Failures carry their error text and never a value."""
    for row in rows:
        assert row["status"] == schemas.SCORE_ERROR
        assert row["error"] is not None and row["error"].startswith(error), row["error"]
        for column in (
            "top_tokens",
            "top_token_ids",
            "top_logprobs",
            "chosen_token",
            "chosen_token_id",
            "chosen_logprob",
        ):
            assert row[column] is None, column


class Logged(Protocol):
    """A request as the HTTP emulator's and the toy service's logs both keep it."""

    @property
    def prompt(self) -> str: ...

    @property
    def prefill(self) -> str | None: ...


def requested(log: Iterable[Logged]) -> Counter[tuple[str, str]]:
    """(prompt, prefill) of every request in a service's log."""
    return Counter((r.prompt, r.prefill or "") for r in log)


def identities(
    toy_inputs: ToyInputs, keys: Iterable[Key] | None = None
) -> Counter[tuple[str, str]]:
    """(prompt, prefill) of the positions ``keys`` (all by default): what their requests carry."""
    chosen = toy_inputs.positions.keys() if keys is None else keys
    return Counter(
        (toy_inputs.positions[k].prompt, toy_inputs.positions[k].prefill) for k in chosen
    )


def assert_parts_intact(run_dir: Path, model2: str = MODEL2) -> None:
    """Every file a ``*.parquet`` glob sees is a complete part of the SCORES schema."""
    for path in parquet_files(run_dir, model2):
        assert PART_NAME.fullmatch(path.name), path.name
        assert pq.read_table(path).schema.equals(schemas.SCORES), path.name


# --- 1, 2: values and KL are the server's ------------------------------------------------------


def test_scores_are_the_servers_distributions_and_kl_follows_from_them(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    result = score_cli(run_dir, toy, MODEL2, "--lookahead", "1")
    assert result.exit_code == 0, result.output
    assert f"{len(toy_inputs.positions)} scored, 0 failed" in result.output

    assert requested(toy.requests) == identities(toy_inputs)
    assert_server_values(run_dir, MODEL2, toy_inputs)
    kl = kl_rows(run_dir)
    assert kl.keys() == toy_inputs.positions.keys()
    for key, position in toy_inputs.positions.items():
        model2_top = [(c.token_id, c.logprob) for c in server_top(MODEL2, position)]
        assert kl[key]["status"] == schemas.KL_STATUS_SCORED
        assert kl[key]["kl_floor"] == pytest.approx(
            reference.kl_floor(position.top, model2_top), rel=1e-9, abs=1e-12
        ), key


def test_same_model_has_zero_kl_and_the_divergence_dial_orders_mean_kl(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    assert score(run_dir, toy, "toy").remaining == 0
    assert all(abs(row["kl_floor"]) < 1e-9 for row in kl_rows(run_dir, "toy").values())

    means = []
    for model2 in ("toy-d0.25", "toy-d0.5", "toy-d1"):
        assert score(run_dir, toy, model2).remaining == 0
        means.append(statistics.fmean(row["kl_floor"] for row in kl_rows(run_dir, model2).values()))
    assert 0 < means[0] < means[1] < means[2]

    result = invoke(
        "query",
        run_dir,
        "SELECT model2, avg(kl_floor) AS mean_kl, count(*) AS n "
        "FROM kl WHERE model2 <> 'toy' GROUP BY model2 ORDER BY mean_kl",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [row["model2"] for row in rows] == ["toy-d0.25", "toy-d0.5", "toy-d1"]
    assert [row["mean_kl"] for row in rows] == pytest.approx(means, rel=1e-9)
    assert {row["n"] for row in rows} == {len(toy_inputs.positions)}


# --- 3: SIGKILL, then --resume -----------------------------------------------------------------


def wait_until(process: subprocess.Popen[str], condition: Callable[[], bool]) -> None:
    while process.poll() is None and not condition():
        time.sleep(0.002)


def kill_point_reached(run_dir: Path, parts: int) -> Callable[[], bool]:
    """Whether the run has written ``parts`` parts, or with 0, its config (before any part)."""
    if parts:
        return lambda: len(parquet_files(run_dir)) >= parts
    return lambda: (RunDir(run_dir).scores_dir(MODEL2) / "run.json").is_file()


def test_sigkill_at_any_point_then_resume_loses_and_repeats_nothing(
    tmp_path: Path, run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, toy: ToyService
) -> None:
    uninterrupted = tmp_path / "uninterrupted"
    explode(toy_inputs.directory, uninterrupted)
    assert score(uninterrupted, toy).remaining == 0  # the same answers, sooner

    emulator.set_faults(FaultConfig(latency_ms=20))
    command = [
        "score",
        run_dir,
        "--model2",
        MODEL2,
        "--base-url",
        emulator.base_url,
        "--checkpoint-rows",
        "5",
        "--max-concurrent",
        "4",
        "--lookahead",
        "1",
    ]
    not_flushed = identities(toy_inputs)
    # Kill once the run has written its config (before any part), then after 1, 2, ... more parts.
    kill_points: list[int | None] = [0, 1, 2, 3, 4, 5, None]
    for attempt, more_parts in enumerate(kill_points):
        parts_before = len(parquet_files(run_dir))
        started = time.monotonic()
        process = start_process(*command, *(["--resume"] if attempt else []))
        if more_parts is None:
            _, stderr = process.communicate()
            assert process.returncode == 0, stderr
        else:
            wait_until(process, kill_point_reached(run_dir, parts_before + more_parts))
            process.kill()
            _, stderr = process.communicate()
            assert process.returncode == -signal.SIGKILL, f"ended before the kill: {stderr}"

        # A resumed run asks only for positions without a flushed ok row at the kill.
        # The killed run's last requests may reach the server's handler only now; those whose
        # body it can no longer read are logged without a prompt (as disconnects).
        asked = requested(r for r in emulator.requests if r.time >= started)
        asked.pop(("", ""), None)
        assert set(asked) <= set(not_flushed)
        assert_parts_intact(run_dir)
        flushed_ok = {key_of(r) for r in score_rows(run_dir) if r["status"] == schemas.SCORE_OK}
        not_flushed = identities(toy_inputs, toy_inputs.positions.keys() - flushed_ok)

    ok_rows = Counter(key_of(r) for r in score_rows(run_dir) if r["status"] == schemas.SCORE_OK)
    assert ok_rows.keys() == toy_inputs.positions.keys()
    assert set(ok_rows.values()) == {1}
    expected, final = resolved(uninterrupted), resolved(run_dir)
    for key in toy_inputs.positions:
        for column in ("top_tokens", "top_token_ids", "top_logprobs"):
            assert final[key][column] == expected[key][column], (key, column)
    assert {row["status"] for row in kl_rows(run_dir).values()} == {schemas.KL_STATUS_SCORED}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_the_run_with_everything_it_counted_saved(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, signum: signal.Signals
) -> None:
    emulator.set_faults(FaultConfig(latency_ms=5))
    # A part per result, so that the signal nearly always lands while parts are being written.
    process = start_process(
        "score",
        run_dir,
        "--model2",
        MODEL2,
        "--base-url",
        emulator.base_url,
        "--checkpoint-rows",
        "1",
        "--max-concurrent",
        "8",
    )
    wait_until(process, lambda: len(parquet_files(run_dir)) >= 10)
    process.send_signal(signum)
    stdout, stderr = process.communicate()

    assert process.returncode == 6, stderr
    assert f"stopped early: stopped by {signum.name}" in stderr
    counted = re.search(r"(\d+) scored, 0 failed", stdout)
    assert counted, stdout
    scored = int(counted[1])
    assert_parts_intact(run_dir)
    assert len([r for r in score_rows(run_dir) if r["status"] == schemas.SCORE_OK]) == scored
    assert f"{len(toy_inputs.positions) - scored} positions remain unscored" in stderr
    kl_status = Counter(row["status"] for row in kl_rows(run_dir).values())
    assert kl_status[schemas.KL_STATUS_SCORED] == scored

    assert score(run_dir, emulator, resume=True).remaining == 0
    assert_server_values(run_dir, MODEL2, toy_inputs)


# --- 4: rate limits ----------------------------------------------------------------------------


def test_a_429_storm_is_ridden_out_with_the_fault_free_results(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    toy.set_faults(FaultConfig(rate_429=0.35, retry_delay_s=0.01, seed=4))
    report = score(run_dir, toy, policy=RetryPolicy(20, 0.01, 0.05))

    assert report.remaining == 0 and report.stopped_because is None
    # The fault-free result is the server's own distribution (first test).
    assert_server_values(run_dir, MODEL2, toy_inputs)
    positions, calls = len(toy_inputs.positions), report.stats.calls
    assert calls.requests == len(toy.requests) <= 3 * positions
    assert calls.rate_limited == tally(toy, "fault")["429"] > 0
    assert calls.retries == calls.requests - positions
    assert sum(row["attempts"] for row in score_rows(run_dir)) == calls.requests


def test_a_short_quota_window_is_waited_out(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    toy.set_faults(FaultConfig(quota_per_minute=40, quota_window_s=0.25))
    report = score(run_dir, toy, policy=RetryPolicy(30, 0.01, 0.05))

    assert report.remaining == 0
    assert_server_values(run_dir, MODEL2, toy_inputs)
    assert tally(toy, "outcome")["ok"] == len(toy_inputs.positions)
    assert report.stats.calls.rate_limited == tally(toy, "fault")["quota"] > 0


def test_rate_limits_lower_the_concurrency_and_successes_restore_it(toy: ToyService) -> None:
    toy.set_faults(FaultConfig(rate_429=1.0, retry_delay_s=0.01))
    target = endpoint(toy)
    request = PrefillRequest("Tell me a story.", " Once", 20)

    async def calls() -> tuple[AdaptiveLimiter, float, CallStats]:
        stats = CallStats()
        caller = Caller(target, RetryPolicy(4, 0.01, 0.05), 8, stats)
        async with open_prefill(target, ClientSettings(MODEL2, 8)) as model:
            outcomes = await asyncio.gather(*(caller.generate(model, request) for _ in range(8)))
            assert all(o.value is None and (o.error or "").startswith("429") for o in outcomes)
            lowered = caller.limiter.limit
            toy.set_faults(FaultConfig())
            for _ in range(40):
                assert (await caller.generate(model, request)).value is not None
        return caller.limiter, lowered, stats

    limiter, lowered, stats = asyncio.run(calls())
    # 40 rejections in a row: two whole windows of 20, each halving the concurrency.
    assert stats.rate_limited == 40
    assert limiter.decreases == 2 and lowered == 2
    assert limiter.limit == 8


def test_concurrency_halves_on_a_sustained_rejection_rate_not_on_random_rejections() -> None:
    """Random rejections of half the requests seldom fill two thirds of a window: the limit
    stays near its ceiling. Rejections of three requests in four keep halving it."""
    rng = random.Random(7)

    def limit_after(rejected_fraction: float, outcomes: int) -> AdaptiveLimiter:
        limiter = AdaptiveLimiter(ceiling=16)
        for _ in range(outcomes):
            if rng.random() < rejected_fraction:
                limiter.on_rejected()
            else:
                limiter.on_success()
        return limiter

    storm = limit_after(0.5, 2000)
    assert storm.decreases <= 3 and storm.limit >= 12
    overload = limit_after(0.75, 200)
    assert overload.decreases >= 4 and overload.limit <= 4


# --- 5: server errors, hangs, bad answers ------------------------------------------------------


def test_transient_faults_are_retried_to_the_correct_values(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    toy.set_faults(
        FaultConfig(
            rate_500=0.05,
            rate_503=0.05,
            rate_hang=0.03,
            hang_seconds=2.0,
            rate_malformed=0.05,
            rate_no_logprobs=0.05,
            seed=5,
        )
    )
    report = score(run_dir, toy, timeout_s=0.3, policy=RetryPolicy(12, 0.01, 0.05))

    assert report.remaining == 0 and report.stats.failed == 0
    assert_server_values(run_dir, MODEL2, toy_inputs)
    faults = tally(toy, "fault")
    assert {"500", "503", "hang", "malformed", "no_logprobs"} <= faults.keys()
    assert report.stats.calls.retries == faults.total() - faults[None] > 0


ALWAYS_FAILING = [
    pytest.param("toy", FaultConfig(rate_500=1.0), "500 INTERNAL: An internal error", id="500"),
    pytest.param("toy", FaultConfig(rate_503=1.0), "503 UNAVAILABLE: The model is", id="503"),
    pytest.param("toy", FaultConfig(rate_hang=1.0, hang_seconds=2.0), "timeout", id="hang"),
    pytest.param("toy", FaultConfig(rate_malformed=1.0), "answer body is not JSON", id="malformed"),
    pytest.param(
        "toy", FaultConfig(rate_no_logprobs=1.0), "answer without logprobs", id="no-logprobs"
    ),
    # The Gemini backend's own words for the API's errors, which the toy's differ from.
    pytest.param("emulator", FaultConfig(rate_500=1.0), "500 INTERNAL", id="500-gemini"),
    pytest.param("emulator", FaultConfig(rate_503=1.0), "503 UNAVAILABLE", id="503-gemini"),
]


@pytest.mark.parametrize(("service", "faults", "error"), ALWAYS_FAILING)
def test_a_model2_that_always_fails_stops_after_the_probes(
    run_dir: Path,
    toy_inputs: ToyInputs,
    request: pytest.FixtureRequest,
    service: str,
    faults: FaultConfig,
    error: str,
) -> None:
    server: Service = request.getfixturevalue(service)
    server.set_faults(faults)
    report = score(run_dir, server, timeout_s=0.3, policy=RetryPolicy(2, 0.01, 0.05))

    # Position 0 (no prefill), then position 1 (the first prefill), each tried 3 times.
    assert report.stopped_because is not None
    url = re.escape(endpoint(server).url)
    assert re.match(
        rf"the first 2 requests to {url} failed \(6 attempts in \d+ s\); "
        rf"the last said: {re.escape(error)}",
        report.stopped_because,
    ), report.stopped_because
    assert report.stats.calls.requests == 2 * 3
    assert report.remaining == len(toy_inputs.positions)
    rows = score_rows(run_dir)
    assert sorted(key_of(r)[2] for r in rows) == [0, 1]
    assert_failure_rows(rows, error)
    assert all(row["attempts"] == 3 for row in rows)
    kl = kl_rows(run_dir)
    assert kl.keys() == toy_inputs.positions.keys()
    assert all(row["kl_floor"] is None and row["kl_lower"] is None for row in kl.values())
    assert Counter(row["status"] for row in kl.values()) == {
        schemas.KL_STATUS_ERROR: 2,
        schemas.KL_STATUS_UNSCORED: len(kl) - 2,
    }


def test_the_cli_says_why_it_stopped_and_how_to_resume(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    emulator.set_faults(FaultConfig(rate_503=1.0))
    result = score_cli(run_dir, emulator, MODEL2, "--max-retries", "0")

    assert result.exit_code == 6
    # The seconds are the machine's: 0 when idle, 1 or more under load.
    assert re.search(
        f"stopped early: the first 2 requests to {re.escape(emulator.base_url)} failed "
        r"\(2 attempts in \d+ s\); the last said: 503 UNAVAILABLE",
        result.stderr,
    )
    assert f"{len(toy_inputs.positions)} positions remain unscored" in result.stderr
    resume = result.stderr.split("continue with: ")[1].strip()
    assert f"score {run_dir} --model2 {MODEL2} --base-url {emulator.base_url}" in resume
    assert resume.endswith("--max-retries 0 --resume")
    assert emulator.stats()["total"] == 2


def test_a_model2_that_starts_failing_stops_after_max_consecutive_failures(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    failing = FaultConfig(rate_503=1.0)
    switched: list[int] = []

    def break_the_server(stats: ScoreStats) -> None:
        if stats.scored >= 20 and not switched:
            toy.set_faults(failing)
            switched.append(stats.scored)

    max_failures, max_concurrent, attempts = 10, 4, 3
    report = score(
        run_dir,
        toy,
        max_concurrent=max_concurrent,
        max_consecutive_failures=max_failures,
        on_progress=break_the_server,
        policy=RetryPolicy(attempts - 1, 0.01, 0.05),
    )

    # Positions in progress when the streak reaches the limit may end it one or more longer.
    in_progress = WORKERS_PER_SLOT * max_concurrent
    stopped = re.fullmatch(
        r"(\d+) positions in a row failed; the last said: 503 UNAVAILABLE: .*",
        report.stopped_because or "",
    )
    assert stopped, report.stopped_because
    assert max_failures <= int(stopped[1]) <= max_failures + in_progress
    # It failed fast: only the positions in progress besides those in the failing streak.
    unavailable = tally(toy, "fault")["503"]
    assert unavailable <= (max_failures + 2 * in_progress) * attempts
    assert max_failures <= report.stats.failed <= max_failures + in_progress
    assert report.remaining > 0

    rows = score_rows(run_dir)
    failures = [r for r in rows if r["status"] == schemas.SCORE_ERROR]
    assert len(failures) == report.stats.failed
    assert_failure_rows(failures, "503 UNAVAILABLE: ")
    kl = kl_rows(run_dir)
    failed_keys = {key_of(r) for r in failures}
    for key, row in kl.items():
        if key in failed_keys:
            assert row["status"] == schemas.KL_STATUS_ERROR
            assert row["error"].startswith("503 UNAVAILABLE: ")
        assert (row["kl_floor"] is None) == (row["status"] != schemas.KL_STATUS_SCORED)

    # Once the server recovers, --resume retries the failures and completes the run.
    toy.set_faults(FaultConfig())
    report = score(run_dir, toy, resume=True)
    assert report.remaining == 0 and report.stats.failed == 0
    assert_server_values(run_dir, MODEL2, toy_inputs)
    assert {row["status"] for row in kl_rows(run_dir).values()} == {schemas.KL_STATUS_SCORED}


# --- 6: models that cannot score -------------------------------------------------------------


def test_a_model_name_the_service_does_not_know_leaves_nothing_behind(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    """A mistyped Model 2 fails at its first request (404); the scores folder that run made
    holds no answer, so it goes, and the model is not listed among the run's Model 2s."""
    result = score_cli(run_dir, emulator, "nosuch-model")
    assert result.exit_code == 5, result.output
    assert "not found" in result.stderr
    assert not RunDir(run_dir).scores_dir("nosuch-model").exists()
    with connect(run_dir) as con:
        assert con.sql("SELECT model2 FROM run_configs").fetchall() == []

    scored = score_cli(run_dir, emulator, MODEL2)
    assert scored.exit_code == 0, scored.output
    failed_again = score_cli(run_dir, emulator, "nosuch-model")
    assert failed_again.exit_code == 5, failed_again.output
    with connect(run_dir) as con:
        assert con.sql("SELECT model2 FROM run_configs").fetchall() == [(MODEL2,)]


def test_score_given_the_input_directory_suggests_an_explode_into_a_new_run_directory(
    tmp_path: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    """The Model 1 files' directory is not a run: the hint explodes them into a new directory
    beside it (never into the inputs themselves), and nothing is written among them."""
    inputs = tmp_path / "inputs"
    shutil.copytree(toy_inputs.directory, inputs)
    before = sorted(inputs.iterdir())
    result = score_cli(inputs, toy)
    assert result.exit_code == 4, result.output
    assert (
        f"explode {inputs} -o {tmp_path / 'inputs-run'}`, then use {tmp_path / 'inputs-run'}"
        in (result.stderr)
    )
    assert f"-o {inputs} " not in result.stderr and f"-o {inputs}`" not in result.stderr
    assert sorted(inputs.iterdir()) == before


def test_resume_of_a_model2_never_scored_here_says_it_starts_a_full_run(
    run_dir: Path, toy: ToyService
) -> None:
    """--resume with nothing to resume is not an error (a run stopped before its first answer
    is resumed so), but it is said in one line before anything is asked, with the Model 2s
    that do have results: a mistyped name would otherwise start a full paid run unannounced."""
    first = score_cli(run_dir, toy, MODEL2, "--resume")
    assert first.exit_code == 0, first.output
    assert f"nothing to resume for {MODEL2} in {run_dir}: starting a full run\n" in first.stderr

    mistyped = score_cli(run_dir, toy, "toy-d05", "--resume")
    assert mistyped.exit_code == 0, mistyped.output
    assert (
        f"nothing to resume for toy-d05 in {run_dir}: starting a full run "
        f"(the results here are for {MODEL2})\n" in mistyped.stderr
    )

    resumed = score_cli(run_dir, toy, MODEL2, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "nothing to resume" not in resumed.stderr


def test_a_thinking_model_stops_at_once_without_a_budget_and_scores_with_budget_0(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    result = score_cli(run_dir, toy, "toy-thinking", "--thinking-budget", "none")
    assert result.exit_code == 5
    assert "thinking" in result.stderr and "--thinking-budget 0" in result.stderr
    assert len(toy.requests) == 1
    assert parquet_files(run_dir, "toy-thinking") == []

    result = score_cli(run_dir, toy, "toy-thinking")
    assert result.exit_code == 0, result.output
    assert_server_values(run_dir, "toy-thinking", toy_inputs)


def test_a_model_that_rejects_prefill_stops_at_once(run_dir: Path, toy: ToyService) -> None:
    result = score_cli(run_dir, toy, "toy-noprefill", "--lookahead", "1")
    assert result.exit_code == 5
    assert "trailing model turn" in result.stderr and "prefill" in result.stderr
    assert len(toy.requests) <= 3
    assert all(
        r["status"] == schemas.SCORE_OK and r["position"] == 0
        for r in score_rows(run_dir, "toy-noprefill")
    )


# --- 7: the API key stays secret -------------------------------------------------------------


def test_the_api_key_is_never_written_or_printed(
    run_dir: Path,
    toy_inputs: ToyInputs,
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-test-SECRET-123"
    for variable in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", secret)
    # The key the subprocesses below get is the one they send.
    assert endpoint_from_environment("gemini", base_url=emulator.base_url).api_key == secret
    emulator.set_faults(
        FaultConfig(
            rate_503=0.15, rate_500=0.1, rate_malformed=0.1, rate_hang=0.05, hang_seconds=2.0
        )
    )
    command = [
        "score",
        run_dir,
        "--model2",
        MODEL2,
        "--base-url",
        emulator.base_url,
        "--max-retries",
        "0",
        "--timeout",
        "0.3",
    ]
    failing = start_process(*command, GEMINI_API_KEY=secret)
    failing_output = failing.communicate()
    assert failing.returncode == 6, failing_output[1]
    errors = [r["error"] for r in score_rows(run_dir) if r["status"] == schemas.SCORE_ERROR]
    assert errors, "the faults should have left failures in the error column"

    emulator.set_faults(FaultConfig())
    # Without faults nothing hangs: a timeout of seconds keeps a loaded machine from failing it.
    resumed = start_process(*command, "--resume", "--timeout", "30", GEMINI_API_KEY=secret)
    resumed_output = resumed.communicate()
    assert resumed.returncode == 0, resumed_output[1]

    assert_server_values(run_dir, MODEL2, toy_inputs)
    for output in (*failing_output, *resumed_output):
        assert secret not in output
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".json" for path in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert not any(secret in error for error in errors)


# --- 8: refusals -----------------------------------------------------------------------------


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def test_scoring_again_needs_resume_or_overwrite_and_resume_keeps_the_config(
    run_dir: Path, toy_inputs: ToyInputs, toy: ToyService
) -> None:
    assert score_cli(run_dir, toy, MODEL2, "--lookahead", "1").exit_code == 0
    before = snapshot(run_dir)
    toy.reset_log()

    again = score_cli(run_dir, toy)
    assert again.exit_code == 4
    assert "--resume" in again.stderr and "--overwrite" in again.stderr

    other_k = score_cli(run_dir, toy, MODEL2, "--resume", "--top-logprobs", "5")
    assert other_k.exit_code == 4
    assert "differs from the one recorded" in other_k.stderr
    assert "top_logprobs: recorded 20, now 5" in other_k.stderr

    assert snapshot(run_dir) == before
    assert toy.requests == []

    nothing_left = score_cli(run_dir, toy, MODEL2, "--resume")
    assert nothing_left.exit_code == 0, nothing_left.output
    assert f"0 scored, 0 failed, {len(toy_inputs.positions)} already done" in nothing_left.output
    assert toy.requests == []

    old_parts = set(parquet_files(run_dir))
    overwrite = score_cli(
        run_dir, toy, MODEL2, "--overwrite", "--top-logprobs", "5", "--lookahead", "1"
    )
    assert overwrite.exit_code == 0, overwrite.output
    assert not old_parts & set(parquet_files(run_dir))
    assert len(score_rows(run_dir)) == len(toy_inputs.positions)
    assert_server_values(run_dir, MODEL2, toy_inputs, k=5)
    recorded = json.loads((RunDir(run_dir).scores_dir(MODEL2) / "run.json").read_text())
    assert recorded["top_logprobs"] == 5
    assert len(toy.requests) == len(toy_inputs.positions)


# --- 9: the Vertex AI request shape ----------------------------------------------------------


def test_the_vertex_backend_scores_through_its_regional_path(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    result = invoke(
        "score",
        run_dir,
        "--model2",
        MODEL2,
        "--backend",
        "vertex",
        "--project-id",
        "p",
        "--location",
        "us-central1",
        "--base-url",
        emulator.base_url,
        "--lookahead",
        "1",
    )
    assert result.exit_code == 0, result.output

    assert_server_values(run_dir, MODEL2, toy_inputs)
    assert len(emulator.requests) == len(toy_inputs.positions)
    assert all("/projects/p/locations/us-central1/" in r.path for r in emulator.requests)

    as_gemini = score_cli(run_dir, emulator, MODEL2, "--resume")
    assert as_gemini.exit_code == 4
    assert "backend: recorded 'vertex', now 'gemini'" in as_gemini.stderr


def test_results_reach_disk_every_checkpoint_interval_while_requests_stall(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    """A stall (every further request hangs) must not keep finished results in memory only."""
    finished = threading.Event()

    def stall_after_first_results() -> None:
        while len(emulator.requests) < 8 and not finished.is_set():
            time.sleep(0.005)
        emulator.set_faults(FaultConfig(rate_hang=1.0, hang_seconds=4.0))

    watcher = threading.Thread(target=stall_after_first_results)
    watcher.start()
    runner = threading.Thread(
        target=lambda: score(
            run_dir,
            emulator,
            timeout_s=30.0,
            max_concurrent=2,
            checkpoint_rows=10_000,
            checkpoint_seconds=0.2,
        )
    )
    runner.start()
    try:
        watcher.join()

        def answered() -> int:
            return sum(1 for r in emulator.requests if r.status == 200)

        stalled_at = time.monotonic()
        while len(score_rows(run_dir)) != answered() and time.monotonic() - stalled_at < 3.0:
            time.sleep(0.05)
        saved = score_rows(run_dir)
        assert len(saved) == answered(), "answered results stayed in memory during the stall"
        assert all(row["status"] == schemas.SCORE_OK for row in saved)
    finally:
        finished.set()
        emulator.set_faults(FaultConfig())
        runner.join()


def test_scoring_range_by_range_asks_for_every_position_once(
    run_dir: Path, toy: ToyService, toy_inputs: ToyInputs
) -> None:
    """Pending positions are read a few responses at a time; none is skipped or repeated."""
    report = score(run_dir, toy, max_concurrent=4, range_positions=7)
    assert report.remaining == 0
    assert requested(toy.requests) == identities(toy_inputs)
    assert_server_values(run_dir, MODEL2, toy_inputs)
