"""What the answers were, reported where a reader sees it: the models the service says answered
(and --require-model-version), and the logprobs left out as unusable. Real HTTP to the emulator
through google-genai; the run's summary and its CLI lines come from the same SQL."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from cli import invoke
from click.testing import Result
from conftest import ToyInputs

from klstream.backends.checks import served_elsewhere
from klstream.emulator import EmulatorServer
from klstream.storage.rundir import ExportDir
from klstream.storage.sqlfiles import load_sql


def run(
    toy_inputs: ToyInputs, output: Path, emulator: EmulatorServer, model2: str, *extra: str
) -> Result:
    return invoke(
        "run", "--input-dir", toy_inputs.directory, "--output-dir", output, "--model2", model2,
        "--base-url", emulator.base_url, *extra,
    )  # fmt: skip


def test_answers_from_another_model_are_reported_or_stop_the_run(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    reported = run(toy_inputs, tmp_path / "out", emulator, "toy-d0.5-rerouted")
    assert reported.exit_code == 0, reported.output
    summary = json.loads(ExportDir(tmp_path / "out").summary.read_text(encoding="utf-8"))
    assert summary["served_models"] == [{"model": "toy", "positions": summary["positions"]}]
    assert summary["positions_from_other_models"] == summary["positions"]
    assert "answers came from another model than toy-d0.5-rerouted: toy" in reported.stderr
    assert "Served by:" in reported.output

    stopped = run(
        toy_inputs, tmp_path / "strict", emulator, "toy-d0.5-rerouted", "--require-model-version"
    )
    assert stopped.exit_code == 5, stopped.output
    assert "the service says toy answered where toy-d0.5-rerouted was asked" in stopped.stderr

    same = run(toy_inputs, tmp_path / "same", emulator, "toy-d0.5", "--require-model-version")
    assert same.exit_code == 0, same.output
    summary = json.loads(ExportDir(tmp_path / "same").summary.read_text(encoding="utf-8"))
    assert summary["positions_from_other_models"] == 0
    assert [entry["model"] for entry in summary["served_models"]] == ["toy-d0.5"]


def test_logprobs_left_out_are_counted_in_the_summary(
    tmp_path: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    padded = run(toy_inputs, tmp_path / "out", emulator, "toy-d0.5-sentinels")
    assert padded.exit_code == 0, padded.output
    summary = json.loads(ExportDir(tmp_path / "out").summary.read_text(encoding="utf-8"))
    assert summary["dropped_logprobs"] > 0 and summary["positions_with_dropped_logprobs"] > 0
    assert "Logprobs left out:" in padded.output
    assert summary["max_kl"] < 100


@pytest.mark.parametrize(
    ("served", "asked", "elsewhere"),
    [
        ("gemini-2.5-flash", "gemini-2.5-flash", False),
        ("models/gemini-2.5-flash", "gemini-2.5-flash", False),
        ("gemini-2.5-flash-001", "models/gemini-2.5-flash", False),
        ("Qwen/Qwen3-8B@fp_3f2a", "Qwen/Qwen3-8B", False),
        ("gemini-2.5-flash-lite", "gemini-2.5-flash", True),
        ("gemini-2.5-flash-preview-09-2025", "gemini-2.5-flash", True),
        ("gemini-2.5-pro", "gemini-2.5-flash", True),
        ("toy-d0.5", "toy", True),
    ],
)
def test_the_check_and_the_sql_agree_on_which_model_answered(
    served: str, asked: str, elsewhere: bool
) -> None:
    """A version of the model asked for is the model asked for; a sibling (flash-lite for
    flash) is not, though its name starts the same."""
    con = duckdb.connect()
    con.execute(load_sql("macros"))
    row = con.execute(
        "SELECT served_elsewhere($served, $asked)", {"served": served, "asked": asked}
    )
    assert served_elsewhere(served, asked) is elsewhere
    assert row.fetchone() == (elsewhere,)
