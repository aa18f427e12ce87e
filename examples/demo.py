"""The README's first command: the whole pipeline on bundled prompts, no credentials needed.

Starts the local Gemini-protocol emulator (with a few injected 429s and 503s, so retries show),
samples Model 1 responses from the toy model ``toy``, then runs ``klstream run`` against the
variant ``toy-d0.5``, and prints the summary and where the ``_kl.json`` files are. Every step
is the real CLI, run as a subprocess; the server is on a free port for the demo's lifetime, so
the commands it prints reach it through ``GOOGLE_GEMINI_BASE_URL``, and the demo ends with how to
start a server those commands reach again.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from klstream.emulator import EmulatorServer, FaultConfig

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "demo"
RESTART_PORT = 8765
"""The port the README's "Try it locally" block starts the server on."""


def shown(path: Path) -> str:
    """``path`` as the user can type it from where they ran the demo."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def klstream(base_url: str, *args: str) -> None:
    command = [sys.executable, "-m", "klstream", *args]
    print(f"\n$ uv run klstream {shlex.join(args)}", flush=True)
    subprocess.run(command, check=True, env={**os.environ, "GOOGLE_GEMINI_BASE_URL": base_url})


def main(out: Path = DEFAULT_OUT) -> None:
    """The demo, written to ``out`` (replaced if it exists)."""
    shutil.rmtree(out, ignore_errors=True)
    faults = FaultConfig(
        latency_ms=20, jitter_ms=10, rate_429=0.03, rate_503=0.02, retry_delay_s=0.2
    )
    with EmulatorServer(faults) as server:
        print(
            f"local Gemini-protocol emulator on {server.base_url} "
            "(GOOGLE_GEMINI_BASE_URL points the commands below at it)"
        )
        klstream(
            server.base_url,
            "sample",
            "--prompts",
            shown(HERE / "prompts.txt"),
            "--model",
            "toy",
            "--num-samples",
            "3",
            "--max-tokens",
            "60",
            "--seed",
            "1",
            "-o",
            shown(out / "responses"),
        )
        klstream(
            server.base_url,
            "run",
            "-i",
            shown(out / "responses"),
            "-o",
            shown(out / "kl"),
            "--model2",
            "toy-d0.5",
            "--max-concurrent",
            "32",
        )
        print(f"\nthe emulator answered {server.stats()['total']} requests")
    print(f"\n_kl.json files: {shown(out / 'kl')}")
    print(f"per-token Parquet for DuckDB/pandas/polars: {shown(out / 'kl' / 'run')}")
    query = (
        "SELECT model2, token, kl_floor, kl_estimate FROM kl WHERE model2 = 'toy-d0.5' "
        "ORDER BY kl_floor DESC LIMIT 5"
    )
    # Double quotes keep the SQL's single quotes readable; it holds nothing a shell expands there.
    print(f'try: uv run klstream query {shlex.quote(shown(out / "kl" / "run"))} "{query}"')
    print(f"\nHTML report (open it in a browser): {shown(out / 'kl' / 'report.html')}")
    print(
        "\nThe demo's server has stopped. To run the commands above again, start one in another "
        f"terminal:\n  uv run klstream emulate --port {RESTART_PORT}\nand point them at it:\n"
        f"  export GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:{RESTART_PORT}\n"
        'The README\'s "Try it locally, step by step" goes on from there.'
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
