"""Explode benchmark: throughput, and peak memory bounded by the largest file, not the directory.

Generates a synthetic input directory (default 200 files x 5 responses x 200 tokens x top-20) and a
directory with 4x as many files of the same size, explodes each in a fresh child process and
prints positions/s and the child's peak RSS (``resource.getrusage``). The peak RSS of the two runs
should be about equal. It also times ``json.loads`` alone over the same files: the ceiling that
parsing with the standard library puts on explode's throughput.

Usage: python bench/explode_bench.py [--files 200] [--responses 5] [--tokens 200] [--top-k 20]
                                     [--scale 4]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from klstream.input.explode import explode

DISTINCT_FILES = 16
"""Files are copies of this many random documents: generating every file would dominate the run."""


def _document(rng: random.Random, responses: int, tokens: int, top_k: int) -> dict[str, Any]:
    def entry() -> dict[str, Any]:
        token = f" tok{rng.randrange(50_000)}"
        return {"token": token, "logprob": -rng.random() * 10, "token_id": rng.randrange(250_000)}

    generated = []
    for _ in range(responses):
        content = []
        for _ in range(tokens):
            top = sorted((entry() for _ in range(top_k)), key=lambda e: -e["logprob"])
            content.append({**top[0], "top_logprobs": top})
        text = "".join(position["token"] for position in content)
        generated.append({"model": "bench-model", "text": text, "logprobs": {"content": content}})
    return {"prompt": "benchmark prompt", "model": "bench-model", "responses": generated}


def make_input_dir(directory: Path, files: int, responses: int, tokens: int, top_k: int) -> int:
    """Write ``files`` input files; returns the size in bytes of the largest."""
    rng = random.Random(0)
    texts = [
        json.dumps(_document(rng, responses, tokens, top_k), indent=1)
        for _ in range(min(files, DISTINCT_FILES))
    ]
    directory.mkdir(parents=True)
    for index in range(files):
        (directory / f"prompt_{index:05d}.json").write_text(texts[index % len(texts)])
    return max(len(text.encode()) for text in texts)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(input_dir: Path, run_dir: Path) -> None:
    """Run one explode in this fresh process and print its figures as JSON for the parent."""
    rss_before = peak_rss_mib()
    started = time.perf_counter()
    report = explode(input_dir, run_dir)
    seconds = time.perf_counter() - started
    figures = {
        "files": report.files,
        "positions": report.positions,
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(figures))


def run_child(input_dir: Path, run_dir: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(input_dir), str(run_dir)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def parse_only_seconds(input_dir: Path) -> float:
    started = time.perf_counter()
    for path in sorted(input_dir.glob("*.json")):
        json.loads(path.read_bytes())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--scale", type=int, default=4, help="file-count multiple of the 2nd dir")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    with tempfile.TemporaryDirectory(prefix="explode-bench-") as temp:
        root = Path(temp)
        shape = (args.responses, args.tokens, args.top_k)
        print(f"{args.responses} responses x {args.tokens} tokens x top-{args.top_k} per file")
        for files in (args.files, args.files * args.scale):
            input_dir = root / f"input-{files}"
            largest = make_input_dir(input_dir, files, *shape)
            total_mib = sum(p.stat().st_size for p in input_dir.iterdir()) / 2**20
            figures = run_child(input_dir, root / f"run-{files}")
            rate = figures["positions"] / figures["seconds"]
            print(
                f"{files:6d} files ({total_mib:7.1f} MiB JSON, largest file "
                f"{largest / 2**20:.1f} MiB): {figures['positions']:,} positions in "
                f"{figures['seconds']:.1f} s = {rate:,.0f} positions/s, "
                f"{total_mib / figures['seconds']:.1f} MiB/s; peak RSS "
                f"{figures['peak_rss_mib']:.0f} MiB (after imports {figures['rss_before_mib']:.0f})"
            )
            if files == args.files:
                parse_rate = figures["positions"] / parse_only_seconds(input_dir)
                print(
                    f"{'':6s} json.loads alone over the same files: {parse_rate:,.0f} positions/s"
                )


if __name__ == "__main__":
    main()
