"""What a killed run costs, and what journaling every answer costs.

1. Kills: ``klstream score`` (a real process, default settings: lookahead auto, checkpoints every
   256 rows or 10 s) against the emulator with a small latency, SIGKILLed ``--kills`` times at
   random moments (after a random number of answers), each time resumed, then left to finish.
   From the emulator's own request log it prints the answers the server delivered against a clean
   run of the same inputs, the requests in flight at the kills (those that arrived within the
   latency and scheduling slack before one, or just after it), and the requests answered again
   although their first answer had been delivered outside that window: with the write-ahead
   journal those are the greedy consistency probe's alone (a few, once per run directory).
2. Journaling: the same run directory scored in process with and without the journal's writes
   (the bench replaces the segment writer's ``append`` with one that only counts, so the rows
   still reach the parts from memory), alternating, ``--rounds`` times each: the medians of
   requests per second and of CPU per request (the emulator runs in the same process).

Usage: python bench/durability_bench.py [--positions 600] [--kills 15] [--latency-ms 10]
                                        [--seed 1] [--journal-positions 4000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from score_bench import make_inputs

from klstream.backends.base import Endpoint
from klstream.emulator import EmulatorServer, FaultConfig
from klstream.input.explode import explode
from klstream.pipeline import score
from klstream.scoring.options import ScoreOptions
from klstream.storage import journal

MODEL2 = "toy-d0.5"


def answered(server: EmulatorServer) -> list[Any]:
    return [r for r in server.requests if r.status == 200 and ":generateContent" in r.path]


def klstream(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "klstream", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kills(inputs: Path, scratch: Path, server: EmulatorServer, count: int, seed: int) -> None:
    clean_dir, killed_dir = scratch / "clean", scratch / "killed"
    explode(inputs, clean_dir)
    explode(inputs, killed_dir)
    command = ["score", "--model2", MODEL2, "--base-url", server.base_url]
    server.reset_log()
    klstream(command[0], clean_dir, *command[1:]).communicate()
    clean = len(answered(server))

    server.reset_log()
    rng = random.Random(seed)
    moments: list[float] = []
    for attempt in range(count):
        before = len(answered(server))
        process = klstream(command[0], killed_dir, *command[1:], *(["--resume"] * bool(attempt)))
        target = before + rng.randint(2, 40)
        while process.poll() is None and len(answered(server)) < target:
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        moments.append(time.monotonic())
        process.communicate()
    process = klstream(command[0], killed_dir, *command[1:], "--resume")
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the last resume failed: {stderr}")
    records = answered(server)
    arrivals: dict[tuple[str, str], list[float]] = {}
    for record in records:
        arrivals.setdefault((record.prompt, record.prefill or ""), []).append(record.time)
    requests_at = Counter((p["prompt"], p["prefill"]) for p in positions_of(killed_dir))
    again = [
        arrived
        for identity, times in arrivals.items()
        for arrived in sorted(times)[: max(len(times) - requests_at[identity], 0)]
    ]
    in_flight = [t for t in again if any(-0.1 < kill - t < 1.0 for kill in moments)]
    print(f"kills: {count} SIGKILLs at random moments, default settings")
    print(f"  answers delivered, clean run:        {clean:6d}")
    print(f"  answers delivered, killed + resumed: {len(records):6d}  ({len(records) - clean:+d})")
    print(f"  answered again, in flight at a kill: {len(in_flight):6d}")
    print(f"  answered again, otherwise:           {len(again) - len(in_flight):6d}")


def positions_of(run_dir: Path) -> list[dict[str, str]]:
    """Every position's request identity: its prompt and Model 1's text before it."""
    positions = pq.read_table(run_dir / "positions.parquet").to_pylist()
    prompts = {
        (r["stem"], r["response_index"]): r["prompt"]
        for r in pq.read_table(run_dir / "responses.parquet").to_pylist()
    }
    texts: dict[tuple[str, int], str] = {}
    identities = []
    for row in positions:
        key = (row["stem"], row["response_index"])
        identities.append({"prompt": prompts[key], "prefill": texts.get(key, "")})
        texts[key] = texts.get(key, "") + row["token"]
    return identities


def journaling(inputs: Path, scratch: Path, server: EmulatorServer, rounds: int) -> None:
    endpoint = Endpoint("gemini", "bench", base_url=server.base_url)
    writes = journal._SegmentWriter.append

    def counted_only(self: journal._SegmentWriter, record: bytes) -> None:
        self.records += 1

    rates: dict[str, list[tuple[float, float]]] = {"with the journal": [], "without its writes": []}
    variants = [("with the journal", writes), ("without its writes", counted_only)]
    for round_index in range(rounds):
        for label, append in variants if round_index % 2 == 0 else variants[::-1]:
            run_dir = scratch / f"{label.replace(' ', '-')}-{round_index}"
            explode(inputs, run_dir)
            journal._SegmentWriter.append = append  # type: ignore[method-assign]
            started, cpu = time.monotonic(), time.process_time()
            options = ScoreOptions(MODEL2, lookahead=1, max_concurrent=64)
            report = score(run_dir, options, endpoint)
            wall, used = time.monotonic() - started, time.process_time() - cpu
            journal._SegmentWriter.append = writes  # type: ignore[method-assign]
            requests = report.stats.calls.requests
            rates[label].append((requests / wall, used / max(requests, 1) * 1000))
    results = [
        (label, statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
        for label, runs in rates.items()
    ]
    print(
        "journaling, one token per request, 64 in flight, no latency "
        f"(median of {rounds}, alternating):"
    )
    for label, rate, cpu_ms in results:
        print(f"  {label:20s} {rate:8.1f} requests/s   {cpu_ms:.3f} ms CPU per request")
    print(f"  ratio: {results[0][1] / results[1][1]:.3f} of the requests/s without the writes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=600)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--journal-positions", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, EmulatorServer() as server:
        scratch = Path(folder)
        inputs = scratch / "in"
        make_inputs(inputs, args.positions, tokens=30, responses=4)
        server.set_faults(FaultConfig(latency_ms=args.latency_ms, seed=args.seed))
        kills(inputs, scratch, server, args.kills, args.seed)
        server.set_faults(FaultConfig())
        journal_inputs = scratch / "journal-in"
        make_inputs(journal_inputs, args.journal_positions, tokens=30, responses=4)
        journaling(journal_inputs, scratch, server, args.rounds)


if __name__ == "__main__":
    main()
