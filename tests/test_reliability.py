"""What a hostile user found (issue 8), each defect tried again for real: two CLI processes on one
run directory, input files that change between runs, a refused port, a silent listener, servers
answering 500s, HTML or broken bodies, an unwritable output, a killed explode, a killed export, a
server echoing the key, and storms of random 429s and 503s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from cli import CREDENTIAL_VARIABLES, invoke, start_process
from fakeservers import Reply, http_server, refused_url, silent_listener
from inputs import Token, make_input, write_input
from scorefixtures import write_fixture_scores

from klstream.backends.base import Endpoint
from klstream.backends.transport import RetryPolicy
from klstream.emulator import EmulatorServer, FaultConfig
from klstream.input.explode import explode
from klstream.metrics.kl import compute_kl
from klstream.pipeline import score as score_run
from klstream.scoring.options import ScoreOptions
from klstream.scoring.score import ScoreReport
from klstream.scoring.session import ScoreStats
from klstream.storage import schemas
from klstream.storage.rundir import ExportDir, RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs

MODEL2 = "toy-d0.5"
FAST = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05)
"""The default retry budget and probe, with back-offs short enough for tests."""


def score(
    run_dir: Path, url: str, policy: RetryPolicy = FAST, timeout_s: float = 60.0, **options: Any
) -> ScoreReport:
    """One request per position (``lookahead`` 1), so counts of requests are counts of positions."""
    endpoint = Endpoint("gemini", "test-key", base_url=url, timeout_s=timeout_s)
    options.setdefault("lookahead", 1)
    return score_run(run_dir, ScoreOptions(MODEL2, policy=policy, **options), endpoint)


def copy_inputs(toy_inputs: ToyInputs, destination: Path, stems: list[str]) -> Path:
    destination.mkdir(parents=True)
    for stem in stems:
        shutil.copy2(toy_inputs.directory / f"{stem}.json", destination / f"{stem}.json")
    return destination


def run_args(input_dir: Path, output_dir: Path, server: EmulatorServer) -> list[object]:
    return [
        "run",
        "--input-dir",
        input_dir,
        "--output-dir",
        output_dir,
        "--model2",
        MODEL2,
        "--base-url",
        server.base_url,
        "--lookahead",
        "1",
    ]


def kl_json_names(output_dir: Path) -> list[str]:
    return sorted(path.name for path in output_dir.glob("*_kl.json"))


def wait_for(process: subprocess.Popen[str], condition: Callable[[], bool]) -> None:
    while process.poll() is None and not condition():
        time.sleep(0.002)
    assert process.poll() is None, "the process ended before the condition held"


def holds_lock(lock: Path, pid: int) -> Callable[[], bool]:
    """Whether ``lock`` names ``pid`` as its holder (written right after locking)."""

    def check() -> bool:
        try:
            return bool(json.loads(lock.read_text(encoding="utf-8"))["pid"] == pid)
        except (OSError, ValueError):
            return False

    return check


def score_rows(run: RunDir) -> list[dict[str, Any]]:
    return [row for part in run.score_parts(MODEL2) for row in pq.read_table(part).to_pylist()]


def dead_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- 1: one writer per run directory and Model 2 ------------------------------------------------


def test_a_second_run_of_one_output_dir_is_refused_at_once_and_a_killed_one_blocks_nothing(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    emulator.set_faults(FaultConfig(latency_ms=100))
    out = tmp_path / "out"
    args = run_args(toy_inputs.directory, out, emulator)
    first = start_process(*args, "--max-concurrent", "2")
    try:
        wait_for(first, holds_lock(ExportDir(out).workspace.model2_lock(MODEL2), first.pid))
        second = start_process(*args, "--resume")
        _, refusal = second.communicate()
        assert second.returncode == 4, refusal
        assert f"is in use by pid {first.pid} (" in refusal and " run --input-dir " in refusal
        assert first.poll() is None, "the refused run must not have disturbed the first"
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL

    emulator.set_faults(FaultConfig())
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert kl_json_names(out) == [f"story-{i}_kl.json" for i in range(3)]
    ok = [
        (row["stem"], row["response_index"], row["position"])
        for row in score_rows(ExportDir(out).workspace)
        if row["status"] == schemas.SCORE_OK
    ]
    assert sorted(ok) == sorted(toy_inputs.positions)  # each position paid for once


def test_scoring_locks_one_model2_and_holds_the_positions_still(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    emulator.set_faults(FaultConfig(latency_ms=100))
    args = ["score", run_dir, "--model2", MODEL2, "--base-url", emulator.base_url]
    holder = start_process(*args, "--max-concurrent", "1")
    try:
        wait_for(holder, holds_lock(RunDir(run_dir).model2_lock(MODEL2), holder.pid))
        same = invoke(*args)
        assert same.exit_code == 4
        assert f"already being scored against {MODEL2!r} by pid {holder.pid} (" in same.stderr
        explode_again = invoke("explode", toy_inputs.directory, "-o", run_dir, "--overwrite")
        assert explode_again.exit_code == 4
        assert f"{run_dir} is in use by pid {holder.pid} (" in explode_again.stderr
        emulator.set_faults(FaultConfig())
        other = invoke("score", run_dir, "--model2", "toy", "--base-url", emulator.base_url)
        assert other.exit_code == 0, other.output  # another Model 2 of the same run, side by side
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate()


# --- 2: the inputs the positions were built from ------------------------------------------------


def test_run_rebuilds_positions_from_changed_inputs_under_overwrite_and_refuses_under_resume(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    two = copy_inputs(toy_inputs, tmp_path / "in2", ["story-0", "story-1"])
    three = copy_inputs(toy_inputs, tmp_path / "in3", ["story-0", "story-1", "story-2"])
    out = tmp_path / "out"
    assert invoke(*run_args(two, out, emulator)).exit_code == 0
    assert kl_json_names(out) == ["story-0_kl.json", "story-1_kl.json"]

    emulator.reset_log()
    refused = invoke(*run_args(three, out, emulator), "--resume")
    assert refused.exit_code == 4
    assert "the input files differ from those" in refused.stderr
    assert "(added story-2.json)" in refused.stderr and "--overwrite" in refused.stderr
    assert emulator.stats()["total"] == 0

    replaced = invoke(*run_args(three, out, emulator), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "exploded 3 files" in replaced.output
    assert kl_json_names(out) == [f"story-{i}_kl.json" for i in range(3)]
    assert emulator.stats()["total"] == len(toy_inputs.positions)

    # A file touched but not changed is the same input; an edited or a missing one is not.
    story0 = three / "story-0.json"
    os.utime(story0, ns=(story0.stat().st_atime_ns, story0.stat().st_mtime_ns + 10**9))
    emulator.reset_log()
    assert invoke(*run_args(three, out, emulator), "--resume").exit_code == 0
    assert emulator.stats()["total"] == 0
    story1 = three / "story-1.json"
    document = json.loads(story1.read_text(encoding="utf-8"))
    document["prompt"] += " Again."
    story1.write_text(json.dumps(document), encoding="utf-8")
    (three / "story-2.json").unlink()
    changed = invoke(*run_args(three, out, emulator), "--resume")
    assert changed.exit_code == 4
    assert "(removed story-2.json; changed story-1.json)" in changed.stderr


# --- 3: endpoints that can never answer ---------------------------------------------------------


def test_a_refused_connection_ends_the_run_naming_the_url_and_the_cause(run_dir: Path) -> None:
    url = refused_url()
    result = invoke("score", run_dir, "--model2", MODEL2, "--base-url", url)
    assert result.exit_code == 5
    port = url.rsplit(":", 1)[1]
    assert f"Error: cannot reach {url}: connection refused (127.0.0.1:{port})" in result.stderr
    assert "--base-url" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_refused_connection_ends_an_openai_backend_run_too(run_dir: Path) -> None:
    url = refused_url()
    result = invoke("score", run_dir, "--model2", MODEL2, "--backend", "openai", "--base-url", url)
    assert result.exit_code == 5
    assert f"Error: cannot reach {url}" in result.stderr and "connection refused" in result.stderr


def test_a_failed_tls_handshake_ends_the_run_naming_the_url_and_the_cause(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    url = emulator.base_url.replace("http://", "https://")  # TLS to a plain HTTP port
    result = invoke("score", run_dir, "--model2", MODEL2, "--base-url", url)
    assert result.exit_code == 5
    assert f"Error: cannot reach {url}: TLS handshake failed ([SSL: " in result.stderr
    assert emulator.stats()["by_status"] == {}


def test_a_listener_that_never_answers_stops_the_run_after_the_probe_budget(
    run_dir: Path, toy_inputs: ToyInputs
) -> None:
    with silent_listener() as listener:
        # The request timeout stays at its default (60 s); the probe bounds each attempt.
        report = score(run_dir, listener.url, RetryPolicy(8, 0.01, 0.05, probe_budget_s=2.0))
        accepted = len(listener.accepted)

    assert report.stopped_because is not None
    assert report.stopped_because.startswith(f"the first request to {listener.url} failed (")
    assert report.stopped_because.endswith(
        "the last said: timeout: no answer within the request timeout"
    )
    assert 1 <= accepted <= 3  # attempts of at most half the budget each, not 13 of 60 s
    assert report.remaining == len(toy_inputs.positions)


def html_page(_: dict[str, str], __: bytes) -> Reply:
    return Reply(200, "text/html", b"<html><body>Please sign in to the network</body></html>")


@pytest.mark.parametrize(
    ("faults", "error"),
    [
        pytest.param(FaultConfig(rate_500=1.0), "500 INTERNAL", id="500"),
        pytest.param(FaultConfig(rate_malformed=1.0), "answer body is not JSON", id="malformed"),
        pytest.param(None, "answer body is not JSON: Expecting value", id="html-200"),
    ],
)
def test_an_endpoint_failing_every_request_stops_after_a_short_probe(
    run_dir: Path, emulator: EmulatorServer, faults: FaultConfig | None, error: str
) -> None:
    asked: list[bytes] = []

    def counted_html(headers: dict[str, str], body: bytes) -> Reply:
        asked.append(body)
        return html_page(headers, body)

    with http_server(counted_html) as html_url:
        if faults is not None:
            emulator.set_faults(faults)
        url = emulator.base_url if faults is not None else html_url
        report = score(run_dir, url)
        requests = emulator.stats()["total"] if faults is not None else len(asked)

    assert report.stopped_because is not None
    assert report.stopped_because.startswith(f"the first 2 requests to {url} failed (12 attempts")
    assert f"the last said: {error}" in report.stopped_because
    # Two probe positions of FAST.probe_attempts each, not of max_retries + 1 = 13 each.
    assert requests == report.stats.calls.requests == 2 * FAST.probe_attempts


def test_once_a_request_has_succeeded_failures_get_the_full_retry_budget(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    switched: list[int] = []

    def break_after_some(stats: ScoreStats) -> None:
        if stats.scored >= 5 and not switched:
            emulator.set_faults(FaultConfig(rate_503=1.0))
            switched.append(stats.scored)

    policy = RetryPolicy(8, 0.01, 0.05, probe_attempts=2)
    endpoint = Endpoint("gemini", "test-key", base_url=emulator.base_url)
    options = ScoreOptions(MODEL2, policy=policy, max_concurrent=2, max_consecutive_failures=4)
    report = score_run(run_dir, options, endpoint, on_progress=break_after_some)

    assert report.stopped_because is not None and "positions in a row failed" in (
        report.stopped_because
    )
    failures = [row for row in score_rows(RunDir(run_dir)) if row["status"] == schemas.SCORE_ERROR]
    assert failures and all(row["attempts"] == 9 for row in failures)


# --- 4, 5: no tracebacks; commands printed to continue work as printed --------------------------


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """``command`` exactly as a user would paste it, without the developer's credentials."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    return subprocess.run(command, shell=True, capture_output=True, text=True, env=env)


