"""Batch runs before their bulk: the online probe (a run whose probe fails uploads nothing), the
canary job (its lines must come back with logprobs before the rest is submitted), and jobs cut
by estimated tokens. Through the real google-genai client over HTTP to the emulator's batch
side, whose event log shows every upload and every job created with its lines' keys."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cli import invoke, start_process
from test_batch import all_keys, events, key_of, kill, resolved, wait_for

from klstream.emulator import BatchConfig, EmulatorServer
from klstream.scoring.batch_jobs import JobManifest, line_tokens, load_manifests, new_plan_name
from klstream.scoring.work import WorkItem
from klstream.storage.rundir import RunDir

MODEL2 = "toy-d0.5"
UPLOADS = {"upload_started", "upload_chunk", "uploaded"}
"""The emulator's events of anything sent to the Files API or Cloud Storage."""


def flags(server: EmulatorServer, model2: str = MODEL2, *extra: object) -> list[object]:
    return [
        "--model2", model2, "--base-url", server.base_url, "--batch", "--lookahead", 1,
        "--batch-poll-seconds", 0.01, "--batch-settle-seconds", 0.5, "--timeout", 5, *extra,
    ]  # fmt: skip


def score(run_dir: Path, server: EmulatorServer, *extra: object, model2: str = MODEL2) -> Any:
    return invoke("score", run_dir, *flags(server, model2, *extra))


def manifests(run_dir: Path, model2: str = MODEL2) -> list[JobManifest]:
    return load_manifests(RunDir(run_dir), model2)


def created(server: EmulatorServer) -> list[tuple[str, ...]]:
    """The keys of every job created, in order."""
    return [event.keys for event in events(server, "created")]


# --- the online probe -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model2", "said"),
    [
        ("toy-logprobsoff", "Logprobs is not enabled"),
        ("toy-noprefill", "Requests ending with a model turn are not supported"),
    ],
)
def test_a_run_whose_probe_fails_uploads_nothing(
    run_dir: Path, emulator: EmulatorServer, model2: str, said: str
) -> None:
    result = score(run_dir, emulator, model2=model2)
    assert result.exit_code == 5, result.output
    assert said in result.stderr
    assert not [event for event in emulator.batch.events if event.kind in UPLOADS]
    assert created(emulator) == []
    assert manifests(run_dir, model2) == []


# --- the canary -------------------------------------------------------------------------------


