"""Cost benchmark: USD per 1,000 scored positions, online vs batch (``score --batch``).

Scoring asks one request per position: the prompt plus Model 1's tokens so far as input, one
output token. A position at index i of a response therefore costs ``prompt + i`` input tokens and
one output token, and a response of n tokens costs ``n * prompt + n (n - 1) / 2`` input tokens in
all: long responses dominate. Batch jobs cost half the online price on both services.

The prices are list prices in USD per million tokens (text, paid tier, prompts under 200k
tokens) as published in 2025; check the current price pages before relying on them. With
``--run-dir`` the table adds a row for a real run directory: its responses' lengths, and its
prompts at about four characters per token.

Usage: python bench/batch_cost_bench.py [--prompt-tokens 50] [--run-dir RUN_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

PRICES_PER_MILLION = {
    # model: (input, output), USD per 1M tokens, online
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-pro": (1.25, 10.00),
}
BATCH_DISCOUNT = 0.5
OUTPUT_TOKENS_PER_POSITION = 1
CHARS_PER_TOKEN = 4.0


def input_tokens_per_position(prompt_tokens: float, response_tokens: int) -> float:
    """Mean input tokens of a response's positions: the prompt and, on average, half of it."""
    return prompt_tokens + (response_tokens - 1) / 2


def usd_per_thousand(input_tokens: float, model: str) -> tuple[float, float]:
    """USD per 1,000 positions online and in batch."""
    price_in, price_out = PRICES_PER_MILLION[model]
    online = 1000 * (input_tokens * price_in + OUTPUT_TOKENS_PER_POSITION * price_out) / 1e6
    return online, online * BATCH_DISCOUNT


def run_dir_shape(run_dir: Path) -> tuple[float, float]:
    """Mean input tokens per position of a real run, and its mean response length."""
    positions = pq.read_table(run_dir / "positions.parquet", columns=["position"])
    responses = pq.read_table(run_dir / "responses.parquet", columns=["prompt", "num_tokens"])
    prompt_chars = pc.utf8_length(responses["prompt"]).to_numpy()
    lengths = responses["num_tokens"].to_numpy()
    prompt_tokens = float((prompt_chars / CHARS_PER_TOKEN * lengths).sum() / lengths.sum())
    mean_prefill = float(pc.mean(positions["position"]).as_py() or 0.0)
    return prompt_tokens + mean_prefill, float(lengths.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=float, default=50.0)
    parser.add_argument("--run-dir", type=Path)
    args = parser.parse_args()
    shapes = [
        (f"{n}-token responses, {args.prompt_tokens:g}-token prompt", n, None)
        for n in (100, 300, 1000)
    ]
    rows: list[tuple[str, float]] = [
        (label, input_tokens_per_position(args.prompt_tokens, n)) for label, n, _ in shapes
    ]
    if args.run_dir is not None:
        tokens, mean_length = run_dir_shape(args.run_dir)
        rows.append((f"{args.run_dir} (mean response {mean_length:.0f} tokens)", tokens))
    print("USD per 1,000 positions (one request each); batch = 50% of online")
    header = f"{'workload':<48} {'input tok/pos':>13}  {'model':<22} {'online':>8} {'batch':>8}"
    print(header)
    print("-" * len(header))
    for label, tokens in rows:
        for model in PRICES_PER_MILLION:
            online, batch = usd_per_thousand(tokens, model)
            print(f"{label:<48} {tokens:>13.1f}  {model:<22} {online:>8.4f} {batch:>8.4f}")
    print(
        "\nA whole response of n tokens costs n positions: e.g. 10,000 responses of 300 tokens "
        "are 3,000,000 positions."
    )


if __name__ == "__main__":
    main()
