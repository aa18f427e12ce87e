"""The public Python API: what it exports, that it works inside a running event loop, that
the README's example runs as written, and that a resume survives a package upgrade."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

import klstream
from klstream.emulator import EmulatorServer
from klstream.storage.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
MODEL2 = "toy-d0.5"


def endpoint(server: EmulatorServer) -> klstream.Endpoint:
    return klstream.Endpoint("gemini", "test-key", base_url=server.base_url, timeout_s=5.0)


def test_every_exported_name_resolves_and_has_a_docstring() -> None:
    names = [name for name in klstream.__all__ if name != "__version__"]
    assert {
        "explode",
        "score",
        "score_async",
        "compute_kl",
        "export",
        "summary",
        "connect",
        "run",
        "run_async",
        "ScoreOptions",
        "RunOptions",
        "KlstreamError",
    } <= set(names)
    for name in names:
        value = getattr(klstream, name)
        assert (value.__doc__ or "").strip(), f"klstream.{name} has no docstring"
    assert sorted(dir(klstream)) == sorted(klstream.__all__)
    with pytest.raises(AttributeError):
        klstream.no_such_name  # noqa: B018


def test_every_exception_is_a_klstream_error_with_an_exit_code() -> None:
    kinds = [getattr(klstream, n) for n in klstream.__all__ if n.endswith(("Error", "Exists"))]
    for kind in kinds:
        assert issubclass(kind, klstream.KlstreamError)
        assert kind.exit_code in {1, 3, 4, 5, 6, 7}


def test_score_async_works_inside_a_running_event_loop(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    async def notebook_cell() -> klstream.ScoreReport:
        return await klstream.score_async(
            run_dir, klstream.ScoreOptions(MODEL2), endpoint(emulator)
        )

    report = asyncio.run(notebook_cell())
    assert report.remaining == 0 and report.stats.scored == report.stats.total > 0
    assert klstream.summary(run_dir)["scored"] == report.stats.total


def test_blocking_score_also_works_inside_a_running_event_loop(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    async def notebook_cell() -> klstream.ScoreReport:
        return klstream.score(run_dir, klstream.ScoreOptions(MODEL2), endpoint(emulator))

    assert asyncio.run(notebook_cell()).remaining == 0


def readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "README's Python API section has no python block"
    return match.group(1)


def test_the_readme_python_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompts.txt", tmp_path / "examples" / "prompts.txt")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "KL divergence: toy -> toy-d0.5" in printed
    assert "mean_kl" in printed
    exported = sorted(p.name for p in (tmp_path / "runs/api-example/kl").glob("*_kl.json"))
    prompts = (ROOT / "examples" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(exported) == len([line for line in prompts if line.strip()])


def test_resume_accepts_a_run_json_written_by_an_older_release(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    first = klstream.score(run_dir, klstream.ScoreOptions(MODEL2), endpoint(emulator))
    config = RunDir(run_dir).run_config(MODEL2)
    older = {
        "model2": MODEL2,
        "top_logprobs": 20,
        "backend": "gemini",
        "thinking_budget": 0,
        "tool_version": "0.0.9",
    }
    config.write_text(json.dumps(older), encoding="utf-8")
    requests_before = emulator.stats()["total"]

    options = klstream.ScoreOptions(MODEL2, resume=True)
    resumed = klstream.score(run_dir, options, endpoint(emulator))
    assert resumed.remaining == 0
    assert resumed.stats.already_done == first.stats.total
    assert emulator.stats()["total"] == requests_before
    recorded = json.loads(config.read_text(encoding="utf-8"))
    assert recorded["results_format"] == 1 and recorded["written_by"] == klstream.__version__


def test_resume_refuses_results_of_another_format(run_dir: Path, emulator: EmulatorServer) -> None:
    klstream.score(run_dir, klstream.ScoreOptions(MODEL2), endpoint(emulator))
    config = RunDir(run_dir).run_config(MODEL2)
    recorded = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(json.dumps({**recorded, "results_format": 99}), encoding="utf-8")
    with pytest.raises(klstream.RunConfigMismatch, match="results_format: recorded 99, now 1"):
        klstream.score(run_dir, klstream.ScoreOptions(MODEL2, resume=True), endpoint(emulator))
