"""Cost benchmark: requests, tokens and USD per position of the spec's method and of lookahead.

Side by side in one run, on the same inputs (Model 1 = ``toy`` sampled at temperature 1 for every
prompt of ``examples/prompts.txt``), against a near (``toy-d0.25``), a medium (``toy-d2``) and a
far (``toy-d8``, which rarely agrees) Model 2 on the local emulator, and a high-entropy pair
(``toy-d0.25@2``: Model 1 = ``toy`` sampled at temperature 2, so most of its tokens are not its
own top token, against ``toy-d0.25``):

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

Then the table "Lookahead vs the oracle", pair × decoding: the oracle (the fewest requests any
lookahead policy could send: one per response and one after each disagreement, from the
``--lookahead 1`` run: :func:`oracle_requests`), ``auto`` before (``--before``: this bench's
``--json`` from the code before) and after, ``auto``'s requests over the oracle of the very tokens
it drew (:func:`own_oracle`), the share of its output tokens wasted (asked for past a
disagreement, the probe's included), its USD against the spec's method, and the requests a
``--dry-run --calibrate 10`` predicted just before the run, beside the requests it sent.

Usage: python bench/cost_bench.py [--samples 3] [--max-tokens 256] [--price-as gemini-2.0-flash]
                                  [--cache-min-tokens 2048] [--thinking-budget 0]
                                  [--pairs toy-d0.25 toy-d2 toy-d8 toy-d0.25@2]
                                  [--lookaheads 1 2 4 8 16 auto] [--calibrate 10]
                                  [--json FILE] [--before FILE] [--render FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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
from klstream.emulator.toymodel import ToyModel
from klstream.input.explode import explode
from klstream.input.sample import SampleOptions, sample
from klstream.pipeline import score
from klstream.scoring.dryrun import DryRunOptions, dry_run
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


def model1_temperature(pair: str) -> tuple[str, float]:
    """``toy-d0.25@2`` is Model 2 ``toy-d0.25`` against Model 1 ``toy`` sampled at temperature
    2: high-entropy responses, where most tokens are not Model 1's own top token."""
    model2, _, temperature = pair.partition("@")
    return model2, float(temperature or 1.0)


def model1_tokens(run_dir: Path) -> tuple[dict[tuple[str, int, int], int], Counter[Any]]:
    """Model 1's token id at every position, and the length of every response."""
    columns = ["stem", "response_index", "position", "token_id"]
    rows = pq.read_table(RunDir(run_dir).positions, columns=columns).to_pylist()
    model1 = {(r["stem"], r["response_index"], r["position"]): r["token_id"] for r in rows}
    return model1, Counter((stem, index) for stem, index, _ in model1)


def oracle_requests(run_dir: Path, model2: str, decoding: str) -> float:
    """The fewest requests any lookahead policy could send: per response, one at position 0 and
    one after each disagreement, where Model 2's token given Model 1's prefix is not Model 1's
    (the last position's never matters). From the ``--lookahead 1`` run in ``run_dir``: under
    sampling the expected count, a disagreement having the chance 1 - Model 2's probability of
    Model 1's token (read from the run's top-k; 0 where it is not listed), so the oracle does
    not carry one run's luck of the draw; under greedy decoding, where the token a one-token
    greedy request returns (the toy Model 2's most likely token, computed here) differs."""
    model1, lengths = model1_tokens(run_dir)
    inner = {key for key in model1 if key[2] < lengths[key[:2]] - 1}
    if decoding == "sample":
        columns = ["stem", "response_index", "position", "status", "top_token_ids", "top_logprobs"]
        disagree = 0.0
        for r in score_table(run_dir, model2, columns).to_pylist():
            key = (r["stem"], r["response_index"], r["position"])
            if r["status"] != "ok" or key not in inner:
                continue
            listed = dict(zip(r["top_token_ids"], r["top_logprobs"], strict=True))
            disagree += 1.0 - math.exp(listed.get(model1[key], -math.inf))
        return len(lengths) + disagree
    prompts = {
        (r["stem"], r["response_index"]): r["prompt"]
        for r in pq.read_table(RunDir(run_dir).responses).to_pylist()
    }
    toy = ToyModel.for_name(model2)
    breaks = 0
    for (stem, index), length in lengths.items():
        ids = [model1[(stem, index, p)] for p in range(length)]
        for p in range(length - 1):
            logprobs = toy.next_token_logprobs(prompts[(stem, index)], ids[:p])
            breaks += int(logprobs.argmax()) != ids[p]
    return len(lengths) + breaks