def test_the_canary_goes_alone_first_and_its_results_are_kept(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    result = score(run_dir, emulator, "--batch-max-requests", 60)
    assert result.exit_code == 0, result.output
    jobs = created(emulator)
    assert [len(keys) for keys in jobs] == [3, 60, 60, 60, 25]
    canary, *bulk = manifests(run_dir)
    assert canary.canary and canary.scored == 3 and not any(m.canary for m in bulk)
    assert canary.plan != bulk[0].plan  # planned and recorded before the bulk, as a job
    rows = resolved(run_dir)
    assert {row["status"] for row in rows} == {"ok"}
    assert Counter(row["source"] for row in rows) == {"batch": 208, "online": 2}
    assert {key_of(row) for row in rows if row["source"] == "batch"} == {
        key for keys in jobs for key in keys
    }
    assert max(emulator.batch.submitted_keys().values()) == 1
    status = invoke("batch", "status", run_dir, "--base-url", emulator.base_url, "--offline")
    assert status.output.count("(canary)") == 1


@pytest.mark.parametrize(
    "route",
    [
        pytest.param([], id="gemini"),
        pytest.param(["--backend", "vertex", "--project-id", "proj"], id="vertex"),
    ],
)
def test_a_canary_back_without_logprobs_stops_the_run_naming_the_cause(
    run_dir: Path, emulator: EmulatorServer, route: list[str]
) -> None:
    emulator.batch.configure(BatchConfig(without_logprobs=True))
    result = score(run_dir, emulator, *route)
    assert result.exit_code == 5, result.output
    assert "brought none of its 3 lines back with logprobs" in result.stderr
    assert "answer without logprobs" in result.stderr
    assert "score online (without --batch)" in result.stderr
    assert [len(keys) for keys in created(emulator)] == [3]  # nothing more was submitted
    (canary,) = manifests(run_dir)
    assert canary.canary and canary.stage == "collected" and canary.failed == 3
    assert emulator.batch.file_names() == []
    failures = [row for row in resolved(run_dir) if row["status"] == "error"]
    assert len(failures) == 3 and all("without logprobs" in row["error"] for row in failures)

    # Once the service carries logprobs, a resumed run proves it with a new canary and goes on.
    emulator.batch.configure(BatchConfig())
    again = score(run_dir, emulator, *route, "--resume")
    assert again.exit_code == 0, again.output
    assert [len(keys) for keys in created(emulator)][:2] == [3, 3]
    assert {row["status"] for row in resolved(run_dir)} == {"ok"}
    assert {key_of(row) for row in resolved(run_dir)} == all_keys(run_dir)


def test_no_canary_submits_the_bulk_at_once(run_dir: Path, emulator: EmulatorServer) -> None:
    result = score(run_dir, emulator, "--no-canary")
    assert result.exit_code == 0, result.output
    assert [len(keys) for keys in created(emulator)] == [208]
    assert not any(m.canary for m in manifests(run_dir))


def test_no_wait_waits_for_the_canary_only(run_dir: Path, emulator: EmulatorServer) -> None:
    submitted = score(run_dir, emulator, "--no-wait")
    assert submitted.exit_code == 0, submitted.output
    assert "batch jobs submitted" in submitted.output
    canary, bulk = manifests(run_dir)
    assert canary.canary and canary.stage == "collected"
    assert not bulk.canary and bulk.stage in ("submitted", "ended")  # not waited for
    finished = score(run_dir, emulator, "--resume")
    assert finished.exit_code == 0, finished.output
    assert [len(keys) for keys in created(emulator)] == [3, 205]


def test_killed_while_the_canary_runs_a_resumed_run_finishes_it_first(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    emulator.batch.configure(BatchConfig(running_s=60.0))
    process = start_process("score", run_dir, *flags(emulator))
    try:
        wait_for(emulator, "job_get")
    finally:
        kill(process)
    (canary,) = manifests(run_dir)
    assert canary.canary and canary.stage == "submitted"
    emulator.batch.configure(BatchConfig())
    result = score(run_dir, emulator, "--resume")
    assert result.exit_code == 0, result.output
    assert [len(keys) for keys in created(emulator)] == [3, 205 - 1]  # a new probe, online
    assert max(emulator.batch.submitted_keys().values()) == 1
    assert {key_of(row) for row in resolved(run_dir)} == all_keys(run_dir)


# --- jobs sized by tokens ---------------------------------------------------------------------


def test_a_line_is_estimated_as_the_dry_run_estimates_it() -> None:
    item = WorkItem("s", 0, 10, "x" * 40, "", max_tokens=3)
    assert line_tokens(item) == 10 + 10 + 3  # 40 characters at 4 a token, 10 before, 3 asked


def test_jobs_are_cut_by_estimated_tokens_as_well_as_by_lines(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    budget = 1000
    result = score(run_dir, emulator, "--no-canary", "--batch-max-tokens", budget)
    assert result.exit_code == 0, result.output
    jobs = manifests(run_dir)
    assert len(jobs) > 1 and all(m.estimated_tokens <= budget for m in jobs)
    # Each job stops at the line that would have taken it past the budget.
    assert all(m.estimated_tokens > budget - 60 for m in jobs[:-1])
    assert sum(len(keys) for keys in created(emulator)) == 208
    assert {row["status"] for row in resolved(run_dir)} == {"ok"}


def test_planning_rounds_list_in_the_order_they_were_planned(tmp_path: Path) -> None:
    """A canary and its bulk are planned within one second, often one millisecond: their jobs
    must still list canary first (names were once a second's clock and a random suffix)."""
    run = RunDir(tmp_path)
    run.batch_dir(MODEL2).mkdir(parents=True)
    planned = []
    for _ in range(30):
        plan = new_plan_name(run, MODEL2)
        run.batch_manifest(MODEL2, f"{plan}-0000").write_text("{}")
        planned.append(plan)
    assert [path.name for path in run.batch_manifests(MODEL2)] == [
        f"job-{plan}-0000.json" for plan in planned
    ]
