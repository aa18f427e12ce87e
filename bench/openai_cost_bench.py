"""What scoring costs on an OpenAI-compatible server: prefill against prompt logprobs.

Scores the same Model 1 responses (sampled from the toy model) through the emulator's
vLLM-style routes with ``--method prefill`` (one chat completion per position, the prefix as an
assistant message to continue) and ``--method prompt-logprobs`` (one completion per response),
and prints, per position: generation requests, prompt tokens the server processes, tokens it
generates, and the light ``/tokenize`` requests prompt logprobs add. Token counts are the
emulator's ``usage`` (the toy chat template included). Responses of two lengths show how
prefill's prompt tokens grow with the response while prompt logprobs' stay flat.

    uv run python bench/openai_cost_bench.py [--positions 1024] [--lengths 32,128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from klstream.backends.base import Endpoint
from klstream.backends.openai import api_base_url
from klstream.emulator import EmulatorServer, RequestRecord, ToyModel
from klstream.emulator.openai_routes import chat_prompt_tokens
from klstream.emulator.toymodel import EOS_ID, Step
from klstream.input.explode import explode
from klstream.pipeline import score
from klstream.scoring.options import ScoreOptions

MODEL1 = "toy"
MODEL2 = "toy-d0.5"
TOP_K = 20
METHODS: tuple[str, ...] = ("prefill", "prompt-logprobs")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def sample_steps(model: ToyModel, prompt: str, length: int, seed: int) -> list[Step]:
    """``length`` tokens from the toy model, sampling on past its ends of sequence."""
    steps: list[Step] = []
    while len(steps) < length:
        context = [s.chosen.token_id for s in steps]
        generation = model.sample(prompt, length - len(steps), 1.0, seed, TOP_K, context)
        steps += [s for s in generation.steps if s.chosen.token_id != EOS_ID]
        seed += 1
    return steps


def make_inputs(directory: Path, positions: int, length: int) -> int:
    """Model 1 responses of ``length`` tokens from the toy model, ``positions`` in all."""
    model = ToyModel.for_name(MODEL1)
    directory.mkdir(parents=True)
    made, stem = 0, 0
    while made < positions:
        prompt = f"Benchmark prompt {stem}: tell me a long story about item {stem}."
        steps = sample_steps(model, prompt, min(length, positions - made), seed=stem * 1000)
        content = [
            {
                "token": s.chosen.token,
                "token_id": s.chosen.token_id,
                "logprob": s.chosen.logprob,
                "top_logprobs": [
                    {"token": c.token, "token_id": c.token_id, "logprob": c.logprob} for c in s.top
                ],
            }
            for s in steps
        ]
        response = {
            "text": "".join(s.chosen.token for s in steps),
            "logprobs": {"content": content},
        }
        document = {"prompt": prompt, "model": MODEL1, "responses": [response]}
        (directory / f"prompt_{stem:05d}.json").write_text(json.dumps(document), encoding="utf-8")
        made += len(steps)
        stem += 1
    return made


def prompt_tokens(record: RequestRecord) -> int:
    """What the server read for a generation request: the rendered template and the text after
    it (the prefill, or the whole response for prompt logprobs)."""
    return chat_prompt_tokens(record.prompt, record.prefill or "")


def measure(server: EmulatorServer, run_dir: Path, method: str, positions: int) -> dict[str, float]:
    server.reset_log()
    endpoint = Endpoint("openai", None, base_url=api_base_url(server.base_url), timeout_s=60.0)
    started = time.perf_counter()
    report = score(
        run_dir, ScoreOptions(MODEL2, method=method, max_concurrent=16, overwrite=True), endpoint
    )
    wall = time.perf_counter() - started
    assert report.remaining == 0, report
    records = [r for r in server.requests if r.status == 200]
    paths = Counter(r.path for r in records)
    generations = [r for r in records if r.path in GENERATION_PATHS]
    return {
        "requests": sum(paths[p] for p in GENERATION_PATHS) / positions,
        "tokenize": paths["/tokenize"] / positions,
        "prompt_tokens": sum(prompt_tokens(r) for r in generations) / positions,
        "generated": len(generations) / positions,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--lengths", default="32,128", help="Response lengths in tokens.")
    args = parser.parse_args()
    print(
        f"{'tokens/response':>15} {'method':>16} {'requests/pos':>12} {'tokenize/pos':>12} "
        f"{'prompt tok/pos':>14} {'generated/pos':>13} {'wall s':>7}"
    )
    with EmulatorServer() as server, tempfile.TemporaryDirectory() as scratch:
        for length in (int(n) for n in args.lengths.split(",")):
            inputs, run_dir = Path(scratch) / f"in-{length}", Path(scratch) / f"run-{length}"
            positions = make_inputs(inputs, args.positions, length)
            explode(inputs, run_dir)
            for method in METHODS:
                figures = measure(server, run_dir, method, positions)
                print(
                    f"{length:>15} {method:>16} {figures['requests']:>12.4f} "
                    f"{figures['tokenize']:>12.4f} {figures['prompt_tokens']:>14.1f} "
                    f"{figures['generated']:>13.4f} {figures['wall_s']:>7.1f}"
                )


if __name__ == "__main__":
    main()
