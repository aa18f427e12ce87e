"""`klstream check`: one row per kind of server the emulator plays (README, "Can it be scored
here?"), with its exit status, through the real google-genai and openai SDKs over HTTP (and the
toy backend in process); the canary batch job on both Google routes; and a real run's first
answer judged by the same functions, into run.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cli import invoke
from click.testing import Result

import klstream
from klstream.emulator import BatchConfig, EmulatorServer
from klstream.emulator.protocol import MUST_THINK_MESSAGE, NO_LOGPROBS_MESSAGE
from klstream.input.explode import explode
from klstream.storage.rundir import RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs

UNPRICED = "price unknown"


def check(server: EmulatorServer | None, model2: str, *args: object, path: str = "") -> Result:
    where = [] if server is None else ["--base-url", server.base_url + path]
    return invoke("check", "--model2", model2, *where, "--timeout", 5, *args)


def row(result: Result) -> str:
    return result.stdout.splitlines()[0]


def gemini_row(model2: str, *cells: str, verdict: str = "scorable: prefill") -> str:
    return " | ".join(
        [f"gemini {model2}", *cells, "prompt-logprobs n/a", "batch untried", UNPRICED, verdict]
    )


SCORABLE = ["logprobs yes", "k 20/20", "ids yes", "prefill continues", "thinking off"]
UNKNOWN = ["k -", "ids -", "prefill -", "thinking -", "served -"]


# --- Gemini-protocol profiles -----------------------------------------------------------------


def test_a_model_that_scores_gets_a_row_of_yeses_and_the_flags_that_score_it(
    emulator: EmulatorServer,
) -> None:
    result = check(emulator, "toy-d0.5")
    assert result.exit_code == 0, result.output
    assert row(result) == gemini_row("toy-d0.5", *SCORABLE, "served toy-d0.5")
    assert "  prefill: after its own first token" in result.stdout
    assert "equals its own second step (largest deviation 0 nats)" in result.stdout
    assert result.stdout.splitlines()[-1] == "toy-d0.5 can be scored here with --method prefill"
    # Three tiny requests: the first answer, two greedy tokens, one after a prefill.
    assert emulator.stats()["total"] == 3


@pytest.mark.parametrize(
    ("backend", "flags", "said"),
    [
        ("gemini", [], NO_LOGPROBS_MESSAGE.format(model="toy-logprobsoff")),
        ("vertex", ["--project-id", "p"], "Logprobs is not supported for this model"),
    ],
)
def test_a_model_without_logprobs_exits_5_with_the_services_words_and_what_works_instead(
    emulator: EmulatorServer, backend: str, flags: list[str], said: str
) -> None:
    result = check(emulator, "toy-logprobsoff", "--backend", backend, *flags)
    assert result.exit_code == 5, result.output
    cells = ["logprobs no", *UNKNOWN, "prompt-logprobs n/a", "batch untried", UNPRICED]
    assert row(result) == " | ".join([f"{backend} toy-logprobsoff", *cells, "not scorable"])
    assert said in result.stdout and said in result.stderr
    assert "cannot be scored on the" in result.stderr
    assert "--backend openai --method prompt-logprobs" in result.stderr
    assert emulator.stats()["total"] == 1


def test_a_model_that_refuses_prefill_exits_5(emulator: EmulatorServer) -> None:
    result = check(emulator, "toy-noprefill")
    assert result.exit_code == 5, result.output
    cells = ["logprobs yes", "k 20/20", "ids yes", "prefill refused", "thinking off"]
    assert row(result) == gemini_row(
        "toy-noprefill", *cells, "served toy-noprefill", verdict="not scorable"
    )
    assert "Requests ending with a model turn are not supported" in result.stderr


def test_a_model_that_must_think_gets_the_least_budget_it_takes(emulator: EmulatorServer) -> None:
    result = check(emulator, "toy-mustthink128")
    assert result.exit_code == 0, result.output
    cells = ["logprobs yes", "k 20/20", "ids yes", "prefill continues", "thinking 128"]
    assert row(result) == gemini_row("toy-mustthink128", *cells, "served toy-mustthink128")
    assert f"refused 0: {MUST_THINK_MESSAGE}" in result.stdout
    # A budget below the least one is refused, and says which flag finds it.
    given = check(emulator, "toy-mustthink128", "--thinking-budget", "0")
    assert given.exit_code == 5
    assert "thinking refused" in row(given) and "--thinking-budget auto" in given.stderr


def test_sentinels_are_left_out_and_the_certain_token_is_the_whole_distribution(
    emulator: EmulatorServer,
) -> None:
    result = check(emulator, "toy-sentinels")
    assert result.exit_code == 0, result.output
    cells = ["logprobs yes", "k 1/20", "ids yes", "prefill continues", "thinking off"]
    assert row(result) == gemini_row("toy-sentinels", *cells, "served toy-sentinels")
    assert "(a shorter list holds the whole distribution); 19 entries left out" in result.stdout


def test_a_substituted_model_is_named_and_warned_about(emulator: EmulatorServer) -> None:
    result = check(emulator, "toy-d0.5-rerouted")
    assert result.exit_code == 0, result.output
    assert row(result) == gemini_row("toy-d0.5-rerouted", *SCORABLE, "served toy")
    assert "served: warning: the service says toy answered, not toy-d0.5-rerouted" in (
        result.stdout
    )


def test_a_retired_model_exits_5_saying_when_it_was_retired(emulator: EmulatorServer) -> None:
    model2 = "gemini-2.0-flash-toy-retired"
    result = check(emulator, model2)
    assert result.exit_code == 5, result.output
    cells = ["logprobs ?", *UNKNOWN, "prompt-logprobs n/a", "batch untried"]
    assert row(result) == " | ".join(
        [f"gemini {model2}", *cells, "price retired 2026-06-01", "not scorable"]
    )
    assert "gemini-2.0-flash was retired on 2026-06-01" in result.stderr
    assert "price: warning: gemini-2.0-flash's prices of" in result.stdout


# --- open-weight servers ----------------------------------------------------------------------


def openai_row(model2: str, ids: str, dialect: str, verdict: str) -> str:
    cells = ["logprobs yes", "k 20/20", f"ids {ids}", "prefill continues", "thinking n/a"]
    tail = [f"served {model2}", f"prompt-logprobs {dialect}", "batch n/a", UNPRICED, verdict]
    return " | ".join([f"openai {model2}", *cells, *tail])


BOTH = "scorable: prefill, prompt-logprobs"


@pytest.mark.parametrize(
    ("path", "model2", "expected", "verdict"),
    [
        ("/v1", "toy-d0.5", openai_row("toy-d0.5", "yes", "vllm", BOTH), "--dialect vllm"),
        ("/sglang/v1", "toy-d0.5", openai_row("toy-d0.5", "texts", "sglang", BOTH), "sglang"),
        ("/legacy/v1", "toy-d0.5", openai_row("toy-d0.5", "texts", "echo", BOTH), "echo"),
        (
            "/v1",
            "toy-d0.5-noprompt",
            openai_row("toy-d0.5-noprompt", "yes", "no", "scorable: prefill"),
            "with --method prefill",
        ),
    ],
    ids=["vllm", "sglang", "legacy-echo", "no-prompt-logprobs"],
)
def test_each_open_weight_server_gets_its_dialect(
    emulator: EmulatorServer, path: str, model2: str, expected: str, verdict: str
) -> None:
    result = check(emulator, model2, "--backend", "openai", path=path)
    assert result.exit_code == 0, result.output
    assert row(result) == expected
    assert verdict in result.stdout.splitlines()[-1]


def test_the_dialect_named_is_the_one_asked(emulator: EmulatorServer) -> None:
    result = check(emulator, "toy-d0.5", "--backend", "openai", "--dialect", "echo", path="/v1")
    assert result.exit_code == 0, result.output
    assert "prompt-logprobs echo" in row(result)


def test_tgi_exits_5_with_both_causes(emulator: EmulatorServer) -> None:
    result = check(emulator, "toy-d0.5", "--backend", "openai", path="/tgi/v1")
    assert result.exit_code == 5, result.output
    cells = ["logprobs ?", "k -", "ids -", "prefill -", "thinking n/a", "served -"]
    tail = ["prompt-logprobs no", "batch n/a", UNPRICED, "not scorable"]
    assert row(result) == " | ".join(["openai toy-d0.5", *cells, *tail])
    assert "prefill: model or endpoint not found" in result.stderr
    assert "prompt-logprobs:" in result.stderr and "is HuggingFace TGI" in result.stderr


def test_the_toy_backend_needs_no_server() -> None:
    result = check(None, "toy-d0.5", "--backend", "toy", "--batch", "--batch-poll-seconds", 0.01)
    assert result.exit_code == 0, result.output
    cells = [*SCORABLE, "served toy-d0.5", "prompt-logprobs yes", "batch 3/3", UNPRICED]
    assert row(result) == " | ".join(
        ["toy toy-d0.5", *cells, "scorable: prefill, prompt-logprobs, batch"]
    )


# --- the canary batch job ---------------------------------------------------------------------

ROUTES = [
    pytest.param([], id="gemini"),
    pytest.param(
        ["--backend", "vertex", "--project-id", "proj", "--location", "us-central1"], id="vertex"
    ),
]


@pytest.mark.parametrize("route", ROUTES)
def test_a_canary_job_proves_batch_and_leaves_no_file(
    emulator: EmulatorServer, route: list[str]
) -> None:
    result = check(emulator, "toy-d0.5", "--batch", "--batch-poll-seconds", 0.01, *route)
    assert result.exit_code == 0, result.output
    assert "| batch 3/3 |" in row(result) and row(result).endswith("scorable: prefill, batch")
    assert "; in batch jobs with --batch" in result.stdout
    created = [event for event in emulator.batch.events if event.kind == "created"]
    assert [len(event.keys) for event in created] == [3]
    assert emulator.batch.file_names() == []
    if route:
        assert emulator.batch.object_names("proj-klstream-batch") == []


@pytest.mark.parametrize("route", ROUTES)
def test_a_canary_without_logprobs_says_batch_cannot_score(
    emulator: EmulatorServer, route: list[str]
) -> None:
    emulator.batch.configure(BatchConfig(without_logprobs=True))
    result = check(emulator, "toy-d0.5", "--batch", "--batch-poll-seconds", 0.01, *route)
    assert result.exit_code == 0, result.output  # online scoring still works
    assert "| batch no |" in row(result) and row(result).endswith("scorable: prefill")
    assert "brought none of its 3 lines back with logprobs" in result.stdout
    assert "answer without logprobs" in result.stdout


def test_a_canary_past_its_time_out_is_cancelled(emulator: EmulatorServer) -> None:
    emulator.batch.configure(BatchConfig(running_s=60.0))
    args = ["--batch", "--batch-timeout", 0.2, "--batch-poll-seconds", 0.05]
    result = check(emulator, "toy-d0.5", *args)
    assert result.exit_code == 0, result.output
    assert "| batch no |" in row(result)
    assert "after 0.2 s and was cancelled" in result.stdout
    assert [event.kind for event in emulator.batch.events].count("cancelled") == 1
    assert emulator.batch.file_names() == []


# --- the same judgement of a real run's first answer ------------------------------------------


def capabilities(run_dir: Path, model2: str) -> dict[str, Any]:
    config = json.loads(RunDir(run_dir).run_config(model2).read_text(encoding="utf-8"))
    recorded: dict[str, Any] = config["capabilities"]
    return recorded


def test_a_score_records_what_its_first_answer_showed(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    model2 = "toy-d0.5-rerouted"
    flags = ["--base-url", emulator.base_url, "--lookahead", 1]
    result = invoke("score", run_dir, "--model2", model2, *flags)
    assert result.exit_code == 0, result.output
    assert "warning: the service says toy answered, not toy-d0.5-rerouted" in result.stderr
    assert capabilities(run_dir, model2) == {
        "method": "prefill",
        "model": model2,
        "top_logprobs": 20,
        "usable": 20,
        "dropped": 0,
        "problem": None,
        "token_ids": True,
        "served_model": "toy",
        "served_as_asked": False,
        "thinking_budget": 0,
        "dialect": None,
    }
    # A resumed run with nothing left to ask keeps what the first run found.
    again = invoke("score", run_dir, "--model2", model2, *flags, "--resume")
    assert again.exit_code == 0, again.output
    assert capabilities(run_dir, model2)["served_model"] == "toy"


def test_prompt_logprobs_record_the_dialect_and_a_batch_run_its_probe(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    run_dir = tmp_path / "run"
    explode(toy_inputs.directory, run_dir, max_files=1)
    openai = ["--backend", "openai", "--base-url", emulator.base_url + "/sglang/v1"]
    result = invoke(
        "score", run_dir, "--model2", "toy-d0.5", *openai, "--method", "prompt-logprobs"
    )
    assert result.exit_code == 0, result.output
    found = capabilities(run_dir, "toy-d0.5")
    assert (found["method"], found["dialect"], found["token_ids"]) == (
        "prompt-logprobs",
        "sglang",
        True,
    )
    batch = ["--base-url", emulator.base_url, "--batch", "--batch-poll-seconds", 0.01]
    result = invoke("score", run_dir, "--model2", "toy-mustthink128", *batch, "--lookahead", 1)
    assert result.exit_code == 0, result.output
    found = capabilities(run_dir, "toy-mustthink128")
    assert (found["method"], found["thinking_budget"]) == ("prefill", 128)


def test_sample_judges_its_first_answer_and_writes_nothing_of_it(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say something.\n", encoding="utf-8")
    result = invoke(
        "sample", "--backend", "toy", "--prompts", prompts, "--model", "toy-rerouted",
        "-o", tmp_path / "out", "--num-samples", 1, "--max-tokens", 3,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: the service says toy answered, not toy-rerouted" in result.stderr
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["toy-rerouted_prompt_0.json"]


def test_the_library_returns_the_report_the_command_prints(emulator: EmulatorServer) -> None:
    endpoint = klstream.endpoint_from_environment("gemini", base_url=emulator.base_url)
    report = klstream.check(endpoint, klstream.CheckOptions("toy-d0.5", top_logprobs=5))
    assert isinstance(report, klstream.CheckReport) and report.scorable
    assert report.methods == {"prefill": {"method": "prefill"}}
    assert report.finding("k").value == "5/5"
    assert report.capabilities is not None and report.capabilities.usable == 5
    assert report.row() == row(check(emulator, "toy-d0.5", "--top-logprobs", 5))
