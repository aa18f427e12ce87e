"""Cost benchmark: requests, tokens and USD per position of the spec's method and of lookahead.

Side by side in one run, on the same inputs (Model 1 = ``toy`` sampled at temperature 1 for every
prompt of ``examples/prompts.txt``), against a near (``toy-d0.25``), a medium (``toy-d2``) and a
far (``toy-d8``, which rarely agrees) Model 2 on the local emulator:

* the spec's method, written out here with the bare google-genai SDK as the spec shows it: one
  request per position (``max_output_tokens=1``), the positions of one response at a time in file
  order, 20 in flight;
* ``klstream score --lookahead 1, 2, 4, 8, 16, auto``, each with sampling (the run's temperature,
  1) and with greedy decoding (after the consistency probe, whose requests are counted).

Per position it prints requests, input tokens (uncached and cached) and output tokens, and USD
per 1,000 positions at ``--price-as``'s list prices (the shipped table's entry is applied to the
toy models), relative to the spec's method, plus what ``auto`` chose. Every klstream run is
checked against ``--lookahead 1``: the same top-k at every position (the emulator is
deterministic given the prefix). The emulator's implicit cache keeps Gemini's minimum
(``--cache-min-tokens``, 2048): the toy prompts and responses are shorter, so nothing is cached
unless it is lowered. ``--thinking-budget N`` has every request (the spec's too) think N tokens,
billed as output: give a pair that must think, such as ``toy-d2-mustthink128``.

Usage: python bench/cost_bench.py [--samples 3] [--max-tokens 256] [--price-as gemini-2.0-flash]
                                  [--cache-min-tokens 2048] [--thinking-budget 0]
                                  [--pairs toy-d0.25 toy-d2 toy-d8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google import genai
from google.genai import types

from klstream.backends.base import Endpoint
from klstream.backends.openai import api_base_url
from klstream.backends.prices import Price, Usage, load_prices, usage_of
from klstream.emulator import EmulatorServer
from klstream.emulator.service import ServiceConfig
from klstream.input.explode import explode
from klstream.input.sample import SampleOptions, sample
from klstream.pipeline import score
from klstream.scoring.options import Lookahead, ScoreOptions
from klstream.storage.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
LOOKAHEADS: list[Lookahead] = [1, 2, 4, 8, 16, "auto"]
SPEC_CONCURRENCY = 20


def spec_method(
    run_dir: Path, model2: str, base_url: str, thinking_budget: int
) -> tuple[int, Usage]:
    """The spec's script: per response, every position at once under a semaphore of 20 (with
    a thinking budget, room for the thoughts in the output tokens, as klstream leaves)."""
    positions = pq.read_table(RunDir(run_dir).positions).to_pylist()
    responses = {
        (r["stem"], r["response_index"]): r
        for r in pq.read_table(RunDir(run_dir).responses).to_pylist()
    }
    config = types.GenerateContentConfig(
        max_output_tokens=1 + thinking_budget,
        response_logprobs=True,
        logprobs=20,
        thinking_config=types.ThinkingConfig(thinking_budget=thinking_budget),
    )
    usage = Usage()

    async def main() -> int:
        client = genai.Client(api_key="bench", http_options=types.HttpOptions(base_url=base_url))
        semaphore = asyncio.Semaphore(SPEC_CONCURRENCY)
        requests = 0

        async def position_request(prompt: str, prefill: str) -> None:
            nonlocal requests
            contents: list[Any] = [{"role": "user", "parts": [{"text": prompt}]}]
            if prefill:
                contents.append({"role": "model", "parts": [{"text": prefill}]})
            async with semaphore:
                answer = await client.aio.models.generate_content(
                    model=model2, contents=contents, config=config
                )
            requests += 1
            metadata = answer.usage_metadata
            usage.add(usage_of(metadata.model_dump(by_alias=True) if metadata else None))

        for key, response in responses.items():
            tokens = [p["token"] for p in positions if (p["stem"], p["response_index"]) == key]
            await asyncio.gather(
                *(
                    position_request(response["prompt"], "".join(tokens[:i]))
                    for i in range(len(tokens))
                )
            )
        await client.aio.aclose()
        return requests

    return asyncio.run(main()), usage


def score_table(run_dir: Path, model2: str, columns: list[str]) -> pa.Table:
    parts = RunDir(run_dir).score_parts(model2)
    return pa.concat_tables(pq.read_table(part, columns=columns) for part in parts)


def top_lists(run_dir: Path, model2: str) -> dict[tuple[str, int, int], Any]:
    columns = ["stem", "response_index", "position", "status", "top_token_ids", "top_logprobs"]
    rows = score_table(run_dir, model2, columns).to_pylist()
    return {
        (r["stem"], r["response_index"], r["position"]): (r["top_token_ids"], r["top_logprobs"])
        for r in rows
        if r["status"] == "ok"
    }


def chosen_lookahead(run_dir: Path, model2: str) -> str:
    """What auto asked for: the mean N and the most common values, over its requests."""
    rows = score_table(run_dir, model2, ["step", "lookahead"]).to_pylist()
    asked = [r["lookahead"] for r in rows if r["step"] == 0]
    common = ", ".join(
        f"N={n}: {100 * c / len(asked):.0f}%" for n, c in Counter(asked).most_common(4)
    )
    return f"mean N {statistics.fmean(asked):.1f} ({common})"


def row(
    label: str, requests: int, usage: Usage, positions: int, price: Price, spec_usd: float | None
) -> dict[str, Any]:
    usd = price.usd(usage)
    return {
        "method": label,
        "requests/pos": requests / positions,
        "input/pos": (usage.prompt_tokens - usage.cached_tokens) / positions,
        "cached/pos": usage.cached_tokens / positions,
        "output/pos": (usage.candidates_tokens + usage.thoughts_tokens) / positions,
        "USD/1k pos": 1000 * usd / positions,
        "vs spec": usd / spec_usd if spec_usd else 1.0,
    }


def prompt_logprobs_row(
    server: EmulatorServer,
    template: Path,
    work: Path,
    model2: str,
    positions: int,
    baseline: dict[Any, Any] | None,
) -> dict[str, Any]:
    """The same positions through the emulator's vLLM-style routes, one completion with prompt
    logprobs per response (its /tokenize calls counted apart): no Gemini price applies."""
    run_dir = work / f"{model2}-prompt-logprobs"
    shutil.copytree(template, run_dir)
    server.reset_log()
    endpoint = Endpoint("openai", None, base_url=api_base_url(server.base_url))
    options = ScoreOptions(model2, method="prompt-logprobs", max_concurrent=SPEC_CONCURRENCY)
    report = score(run_dir, options, endpoint)
    assert report.remaining == 0, report
    paths = Counter(r.path for r in server.requests if r.status == 200)
    responses = pq.read_metadata(RunDir(run_dir).responses).num_rows
    completions = paths["/v1/completions"]
    label = (
        f"`--backend openai --method prompt-logprobs`: {completions / responses:.2f} requests "
        f"per response (+{paths['/tokenize'] / responses:.2f} /tokenize)"
    )
    shutil.rmtree(run_dir)
    return {
        "method": label,
        "requests/pos": completions / positions,
        "same": "n/a (the toy chat template conditions otherwise)",
    }


def print_table(model2: str, rows: list[dict[str, Any]], positions: int) -> None:
    print(f"\n### Model 2 = `{model2}` ({positions:,} positions)\n")
    print(
        "| method | requests/pos | input/pos | cached/pos | output/pos | USD per 1,000 pos "
        "| vs spec | same top-k |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|:---:|")

    def figure(r: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
        return "–" if key not in r else f"{scale * r[key]:{spec}}"

    for r in rows:
        print(
            f"| {r['method']} | {r['requests/pos']:.3f} | {figure(r, 'input/pos', '.1f')} | "
            f"{figure(r, 'cached/pos', '.1f')} | {figure(r, 'output/pos', '.2f')} | "
            f"{figure(r, 'USD/1k pos', '.5f')} | {figure(r, 'vs spec', '.0f', 100)}% | "
            f"{r.get('same', '')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--price-as", default="gemini-2.0-flash")
    parser.add_argument("--cache-min-tokens", type=int, default=ServiceConfig.cache_min_tokens)
    parser.add_argument("--thinking-budget", type=int, default=0)
    parser.add_argument("--pairs", nargs="+", default=["toy-d0.25", "toy-d2", "toy-d8"])
    args = parser.parse_args()

    price = load_prices()[args.price_as]
    work = Path(tempfile.mkdtemp(prefix="klstream-cost-bench-"))
    prices_file = work / "prices.json"
    entry = {k: v for k, v in asdict(price).items() if k != "model"}
    entry["source"] = f"{args.price_as}'s list prices ({price.source}), for the emulator"
    prices_file.write_text(json.dumps({"models": {"toy": entry}}), encoding="utf-8")
    toy_price = load_prices(prices_file)["toy"]
    service = ServiceConfig(cache_min_tokens=args.cache_min_tokens)
    try:
        with EmulatorServer(service=service) as server:
            endpoint = Endpoint("gemini", "bench", base_url=server.base_url)
            options = SampleOptions(
                "toy", num_samples=args.samples, max_tokens=args.max_tokens, seed=args.seed
            )
            sample(ROOT / "examples" / "prompts.txt", work / "responses", options, endpoint)
            template = work / "template"
            explode(work / "responses", template)
            positions = pq.read_metadata(RunDir(template).positions).num_rows
            print(
                f"Model 1 = toy, {args.samples} samples of up to {args.max_tokens} tokens for each "
                f"prompt of examples/prompts.txt: {positions:,} positions. USD at "
                f"{args.price_as}'s list prices of {price.date}; emulator cache minimum "
                f"{args.cache_min_tokens} tokens; thinking budget {args.thinking_budget} (output "
                "tokens include the thoughts)."
            )
            choices: list[str] = []
            for model2 in args.pairs:
                spec_dir = work / f"{model2}-spec"
                shutil.copytree(template, spec_dir)
                server.set_service(service)
                requests, usage = spec_method(
                    spec_dir, model2, server.base_url, args.thinking_budget
                )
                spec = row(
                    "spec's method (1 request/position, 20 concurrent, file order)",
                    requests,
                    usage,
                    positions,
                    toy_price,
                    None,
                )
                spec_usd = spec["USD/1k pos"] * positions / 1000
                rows = [spec]
                baseline: dict[Any, Any] | None = None
                for decoding in ("sample", "greedy"):
                    for lookahead in LOOKAHEADS:
                        if lookahead == 1 and decoding == "greedy":
                            continue
                        run_dir = work / f"{model2}-{decoding}-{lookahead}"
                        shutil.copytree(template, run_dir)
                        server.set_service(service)
                        report = score(
                            run_dir,
                            ScoreOptions(
                                model2,
                                lookahead=lookahead,
                                decoding=decoding,
                                max_concurrent=SPEC_CONCURRENCY,
                                prices=prices_file,
                                thinking_budget=args.thinking_budget,
                            ),
                            endpoint,
                        )
                        label = f"`--lookahead {lookahead}`" + (
                            "" if lookahead == 1 else f", {report.decoding}"
                        )
                        r = row(
                            label,
                            report.stats.calls.requests,
                            report.stats.usage,
                            positions,
                            toy_price,
                            spec_usd,
                        )
                        lists = top_lists(run_dir, model2)
                        if baseline is None:
                            baseline = lists
                        r["same"] = "yes" if lists == baseline else "NO"
                        rows.append(r)
                        if lookahead == "auto":
                            choices.append(
                                f"{model2}, {decoding} (ran {report.decoding}): "
                                f"{chosen_lookahead(run_dir, model2)}"
                            )
                        shutil.rmtree(run_dir)
                rows.append(
                    prompt_logprobs_row(server, template, work, model2, positions, baseline)
                )
                print_table(model2, rows, positions)
            print("\nWhat `--lookahead auto` chose:")
            for choice in choices:
                print(f"- {choice}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
