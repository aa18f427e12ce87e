"""The ``klstream emulate`` command: run the local Gemini (and OpenAI-compatible) emulator in
the foreground."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from klstream.emulator.app import serve
from klstream.emulator.batch import BatchConfig
from klstream.emulator.faults import FaultConfig
from klstream.emulator.service import ServiceConfig


async def _serve_until_signalled(
    host: str,
    port: int,
    faults: FaultConfig,
    request_log: Path | None,
    batch: BatchConfig,
    service: ServiceConfig,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut the server down cleanly."""
    loop = asyncio.get_running_loop()
    server = asyncio.ensure_future(
        serve(
            host,
            port,
            faults,
            request_log,
            on_ready=lambda url: click.echo(f"klstream emulator listening on {url}"),
            batch=batch,
            service=service,
        )
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.cancel)
    try:
        await server
    except asyncio.CancelledError:
        click.echo("klstream emulator stopped")
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None


@click.command("emulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8765, show_default=True, help="Port to bind (0: any free port).")
@click.option("--latency-ms", default=0.0, show_default=True, help="Fixed delay per request.")
@click.option("--jitter-ms", default=0.0, show_default=True, help="Extra uniform random delay.")
@click.option("--rate-429", default=0.0, show_default=True, help="Fraction answered 429.")
@click.option(
    "--retry-delay", default=1.5, show_default=True, help="Seconds advised by 429 answers."
)
@click.option("--rate-500", default=0.0, show_default=True, help="Fraction answered 500.")
@click.option("--rate-503", default=0.0, show_default=True, help="Fraction answered 503.")
@click.option("--rate-hang", default=0.0, show_default=True, help="Fraction that hang.")
@click.option("--hang-seconds", default=60.0, show_default=True, help="How long a hang lasts.")
@click.option(
    "--rate-malformed", default=0.0, show_default=True, help="Fraction with a truncated body."
)
@click.option(
    "--rate-html", default=0.0, show_default=True, help="Fraction answered 200 with an HTML page."
)
@click.option(
    "--rate-no-logprobs",
    default=0.0,
    show_default=True,
    help="Fraction answered without logprobs (logprobsResult, logprobs, prompt_logprobs).",
)
@click.option(
    "--rate-short-prompt-logprobs",
    default=0.0,
    show_default=True,
    help="Fraction of OpenAI completions whose prompt_logprobs lack their last entries.",
)
@click.option(
    "--rate-short-topk",
    default=0.0,
    show_default=True,
    help="Fraction of Gemini answers whose top-k lists hold 3 candidates, whatever was asked.",
)
@click.option(
    "--quota-per-minute",
    default=0,
    show_default=True,
    help="Requests allowed per rolling minute, then 429 (0: unlimited).",
)
@click.option(
    "--fail-first-n",
    default=0,
    show_default=True,
    help="Answer 503 to the first N copies of each distinct request.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the fault randomness.")
@click.option(
    "--batch-seconds",
    default=0.0,
    show_default=True,
    help="How long a batch job runs before it succeeds.",
)
@click.option(
    "--batch-line-error-rate",
    default=0.0,
    show_default=True,
    help="Fraction of batch lines answered with an error (once per key).",
)
@click.option(
    "--cache-min-tokens",
    default=ServiceConfig.cache_min_tokens,
    show_default=True,
    help="Shortest repeated input prefix the implicit cache reports as cached.",
)
@click.option(
    "--cache-ttl",
    default=300.0,
    show_default=True,
    help="Seconds a prefix stays cached after a request last sent it.",
)
@click.option(
    "--scaled-logprobs",
    is_flag=True,
    help="Report the logprobs of the temperature-scaled distribution sampled from, instead of "
    "the temperature-1 ones.",
)
@click.option(
    "--request-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append one JSON line per request to this file.",
)
def emulate_command(
    host: str,
    port: int,
    latency_ms: float,
    jitter_ms: float,
    rate_429: float,
    retry_delay: float,
    rate_500: float,
    rate_503: float,
    rate_hang: float,
    hang_seconds: float,
    rate_malformed: float,
    rate_html: float,
    rate_no_logprobs: float,
    rate_short_prompt_logprobs: float,
    rate_short_topk: float,
    quota_per_minute: int,
    fail_first_n: int,
    seed: int,
    batch_seconds: float,
    batch_line_error_rate: float,
    cache_min_tokens: int,
    cache_ttl: float,
    scaled_logprobs: bool,
    request_log: Path | None,
) -> None:
    """Run a local Gemini API emulator backed by deterministic toy models.

    It lets you dry-run klstream pipelines (and anything else built on the
    google-genai or openai SDKs) without network access and without spending
    money, and rehearse failures: latency, 429/500/503 errors, hangs, malformed
    or HTML bodies, missing logprobs and quotas. Point clients at it with
    --base-url http://HOST:PORT or GOOGLE_GEMINI_BASE_URL=http://HOST:PORT
    (the same URL with --backend openai serves vLLM-style /v1/completions,
    /v1/chat/completions and /tokenize) and use toy model names such as "toy"
    and "toy-d0.5" (see the klstream.emulator module documentation). Stops on
    Ctrl-C or SIGTERM.
    """
    try:
        faults = FaultConfig(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            rate_429=rate_429,
            retry_delay_s=retry_delay,
            rate_500=rate_500,
            rate_503=rate_503,
            rate_hang=rate_hang,
            hang_seconds=hang_seconds,
            rate_malformed=rate_malformed,
            rate_html=rate_html,
            rate_no_logprobs=rate_no_logprobs,
            rate_short_prompt_logprobs=rate_short_prompt_logprobs,
            rate_short_topk=rate_short_topk,
            quota_per_minute=quota_per_minute,
            fail_first_n=fail_first_n,
            seed=seed,
        )
        batch = BatchConfig(running_s=batch_seconds, line_error_rate=batch_line_error_rate)
        service = ServiceConfig(cache_min_tokens, cache_ttl, scaled_logprobs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(_serve_until_signalled(host, port, faults, request_log, batch, service))