def own_oracle(run_dir: Path, model2: str) -> int:
    """The oracle for the very tokens a run drew: one request per response and one after each
    stored result whose chosen token (Model 2's, given Model 1's prefix) is not Model 1's."""
    model1, lengths = model1_tokens(run_dir)
    columns = ["stem", "response_index", "position", "status", "chosen_token_id"]
    breaks = sum(
        int(r["chosen_token_id"] != model1[key])
        for r in score_table(run_dir, model2, columns).to_pylist()
        if r["status"] == "ok"
        and (key := (r["stem"], r["response_index"], r["position"]))[2] < lengths[key[:2]] - 1
    )
    return len(lengths) + breaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--price-as", default="gemini-2.0-flash")
    parser.add_argument("--cache-min-tokens", type=int, default=ServiceConfig.cache_min_tokens)
    parser.add_argument("--thinking-budget", type=int, default=0)
    parser.add_argument(
        "--pairs", nargs="+", default=["toy-d0.25", "toy-d2", "toy-d8", "toy-d0.25@2"]
    )
    parser.add_argument(
        "--lookaheads",
        nargs="+",
        default=[str(n) for n in LOOKAHEADS],
        help="the lookaheads to run (1 and auto at least: the baseline and the oracle table)",
    )
    parser.add_argument(
        "--calibrate", type=int, default=10, help="the dry run's --calibrate before each auto run"
    )
    parser.add_argument("--json", type=Path, help="write the oracle table's rows here")
    parser.add_argument(
        "--before",
        type=Path,
        help="a --json file written by this bench on the code before, for the auto-before column",
    )
    parser.add_argument(
        "--render",
        type=Path,
        help="print the oracle table of a --json file (with --before's beside), running nothing",
    )
    args = parser.parse_args()
    if args.render:
        rows = list(json.loads(args.render.read_text()).values())
        earlier = json.loads(args.before.read_text()) if args.before else {}
        for r in rows:
            found = earlier.get(r["key"], {})
            r.update(
                before=found.get("after"),
                before_predicted=found.get("predicted"),
                before_predicted_decoding=found.get("predicted_decoding"),
            )
        print_oracle_table(rows)
        return
    lookaheads: list[Lookahead] = [v if v == "auto" else int(v) for v in args.lookaheads]

    price = load_prices()[args.price_as]
    work = Path(tempfile.mkdtemp(prefix="klstream-cost-bench-"))
    prices_file = work / "prices.json"
    entry = {k: v for k, v in asdict(price).items() if k != "model"}
    entry["source"] = f"{args.price_as}'s list prices ({price.source}), for the emulator"
    prices_file.write_text(json.dumps({"models": {"toy": entry}}), encoding="utf-8")
    toy_price = load_prices(prices_file)["toy"]
    service = ServiceConfig(cache_min_tokens=args.cache_min_tokens)
    before = json.loads(args.before.read_text()) if args.before else {}
    oracle_rows: list[dict[str, Any]] = []
    try:
        with EmulatorServer(service=service) as server:
            endpoint = Endpoint("gemini", "bench", base_url=server.base_url)
            templates: dict[float, tuple[Path, int]] = {}
            choices: list[str] = []
            for pair in args.pairs:
                model2, temperature = model1_temperature(pair)
                if temperature not in templates:
                    sampling = SampleOptions(
                        "toy",
                        num_samples=args.samples,
                        max_tokens=args.max_tokens,
                        seed=args.seed,
                        temperature=temperature,
                    )
                    responses = work / f"responses-{temperature:g}"
                    sample(ROOT / "examples" / "prompts.txt", responses, sampling, endpoint)
                    template = work / f"template-{temperature:g}"
                    explode(responses, template)
                    count = pq.read_metadata(RunDir(template).positions).num_rows
                    templates[temperature] = (template, count)
                    top = pq.read_table(
                        RunDir(template).positions, columns=["token_id", "top_token_ids"]
                    ).to_pylist()
                    own_top = sum(r["token_id"] == r["top_token_ids"][0] for r in top) / count
                    print(
                        f"Model 1 = toy at temperature {temperature:g}, {args.samples} samples "
                        f"of up to {args.max_tokens} tokens for each prompt of "
                        f"examples/prompts.txt: {count:,} positions, {100 * own_top:.0f}% of "
                        f"them Model 1's own top token. USD at {args.price_as}'s list prices "
                        f"of {price.date}; emulator cache minimum {args.cache_min_tokens} "
                        f"tokens; thinking budget {args.thinking_budget} (output tokens "
                        "include the thoughts)."
                    )
                template, positions = templates[temperature]
                spec_dir = work / f"{pair}-spec"
                shutil.copytree(template, spec_dir)
                server.set_service(service)
                requests, usage = spec_method(
                    spec_dir, model2, server.base_url, args.thinking_budget
                )
                shutil.rmtree(spec_dir)
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
                oracles: dict[str, float] = {}
                for decoding in ("sample", "greedy"):
                    for lookahead in lookaheads:
                        if lookahead == 1 and decoding == "greedy":
                            continue
                        run_dir = work / f"{pair}-{decoding}-{lookahead}"
                        shutil.copytree(template, run_dir)
                        server.set_service(service)
                        options = ScoreOptions(
                            model2,
                            lookahead=lookahead,
                            decoding=decoding,
                            max_concurrent=SPEC_CONCURRENCY,
                            prices=prices_file,
                            thinking_budget=args.thinking_budget,
                        )
                        predicted = None
                        if lookahead == "auto" and args.calibrate:
                            predicted = dry_run(
                                run_dir,
                                options,
                                DryRunOptions(calibrate=args.calibrate),
                                endpoint,
                            )
                        report = score(run_dir, options, endpoint)
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
                        if lookahead == 1:
                            oracles["sample"] = oracle_requests(run_dir, model2, "sample")
                            oracles["greedy"] = oracle_requests(run_dir, model2, "greedy")
                        if lookahead == "auto":
                            choices.append(
                                f"{pair}, {decoding} (ran {report.decoding}): "
                                f"{chosen_lookahead(run_dir, model2)}"
                            )
                            usage = report.stats.usage
                            output = usage.candidates_tokens + usage.thoughts_tokens
                            key = f"{pair} {decoding}"
                            oracle_rows.append(
                                {
                                    "key": key,
                                    "pair": pair,
                                    "decoding": decoding,
                                    "ran": report.decoding,
                                    "positions": positions,
                                    "oracle": oracles.get(report.decoding),
                                    "before": before.get(key, {}).get("after"),
                                    "before_predicted": before.get(key, {}).get("predicted"),
                                    "before_predicted_decoding": before.get(key, {}).get(
                                        "predicted_decoding"
                                    ),
                                    "after": report.stats.calls.requests,
                                    "own_oracle": own_oracle(run_dir, model2),
                                    "wasted": (output - positions) / output,
                                    "usd": r["USD/1k pos"] * positions / 1000,
                                    "spec_usd": spec_usd,
                                    "predicted": predicted.lookahead.requests
                                    if predicted
                                    else None,
                                    "predicted_decoding": predicted.decoding if predicted else None,
                                    "same": r["same"],
                                }
                            )
                        shutil.rmtree(run_dir)
                print_table(pair, rows, positions)
            print("\nWhat `--lookahead auto` chose:")
            for choice in choices:
                print(f"- {choice}")
            print_oracle_table(oracle_rows)
            if args.json:
                args.json.write_text(
                    json.dumps({r["key"]: r for r in oracle_rows}, indent=1), encoding="utf-8"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_oracle_table(rows: list[dict[str, Any]]) -> None:
    """Pair × decoding: the oracle, auto before and after (requests per position), auto's
    requests over the oracle of its own draws, its share of output tokens wasted, its USD
    against the spec's method, and the dry run's predicted requests beside the requests sent
    (now and, from ``--before``, with the code before)."""
    print("\n### Lookahead vs the oracle\n")
    print(
        "| pair | decoding | oracle req/pos | auto before | auto after | after / oracle "
        "| after / oracle of its draws | wasted output | USD vs spec "
        "| dry run: requests predicted / sent (decoding) | dry run before: predicted / sent "
        "| same top-k |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        n = r["positions"]
        oracle = r["oracle"]
        before = "–" if r["before"] is None else f"{r['before'] / n:.3f}"
        ratio = "–" if not oracle else f"{r['after'] / oracle:.3f}"
        predicted = (
            "–"
            if r["predicted"] is None
            else f"{r['predicted']:,} / {r['after']:,} ({r['predicted_decoding']})"
        )
        earlier = (
            "–"
            if r.get("before_predicted") is None
            else f"{r['before_predicted']:,} / {r['before']:,} ({r['before_predicted_decoding']})"
        )
        print(
            f"| {r['pair']} | {r['decoding']} (ran {r['ran']}) | "
            f"{'–' if not oracle else f'{oracle / n:.3f}'} | {before} | {r['after'] / n:.3f} | "
            f"{ratio} | {r['after'] / r['own_oracle']:.3f} | {100 * r['wasted']:.0f}% | "
            f"{100 * r['usd'] / r['spec_usd']:.0f}% | {predicted} | {earlier} | {r['same']} |"
        )


if __name__ == "__main__":
    main()
