"""Deterministic SCORES answers for the journal tests, importable by their child processes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

TOP_K = 20
START = datetime(2025, 1, 1, tzinfo=UTC)


def answer(tag: str, index: int, steps: int) -> list[dict[str, Any]]:
    """The rows of one answer of ``steps`` steps, a function of its arguments alone; its
    ``request_id`` is ``tag:index``."""
    rng = random.Random(f"{tag}:{index}")
    return [
        {
            "stem": f"story-{index % 7}",
            "response_index": index % 3,
            "position": index + step,
            "model2": "models/gemini-2.0-flash",
            "status": "ok",
            "top_tokens": [f" tok{rng.randrange(50_000)}é" for _ in range(TOP_K)],
            "top_token_ids": [rng.randrange(250_000) for _ in range(TOP_K)],
            "top_logprobs": [-rng.random() * 20 for _ in range(TOP_K)],
            "chosen_token": " the",
            "chosen_token_id": 279,
            "chosen_logprob": -rng.random(),
            "finish_reason": "MAX_TOKENS",
            "attempts": 1,
            "latency_ms": rng.random() * 1000,
            "error": None,
            "scored_at": START + timedelta(microseconds=rng.randrange(10**12)),
            "source": "online",
            "request_id": f"{tag}:{index}",
            "step": step,
            "lookahead": steps,
            "decoding": "sample",
            "prompt_token_count": 1000 + index if step == 0 else None,
            "cached_content_token_count": None,
            "candidates_token_count": steps if step == 0 else None,
            "thoughts_token_count": 0 if step == 0 else None,
        }
        for step in range(steps)
    ]