def test_an_unwritable_export_keeps_the_scores_and_prints_the_export_command(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    out = tmp_path / "out"
    (out / "story-1_kl.json").mkdir(parents=True)  # in the way of the export's rename
    process = start_process(*run_args(toy_inputs.directory, out, emulator))
    _, stderr = process.communicate()

    assert process.returncode == 7
    line = one_line_error(stderr)
    workspace = ExportDir(out).workspace.root
    assert f"every position is scored and kept in {workspace}, but the export failed" in line
    assert "Is a directory" in line and "story-1_kl.json" in line
    assert not (out / "summary.json").exists()
    command = line.split("export them with: ")[1]

    (out / "story-1_kl.json").rmdir()
    emulator.reset_log()
    exported = shell(command)
    assert exported.returncode == 0, exported.stderr
    assert emulator.stats()["total"] == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["files"] == [f"story-{i}_kl.json" for i in range(3)]


def test_outputs_under_a_regular_file_are_one_line_errors(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    run_dir = tmp_path / "run"
    explode(toy_inputs.directory, run_dir)
    write_fixture_scores(run_dir, MODEL2)
    compute_kl(run_dir, MODEL2)

    export = invoke("export", run_dir, "-o", blocker / "out")
    assert export.exit_code == 7
    assert one_line_error(export.stderr) == (
        f"Error: cannot write {blocker / 'out'}: {blocker / 'out'}: Not a directory"
    )
    run = invoke(*run_args(toy_inputs.directory, blocker / "out", emulator))
    assert run.exit_code == 7
    assert "cannot create the run directory" in one_line_error(run.stderr)
    assert emulator.stats()["total"] == 0


def test_run_with_a_mistyped_input_directory_creates_nothing(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    """Neither the output directory nor its workspace is created for inputs that are not there,
    and one whose input files are all invalid is removed again."""
    out = tmp_path / "new" / "out"
    result = invoke(*run_args(tmp_path / "inptus", out, emulator))
    assert result.exit_code == 3, result.output
    assert f"input directory {tmp_path / 'inptus'} does not exist" in result.output
    assert not (tmp_path / "new").exists()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.json").write_text("not json", encoding="utf-8")
    invalid = invoke(*run_args(tmp_path / "bad", out, emulator))
    assert invalid.exit_code == 3, invalid.output
    assert not out.exists()
    assert emulator.stats()["total"] == 0


def test_the_printed_resume_command_of_run_finishes_the_run_as_printed(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    emulator.set_faults(FaultConfig(rate_503=1.0))
    out = tmp_path / "out"
    process = start_process(
        *run_args(toy_inputs.directory, out, emulator), "--top-logprobs", "5", "--max-retries", "0"
    )
    _, stderr = process.communicate()
    assert process.returncode == 6, stderr
    command = stderr.split("continue with: ")[1].strip()
    assert (
        f" run --input-dir {toy_inputs.directory} --output-dir {out} --model2 {MODEL2} " in command
    )
    assert command.endswith("--max-retries 0 --resume")
    assert f"--base-url {emulator.base_url}" in command and "--top-logprobs 5" in command

    emulator.set_faults(FaultConfig())
    finished = shell(command)
    assert finished.returncode == 0, finished.stderr
    assert kl_json_names(out) == [f"story-{i}_kl.json" for i in range(3)]
    kl = pq.read_table(ExportDir(out).workspace.kl_path(MODEL2)).to_pylist()
    assert {row["status"] for row in kl} == {schemas.KL_STATUS_SCORED}


# --- 6, 7: litter and partial exports ---------------------------------------------------------


def temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp-*"))


def test_temporaries_of_a_killed_explode_are_removed_by_the_next_run(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    top: list[tuple[str, int | None, float]] = [("a", 1, -0.1), ("b", 2, -2.5), ("c", 3, -3.0)]
    tokens: list[Token] = [("a", 1, -0.1, top)] * 300
    for index in range(40):
        write_input(inputs, f"file-{index:02d}", make_input(f"prompt {index}", "m", [tokens] * 10))
    run_dir = tmp_path / "run"
    explode_process = start_process("explode", inputs, "-o", run_dir)
    wait_for(explode_process, lambda: len(temporaries(run_dir)) >= 2)
    explode_process.kill()
    explode_process.communicate()
    left = temporaries(run_dir)
    assert left and all(path.name.endswith(f".tmp-{explode_process.pid}") for path in left)

    result = invoke("explode", inputs, "-o", run_dir)
    assert result.exit_code == 0, result.output
    assert temporaries(run_dir) == []


def test_score_and_export_remove_stale_temporaries_and_keep_live_ones(
    run_dir: Path, tmp_path: Path, emulator: EmulatorServer
) -> None:
    run = RunDir(run_dir)
    out = tmp_path / "out"
    # This process's own PID would name the temporaries its score and export write.
    dead, alive = dead_pid(), os.getppid()
    planted = {
        run.scores_dir(MODEL2): ".part-x.parquet",
        run.kl_path(MODEL2).parent: f".{MODEL2}.parquet",
        out: ".story-0_kl.json",
    }
    for directory, name in planted.items():
        directory.mkdir(parents=True, exist_ok=True)
        for pid in (dead, alive):
            (directory / f"{name}.tmp-{pid}").write_text("half-written", encoding="utf-8")

    assert (
        invoke("score", run_dir, "--model2", MODEL2, "--base-url", emulator.base_url).exit_code == 0
    )
    assert invoke("export", run_dir, "-o", out).exit_code == 0
    for directory, name in planted.items():
        assert temporaries(directory) == [directory / f"{name}.tmp-{alive}"]


def test_summary_json_names_a_complete_export_and_resume_completes_a_partial_one(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    out = tmp_path / "out"
    args = run_args(toy_inputs.directory, out, emulator)
    assert invoke(*args).exit_code == 0
    names = [f"story-{i}_kl.json" for i in range(3)]
    summary_path = out / "summary.json"
    assert json.loads(summary_path.read_text(encoding="utf-8"))["files"] == names
    expected = {name: (out / name).read_bytes() for name in [*names, "summary.json"]}

    # As a kill during export leaves it: some files, and no summary.
    summary_path.unlink()
    (out / "story-2_kl.json").unlink()
    emulator.reset_log()
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert emulator.stats()["total"] == 0
    assert {name: (out / name).read_bytes() for name in expected} == expected

    # An export that fails removes the summary first: what is left is visibly incomplete.
    (out / "story-1_kl.json").unlink()
    (out / "story-1_kl.json").mkdir()
    failed = invoke("export", ExportDir(out).workspace.root, "-o", out)
    assert failed.exit_code == 7
    assert not summary_path.exists()


# --- 8: the key, however a server echoes it ---------------------------------------------------


SECRET = "secret-canary-123456"


def key_fragments(key: str) -> set[str]:
    """Every 8 characters in a row of the key, as is or with every symbol percent-encoded."""
    encoded = "".join(c if c.isalnum() else quote(c, safe="").replace("-", "%2D") for c in key)
    return {form[i : i + 8].lower() for form in (key, encoded) for i in range(len(form) - 7)}


def leaks(text: str, key: str = SECRET) -> bool:
    return any(fragment in text.lower() for fragment in key_fragments(key))


@pytest.mark.parametrize(
    "echo",
    [
        SECRET,
        SECRET[:12],
        SECRET[5:13],
        quote(SECRET, safe=""),
        SECRET.replace("-", "%2D"),
        SECRET.replace("-", "%2d")[:15],
    ],
)
def test_redact_masks_the_key_whole_cut_short_and_url_encoded(echo: str) -> None:
    redacted = Endpoint("gemini", SECRET).redact(f"the server said: {echo}!")
    assert redacted.startswith("the server said: ") and redacted.endswith("!")
    assert "***" in redacted and not leaks(redacted)


def test_redact_leaves_text_without_the_key_alone() -> None:
    text = "503 UNAVAILABLE: the model is overloaded; secret- canary"
    assert Endpoint("gemini", SECRET).redact(text) == text


@pytest.mark.parametrize("status", [500, 403])
def test_a_server_echoing_the_key_encoded_or_cut_short_never_shows_it(
    run_dir: Path, status: int
) -> None:
    def echo_key(headers: dict[str, str], _: bytes) -> Reply:
        key = headers.get("x-goog-api-key", "")
        message = f"bad key {key.replace('-', '%2D')}; first part {key[:12]}; {quote(key)}"
        error = {"code": status, "message": message, "status": "ERROR"}
        return Reply(status, "application/json", json.dumps({"error": error}).encode())

    with http_server(echo_key) as url:
        process = start_process(
            "score", run_dir, "--model2", MODEL2, "--base-url", url, "--max-retries", "0",
            GEMINI_API_KEY=SECRET,
        )  # fmt: skip
        stdout, stderr = process.communicate()

    assert process.returncode == (6 if status == 500 else 5), stderr
    assert "bad key ***; first part ***; ***" in stderr
    assert not leaks(stdout) and not leaks(stderr)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert not leaks(path.read_bytes().decode("utf-8", "replace")), path


# --- 10: storms of random rejections ----------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(FaultConfig(rate_429=0.5, retry_delay_s=0.01, seed=3), id="429"),
        pytest.param(FaultConfig(rate_503=0.5, seed=3), id="503"),
    ],
)
def test_a_storm_of_random_rejections_completes_within_2_2_requests_per_position(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, faults: FaultConfig
) -> None:
    emulator.set_faults(faults)
    report = score(run_dir, emulator.base_url)

    assert report.remaining == 0 and report.stopped_because is None
    assert report.stats.calls.requests <= 2.2 * len(toy_inputs.positions)
    assert report.stats.calls.concurrency_cuts <= 3
