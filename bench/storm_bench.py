"""Storm benchmark: a clean run against runs where half of all requests are turned away.

The same run directory (``--positions`` positions) is scored three times with klstream's default
retry policy (or ``--max-retries``, ``--backoff-max``) and ``--max-concurrent`` against the
emulator with a fixed latency: without faults, with a random 429 on ``--rate`` of the requests
(RetryInfo ``retryDelay`` of ``--retry-delay`` seconds), and with a random 503 on the same
fraction (no delay given). For each it prints the wall time, the time relative to the clean run,
requests per position, positions left unscored, and how often the concurrency was lowered. The
goal: at most 2.2 requests per position, and a storm finished in at most 5x the clean run's time.

Usage: python bench/storm_bench.py [--positions 1152] [--latency-ms 200] [--max-concurrent 16]
                                   [--rate 0.5] [--retry-delay 1.5] [--seed 1]
                                   [--max-retries N] [--backoff-max SECONDS]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from score_bench import make_inputs

from klstream.backends.base import Endpoint
from klstream.backends.transport import RetryPolicy
from klstream.emulator import EmulatorServer, FaultConfig
from klstream.input.explode import explode
from klstream.pipeline import score
from klstream.scoring.options import ScoreOptions

MODEL2 = "toy-d0.5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1152)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-concurrent", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--retry-delay", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-retries", type=int, default=RetryPolicy.max_retries)
    parser.add_argument("--backoff-max", type=float, default=RetryPolicy.backoff_max_s)
    args = parser.parse_args()
    policy = RetryPolicy(max_retries=args.max_retries, backoff_max_s=args.backoff_max)
    latency = {"latency_ms": args.latency_ms, "seed": args.seed}
    cases = {
        "clean": FaultConfig(**latency),
        f"{args.rate:.0%} 429": FaultConfig(
            rate_429=args.rate, retry_delay_s=args.retry_delay, **latency
        ),
        f"{args.rate:.0%} 503": FaultConfig(rate_503=args.rate, **latency),
    }
    with tempfile.TemporaryDirectory() as scratch:
        inputs, run_dir = Path(scratch) / "in", Path(scratch) / "run"
        make_inputs(inputs, args.positions, tokens=24, responses=4)
        explode(inputs, run_dir)
        print(
            f"{args.positions} positions, latency {args.latency_ms:g} ms, "
            f"--max-concurrent {args.max_concurrent}, --max-retries {args.max_retries}, "
            f"back-off at most {args.backoff_max:g} s"
        )
        print(
            f"{'case':<9} {'seconds':>8} {'x clean':>8} {'req/pos':>8} {'unscored':>9} {'cuts':>5}"
        )
        clean_seconds = None
        for name, faults in cases.items():
            with EmulatorServer(faults) as server:
                endpoint = Endpoint("gemini", "bench-no-key", base_url=server.base_url)
                options = ScoreOptions(
                    MODEL2, max_concurrent=args.max_concurrent, policy=policy, overwrite=True
                )
                started = time.monotonic()
                report = score(run_dir, options, endpoint)
                seconds = time.monotonic() - started
            clean_seconds = clean_seconds or seconds
            calls = report.stats.calls
            print(
                f"{name:<9} {seconds:>8.1f} {seconds / clean_seconds:>8.2f} "
                f"{calls.requests / report.stats.total:>8.2f} {report.remaining:>9} "
                f"{calls.concurrency_cuts:>5}"
            )


if __name__ == "__main__":
    main()
