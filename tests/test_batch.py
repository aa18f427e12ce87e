"""`score --batch` and `run --batch`. The job mechanics (end states, resume, fallback, status,
cancel, lost replies, rounds) run on the toy backend's jobs in process, which move one step
per look; the requests, the output files and SIGKILL at every step go through the real
google-genai and google-cloud-storage clients, over real HTTP to the emulator's batch side.

Both services count the keys of every job they create (``submitted_keys``): a key submitted
twice is a position paid for twice.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from cli import invoke, start_process
from conftest import ToyInputs
from test_score import Service, score_cli, service_flags

from klstream.backends import batch_jobs
from klstream.backends.base import ClientSettings, Endpoint, PrefillRequest
from klstream.backends.gemini import generation_config, make_client, prefill_contents
from klstream.backends.toy import ToyBatchConfig, ToyService
from klstream.emulator import EmulatorServer
from klstream.emulator.batch import BatchConfig, BatchEvent, EndState
from klstream.input.explode import explode
from klstream.scoring.batch_jobs import JobManifest, load_manifests
from klstream.storage import schemas
from klstream.storage.database import connect
from klstream.storage.rundir import RunDir

MODEL2 = "toy-d0.5"
BACKENDS: list[str] = ["gemini", "vertex"]
PER_JOB = 60
"""Requests per job in these tests: the 210 toy positions make four jobs."""
LIVE = 1_000
"""Looks a toy job takes to end: jobs that stay live through a test."""


def backend_flags(backend: str) -> list[str]:
    if backend == "vertex":
        return ["--backend", "vertex", "--project-id", "proj", "--location", "us-central1"]
    return []


def batch_flags(
    server: Service,
    backend: str = "gemini",
    lookahead_flags: tuple[str, ...] = ("--lookahead", "1"),
) -> list[str]:
    """The job mechanics are tested one position per line (``--lookahead 1``), without the
    canary job (tests/test_canary.py); ``backend`` is the one that speaks HTTP to the emulator.
    Toy jobs end by looks, not by time, so they are looked at as often as the CLI allows."""
    toy = isinstance(server, ToyService)
    return [
        "--model2",
        MODEL2,
        *service_flags(server),
        "--batch",
        "--no-canary",
        "--batch-max-requests",
        str(PER_JOB),
        "--batch-poll-seconds",
        "0.01" if toy else "0.05",
        "--batch-settle-seconds",
        "0.5",
        *([] if toy else backend_flags(backend)),
        *lookahead_flags,
    ]


def score_batch(run_dir: Path, server: Service, *extra: str, backend: str = "gemini") -> Any:
    return invoke("score", run_dir, *batch_flags(server, backend), *extra)


def submitted_keys(server: Service) -> Counter[str]:
    if isinstance(server, ToyService):
        return server.submitted_keys()
    return server.batch.submitted_keys()


def all_keys(run_dir: Path) -> set[str]:
    rows = pq.read_table(RunDir(run_dir).positions, columns=["stem", "response_index", "position"])
    return {f"{r['stem']}#{r['response_index']}#{r['position']}" for r in rows.to_pylist()}


def resolved(run_dir: Path) -> list[dict[str, Any]]:
    with connect(run_dir) as con:
        relation = con.sql(
            "SELECT stem, response_index, position, status, source, error "
            "FROM scores_resolved ORDER BY ALL"
        )
        return [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]


def key_of(row: dict[str, Any]) -> str:
    return f"{row['stem']}#{row['response_index']}#{row['position']}"


def assert_scored_once_each(run_dir: Path, server: Service) -> None:
    """Every position has a result; every batch submission is of a distinct position, and the
    positions not submitted in batch were answered online (the probe: until a line with a
    prefill)."""
    submitted = submitted_keys(server)
    assert submitted, "no batch job was created"
    assert max(submitted.values()) == 1, Counter(submitted).most_common(3)
    rows = resolved(run_dir)
    assert {row["status"] for row in rows} == {"ok"}
    assert {key_of(row) for row in rows} == all_keys(run_dir)
    online = {key_of(row) for row in rows if row["source"] == "online"}
    assert set(submitted) | online == all_keys(run_dir)
    assert not set(submitted) & online


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer() as running:
        yield running


def events(server: EmulatorServer, kind: str) -> list[BatchEvent]:
    return [event for event in server.batch.events if event.kind == kind]


def wait_for(server: EmulatorServer, kind: str, count: int = 1, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(events(server, kind)) < count:
        assert time.monotonic() < deadline, f"no {kind!r} event in {timeout_s}s"
        time.sleep(0.02)


def kill(process: subprocess.Popen[str]) -> None:
    assert process.poll() is None, f"ended before the kill: {process.communicate()}"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def manifests(run_dir: Path) -> list[JobManifest]:
    return load_manifests(RunDir(run_dir), MODEL2)


# --- the requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_lines_ask_exactly_what_the_online_request_asks(backend: str) -> None:
    """The SDK's online body, caught on the wire, equals a batch line's request."""
    bodies: list[Any] = []

    async def capture(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"candidates": []})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", capture)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        endpoint = Endpoint(backend, "k" if backend == "gemini" else None, "p", "us-central1", url)
        contents = prefill_contents("Tell a story.", "Once upon")
        await make_client(endpoint).aio.models.generate_content(
            model=MODEL2, contents=contents, config=generation_config(7, 0, temperature=1.0)
        )
        await runner.cleanup()
        jobs = batch_jobs(endpoint, ClientSettings(MODEL2, thinking_budget=0), None)
        request = PrefillRequest("Tell a story.", "Once upon", 7, temperature=1.0)
        line = json.loads(jobs.encode_line("story#0#1", 3, request))
        assert line["request"].pop("labels", {"klstream_line": "3"}) == {"klstream_line": "3"}
        assert line["request"] == bodies[0]

    asyncio.run(main())


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_batch_writes_the_same_kl_files_as_an_online_run(
    backend: str, server: EmulatorServer, toy_inputs: ToyInputs, tmp_path: Path
) -> None:
    server.batch.configure(BatchConfig(pending_s=0.1, running_s=0.2))
    common = ["--input-dir", toy_inputs.directory]
    online = invoke(
        "run", *common, "--output-dir", tmp_path / "online", "--model2", MODEL2,
        "--base-url", server.base_url, *backend_flags(backend),
    )  # fmt: skip
    assert online.exit_code == 0, online.output
    batch = invoke(
        "run", *common, "--output-dir", tmp_path / "batch", *batch_flags(server, backend)
    )
    assert batch.exit_code == 0, batch.output
    assert "(batch)" in batch.output
    online_files = sorted(p.name for p in (tmp_path / "online").glob("*.json"))
    assert online_files == sorted(p.name for p in (tmp_path / "batch").glob("*.json"))
    assert len(online_files) == 4
    for name in online_files:
        online_text = (tmp_path / "online" / name).read_text(encoding="utf-8")
        batch_text = (tmp_path / "batch" / name).read_text(encoding="utf-8")
        if name == "summary.json":
            # The figures agree; what the answers cost (requests, USD) does not.
            online_summary, batch_summary = json.loads(online_text), json.loads(batch_text)
            assert online_summary.pop("cost")["requests"] < batch_summary.pop("cost")["requests"]
            assert batch_summary == online_summary
        else:
            assert batch_text == online_text, name
    run_dir = tmp_path / "batch" / "run"
    assert_scored_once_each(run_dir, server)
    assert Counter(row["source"] for row in resolved(run_dir)) == {"batch": 208, "online": 2}
    assert len(manifests(run_dir)) == 4
    assert all(m.stage == "collected" and m.cleaned for m in manifests(run_dir))
    assert server.batch.file_names() == []
    if backend == "vertex":
        assert server.batch.object_names("proj-klstream-batch") == []


def test_keep_batch_files_leaves_inputs_and_outputs(server: EmulatorServer, run_dir: Path) -> None:
    result = score_batch(run_dir, server, "--keep-batch-files")
    assert result.exit_code == 0, result.output
    names = server.batch.file_names()
    assert sum(name.startswith("files/klstream-") for name in names) == 4
    assert sum(name.startswith("files/batch-") for name in names) == 4


# --- per-line errors, end states, fallback -----------------------------------------------------


def configure(server: Service, **config: Any) -> None:
    """The same batch behaviour on either service."""
    if isinstance(server, ToyService):
        server.set_batch(ToyBatchConfig(**config))
    else:
        server.batch.configure(BatchConfig(**config))


def test_line_errors_are_failures_and_resume_submits_only_them(
    toy: ToyService, run_dir: Path
) -> None:
    toy.set_batch(ToyBatchConfig(line_error_rate=0.2, seed=3))
    first = score_batch(run_dir, toy)
    assert first.exit_code == 6, first.output
    failed = {key_of(row) for row in resolved(run_dir) if row["status"] == "error"}
    assert failed
    assert all(
        row["error"].startswith("batch line error: 500")
        for row in resolved(run_dir)
        if row["status"] == "error"
    )
    before = toy.submitted_keys()
    second = score_batch(run_dir, toy, "--resume")
    assert second.exit_code == 0, second.output
    again = toy.submitted_keys() - before
    # The resumed round's probe answers one of them online; the rest go in a batch job.
    assert set(again) < failed and len(again) == len(failed) - 1
    assert {row["status"] for row in resolved(run_dir)} == {"ok"}


@pytest.mark.parametrize(
    ("backend", "end_state"),
    [
        ("toy", "FAILED"),
        ("toy", "EXPIRED"),
        # Each Google backend reads an unsuccessful job's state and partial output on the wire.
        ("gemini", "EXPIRED"),
        ("vertex", "FAILED"),
    ],
)
def test_a_job_that_fails_or_expires_keeps_its_answers_and_resume_resubmits_the_rest(
    backend: str, end_state: EndState, request: pytest.FixtureRequest, run_dir: Path
) -> None:
    server: Service = request.getfixturevalue("toy" if backend == "toy" else "server")
    configure(server, end_states=("SUCCEEDED", end_state), partial_fraction=0.5)
    first = score_batch(run_dir, server, backend=backend)
    assert first.exit_code == 6, first.output
    unscored = [row for row in resolved(run_dir) if row["status"] == "error"]
    assert len(unscored) == PER_JOB // 2
    assert all(f"ended {end_state}" in row["error"] for row in unscored)
    second = score_batch(run_dir, server, "--resume", backend=backend)
    assert second.exit_code == 0, second.output
    resubmitted = submitted_keys(server)
    assert {key for key, count in resubmitted.items() if count == 2} | {
        key_of(row) for row in resolved(run_dir) if row["source"] == "online"
    } >= {key_of(row) for row in unscored}
    assert sum(count == 2 for count in resubmitted.values()) == len(unscored) - 1


def test_batch_fallback_online_scores_what_the_jobs_left(toy: ToyService, run_dir: Path) -> None:
    toy.set_batch(ToyBatchConfig(end_states=("EXPIRED",), partial_fraction=0.25))
    result = score_batch(run_dir, toy, "--batch-fallback", "online")
    assert result.exit_code == 0, result.output
    sources = Counter(row["source"] for row in resolved(run_dir))
    assert sources == {"batch": 208 - (PER_JOB - PER_JOB // 4), "online": 2 + PER_JOB * 3 // 4}
    assert max(toy.submitted_keys().values()) == 1


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_status_and_cancel_without_batch_jobs_need_no_key(run_dir: Path, command: str) -> None:
    """A run never scored in batch has nothing to ask the service: no key is asked for (the
    test runs without credentials), and the answer says there are no jobs."""
    result = invoke("batch", command, run_dir)
    assert result.exit_code == 0, result.output
    assert result.output == f"no batch jobs in {run_dir}\n"
    only = invoke("batch", command, run_dir, "--model2", "toy-d0.5")
    assert only.exit_code == 0, only.output
    assert only.output == f"no batch jobs for toy-d0.5 in {run_dir}\n"


def test_no_wait_then_status_cancel_and_resume(toy: ToyService, run_dir: Path) -> None:
    toy.set_batch(ToyBatchConfig(polls=LIVE))
    submitted = score_batch(run_dir, toy, "--no-wait")
    assert submitted.exit_code == 0, submitted.output
    assert "batch jobs submitted; collect their results with:" in submitted.output
    assert "--no-wait" not in submitted.output.splitlines()[-1]
    assert "--resume" in submitted.output
    assert {m.stage for m in manifests(run_dir)} == {"submitted"}

    # The state recorded at the create, then the state the service gives when asked.
    offline = invoke("batch", "status", run_dir, "--offline")
    assert offline.exit_code == 0, offline.output
    assert offline.output.count("klstream-") == offline.output.count("PENDING") == 4
    status = invoke("batch", "status", run_dir, *service_flags(toy))
    assert status.exit_code == 0, status.output
    assert status.output.count("klstream-") == status.output.count("RUNNING") == 4

    cancelled = invoke("batch", "cancel", run_dir, *service_flags(toy))
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled 4 batch jobs" in cancelled.output
    assert [job.state for job in toy.jobs()] == ["CANCELLED"] * 4

    # One resume collects what the cancelled jobs answered and submits the rest again.
    toy.set_batch(ToyBatchConfig())
    finished = score_batch(run_dir, toy, "--resume")
    assert finished.exit_code == 0, finished.output
    assert {row["status"] for row in resolved(run_dir)} == {"ok"}
    with connect(run_dir) as con:
        failures = con.sql("SELECT error FROM scores WHERE status = 'error'").fetchall()
    assert failures and all("ended CANCELLED" in error for (error,) in failures)
    counts = toy.submitted_keys()
    # The new round's first position goes online, as its probe.
    assert sum(count == 2 for count in counts.values()) == len(failures) - 1
    assert max(counts.values()) == 2


def test_no_wait_then_resume_collects_without_submitting_again(
    toy: ToyService, run_dir: Path
) -> None:
    assert score_batch(run_dir, toy, "--no-wait").exit_code == 0
    result = score_batch(run_dir, toy, "--resume")
    assert result.exit_code == 0, result.output
    assert_scored_once_each(run_dir, toy)


def test_vertex_output_without_keys_is_matched_by_the_request_label(
    server: EmulatorServer, run_dir: Path
) -> None:
    server.batch.configure(BatchConfig(echo_custom_fields=False))
    result = score_batch(run_dir, server, backend="vertex")
    assert result.exit_code == 0, result.output
    assert_scored_once_each(run_dir, server)


def test_a_lost_create_reply_is_resolved_by_display_name(toy: ToyService, run_dir: Path) -> None:
    toy.set_batch(ToyBatchConfig(lost_create_replies=2))
    result = score_batch(run_dir, toy)
    assert result.exit_code == 0, result.output
    # Four jobs, the two whose reply was lost among them, each found and recorded once.
    assert sorted(m.job_name or "" for m in manifests(run_dir)) == sorted(
        job.name for job in toy.jobs()
    )
    assert len(toy.jobs()) == 4
    assert_scored_once_each(run_dir, toy)


# --- refusals ---------------------------------------------------------------------------------


def test_a_region_without_batch_is_a_clear_error(server: EmulatorServer, run_dir: Path) -> None:
    server.batch.configure(BatchConfig(unsupported_locations=frozenset({"us-central1"})))
    result = score_batch(run_dir, server, backend="vertex")
    assert result.exit_code == 5
    assert "batch prediction is not available in location 'us-central1'" in result.output
    assert "--location" in result.output
    assert {m.stage for m in manifests(run_dir)} == {"uploaded"}


def test_existing_jobs_need_resume_and_live_jobs_block_overwrite(
    toy: ToyService, run_dir: Path
) -> None:
    toy.set_batch(ToyBatchConfig(polls=LIVE))
    assert score_batch(run_dir, toy, "--no-wait").exit_code == 0
    again = score_batch(run_dir, toy)
    assert again.exit_code == 4 and "--resume" in again.output
    overwrite = score_batch(run_dir, toy, "--overwrite")
    assert overwrite.exit_code == 4 and "klstream batch cancel" in overwrite.output


def test_a_planning_round_cut_short_is_discarded(toy: ToyService, run_dir: Path) -> None:
    assert score_batch(run_dir, toy, "--no-wait").exit_code == 0
    run = RunDir(run_dir)
    manifest = manifests(run_dir)[0]
    planned = [m.job_id for m in manifests(run_dir)]
    orphan = JobManifest(**{**manifest.__dict__, "job_id": "ffffffff0000-0000", "plan": "cut",
                            "stage": "planned"})  # fmt: skip
    orphan.save(run)
    run.batch_input(MODEL2, orphan.job_id).write_text("{}\n", encoding="utf-8")
    assert [m.job_id for m in load_manifests(run, MODEL2)] == planned
    assert not run.batch_manifest(MODEL2, orphan.job_id).exists()
    assert not run.batch_input(MODEL2, orphan.job_id).exists()


# --- SIGKILL at every step ---------------------------------------------------------------------

KILL_POINTS = {
    # name: (emulator behaviour, event to kill at, how many of them, stage expected after)
    "uploading": (BatchConfig(upload_delay_s=30.0), "upload_chunk", 1, {"planned"}),
    "between upload and create": (
        BatchConfig(upload_delay_s=30.0, upload_delay_after=1),
        "upload_chunk",
        2,
        {"uploaded", "planned"},
    ),
    "creating, job not made yet": (
        BatchConfig(create_delay_s=30.0),
        "create_received",
        1,
        {"creating", "uploaded"},
    ),
    "creating, job made, reply pending": (
        BatchConfig(create_reply_delay_s=30.0),
        "created",
        1,
        {"creating", "uploaded"},
    ),
    "polling": (BatchConfig(running_s=30.0), "job_get", 1, {"submitted"}),
    "downloading": (BatchConfig(download_delay_s=30.0), "download", 1, {"ended", "submitted"}),
}


VERTEX_KILL_POINTS = ["uploading", "between upload and create", "creating, job made, reply pending",
                      "downloading"]  # fmt: skip
"""Where Vertex AI differs: its uploads, its listing, its downloads (the rest is shared)."""


@pytest.mark.parametrize(
    ("backend", "point"),
    [("gemini", point) for point in KILL_POINTS] + [("vertex", p) for p in VERTEX_KILL_POINTS],
)
def test_sigkill_at_any_step_then_resume_never_submits_a_position_twice(
    backend: str, point: str, server: EmulatorServer, run_dir: Path
) -> None:
    config, event, count, stages = KILL_POINTS[point]
    server.batch.configure(config)
    process = start_process("score", run_dir, *batch_flags(server, backend))
    try:
        wait_for(server, event, count)
        if point == "between upload and create":
            assert len(events(server, "uploaded")) >= 1
    finally:
        kill(process)
    assert {m.stage for m in manifests(run_dir)} <= stages | {"collected"}, [
        m.stage for m in manifests(run_dir)
    ]
    if point == "between upload and create":
        assert manifests(run_dir)[0].stage == "uploaded"
    server.batch.configure(BatchConfig())
    result = score_batch(run_dir, server, "--resume", backend=backend)
    assert result.exit_code == 0, result.output
    assert_scored_once_each(run_dir, server)
    assert all(m.stage == "collected" for m in manifests(run_dir))


# --- lookahead in rounds -----------------------------------------------------------------------


def top_lists(run_dir: Path) -> dict[str, tuple[list[str], list[float]]]:
    with connect(run_dir) as con:
        relation = con.sql(
            "SELECT stem, response_index, position, top_tokens, top_logprobs "
            "FROM scores_resolved WHERE status = 'ok'"
        )
        return {
            f"{stem}#{index}#{position}": (tokens, logprobs)
            for stem, index, position, tokens, logprobs in relation.fetchall()
        }


def score_lookahead(run_dir: Path, toy: ToyService, *extra: str) -> Any:
    flags = batch_flags(toy, lookahead_flags=("--lookahead", "4"))
    return invoke("score", run_dir, *flags, *extra)


def test_batch_lookahead_gives_the_online_one_token_results_in_fewer_requests_over_rounds(
    toy: ToyService, run_dir: Path, toy_inputs: ToyInputs, tmp_path: Path
) -> None:
    online_dir = tmp_path / "online"
    explode(toy_inputs.directory, online_dir)
    online = score_cli(online_dir, toy, MODEL2, "--lookahead", "1")
    assert online.exit_code == 0, online.output
    batch = score_lookahead(run_dir, toy)
    assert batch.exit_code == 0, batch.output
    expected = top_lists(online_dir)
    assert top_lists(run_dir) == expected and len(expected) == len(all_keys(run_dir))
    lines = toy.submitted_keys()
    assert max(lines.values()) == 1
    assert sum(lines.values()) + 2 < len(expected)  # + 2: the probe, online
    plans = {manifest.plan for manifest in manifests(run_dir)}
    assert len(plans) >= 2
    assert f"{len(plans)} rounds" in batch.output
    lookaheads = [
        row
        for part in RunDir(run_dir).score_parts(MODEL2)
        for row in pq.read_table(part, columns=["lookahead", "step"]).to_pylist()
    ]
    assert {row["lookahead"] for row in lookaheads} >= {4}
    assert any(row["step"] > 0 for row in lookaheads)


def test_batch_auto_ends_its_lines_where_a_disagreement_is_likely(
    toy: ToyService, run_dir: Path, toy_inputs: ToyInputs, tmp_path: Path
) -> None:
    """Under ``auto`` each line asks for what the online scheduler would, from the acceptance
    prediction, so lines end after the positions Model 1 itself found unlikely (where Model 2
    is likely to generate another token), not at every N-th; the results stay the online
    one-token results."""
    online_dir = tmp_path / "online"
    explode(toy_inputs.directory, online_dir)
    assert score_cli(online_dir, toy, MODEL2, "--lookahead", "1").exit_code == 0
    flags = batch_flags(toy, lookahead_flags=("--lookahead", "auto"))
    batch = invoke("score", run_dir, *flags)
    assert batch.exit_code == 0, batch.output
    assert top_lists(run_dir) == top_lists(online_dir)
    probability = {
        (r["stem"], r["response_index"], r["position"]): math.exp(r["logprob"])
        for r in pq.read_table(RunDir(run_dir).positions).to_pylist()
    }
    lines = [
        row
        for part in RunDir(run_dir).score_parts(MODEL2)
        for row in pq.read_table(part).to_pylist()
        if row["step"] == 0 and row["source"] == schemas.SOURCE_BATCH
    ]
    assert len({row["lookahead"] for row in lines}) > 2
    ends = [
        probability[key]
        for row in lines
        if (key := (row["stem"], row["response_index"], row["position"] + row["lookahead"] - 1))
        in probability
        and (key[0], key[1], key[2] + 1) in probability
    ]
    assert statistics.fmean(ends) < statistics.fmean(probability.values()) - 0.2


def test_max_rounds_leaves_uncovered_positions_for_resume(toy: ToyService, run_dir: Path) -> None:
    first = score_lookahead(run_dir, toy, "--max-rounds", "1")
    assert first.exit_code == 6, first.output
    assert "still uncovered after 1 rounds of batch jobs" in first.output
    assert len({manifest.plan for manifest in manifests(run_dir)}) == 1
    scored = set(top_lists(run_dir))
    assert scored < all_keys(run_dir)
    assert {row["status"] for row in resolved(run_dir)} == {"ok"}
    second = score_lookahead(run_dir, toy, "--resume")
    assert second.exit_code == 0, second.output
    assert set(top_lists(run_dir)) == all_keys(run_dir)
    assert max(toy.submitted_keys().values()) == 1
