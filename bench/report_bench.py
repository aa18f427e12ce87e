"""Report benchmark: the HTML report of a large run, its size and its time to interactive.

Builds a synthetic run directory (default 10,000 responses × 500 tokens, top-20 lists on both
sides) by writing its Parquet tables directly with the schemas of ``klstream/storage/schemas.py``
— no API, no KL pass: the estimators are drawn at random, per response around its own level — then
times ``klstream.output.report.write_report`` and opens the page in headless Chromium (Debian's
``chromium`` and ``chromium-driver``, through selenium), printing:

  * the time to build the report and the size of the file;
  * the time to interactive: from navigation start to the ``data-ready`` mark the page sets once
    its first render is done (the overview, the response table and the first heat map drawn);
  * the time to open another response's heat map and to change the threshold.

Usage: python bench/report_bench.py [--responses 10000] [--tokens 500] [--keep DIR]
       [--screenshot PATH]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from klstream.output.report import write_report
from klstream.storage import schemas
from klstream.storage.rundir import RunDir

MODEL1 = "bench-model-1"
MODEL2 = "bench-model-2"
TOP_K = 20
VOCABULARY = 32_000
RESPONSES_PER_PROMPT = 5
CHUNK_RESPONSES = 500
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def vocabulary(rng: np.random.Generator) -> np.ndarray:
    """Word-like token strings, most with a leading space, as in real tokenizers."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(1, 9, size=VOCABULARY)
    words = ["".join(rng.choice(letters, size=n)) for n in lengths]
    spaced = rng.random(VOCABULARY) < 0.8
    tokens = np.array([(" " if s else "") + w for s, w in zip(spaced, words, strict=True)])
    tokens[:4] = [".", ",", "\n", " the"]
    return tokens


def zipf_ids(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.minimum(rng.zipf(1.2, size=shape) - 1, VOCABULARY - 1)


def descending_logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    decay = -np.cumsum(rng.exponential(rng.uniform(0.2, 2.0, size=(n, 1)), size=(n, TOP_K)), 1)
    mass = np.exp(decay)
    coverage = rng.uniform(0.6, 0.999, size=(n, 1))
    logprobs: np.ndarray = np.log(mass / mass.sum(axis=1, keepdims=True) * coverage)
    return logprobs


def list_array(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), value_type))


def token_lists(vocab: pa.Array, ids: np.ndarray) -> pa.ListArray:
    n, k = ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, vocab.take(pa.array(ids.ravel())))


