"""The README's "Try it locally" blocks run as written: the server block in the background, the
pasted block in bash with `set -euo pipefail`, both through `uv run` in a fresh directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Try it locally, step by step"


def local_blocks() -> list[str]:
    """The section's bash blocks, in order: the server's, then the pasted one."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.DOTALL)


def _uv() -> str | None:
    """The uv running this suite (`uv run` exports it as $UV), else one on PATH."""
    return os.environ.get("UV") or shutil.which("uv")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh directory laid out as the project root is for the blocks: examples/prompts.txt."""
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompts.txt", tmp_path / "examples" / "prompts.txt")
    return tmp_path


@pytest.fixture
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`uv run` of this project from any directory, without syncing or locking it again."""
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed: the README's blocks run through `uv run`")
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "uv").symlink_to(uv)
    env = {name: value for name, value in os.environ.items() if not name.startswith("GOOGLE_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        UV_PROJECT=str(ROOT),
        UV_NO_SYNC="1",
        UV_FROZEN="1",
    )
    env.pop("GEMINI_API_KEY", None)
    return env


@contextlib.contextmanager
def serving(command: str, workdir: Path, env: dict[str, str]) -> Iterator[str]:
    """``command`` (a server) running in its own process group until the block ends; yields
    its first line of output, which it prints once it listens."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        yield process.stdout.readline()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)


@pytest.fixture
def readme_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The README's fixed port 8765 for one test at a time, across xdist workers (whose
    temporary directories share a parent): an exclusive lock held for the test."""
    lock = tmp_path_factory.getbasetemp().parent / "readme-port-8765.lock"
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture
def server(readme_port: None, workdir: Path, shell_env: dict[str, str]) -> Iterator[str]:
    """The first block, running until the test ends; yields its first line of output."""
    with serving(local_blocks()[0].strip(), workdir, shell_env) as first_line:
        yield first_line


def test_the_readme_has_the_two_local_blocks() -> None:
    blocks = local_blocks()
    assert len(blocks) == 2
    assert blocks[0].strip() == "uv run klstream emulate --port 8765"
    commands = [line.split()[3] for line in blocks[1].splitlines() if line.startswith("uv run")]
    assert commands == ["sample", "explode", "score", "score", "top", "report", "query"]


def test_the_readme_local_block_runs_as_written(
    server: str, workdir: Path, shell_env: dict[str, str]
) -> None:
    assert server.startswith("klstream emulator listening on http://127.0.0.1:8765"), server
    pasted = local_blocks()[1]
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{pasted}"],
        cwd=workdir,
        env=shell_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run = workdir / "runs" / "local" / "run"
    assert (run / "report.html").stat().st_size > 0
    assert "dry run" in result.stdout.lower()
    assert re.search(r"score toy-d0\.5: [\d,]+ scored, 0 failed", result.stdout)
    assert re.search(r"toy-d0\.5\s*│\s*[\d,]+\s*│\s*0\.\d+", result.stdout), result.stdout


def test_the_demo_prints_commands_that_work_after_its_server_has_gone(
    readme_port: None, workdir: Path, shell_env: dict[str, str]
) -> None:
    """`make demo`'s printed commands reach no temporary port: followed by its restart lines
    (the README's server block and export), they run as printed, from scratch."""
    demo = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), str(workdir / "demo")],
        cwd=workdir,
        env=shell_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr
    printed = demo.stdout.splitlines()
    commands = [line[2:] for line in printed if line.startswith("$ uv run klstream ")]
    assert [command.split()[3] for command in commands] == ["sample", "run"]
    assert not any("127.0.0.1" in command for command in commands)
    restart = printed[printed.index("and point them at it:") - 1].strip()
    export = printed[printed.index("and point them at it:") + 1].strip()
    assert restart == local_blocks()[0].strip()
    assert export == "export GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:8765"
    query = next(line for line in printed if line.startswith("try: ")).removeprefix("try: ")

    with serving(restart, workdir, shell_env) as first_line:
        assert "listening on http://127.0.0.1:8765" in first_line
        again = subprocess.run(
            [
                "bash",
                "-c",
                "\n".join(["set -euo pipefail", "rm -r demo", export, *commands, query]),
            ],
            cwd=workdir,
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert again.returncode == 0, again.stderr
    assert "sample toy: wrote 5 files" in again.stdout
    assert re.search(r"score toy-d0\.5: 708 scored, 0 failed", again.stdout), again.stdout
    assert "toy-d0.5" in again.stdout and "kl_estimate" in again.stdout
