"""The spec's step 1: sample Model 1's responses with their logprobs, in the spec's input format.

Requests go through the same client, retry policy and adaptive concurrency as scoring
(:mod:`klstream.backends.transport`). One file per prompt, ``<model>_prompt_<i>.json``, written
atomically once all its samples are in; a prompt whose file exists is skipped, so re-running after
a failure or an interruption asks only for what is missing.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klstream.backends import open_prefill
from klstream.backends.base import (
    Answer,
    ClientSettings,
    Endpoint,
    PrefillRequest,
    ThinkingBudget,
)
from klstream.backends.thinking import sent_budget
from klstream.backends.transport import Caller, CallStats, Outcome, RetryPolicy
from klstream.errors import InputError, KlstreamError
from klstream.loop import run_blocking
from klstream.preflight import Capabilities, answer_capabilities
from klstream.storage.atomic import write_text_atomic
from klstream.storage.rundir import model2_dirname


@dataclass(frozen=True)
class SampleOptions:
    model: str
    num_samples: int = 5
    max_tokens: int = 256
    temperature: float = 1.0
    top_logprobs: int = 20
    max_concurrent: int = 16
    seed: int | None = None
    thinking_budget: ThinkingBudget = "auto"
    """Tokens, None (no thinking config) or ``"auto"`` (the least the model accepts)."""
    policy: RetryPolicy = RetryPolicy()
    overwrite: bool = False


@dataclass
class SampleReport:
    written: list[Path] = field(default_factory=list)
    skipped_existing: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    calls: CallStats = field(default_factory=CallStats)
    capabilities: Capabilities | None = None
    """What the first answer showed (:func:`~klstream.preflight.answer_capabilities`, the
    check a scoring run makes of its first answer); not written anywhere."""


def read_prompts(path: Path) -> list[str]:
    """Prompts one per line, or JSON Lines of strings or objects with a ``prompt`` key.

    A file whose first non-blank line starts with ``{`` or ``"`` is read as JSON Lines (so a
    prompt can hold newlines); blank lines are skipped either way.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise KlstreamError(f"cannot read prompts from {path}: {error}") from error
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise KlstreamError(f"{path} holds no prompts")
    if not numbered[0][1].lstrip().startswith(("{", '"')):
        return [line for _, line in numbered]
    prompts = []
    for number, line in numbered:
        where = f"line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(str(path), where, f"invalid JSON: {error.msg}") from error
        if isinstance(value, dict):
            value = value.get("prompt")
            where += ".prompt"
        if not isinstance(value, str) or not value:
            raise InputError(str(path), where, "expected a non-empty string prompt")
        prompts.append(value)
    return prompts


def response_entry(model: str, answer: Answer) -> dict[str, Any]:
    """One response in the spec's input format."""
    content = [
        {
            "token": step.chosen.token,
            "logprob": step.chosen.logprob,
            "token_id": step.chosen.token_id,
            "top_logprobs": [
                {"token": c.token, "logprob": c.logprob, "token_id": c.token_id} for c in step.top
            ],
        }
        for step in answer.steps
    ]
    return {"model": model, "text": answer.text, "logprobs": {"content": content}}


def output_path(output_dir: Path, model: str, index: int, count: int) -> Path:
    width = len(str(max(count - 1, 0)))
    return output_dir / f"{model2_dirname(model)}_prompt_{index:0{width}d}.json"


async def sample_async(
    prompts: list[str], output_dir: Path, options: SampleOptions, endpoint: Endpoint
) -> SampleReport:
    """Sample ``options.num_samples`` responses per prompt into one spec-format file each;
    prompts whose file exists are skipped unless ``options.overwrite``."""
    report = SampleReport()
    todo = []
    for index in range(len(prompts)):
        path = output_path(output_dir, options.model, index, len(prompts))
        if path.exists() and not options.overwrite:
            report.skipped_existing += 1
        else:
            todo.append((index, path))
    if not todo:
        return report
    output_dir.mkdir(parents=True, exist_ok=True)
    caller = Caller(endpoint, options.policy, options.max_concurrent, report.calls)
    settings = ClientSettings.of(options.model, options.max_concurrent, options.thinking_budget)
    async with open_prefill(endpoint, settings) as model:

        async def one(prompt: str, sample: int) -> Outcome:
            seed = None if options.seed is None else options.seed + sample
            request = PrefillRequest(
                prompt, "", options.top_logprobs, options.max_tokens, options.temperature, seed
            )
            outcome = await caller.generate(model, request)
            if outcome.value is not None and report.capabilities is None:
                budget = sent_budget(model, settings)
                report.capabilities = answer_capabilities(
                    outcome.value, options.top_logprobs, options.model, budget
                )
            return outcome

        async def prompt_file(index: int, path: Path) -> None:
            prompt = prompts[index]
            outcomes = await asyncio.gather(*(one(prompt, j) for j in range(options.num_samples)))
            errors = [o.error for o in outcomes if o.value is None]
            if errors:
                report.failed[index] = str(errors[0])
                return
            document = {
                "prompt": prompt,
                "model": options.model,
                "responses": [
                    response_entry(options.model, o.value) for o in outcomes if o.value is not None
                ],
            }
            await asyncio.to_thread(
                write_text_atomic, path, json.dumps(document, ensure_ascii=False, indent=1)
            )
            report.written.append(path)

        await asyncio.gather(*(prompt_file(index, path) for index, path in todo))
    return report


def sample(
    prompts_path: Path, output_dir: Path, options: SampleOptions, endpoint: Endpoint
) -> SampleReport:
    """:func:`sample_async` over the prompts in ``prompts_path``, blocking."""
    prompts = read_prompts(prompts_path)
    return run_blocking(sample_async(prompts, output_dir, options, endpoint))