def write_run(run_dir: Path, responses: int, tokens: int, seed: int = 0) -> None:
    """positions, responses, scores and kl tables of a synthetic run, chunk by chunk."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    vocab_arrow = pa.array(vocab, pa.string())
    run = RunDir(run_dir)
    run.scores_dir(MODEL2).mkdir(parents=True)
    run.kl_path(MODEL2).parent.mkdir(parents=True)
    scored_at = pa.scalar(datetime.datetime.now(datetime.UTC), pa.timestamp("us", tz="UTC"))
    with (
        pq.ParquetWriter(run.positions, schemas.POSITIONS, compression="zstd") as positions,
        pq.ParquetWriter(run.responses, schemas.RESPONSES, compression="zstd") as response_rows,
        pq.ParquetWriter(run.kl_path(MODEL2), schemas.KL, compression="zstd") as kl,
    ):
        for first in range(0, responses, CHUNK_RESPONSES):
            count = min(CHUNK_RESPONSES, responses - first)
            n = count * tokens
            number = np.repeat(np.arange(first, first + count), tokens)
            prompt_number = (number // RESPONSES_PER_PROMPT).astype(str)
            stems = np.char.add("prompt-", np.char.zfill(prompt_number, 5))
            index = (number % RESPONSES_PER_PROMPT).astype(np.int32)
            position = np.tile(np.arange(tokens, dtype=np.int32), count)
            p_ids = zipf_ids(rng, (n, TOP_K))
            q_ids = np.where(rng.random((n, TOP_K)) < 0.8, p_ids, zipf_ids(rng, (n, TOP_K)))
            p_lp, q_lp = descending_logprobs(rng, n), descending_logprobs(rng, n)
            chosen = np.minimum(rng.geometric(0.6, size=n) - 1, TOP_K - 1)
            rows = np.arange(n)
            token_ids = p_ids[rows, chosen]
            token_text = vocab[token_ids]
            lengths = np.char.str_len(token_text).reshape(count, tokens)
            char_offset = (np.cumsum(lengths, axis=1) - lengths).ravel()
            key = {
                "stem": pa.array(stems),
                "response_index": pa.array(index),
                "position": pa.array(position),
            }
            positions.write_table(
                pa.table(
                    {
                        **key,
                        "token": pa.array(token_text),
                        "token_id": pa.array(token_ids),
                        "logprob": pa.array(p_lp[rows, chosen]),
                        "top_tokens": token_lists(vocab_arrow, p_ids),
                        "top_token_ids": list_array(p_ids, pa.int64()),
                        "top_logprobs": list_array(p_lp, pa.float64()),
                        "char_offset": pa.array(char_offset),
                    },
                    schema=schemas.POSITIONS,
                )
            )
            first_rows = np.arange(0, n, tokens)
            texts = ["".join(t) for t in token_text.reshape(count, tokens)]
            response_rows.write_table(
                pa.table(
                    {
                        "stem": pa.array(stems[first_rows]),
                        "response_index": pa.array(index[first_rows]),
                        "prompt": pa.array(
                            [
                                f"Prompt {s}: write about topic {s[-5:]} at some length."
                                for s in stems[first_rows]
                            ]
                        ),
                        "model1": pa.array([MODEL1] * count),
                        "text": pa.array(texts),
                        "num_tokens": pa.array(np.full(count, tokens, dtype=np.int32)),
                        "tokens_match_text": pa.array(rng.random(count) > 0.02),
                        "source_path": pa.array([f"/bench/{s}.json" for s in stems[first_rows]]),
                    },
                    schema=schemas.RESPONSES,
                )
            )
            failed = rng.random(n) < 0.001
            status = np.where(failed, schemas.SCORE_ERROR, schemas.SCORE_OK)
            errors = pa.array(np.full(n, "503 UNAVAILABLE"), pa.string(), mask=~failed)
            pq.write_table(
                complete(
                    {
                        **key,
                        "model2": pa.array([MODEL2] * n),
                        "status": pa.array(status),
                        "top_tokens": token_lists(vocab_arrow, q_ids),
                        "top_token_ids": list_array(q_ids, pa.int64()),
                        "top_logprobs": list_array(q_lp, pa.float64()),
                        "chosen_token": pa.array(vocab[q_ids[:, 0]]),
                        "chosen_token_id": pa.array(q_ids[:, 0]),
                        "chosen_logprob": pa.array(q_lp[:, 0]),
                        "finish_reason": pa.array(["MAX_TOKENS"] * n),
                        "attempts": pa.array(np.ones(n, dtype=np.int32)),
                        "latency_ms": pa.array(rng.uniform(50, 400, n)),
                        "error": errors,
                        "scored_at": pa.array(np.full(n, scored_at.value), scored_at.type),
                    },
                    schemas.SCORES,
                    n,
                ),
                run.scores_dir(MODEL2) / f"part-{first:08d}.parquet",
                compression="zstd",
            )
            level = np.repeat(rng.normal(-3.0, 1.0, size=count), tokens)
            kl_floor = np.exp(rng.normal(level, 1.8))
            entropy1, entropy2 = rng.gamma(2.0, 0.6, n), rng.gamma(2.0, 0.6, n)
            m2_logprob = p_lp[rows, chosen] - rng.normal(0, 1.0, n)
            ok = ~failed

            kl.write_table(
                pa.table(
                    {
                        "model2": pa.array([MODEL2] * n),
                        **key,
                        "token": pa.array(token_text),
                        "status": pa.array(np.where(ok, schemas.KL_STATUS_SCORED, "error")),
                        "error": errors,
                        "kl_floor": masked(kl_floor, failed),
                        "kl_lower": masked(kl_floor * rng.uniform(0.5, 1.0, n), failed),
                        "kl_estimate": masked(kl_floor * rng.uniform(1.0, 1.3, n), failed),
                        "tail_sigma2": pa.array(np.full(n, 0.5)),
                        "logratio": masked(p_lp[rows, chosen] - m2_logprob, failed),
                        "model1_logprob": pa.array(p_lp[rows, chosen]),
                        "model2_logprob": masked(m2_logprob, failed),
                        "m1_token_in_m2_topk": masked(rng.random(n) < 0.93, failed),
                        "top1_agree": masked(rng.random(n) < 0.8, failed),
                        "entropy1": pa.array(entropy1),
                        "entropy2": masked(entropy2, failed),
                        "coverage1": pa.array(np.exp(p_lp).sum(axis=1)),
                        "coverage2": masked(np.exp(q_lp).sum(axis=1), failed),
                    },
                    schema=schemas.KL,
                )
            )


def complete(columns: dict[str, pa.Array], schema: pa.Schema, rows: int) -> pa.Table:
    """``columns`` as a table of ``schema``, the columns not given (what a bench run does not
    model, such as the usage of each answer) all null."""
    missing = {f.name: pa.nulls(rows, f.type) for f in schema if f.name not in columns}
    return pa.table({**columns, **missing}).select(schema.names).cast(schema)


def masked(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    return pa.array(values, mask=missing)


def time_to_interactive(report: Path, screenshot: Path | None) -> dict[str, float]:
    """Open the report from disk in headless Chromium and time its first render and a click."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="klstream-bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        started = time.perf_counter()
        driver.get(report.resolve().as_uri())
        WebDriverWait(driver, 120, poll_frequency=0.02).until(
            lambda d: d.execute_script("return document.documentElement.dataset.ready")
        )
        wall = time.perf_counter() - started
        ready_ms = float(driver.execute_script("return document.documentElement.dataset.readyMs"))
        link = driver.find_elements(By.CSS_SELECTOR, "#response-table tbody a")[1]
        opened_ms = driver.execute_script(
            "const t = performance.now(); arguments[0].click();"
            "window.dispatchEvent(new HashChangeEvent('hashchange'));"
            "return performance.now() - t;",
            link,
        )
        threshold_ms = driver.execute_script(
            "const s = document.getElementById('threshold'); const t = performance.now();"
            "s.value = String(Number(s.value) - 1); s.dispatchEvent(new Event('input'));"
            "return performance.now() - t;"
        )
        memory = driver.execute_script(
            "return performance.memory ? performance.memory.usedJSHeapSize : 0"
        )
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        return {
            "ready_ms": ready_ms,
            "wall_s": wall,
            "open_ms": float(opened_ms),
            "threshold_ms": float(threshold_ms),
            "heap_mb": float(memory) / 1e6,
        }
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--keep", type=Path, help="Build the run here and keep it.")
    parser.add_argument("--screenshot", type=Path, help="Save a screenshot of the page here.")
    args = parser.parse_args()

    scratch = None if args.keep else Path(tempfile.mkdtemp(prefix="klstream-report-bench-"))
    run_dir = args.keep or (scratch / "run")  # type: ignore[operator]
    try:
        if not RunDir(run_dir).positions.exists():
            started = time.perf_counter()
            write_run(run_dir, args.responses, args.tokens)
            print(
                f"synthetic run: {args.responses:,} responses × {args.tokens} tokens "
                f"({args.responses * args.tokens:,} positions) in "
                f"{time.perf_counter() - started:.1f}s -> {run_dir}"
            )
        started = time.perf_counter()
        result = write_report(run_dir)
        print(
            f"report built in {time.perf_counter() - started:.1f}s: {result.size_bytes / 1e6:.1f} "
            f"MB, {result.detail_responses} responses with top-k detail -> {result.path}"
        )
        if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            print("no /usr/bin/chromium or chromedriver: time to interactive not measured")
            return
        figures = time_to_interactive(result.path, args.screenshot)
        print(
            f"headless Chromium: interactive {figures['ready_ms'] / 1000:.2f}s after navigation "
            f"start (driver wall clock {figures['wall_s']:.2f}s), JS heap "
            f"{figures['heap_mb']:.0f} MB; another response's heat map in "
            f"{figures['open_ms']:.0f} ms, a threshold change in {figures['threshold_ms']:.0f} ms"
        )
        if args.screenshot:
            print(f"screenshot: {args.screenshot}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
