"""The script ``klstream views RUN`` prints runs as-is, whatever files the run has yet, in Python's
duckdb and in the duckdb CLI, and gives them the views klstream's own connection has."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from cli import invoke
from conftest import ToyInputs
from scorefixtures import write_fixture_scores

from klstream.backends.toy import ToyService
from klstream.input.explode import explode
from klstream.metrics.kl import compute_kl
from klstream.storage.database import connect

VIEWS = {
    "positions",
    "responses",
    "skipped",
    "scores",
    "scores_resolved",
    "kl",
    "response_stats",
    "run_configs",
    "costs",
    "lookahead_hazards",
}
COUNTS = "SELECT " + ", ".join(f"(SELECT count(*) FROM {view})" for view in sorted(VIEWS))
DUCKDB_CLI = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")


def just_exploded(tmp_path: Path, toy: ToyService, inputs: Path) -> Path:
    explode(inputs, tmp_path / "run")
    return tmp_path / "run"


def with_skipped(tmp_path: Path, toy: ToyService, inputs: Path) -> Path:
    shutil.copytree(inputs, tmp_path / "in")
    (tmp_path / "in" / "broken.json").write_text("not json", encoding="utf-8")
    explode(tmp_path / "in", tmp_path / "run", skip_invalid=True)
    return tmp_path / "run"


def scores_without_run_json(tmp_path: Path, toy: ToyService, inputs: Path) -> Path:
    """Parts but no run.json and no KL table yet."""
    run = just_exploded(tmp_path, toy, inputs)
    write_fixture_scores(run, "fixture-model")
    return run


def scores_and_kl_without_run_json(tmp_path: Path, toy: ToyService, inputs: Path) -> Path:
    run = scores_without_run_json(tmp_path, toy, inputs)
    compute_kl(run, "fixture-model")
    return run


def scored(tmp_path: Path, toy: ToyService, inputs: Path) -> Path:
    """A real score: parts, run.json and the KL table."""
    run = just_exploded(tmp_path, toy, inputs)
    result = invoke("score", run, "--model2", "toy-d0.5", "--backend", "toy", "--base-url", toy.url)
    assert result.exit_code == 0, result.output
    return run


RUNS: dict[str, Callable[[Path, ToyService, Path], Path]] = {
    "just-exploded": just_exploded,
    "with-skipped": with_skipped,
    "scores-without-run-json": scores_without_run_json,
    "scores-and-kl": scores_and_kl_without_run_json,
    "scored": scored,
}


@pytest.fixture(params=sorted(RUNS))
def script_and_counts(
    request: pytest.FixtureRequest, tmp_path: Path, toy: ToyService, toy_inputs: ToyInputs
) -> tuple[Path, tuple[int, ...]]:
    """The printed script of a run in one state, and the row count of each view as klstream's
    own connection sees them."""
    run = RUNS[request.param](tmp_path, toy, toy_inputs.directory)
    printed = invoke("views", run)
    assert printed.exit_code == 0, printed.output
    script = tmp_path / "views.sql"
    script.write_text(printed.output, encoding="utf-8")
    with connect(run) as ours:
        counts = ours.execute(COUNTS).fetchone()
    assert counts is not None
    return script, counts


def test_the_script_runs_in_python_duckdb_whatever_files_exist(
    script_and_counts: tuple[Path, tuple[int, ...]],
) -> None:
    """Every view exists, as empty views where files are missing, with klstream's row counts."""
    script, counts = script_and_counts
    with duckdb.connect() as con:
        con.execute(script.read_text(encoding="utf-8"))
        names = {
            name
            for (name,) in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        }
        assert names == VIEWS
        assert con.execute(COUNTS).fetchone() == counts


@pytest.mark.skipif(DUCKDB_CLI is None, reason="no duckdb CLI (dev dependency duckdb-cli)")
def test_the_script_runs_in_the_duckdb_cli_whatever_files_exist(
    script_and_counts: tuple[Path, tuple[int, ...]],
) -> None:
    """``duckdb -init FILE``, ``duckdb < FILE`` and ``.read FILE`` run it without an error, from
    another directory (the script's file_search_path finds the run), and count what klstream
    counts."""
    script, counts = script_and_counts
    assert DUCKDB_CLI is not None
    query = COUNTS + ";"
    ways = {
        "init": ([DUCKDB_CLI, "-init", str(script), "-list", "-noheader", "-c", query], ""),
        "stdin": (
            [DUCKDB_CLI, "-list", "-noheader"],
            script.read_text(encoding="utf-8") + "\n" + query,
        ),
        "read": ([DUCKDB_CLI, "-list", "-noheader"], f".read {script}\n{query}\n"),
    }
    for how, (args, stdin) in ways.items():
        result = subprocess.run(
            args, input=stdin, capture_output=True, text=True, cwd=script.parent.parent, check=False
        )
        assert result.returncode == 0, (how, result.stderr)
        assert "Error" not in result.stderr, result.stderr
        assert result.stdout.strip() == "|".join(map(str, counts))
