"""Nothing paid twice, nothing silently wrong: the answer journal under SIGKILL, --overwrite as a
replacement, the configuration checked against the data, damaged files, and the counts.

Process behaviour is tested with real processes and signals against the HTTP emulator, whose
request log outlives the killed clients; the rest runs in process.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from cli import invoke, start_process
from conftest import ToyInputs
from fakeservers import refused_url
from inputs import Token, make_input, write_input

from klstream.backends.base import Endpoint
from klstream.backends.transport import RetryPolicy
from klstream.emulator import EmulatorServer, FaultConfig
from klstream.input.explode import explode
from klstream.pipeline import score
from klstream.scoring.options import ScoreOptions
from klstream.storage import schemas
from klstream.storage.database import connect
from klstream.storage.rundir import ExportDir, RunDir

MODEL2 = "toy-d0.5"
KILLS = 4
IN_FLIGHT = ScoreOptions(MODEL2).max_concurrent
"""Requests a run has in flight at most: all a kill can make it pay for again."""
Identity = tuple[str, str]


def score_cli(run_dir: Path, server: EmulatorServer | str, *args: object) -> Any:
    url = server if isinstance(server, str) else server.base_url
    return invoke("score", run_dir, "--model2", MODEL2, "--base-url", url, *args)


def resolved(run_dir: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    with connect(run_dir) as con:
        relation = con.sql(
            "SELECT stem, response_index, position, status, top_tokens, top_logprobs "
            "FROM scores_resolved WHERE model2 = $m",
            params={"m": MODEL2},
        )
        rows = [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]
    return {(r["stem"], r["response_index"], r["position"]): r for r in rows}


def delivered(server: EmulatorServer) -> list[Any]:
    """The generation requests the server answered (200): every one of them was paid."""
    return [r for r in server.requests if r.status == 200 and ":generateContent" in r.path]


# --- 1: SIGKILL at random moments pays only for what was in flight ----------------------------


def test_after_any_sigkill_a_resume_pays_again_only_for_requests_in_flight(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    """At default settings (lookahead auto, checkpoints every 256 rows or 10 s) every answer is
    journaled the moment it arrives: after a kill, no request is answered again unless it was
    in flight at the kill (a response the server sent that the dying client never read)."""
    clean = tmp_path / "clean"
    explode(toy_inputs.directory, clean)
    assert score_cli(clean, emulator).exit_code == 0
    expected = resolved(clean)

    run_dir = tmp_path / "killed"
    explode(toy_inputs.directory, run_dir)
    emulator.set_faults(FaultConfig(latency_ms=10))
    emulator.reset_log()
    command = ["score", run_dir, "--model2", MODEL2, "--base-url", emulator.base_url]
    rng = random.Random(17)
    kills: list[float] = []
    for attempt in range(KILLS):
        before = len(delivered(emulator))
        process = start_process(*command, *(["--resume"] if attempt else []))
        target = before + rng.randint(IN_FLIGHT + 1, 2 * IN_FLIGHT + 8)
        while process.poll() is None and len(delivered(emulator)) < target:
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        kills.append(time.monotonic())
        process.communicate()
        assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    finished = start_process(*command, "--resume")
    _, stderr = finished.communicate()
    assert finished.returncode == 0, stderr

    final = resolved(run_dir)
    assert final.keys() == expected.keys()
    assert all(final[k]["status"] == schemas.SCORE_OK for k in final)
    for key, row in expected.items():
        assert final[key]["top_logprobs"] == row["top_logprobs"], key

    # A start position asked for again after its answer was delivered was paid twice. The first
    # copy of such a request was either in flight at a kill (it arrived within the server's
    # latency, and scheduling slack, before one, or just after: sent by the dying process) or
    # one of the greedy consistency probe's
    # requests, which a one-token request at the same position follows by design (the probe
    # runs once per run directory: its greedy answers are logged, never asked again).
    by_identity: dict[Identity, list[float]] = {}
    for record in delivered(emulator):
        by_identity.setdefault((record.prompt, record.prefill or ""), []).append(record.time)
    positions = Counter((p.prompt, p.prefill) for p in toy_inputs.positions.values())
    first_copies = [
        arrived
        for identity, times in by_identity.items()
        for arrived in sorted(times)[: max(len(times) - positions[identity], 0)]
    ]

    def kill_after(arrived: float) -> float | None:
        """The kill this request was in flight at: the first after it, or one just before
        (a request the dying process had sent)."""
        return min((kill for kill in kills if -0.1 < kill - arrived < 1.0), default=None)

    per_kill = Counter(kill_after(t) for t in first_copies)
    beyond_flight = per_kill.pop(None, 0)
    beyond_flight += sum(max(count - IN_FLIGHT, 0) for count in per_kill.values())
    probe = json.loads(RunDir(run_dir).run_config(MODEL2).read_text(encoding="utf-8"))
    # Each kill lands after more answers than a run has requests in flight: without the
    # journal, each would pay again for every answer since the last checkpoint.
    assert beyond_flight <= probe["greedy_probe"]["requests"] <= 3, per_kill


# --- 2: --overwrite replaces, and never deletes before the new run has an answer ---------------


def _scored_run(tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer) -> Path:
    run_dir = tmp_path / "run"
    explode(toy_inputs.directory, run_dir)
    assert score_cli(run_dir, emulator).exit_code == 0
    return run_dir


def test_overwrite_against_a_dead_endpoint_keeps_the_results_it_would_replace(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    run_dir = _scored_run(tmp_path, toy_inputs, emulator)
    before = resolved(run_dir)
    kl_before = RunDir(run_dir).kl_path(MODEL2).read_bytes()

    dead = score_cli(run_dir, refused_url(), "--overwrite", "--max-retries", "0")
    assert dead.exit_code == 5, dead.output
    assert resolved(run_dir) == before
    assert RunDir(run_dir).kl_path(MODEL2).read_bytes() == kl_before
    assert not RunDir(run_dir).replaced_dir(MODEL2).exists()

    again = score_cli(run_dir, emulator, "--overwrite", "--top-logprobs", "5")
    assert again.exit_code == 0, again.output
    assert {len(row["top_tokens"]) for row in resolved(run_dir).values()} == {5}
    assert not RunDir(run_dir).replaced_dir(MODEL2).exists()


def test_a_killed_overwrite_is_finished_by_the_next_run(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    """Killed before its first answer, an overwrite leaves the old results aside; the next
    run puts them back (nothing new to keep) before it looks at them."""
    run_dir = _scored_run(tmp_path, toy_inputs, emulator)
    before = resolved(run_dir)
    aside = RunDir(run_dir).replaced_dir(MODEL2)
    emulator.set_faults(FaultConfig(rate_hang=1.0, hang_seconds=2.0))
    process = start_process(
        "score", run_dir, "--model2", MODEL2, "--base-url", emulator.base_url, "--overwrite"
    )
    while process.poll() is None and not aside.exists():
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert aside.exists()
    emulator.set_faults(FaultConfig())

    resumed = score_cli(run_dir, emulator, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resolved(run_dir) == before
    assert not aside.exists()


def test_run_overwrite_never_leaves_exports_out_of_step_with_the_scores(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    output = tmp_path / "out"
    common = ["--input-dir", toy_inputs.directory, "--output-dir", output, "--model2", MODEL2]
    first = invoke("run", *common, "--base-url", emulator.base_url)
    assert first.exit_code == 0, first.output
    exports = ExportDir(output)
    summary = json.loads(exports.summary.read_text(encoding="utf-8"))

    emulator.set_faults(FaultConfig(rate_500=1.0))
    failing = invoke(
        "run", *common, "--base-url", emulator.base_url, "--overwrite", "--max-retries", "0"
    )
    assert failing.exit_code == 6, failing.output
    # No answer: the old scores and the exports made from them are all still there.
    assert json.loads(exports.summary.read_text(encoding="utf-8")) == summary
    assert exports.report.is_file()

    emulator.set_faults(FaultConfig(rate_500=0.3, seed=3))
    partial = invoke(
        "run", *common, "--base-url", emulator.base_url, "--overwrite", "--max-retries", "0"
    )
    assert partial.exit_code == 6, partial.output
    # Answers came: the old scores went, and so did every output made from them.
    assert exports.outputs() == [exports.summary, exports.report]
    assert not any(path.exists() for path in exports.outputs())


def test_resume_and_overwrite_together_are_refused_in_one_line(run_dir: Path) -> None:
    result = invoke("score", run_dir, "--model2", MODEL2, "--resume", "--overwrite")
    assert result.exit_code == 2
    assert "choose one" in result.stderr and "Traceback" not in result.stderr


# --- 3: answers that are not what was asked are never values ----------------------------------


def test_short_top_k_lists_are_retried_and_never_stored_as_values(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    endpoint = Endpoint("gemini", "test-key", base_url=emulator.base_url)
    fast = RetryPolicy(max_retries=12, backoff_initial_s=0.0, backoff_max_s=0.0)
    clean = tmp_path / "clean"
    explode(toy_inputs.directory, clean)
    score(clean, ScoreOptions(MODEL2, policy=fast), endpoint)

    run_dir = tmp_path / "short"
    explode(toy_inputs.directory, run_dir)
    emulator.set_faults(FaultConfig(rate_short_topk=0.3, seed=4))
    report = score(run_dir, ScoreOptions(MODEL2, policy=fast), endpoint)
    assert report.remaining == 0 and emulator.stats()["by_fault"]["short_topk"] > 0
    assert resolved(run_dir) == resolved(clean)

    persistent = tmp_path / "always-short"
    explode(toy_inputs.directory, persistent)
    emulator.set_faults(FaultConfig(rate_short_topk=1.0))
    stopped = score(
        persistent, ScoreOptions(MODEL2, policy=fast, max_consecutive_failures=5), endpoint
    )
    assert stopped.stopped_because is not None
    with connect(persistent) as con:
        rows = con.sql("SELECT status, error, top_tokens FROM scores").fetchall()
    assert rows and all(status == schemas.SCORE_ERROR and top is None for status, _, top in rows)
    assert all("3 usable entries where 20 were asked" in error for _, error, _ in rows)


# --- 4: the configuration is checked against the data ------------------------------------------


def test_a_lost_run_json_is_rebuilt_from_the_parts_and_other_settings_are_refused(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    run_dir = _scored_run(tmp_path, toy_inputs, emulator)
    config_path = RunDir(run_dir).run_config(MODEL2)
    recorded = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.unlink()

    mixed = score_cli(run_dir, emulator, "--resume", "--top-logprobs", "5")
    assert mixed.exit_code == 4, mixed.output
    assert "top_logprobs: recorded 20, now 5" in mixed.stderr
    assert not config_path.exists()

    config_path.write_text("{not json", encoding="utf-8")
    same = score_cli(run_dir, emulator, "--resume")
    assert same.exit_code == 0, same.output
    rebuilt = json.loads(config_path.read_text(encoding="utf-8"))
    assert {k: rebuilt[k] for k in ("model2", "top_logprobs", "temperature", "backend")} == {
        k: recorded[k] for k in ("model2", "top_logprobs", "temperature", "backend")
    }


def test_parts_that_do_not_say_their_configuration_are_not_resumed_without_run_json(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    run_dir = _scored_run(tmp_path, toy_inputs, emulator)
    run = RunDir(run_dir)
    for part in run.score_parts(MODEL2):
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata(None), part)
    run.run_config(MODEL2).unlink()
    refused = score_cli(run_dir, emulator, "--resume")
    assert refused.exit_code == 4, refused.output
    assert "do not say which configuration made them" in refused.stderr
    assert "put run.json back, or pass --overwrite" in refused.stderr


# --- 5: damaged files --------------------------------------------------------------------------


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_part_is_quarantined_and_its_positions_asked_again(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    run_dir = tmp_path / "run"
    explode(toy_inputs.directory, run_dir)
    assert score_cli(run_dir, emulator, "--checkpoint-rows", "40").exit_code == 0
    run = RunDir(run_dir)
    damaged = run.score_parts(MODEL2)[1]
    lost = {(r["stem"], r["response_index"], r["position"]) for r in _readable_rows(damaged)}
    _cut(damaged)
    emulator.reset_log()

    resumed = score_cli(run_dir, emulator, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"damaged parts moved to quarantine ({damaged.name})" in resumed.stderr
    assert (run.quarantine_dir(MODEL2) / damaged.name).exists()
    assert set(resolved(run_dir)) == set(toy_inputs.positions)
    assert 0 < len(delivered(emulator)) <= len(lost)


def _readable_rows(part: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(
        part, columns=["stem", "response_index", "position"]
    ).to_pylist()
    return rows


def test_damaged_derived_data_is_rebuilt_and_damaged_inputs_say_how_to_rebuild(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    run_dir = _scored_run(tmp_path, toy_inputs, emulator)
    run = RunDir(run_dir)
    _cut(run.kl_path(MODEL2))
    exported = invoke("export", run_dir, "-o", tmp_path / "out")
    assert exported.exit_code == 0, exported.output
    assert pq.read_metadata(run.kl_path(MODEL2)).num_rows == len(toy_inputs.positions)

    _cut(run.positions)
    query = start_process("query", run_dir, "SELECT count(*) FROM kl")
    _, stderr = query.communicate()
    assert query.returncode == 4 and "Traceback" not in stderr
    assert f"{run.positions} is damaged" in stderr
    command = stderr.split("explode the same inputs again: ", 1)[1].split(" (the", 1)[0]
    rebuilt = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert invoke("query", run_dir, "SELECT count(*) FROM kl").exit_code == 0

    run.inputs_manifest.write_text("garbage", encoding="utf-8")
    refused = score_cli(run_dir, emulator, "--resume")
    assert refused.exit_code == 4
    assert f"{run.inputs_manifest} is damaged" in refused.stderr


def test_run_resume_rebuilds_damaged_positions_only_from_the_inputs_it_recorded(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    """The same files chosen by another --pattern are not what the run recorded: the damaged
    positions are then said to be damaged, with the command that rebuilds them (the run once
    re-exploded them, and explode refused, saying the inputs were other files)."""
    output = tmp_path / "out"
    common = ["--input-dir", toy_inputs.directory, "--output-dir", output, "--model2", MODEL2]
    first = invoke("run", *common, "--base-url", emulator.base_url)
    assert first.exit_code == 0, first.output
    run = ExportDir(output).workspace
    requests = len(emulator.requests)

    _cut(run.positions)
    resumed = invoke("run", *common, "--base-url", emulator.base_url, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert pq.read_metadata(run.positions).num_rows == len(toy_inputs.positions)
    assert len(emulator.requests) == requests

    _cut(run.positions)
    other = invoke(
        "run", *common, "--base-url", emulator.base_url, "--resume", "--pattern", "*.jso[n]"
    )
    assert other.exit_code == 4
    assert f"{run.positions} is damaged" in other.stderr
    assert len(emulator.requests) == requests


# --- 7: every response counts ------------------------------------------------------------------


def test_the_summary_counts_a_response_without_tokens(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    inputs = tmp_path / "in"
    token: Token = ("Hi", 5, -0.5, [("Hi", 5, -0.5), ("Yo", 6, -1.0)])
    write_input(inputs, "a", make_input("Say hi.", "toy", [[token], [], [token, token]]))
    output = tmp_path / "out"
    result = invoke(
        "run", "--input-dir", inputs, "--output-dir", output, "--model2", MODEL2,
        "--base-url", emulator.base_url, "--top-logprobs", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(ExportDir(output).summary.read_text(encoding="utf-8"))["responses"] == 3
