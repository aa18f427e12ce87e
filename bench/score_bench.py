"""Score benchmark: requests/s of the Model 2 stage against the emulator, and its CPU per request.

The emulator runs in its own process (``python -m klstream.emulator --latency-ms 50``) so its CPU
does not compete with the client's. For each ``--concurrency`` the benchmark scores a fresh copy
of one run directory through the real :func:`klstream.pipeline.score` path and, side by side in
the same run, sends the same requests

* through the bare google-genai SDK (``client.aio.models.generate_content``, called as klstream
  calls it: one attempt, a shared ``aiohttp`` session, contents as dicts and the raw answer body
  parsed with ``json.loads``), with no klstream code around it, and
* as raw ``aiohttp`` POSTs of the same JSON body (``json.dumps`` the body, ``json.loads`` the
  answer, nothing else).

With a fixed latency L, at most ``concurrency / L`` requests can complete per second: that bound is
printed beside each rate. The client's CPU time per request (``time.process_time``, all threads of
this process) gives the rate one process can sustain at most, ``1 / CPU per request``; the table
shows how much of klstream's per-request CPU the SDK alone already costs. Rates and CPU are taken
over a steady-state window, from the completion of the first ``--warmup`` fraction of requests to
the last completion, so client set-up, the probe requests and the KL pass after scoring are left
out (the whole ``score`` call is reported below the table). The server's CPU use over the same
window (``/proc/PID/stat``) shows whether the emulator, rather than the client, was the limit.

``--variants`` adds two more clients that show what the SDK costs when used differently:
"SDK objects" passes ``types.Content`` objects and lets the SDK build a pydantic
``GenerateContentResponse`` (the SDK's default use, which klstream avoids); "SDK private" hands a
prebuilt JSON body to the client's private ``_api_client.async_request`` (the SDK's HTTP layer,
auth and URL without its request conversion).

``--profile N`` also runs klstream once at concurrency N under cProfile and prints its top costs
(cProfile sees only the event-loop thread, not the Parquet/DuckDB worker threads).

Usage: python bench/score_bench.py [--positions 4000] [--latency-ms 50]
                                   [--concurrency 16 64 256] [--variants] [--profile 64]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from google import genai
from google.genai import types

from klstream.backends.base import Endpoint
from klstream.emulator.toymodel import EOS_ID, ToyModel
from klstream.input.explode import explode
from klstream.pipeline import score
from klstream.scoring.options import ScoreOptions
from klstream.scoring.session import ScoreStats

MODEL1 = "toy"
MODEL2 = "toy-d0.5"
TOP_K = 20
API_KEY = "bench-no-key"
CLIENTS = ("klstream", "bare SDK", "raw aiohttp")
VARIANTS = ("SDK objects", "SDK private")
LEGEND = """\
bound/s = concurrency / latency; ratio = req/s / bound; CPU us/req = client process CPU per request;
client CPU = client CPU s per wall s (100% = one core busy); 1/CPU = the single-process ceiling
implied by CPU/req; server CPU = emulator CPU s per wall s (near 100%: the emulator, not the client,
was the limit); srv us/req = emulator CPU per request.
"""
GENERATION_CONFIG_JSON = {
    "maxOutputTokens": 1,
    "responseLogprobs": True,
    "logprobs": TOP_K,
    "thinkingConfig": {"thinkingBudget": 0},
}


# --- input ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: str
    prefill: str


def make_inputs(directory: Path, positions: int, tokens: int, responses: int) -> list[Request]:
    """Sample Model 1 responses from the toy model until ``positions`` token positions exist.

    Writes the input files (the spec's JSON format) and returns one request per position, the
    prefill being the response's tokens before it, as klstream builds them.
    """
    model = ToyModel.for_name(MODEL1)
    directory.mkdir(parents=True)
    requests: list[Request] = []
    stem = 0
    while len(requests) < positions:
        prompt = f"Benchmark prompt {stem}: tell me a long story about item {stem}."
        generated = []
        for index in range(responses):
            want = min(tokens, positions - len(requests))
            if want <= 0:
                break
            steps = model.sample(prompt, want, 1.0, seed=stem * 1000 + index, top_k_logprobs=TOP_K)
            steps_kept = [s for s in steps.steps if s.chosen.token_id != EOS_ID]
            if not steps_kept:
                continue
            content, text = [], ""
            for step in steps_kept:
                requests.append(Request(prompt, text))
                text += step.chosen.token
                top = [
                    {"token": c.token, "token_id": c.token_id, "logprob": c.logprob}
                    for c in step.top
                ]
                content.append(
                    {
                        "token": step.chosen.token,
                        "token_id": step.chosen.token_id,
                        "logprob": step.chosen.logprob,
                        "top_logprobs": top,
                    }
                )
            generated.append({"text": text, "logprobs": {"content": content}})
        document = {"prompt": prompt, "model": MODEL1, "responses": generated}
        (directory / f"prompt_{stem:05d}.json").write_text(json.dumps(document), encoding="utf-8")
        stem += 1
    return requests


# --- emulator process -----------------------------------------------------------------------------


class Emulator:
    """``python -m klstream.emulator`` in a child process, with a view of its CPU time."""

    def __init__(self, latency_ms: float) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "klstream.emulator",
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.base_url = line.split("listening on", 1)[1].strip()
        self.ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the emulator process so far."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- measurement ----------------------------------------------------------------------------------


@dataclass
class Window:
    """Wall, client-CPU and server-CPU marks at two completion counts."""

    start_at: int
    end_at: int
    server: Emulator
    marks: list[tuple[float, float, float]] = field(default_factory=list)

    def completed(self, done: int) -> None:
        if done == self.start_at or done == self.end_at:
            self.marks.append((time.perf_counter(), time.process_time(), self.server.cpu_seconds()))

    def result(self, client: str, concurrency: int, latency_s: float) -> Result:
        assert len(self.marks) == 2, "window not completed"
        (wall0, cpu0, server0), (wall1, cpu1, server1) = self.marks
        return Result(
            client,
            concurrency,
            self.end_at - self.start_at,
            wall1 - wall0,
            cpu1 - cpu0,
            server1 - server0,
            latency_s,
        )


@dataclass(frozen=True)
class Result:
    client: str
    concurrency: int
    requests: int
    wall_s: float
    cpu_s: float
    server_cpu_s: float
    latency_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    @property
    def bound(self) -> float:
        return self.concurrency / self.latency_s

    @property
    def cpu_per_request(self) -> float:
        return self.cpu_s / self.requests


async def run_workers(
    concurrency: int,
    requests: list[Request],
    window: Window,
    send: Callable[[Request], Awaitable[None]],
) -> None:
    """``concurrency`` tasks sending ``requests``; each completion is reported to ``window``."""
    pending: Iterator[Request] = iter(requests)
    done = 0

    async def worker() -> None:
        nonlocal done
        for request in pending:
            await send(request)
            done += 1
            window.completed(done)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def scoring_config(**extra: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        max_output_tokens=1,
        response_logprobs=True,
        logprobs=TOP_K,
        thinking_config=types.ThinkingConfig(thinking_budget=0),
        **extra,
    )


def json_contents(request: Request) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": request.prompt}]}]
    if request.prefill:
        contents.append({"role": "model", "parts": [{"text": request.prefill}]})
    return contents


def check_answer(answer: dict[str, Any]) -> None:
    assert answer["candidates"][0]["logprobsResult"]["topCandidates"], "an answer without logprobs"


async def sdk_client(
    variant: str, base_url: str, concurrency: int, requests: list[Request], window: Window
) -> None:
    """google-genai alone, configured as klstream configures it: one attempt, a shared session.

    ``variant`` is ``bare SDK`` (as klstream calls it), ``SDK objects`` or ``SDK private`` (see
    the module documentation).
    """
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = genai.Client(
            api_key=API_KEY,
            http_options=types.HttpOptions(
                base_url=base_url,
                timeout=60_000,
                retry_options=types.HttpRetryOptions(attempts=1),
                aiohttp_client=session,
            ),
        )
        config = scoring_config()
        raw_config = scoring_config(should_return_http_response=True)
        path = f"models/{MODEL2}:generateContent"

        async def objects(request: Request) -> None:
            contents = [types.Content(role="user", parts=[types.Part(text=request.prompt)])]
            if request.prefill:
                contents.append(
                    types.Content(role="model", parts=[types.Part(text=request.prefill)])
                )
            response = await client.aio.models.generate_content(
                model=MODEL2, contents=contents, config=config
            )
            assert response.candidates, "an answer without candidates"

        async def bare(request: Request) -> None:
            response = await client.aio.models.generate_content(
                model=MODEL2,
                contents=json_contents(request),  # type: ignore[arg-type]
                config=raw_config,
            )
            assert response.sdk_http_response is not None
            check_answer(json.loads(response.sdk_http_response.body or ""))

        async def private(request: Request) -> None:
            body = {"contents": json_contents(request), "generationConfig": GENERATION_CONFIG_JSON}
            response = await client.aio._api_client.async_request("post", path, body, None)
            check_answer(json.loads(response.body))

        send = {"bare SDK": bare, "SDK objects": objects, "SDK private": private}[variant]
        await run_workers(concurrency, requests, window, send)


async def raw_aiohttp(
    base_url: str, concurrency: int, requests: list[Request], window: Window
) -> None:
    """The same JSON body POSTed with aiohttp, the answer parsed with json.loads, nothing else."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    url = f"{base_url}/v1beta/models/{MODEL2}:generateContent"
    headers = {"Content-Type": "application/json", "x-goog-api-key": API_KEY}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(request: Request) -> None:
            body = json.dumps(
                {"contents": json_contents(request), "generationConfig": GENERATION_CONFIG_JSON}
            )
            async with session.post(url, data=body.encode(), headers=headers) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {payload[:200]!r}")
            check_answer(json.loads(payload))

        await run_workers(concurrency, requests, window, send)


@dataclass(frozen=True)
class WholeRun:
    seconds: float
    cpu_s: float
    scored: int


def klstream_run(
    base_url: str, concurrency: int, master: Path, work: Path, positions: int, window: Window
) -> WholeRun:
    """``score`` on a fresh copy of the exploded run dir; the window follows its progress."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(master, work)
    endpoint = Endpoint("gemini", api_key=API_KEY, base_url=base_url)
    options = ScoreOptions(
        model2=MODEL2, top_logprobs=TOP_K, max_concurrent=concurrency, lookahead=1
    )

    def on_progress(stats: ScoreStats) -> None:
        window.completed(stats.done)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    report = score(work, options, endpoint, on_progress)
    whole = WholeRun(time.perf_counter() - wall0, time.process_time() - cpu0, report.stats.scored)
    if report.stopped_because or report.stats.failed or report.stats.scored != positions:
        raise RuntimeError(f"score did not score every position: {report}")
    if report.stats.calls.retries:
        print(f"  note: klstream retried {report.stats.calls.retries} requests", file=sys.stderr)
    return whole


def profile_klstream(
    base_url: str,
    concurrency: int,
    master: Path,
    work: Path,
    positions: int,
    server: Emulator,
    top: int,
) -> None:
    window = Window(positions // 20, positions, server)
    profiler = cProfile.Profile()
    profiler.enable()
    klstream_run(base_url, concurrency, master, work, positions, window)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(order).print_stats(top)
        print(
            f"\ncProfile of score at max_concurrent {concurrency}, by {order} "
            f"(profiling slows the run; compare shares, not absolute times):"
        )
        print(
            "\n".join(
                line
                for line in out.getvalue().splitlines()
                if line.strip() and not line.startswith(("   Ordered", "   List"))
            )
        )


# --- report ---------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    header = (
        f"{'client':<12} {'conc':>5} {'bound/s':>8} {'req/s':>8} {'ratio':>6} "
        f"{'CPU us/req':>10} {'client CPU':>10} {'1/CPU /s':>9} {'server CPU':>10} "
        f"{'srv us/req':>10}"
    )
    print(header)
    print("-" * len(header))
    for index, r in enumerate(results):
        if index and r.concurrency != results[index - 1].concurrency:
            print()
        print(
            f"{r.client:<12} {r.concurrency:>5} {r.bound:>8,.0f} {r.rate:>8,.0f} "
            f"{r.rate / r.bound:>6.0%} {r.cpu_per_request * 1e6:>10,.0f} "
            f"{r.cpu_s / r.wall_s:>10.0%} {1 / r.cpu_per_request:>9,.0f} "
            f"{r.server_cpu_s / r.wall_s:>10.0%} "
            f"{r.server_cpu_s / r.requests * 1e6:>10,.0f}"
        )


def print_breakdown(results: list[Result], target: float) -> None:
    print("\nPer-request client CPU, klstream split against the bare SDK and raw aiohttp:")
    for concurrency in sorted({r.concurrency for r in results}):
        by_client = {r.client: r.cpu_per_request for r in results if r.concurrency == concurrency}
        ours, sdk, raw = (by_client[c] for c in CLIENTS)
        print(
            f"  conc {concurrency:>4}: klstream {ours * 1e6:,.0f} us = raw HTTP "
            f"{raw * 1e6:,.0f} + SDK {max(sdk - raw, 0) * 1e6:,.0f} + klstream "
            f"{(ours - sdk) * 1e6:,.0f} us; the SDK call is {sdk / ours:.0%} of klstream's "
            f"CPU, klstream's own code {(ours - sdk) / ours:.0%}"
        )
    print(
        f"\n{target:.0%} of the bound, and the most CPU per request one fully busy core "
        "allows at that rate:"
    )
    for concurrency in sorted({r.concurrency for r in results}):
        ours = next(r for r in results if r.concurrency == concurrency and r.client == "klstream")
        wanted = target * ours.bound
        verdict = "reached" if ours.rate >= wanted else "NOT reached"
        print(
            f"  conc {concurrency:>4}: {wanted:,.0f} req/s needs <= {1e6 / wanted:,.0f} us "
            f"CPU/request; klstream spends {ours.cpu_per_request * 1e6:,.0f} us and did "
            f"{ours.rate:,.0f} req/s ({ours.rate / ours.bound:.0%} of the bound): {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--positions",
        type=int,
        default=4000,
        help="token positions = requests per client and concurrency",
    )
    parser.add_argument("--tokens", type=int, default=100, help="tokens per Model 1 response")
    parser.add_argument("--responses", type=int, default=4, help="responses per input file")
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="latency the emulator adds to every request"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[16, 64, 256],
        help="max_concurrent values to measure",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.05,
        help="fraction of requests completed before the measuring window opens",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.85,
        help="fraction of the bound the verdict lines check for",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also measure the 'SDK objects' and 'SDK private' clients",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="CONCURRENCY",
        help="also profile one klstream run at this concurrency with cProfile",
    )
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args()
    latency_s = args.latency_ms / 1000

    with tempfile.TemporaryDirectory(prefix="score-bench-") as temp:
        root = Path(temp)
        random.seed(0)
        requests = make_inputs(root / "input", args.positions, args.tokens, args.responses)
        report = explode(root / "input", root / "master")
        assert report.positions == len(requests)
        n = len(requests)
        start_at = max(int(n * args.warmup), 4)
        mean_prefill = sum(len(r.prefill) for r in requests) / n
        print(
            f"{n:,} positions ({report.responses} responses of <= {args.tokens} tokens, "
            f"mean prefill {mean_prefill:.0f} chars), top-{TOP_K}, emulator latency "
            f"{args.latency_ms:g} ms in its own process; {os.cpu_count()} CPUs. Window: "
            f"completions {start_at:,}..{n:,}.\n"
        )
        server = Emulator(args.latency_ms)
        try:
            results: list[Result] = []
            wholes: dict[int, WholeRun] = {}
            for concurrency in args.concurrency:
                for client in CLIENTS + (VARIANTS if args.variants else ()):
                    window = Window(start_at, n, server)
                    if client == "klstream":
                        wholes[concurrency] = klstream_run(
                            server.base_url, concurrency, root / "master", root / "work", n, window
                        )
                    elif client == "raw aiohttp":
                        asyncio.run(raw_aiohttp(server.base_url, concurrency, requests, window))
                    else:
                        asyncio.run(
                            sdk_client(client, server.base_url, concurrency, requests, window)
                        )
                    results.append(window.result(client, concurrency, latency_s))
                    print(f"  measured {client} at concurrency {concurrency}", file=sys.stderr)
            print(LEGEND)
            print_table(results)
            print_breakdown(results, args.target)
            print("\nWhole score calls (set-up, probe requests and the KL pass included):")
            for concurrency, whole in wholes.items():
                print(
                    f"  conc {concurrency:>4}: {whole.scored:,} positions in "
                    f"{whole.seconds:.2f} s = {whole.scored / whole.seconds:,.0f} /s, CPU "
                    f"{whole.cpu_s:.2f} s = {whole.cpu_s / whole.scored * 1e6:,.0f} us/position"
                )
            if args.profile:
                profile_klstream(
                    server.base_url,
                    args.profile,
                    root / "master",
                    root / "work",
                    n,
                    server,
                    args.profile_top,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
