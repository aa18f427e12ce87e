"""The README's first command: the whole pipeline on bundled prompts, no credentials needed.

Starts the local Gemini-protocol emulator (with a few injected 429s and 503s, so retries show),
samples Model 1 responses from the toy model ``toy``, then runs ``klstream run`` against the
variant ``toy-d0.5``, and prints the summary and where the ``_kl.json`` files are. Every step
is the real CLI, run as a subprocess, so the printed commands can be copied.
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
OUT = HERE.parent / "demo"


def shown(path: Path) -> str:
    """``path`` as the user can type it from where they ran the demo."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def klstream(*args: str) -> None:
    command = [sys.executable, "-m", "klstream", *args]
    print(f"\n$ uv run klstream {shlex.join(args)}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    faults = FaultConfig(
        latency_ms=20, jitter_ms=10, rate_429=0.03, rate_503=0.02, retry_delay_s=0.2
    )
    with EmulatorServer(faults) as server:
        print(f"local Gemini-protocol emulator on {server.base_url}")
        klstream(
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
            shown(OUT / "responses"),
            "--base-url",
            server.base_url,
        )
        klstream(
            "run",
            "--input-dir",
            shown(OUT / "responses"),
            "--output-dir",
            shown(OUT / "kl"),
            "--model2",
            "toy-d0.5",
            "--max-concurrent",
            "32",
            "--base-url",
            server.base_url,
        )
        print(f"\nthe emulator answered {server.stats()['total']} requests")
    print(f"\n_kl.json files: {shown(OUT / 'kl')}")
    print(f"per-token Parquet for DuckDB/pandas/polars: {shown(OUT / 'kl' / 'run')}")
    query = "SELECT token, kl_floor FROM kl ORDER BY kl_floor DESC LIMIT 5"
    print(f"try: uv run klstream query {shlex.join([shown(OUT / 'kl' / 'run'), query])}")
    print(f"\nHTML report (open it in a browser): {shown(OUT / 'kl' / 'report.html')}")


if __name__ == "__main__":
    main()
