"""The ``klstream`` command line: parse, call the public API (:mod:`klstream`), print.

The library's errors describe problems without command-line flags; :data:`HINTS` adds the flag
that fixes each one, and the exit status comes from the error (:mod:`klstream.errors`).
"""

from __future__ import annotations

import importlib
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import click
import cloup
from click.core import ParameterSource

from klstream import __version__
from klstream import errors as E
from klstream.backends import BACKENDS, PROMPT_LOGPROBS, dialect_names, online_methods
from klstream.numbers import thousands

if TYPE_CHECKING:
    from klstream.backends.base import Endpoint, ThinkingBudget
    from klstream.backends.transport import RetryPolicy
    from klstream.scoring.dryrun import DryRunOptions
    from klstream.scoring.options import BatchOptions, ScoreOptions
    from klstream.scoring.score import ScoreReport


OUT_OF_THINKING = (
    "choose a Model 2 whose thinking can be switched off or bounded (such as gemini-2.5-flash "
    "on Vertex AI), or an open-weight model (--backend openai)"
)
"""Where the thinking hints end: a search that found nothing cannot be helped by a flag."""


def _thinking_hint(error: E.KlstreamError) -> str:
    """Every thinking failure points at ``auto`` or, after a search, out of the loop."""
    if getattr(error, "searched", False):
        return OUT_OF_THINKING
    if isinstance(error, E.ThinkingNotDisabled) and error.thinking_budget is None:
        return "pass --thinking-budget 0, or auto (the default) to find the least the model takes"
    return (
        "pass --thinking-budget auto (the default): 0 where the model accepts it, else the "
        "least budget it accepts"
    )


def _logprobs_hint(error: E.KlstreamError) -> str:
    """The flags of what works instead of a model without logprobs."""
    model = getattr(error, "model", "")
    options = ["--backend openai --method prompt-logprobs --base-url URL (a vLLM server)"]
    if not (getattr(error, "backend", "") == "vertex" and model.startswith("gemini-2.5")):
        options.insert(0, "--backend vertex --model2 gemini-2.5-flash --project-id PROJECT")
    return "try " + ", or ".join(options) + " (README: when a provider withdraws logprobs)"


HINTS: dict[type[E.KlstreamError], Callable[[E.KlstreamError], str]] = {
    E.NotExploded: lambda e: _explode_hint(e),
    E.PositionsExist: lambda e: "pass --overwrite to replace them, or pick another run dir",
    E.RunExists: lambda e: (
        "pass --resume to continue it, or --overwrite to score again from scratch"
    ),
    E.ResultsExist: lambda e: (
        "pass --resume to continue that run, or --overwrite to discard it and start again"
    ),
    E.RunConfigMismatch: lambda e: (
        "use the recorded settings with --resume, or --overwrite to start again"
    ),
    E.NoResults: lambda e: "run `klstream score RUN_DIR --model2 NAME` first",
    E.AmbiguousModel2: lambda e: "choose one with --model2",
    E.MissingCredentials: lambda e: (
        "set GEMINI_API_KEY, or pass --backend vertex with "
        "--project-id, or --base-url for a local server such as `klstream emulate`"
    ),
    E.MissingServerUrl: lambda e: "pass --base-url (or set OPENAI_BASE_URL)",
    E.MethodUnsupported: lambda e: (
        "use --method prefill, or --method prompt-logprobs with "
        + " or ".join(f"--backend {n}" for n, s in BACKENDS.items() if PROMPT_LOGPROBS in s.methods)
    ),
    E.ThinkingRejected: _thinking_hint,
    E.ThinkingNotDisabled: _thinking_hint,
    E.LogprobsUnavailable: _logprobs_hint,
    E.ModelNotFound: lambda e: (
        "check --model2 and --base-url; `klstream prices` lists the Gemini models klstream knows "
        "and when each was retired"
    ),
    E.BatchUnavailable: lambda e: (
        "pass --location with a region that offers batch prediction (such as us-central1), "
        "or score online without --batch"
    ),
    E.BatchJobsActive: lambda e: "run `klstream batch cancel RUN_DIR` first, or --resume",
    E.GreedyInconsistent: lambda e: "use --lookahead-decoding sample (or auto, which falls back)",
    E.TopLogprobsShort: lambda e: (
        f"pass --top-logprobs {getattr(e, 'usable', 1) or 1} or less"
        if getattr(e, "usable", 0)
        else "choose a Model 2 whose service lists logprobs"
    ),
    E.BatchCanaryFailed: lambda e: (
        "score online (without --batch); `klstream check --batch` shows what batch lines bring back"
    ),
    E.PriceTableError: lambda e: "fix the file given to --prices",
    E.RunLocked: lambda e: "wait for that process to end, or stop it, then try again",
    E.InputsChanged: lambda e: (
        "give the --input-dir and --pattern of the original run to resume it, or --overwrite "
        "to start again from these inputs"
    ),
    E.EndpointUnreachable: lambda e: "check --base-url (or the network, proxy and DNS)",
    E.RunDamaged: lambda e: _rebuild_hint(e),
    E.RunConfigUnknown: lambda e: "put run.json back, or pass --overwrite to replace these results",
    E.ExportFailed: lambda e: (
        "make the output directory writable, then export them with: "
        + _export_command(getattr(e, "run_dir", ""), getattr(e, "output_dir", ""), e)
    ),
}
"""The command-line fix for each kind of error, appended to its message."""


def _rebuild_hint(error: E.KlstreamError) -> str:
    """How to rebuild what a damaged file of the run's inputs spoils."""
    from klstream.storage.rundir import INPUTS_FILE

    path, run_dir = Path(str(getattr(error, "path", ""))), getattr(error, "run_dir", "")
    input_dir = getattr(error, "input_dir", None)
    if path.name == INPUTS_FILE:
        return (
            "move it away (the run then resumes without comparing its input files), or explode "
            "the inputs into a new run directory"
        )
    if input_dir is None:
        return "explode the inputs again into a new run directory"
    words = [*program_words(), "explode", str(input_dir), "-o", str(run_dir), "--overwrite"]
    return (
        f"explode the same inputs again: {shlex.join(words)} (the results are kept: they are "
        "keyed to the same positions)"
    )


def _explode_hint(error: E.KlstreamError) -> str:
    """How to explode; pointed at a directory of input files (Model 1's JSON), an explode of
    them into a new run directory beside it, never into the inputs themselves."""
    run_dir = Path(str(getattr(error, "run_dir", "RUN_DIR")))
    if run_dir.is_dir() and any(run_dir.glob("*.json")):
        new_run = run_dir.parent / f"{run_dir.name}-run"
        words = [*program_words(), "explode", str(run_dir), "-o", str(new_run)]
        return (
            f"{run_dir} holds input files: explode them into a new run directory with "
            f"`{shlex.join(words)}`, then use {new_run} here"
        )
    return f"run `klstream explode INPUT_DIR -o {run_dir}` first"


def _export_command(run_dir: object, output_dir: object, error: E.KlstreamError) -> str:
    words = [*program_words(), "export", str(run_dir), "-o", str(output_dir)]
    return shlex.join([*words, "--model2", str(getattr(error, "model2", ""))])


def _message(error: E.KlstreamError) -> str:
    for kind in type(error).__mro__:
        hint = HINTS.get(kind)
        if hint is not None:
            return f"{error}; {hint(error)}"
    return str(error)


if TYPE_CHECKING:
    from klstream.input.explode import ExplodeReport
    from klstream.output.query import OutputFormat
    from klstream.output.report import ReportResult
    from klstream.output.top import Score
    from klstream.preflight import Capabilities, CheckReport


class _WholeSummary(click.Command):
    """A command whose line in its group's list is its whole first paragraph, wrapped instead
    of cut off at the terminal's width."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or (self.help or "").split("\n\n")[0].replace("\n", " ").strip()


class _Command(_WholeSummary, cloup.Command):
    pass


class _Subgroup(_WholeSummary, cloup.Group):
    command_class = _Command


COMMAND_SECTIONS = {
    "Score a run": ("run", "explode", "score", "kl", "export"),
    "Look at the results": ("top", "report", "query", "views"),
    "Models, prices and a local server": ("check", "sample", "prices", "emulate"),
    "Batch jobs": ("batch",),
}
"""The top-level help's sections, in order; every command is in one (tests/test_cli_help.py)."""


class _Group(cloup.Group):
    """Turns a :class:`KlstreamError` (or a file-system error no stage anticipated) into one
    clear line on stderr and its exit status, imports the emulator (numpy, aiohttp, its toy
    vocabulary) only when it is asked for, and lists the commands in :data:`COMMAND_SECTIONS`."""

    command_class = _Command
    group_class = _Subgroup
    lazy_commands = {
        "emulate": (
            "klstream.emulator.command",
            "emulate_command",
            "A local server speaking the Gemini and OpenAI-compatible protocols, with toy models "
            "and injected faults: everything works offline against it.",
        )
    }
    """Commands imported when run; listed in the help by their summary alone."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module, attribute, _ = self.lazy_commands[name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, name)

    def list_sections(
        self, ctx: click.Context, include_default_section: bool = True
    ) -> list[cloup.Section]:
        return [
            cloup.Section(title, [self._listed(ctx, name) for name in names])
            for title, names in COMMAND_SECTIONS.items()
        ]

    def _listed(self, ctx: click.Context, name: str) -> click.Command:
        if name in self.lazy_commands:
            return _Command(name, short_help=self.lazy_commands[name][2])
        command = self.get_command(ctx, name)
        if command is None:
            raise LookupError(f"COMMAND_SECTIONS names {name!r}, which is no command")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except E.KlstreamError as error:
            click.echo(f"Error: {_message(error)}", err=True)
            ctx.exit(error.exit_code)
        except OSError as error:
            click.echo(f"Error: {E.describe_os_error(error)}", err=True)
            ctx.exit(1)


@cloup.group(cls=_Group)
@click.version_option(__version__, prog_name="klstream")
def main() -> None:
    """Where, and by how much, do two language models' next-token distributions disagree?

    `run` does it all (explode → score → export → report); the stages run alone too, and
    `top`, `report` and `query` look at any run. `klstream COMMAND --help` tells more.
    """


run_dir_argument = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
_format_option = click.option(
    "--format",
    "output_format",
    default="table",
    show_default=True,
    type=click.Choice(["table", "csv", "json", "parquet"]),
    help="How to print the rows: a table, CSV, JSON Lines, or Parquet (needs -o).",
)
"""How `query` and `top` print their rows."""


@main.command()
@click.argument("input_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output-dir",
    "run_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory to create (positions.parquet, responses.parquet).",
)
@click.option("--pattern", default="*.json", show_default=True, help="Glob for input files.")
@click.option("--max-files", type=click.IntRange(min=1), help="Process at most N files.")
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Record invalid responses in skipped.parquet and go on, instead of failing.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run's positions.")
def explode(
    input_dir: Path,
    run_dir: Path,
    pattern: str,
    max_files: int | None,
    skip_invalid: bool,
    overwrite: bool,
) -> None:
    """Explode Model 1 response files into a Parquet table of token positions."""
    from klstream.input.explode import explode as explode_inputs

    report = explode_inputs(
        input_dir,
        run_dir,
        pattern=pattern,
        max_files=max_files,
        skip_invalid=skip_invalid,
        overwrite=overwrite,
    )
    click.echo(_exploded_line(report, run_dir))
    if report.responses_text_mismatch:
        click.echo(
            f"warning: {thousands(report.responses_text_mismatch)} responses' tokens do not "
            "reproduce their text (tokens_match_text = false in responses.parquet); their "
            "prefills follow the tokens",
            err=True,
        )
    if report.skipped:
        click.echo(
            f"skipped {thousands(report.skipped)} invalid responses: see {report.skipped_path}",
            err=True,
        )


def _exploded_line(report: ExplodeReport, run_dir: Path) -> str:
    return (
        f"exploded {thousands(report.files)} files: {thousands(report.responses)} responses, "
        f"{thousands(report.positions)} positions -> {run_dir}"
    )


@main.command()
@run_dir_argument
@click.option("--model2", required=True, help="Model 2 whose scores to use.")
def kl(run_dir: Path, model2: str) -> None:
    """Recompute the per-position KL table of one Model 2 from its scores."""
    from klstream.metrics.kl import compute_kl

    report = compute_kl(run_dir, model2)
    click.echo(
        f"kl: {thousands(report.scored)} of {thousands(report.positions)} positions scored "
        f"({thousands(report.failed)} failed, {thousands(report.unscored)} unscored) -> "
        f"{report.path}"
    )


@main.command()
@run_dir_argument
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write <stem>_kl.json files and summary.json.",
)
@click.option("--model2", help="Which Model 2 to export (needed when the run has several).")
def export(run_dir: Path, output_dir: Path, model2: str | None) -> None:
    """Write the spec's <stem>_kl.json files and a run summary."""
    from klstream.output.export import export as export_run
    from klstream.output.export import format_summary

    report = export_run(run_dir, output_dir, model2)
    click.echo(format_summary(report.summary))
    click.echo(
        f"wrote {thousands(len(report.files))} _kl.json files and {report.summary_path.name} to "
        f"{output_dir}"
    )


@main.command()
@run_dir_argument
@click.argument("sql")
@_format_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result to this file instead of printing it.",
)
@click.option("--max-rows", default=40, show_default=True, help="Rows to print as a table.")
def query(run_dir: Path, sql: str, output_format: str, output: Path | None, max_rows: int) -> None:
    """Run SQL over the run's views: positions, responses, scores, kl, response_stats, ..."""
    from klstream.output.query import run_query

    click.echo(run_query(run_dir, sql, cast("OutputFormat", output_format), output, max_rows))


@main.command()
@run_dir_argument
def views(run_dir: Path) -> None:
    """Print SQL that creates the run's views, for the duckdb CLI: duckdb -init FILE."""
    from klstream.storage.database import views_script

    click.echo(views_script(run_dir), nl=False)


@main.command()
@run_dir_argument
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write (default: RUN_DIR/report.html, or a name after --response).",
)
@click.option(
    "--detail",
    multiple=True,
    metavar="STEM:INDEX",
    help="Carry this response's full top-k lists too (repeatable).",
)
@click.option(
    "--detail-positions",
    type=click.IntRange(min=0),
    help="Budget of positions with full top-k lists, filled by the most divergent responses "
    "(default 50,000: some 10 MB).",
)
@click.option(
    "--response",
    "responses",
    multiple=True,
    metavar="STEM:INDEX",
    help="Write a page for just this response (repeatable), with its full top-k lists.",
)
@click.option(
    "--top-tokens",
    type=click.IntRange(min=0),
    help="Highest-KL tokens listed per Model 2 (default 100).",
)
def report(
    run_dir: Path,
    output: Path | None,
    detail: tuple[str, ...],
    detail_positions: int | None,
    responses: tuple[str, ...],
    top_tokens: int | None,
) -> None:
    """Write a self-contained HTML report: overview, response table, token heat maps."""
    from klstream.output.report import ReportOptions, parse_response_key, write_report

    only = tuple(parse_response_key(text) for text in responses)
    if output is None and only:
        output = run_dir / ("report-" + "-".join(f"{s}_{i}" for s, i in only) + ".html")
    given = {"detail_positions": detail_positions, "top_tokens": top_tokens}
    options = ReportOptions(
        detail=tuple(parse_response_key(text) for text in detail),
        only=only,
        **{name: value for name, value in given.items() if value is not None},
    )
    click.echo(_report_line(write_report(run_dir, output, options)))


def _report_line(result: ReportResult) -> str:
    return (
        f"report: {thousands(result.responses)} responses, {thousands(result.positions)} "
        f"positions, "
        f"{thousands(result.detail_responses)} with top-k detail, {result.size_bytes / 1e6:.1f} MB "
        f"-> {result.path}"
    )


@main.command()
@run_dir_argument
@click.option("--model2", help="Which Model 2 (needed when the run has several).")
@click.option(
    "--score",
    type=click.Choice(["kl", "normalized", "estimate"]),
    default="kl",
    show_default=True,
    help="kl: kl_floor; normalized: kl_floor / (entropy1 + entropy2); estimate: kl_estimate.",
)
@click.option("--min", "minimum", type=float, help="Only positions with score >= MIN.")
@click.option("--max", "maximum", type=float, help="Only positions with score <= MAX.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Rows at most."
)
@click.option(
    "--context",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Tokens of context on each side.",
)
@_format_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the rows to this file (table: as CSV) instead of printing them.",
)
def top(
    run_dir: Path,
    model2: str | None,
    score: str,
    minimum: float | None,
    maximum: float | None,
    limit: int,
    context: int,
    output_format: str,
    output: Path | None,
) -> None:
    """The highest-KL tokens of a run with their context, optionally within [--min, --max]."""
    from klstream.output.query import render_rows
    from klstream.output.top import TopQuery, format_table, top_tokens_of_run

    query = TopQuery(model2, cast("Score", score), minimum, maximum, limit, context)
    table = top_tokens_of_run(run_dir, query)
    if output_format == "table" and output is None:
        click.echo(format_table(table))
    else:
        click.echo(render_rows(table, cast("OutputFormat", output_format), output, limit))


def _apply(function: Any, decorators: list[Callable[[Any], Any]]) -> Any:
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


_where_options = [
    click.option(
        "--base-url",
        help="Another endpoint, such as `klstream emulate`'s (default: "
        "$GOOGLE_GEMINI_BASE_URL, or $OPENAI_BASE_URL with --backend openai).",
    ),
    click.option("--project-id", help="Vertex AI project (default: $GOOGLE_CLOUD_PROJECT)."),
    click.option("--location", default="global", show_default=True, help="Vertex AI region."),
]
"""Where the service is, beyond the backend: shared by every command that reaches one."""
_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds before a request counts as failed.",
)
_endpoint_options = [
    click.option(
        "--backend",
        type=click.Choice(list(BACKENDS)),
        default="gemini",
        show_default=True,
        help="Where the model is: "
        + "; ".join(f"{name}, {spec.summary}" for name, spec in BACKENDS.items())
        + ".",
    ),
    *_where_options,
    click.option(
        "--dialect",
        type=click.Choice(dialect_names()),
        default="auto",
        show_default=True,
        help="With --backend openai and --method prompt-logprobs: how the server is asked for "
        "prompt logprobs. auto finds out with a small request or two; vllm (prompt_logprobs), "
        "echo (the legacy completions echo), sglang (its /generate); tgi is recognised and "
        "refused (no top-k for prompt tokens).",
    ),
    _timeout_option,
]
"""Where the model is and how to reach it."""
_retry_options = [
    click.option(
        "--max-concurrent",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        help="Requests in flight at most, across all files.",
    ),
    click.option(
        "--max-retries",
        type=click.IntRange(min=0),
        default=12,
        show_default=True,
        help="Retries on 429, 5xx, time-outs and answers without logprobs.",
    ),
]
_thinking_option = click.option(
    "--thinking-budget",
    default="auto",
    show_default=True,
    metavar="N|none|auto",
    help="Thinking budget to send; `none` sends no thinking config; `auto` sends 0, or the "
    "least budget the model accepts when it cannot stop thinking.",
)
_bucket_option = click.option(
    "--bucket-name",
    help="With --batch on Vertex AI: Cloud Storage bucket for the JSONL files "
    "(default: <project>-klstream-batch, created if missing).",
)
_poll_option = click.option(
    "--batch-poll-seconds",
    type=click.FloatRange(min=0.01),
    default=60.0,
    show_default=True,
    help="With --batch: longest wait between two looks at the jobs.",
)
_model2_option = click.option("--model2", required=True, help="Model 2, e.g. gemini-2.5-flash.")
_top_logprobs_option = click.option(
    "--top-logprobs",
    type=click.IntRange(1, 20),
    default=20,
    show_default=True,
    help="Top-k logprobs to request per position.",
)


def _endpoint_groups(function: Any) -> Any:
    """The endpoint and the retries, for the commands that reach a model (`sample`, `check`)."""
    return _apply(
        function,
        [
            cloup.option_group("Endpoint", *_endpoint_options),
            cloup.option_group("Retries and concurrency", *_retry_options),
        ],
    )


_ask_options = [
    _model2_option,
    click.option(
        "--method",
        type=click.Choice(online_methods()),
        default="prefill",
        show_default=True,
        help="One request per position (any backend), or one per response from an open-weight "
        "server's prompt logprobs (--backend openai: vLLM, SGLang; see --dialect).",
    ),
    _top_logprobs_option,
    click.option(
        "--lookahead",
        default="auto",
        show_default=True,
        metavar="N|auto",
        help="Tokens each request asks for; the steps that follow Model 1's tokens are stored "
        "too. `auto` picks per response the number with the least expected cost per position.",
    ),
    click.option(
        "--lookahead-decoding",
        type=click.Choice(["auto", "greedy", "sample"]),
        default="auto",
        show_default=True,
        help="How lookahead tokens are generated: sample at --temperature, greedy (refused "
        "unless a consistency probe finds the logprobs independent of the sampling settings), "
        "or auto (greedy when the probe passes).",
    ),
    click.option(
        "--temperature",
        type=click.FloatRange(0.0, 2.0),
        default=1.0,
        show_default=True,
        help="Sampling temperature of every request but greedy lookahead's.",
    ),
    _thinking_option,
    click.option(
        "--require-model-version",
        is_flag=True,
        help="Stop when the service says another model answered than --model2 (an alias "
        "moved, a retired model rerouted) instead of reporting it at the end.",
    ),
]
"""What Model 2 is asked."""
_cost_options = [
    click.option(
        "--dry-run",
        is_flag=True,
        help="Send nothing: print the requests, tokens, USD (online and batch) and time the "
        "scoring would take, from one token per request to the lookahead's estimate.",
    ),
    click.option(
        "--calibrate",
        type=click.IntRange(min=1),
        metavar="K",
        help="With --dry-run: send K real requests to count prompt tokens and measure how "
        "often Model 2's tokens are Model 1's.",
    ),
    click.option(
        "--rpm",
        type=click.FloatRange(min=0, min_open=True),
        help="With --dry-run: requests per minute the quota allows.",
    ),
    click.option(
        "--tpm",
        type=click.FloatRange(min=0, min_open=True),
        help="With --dry-run: tokens per minute the quota allows.",
    ),
    click.option(
        "--prices",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A price table (JSON, the layout of klstream/backends/prices.json) whose models "
        "replace or add to the shipped ones.",
    ),
]
"""What a run will cost, and at which prices."""
_batch_options_list = [
    click.option(
        "--batch",
        is_flag=True,
        help="Score through batch jobs: half the price, results within a day, no online quota.",
    ),
    click.option(
        "--no-wait",
        is_flag=True,
        help="With --batch: submit the jobs and exit (after the canary job: see --no-canary); "
        "--resume collects the results later.",
    ),
    _bucket_option,
    click.option(
        "--keep-batch-files",
        is_flag=True,
        help="With --batch: keep the uploaded inputs and the outputs after collecting them.",
    ),
    click.option(
        "--batch-fallback",
        type=click.Choice(["none", "online"]),
        default="none",
        show_default=True,
        help="With --batch: score online what the jobs left unanswered (failed, expired, ...).",
    ),
    click.option(
        "--batch-max-requests",
        type=click.IntRange(min=1),
        help="With --batch: requests per job (default 50,000).",
    ),
    click.option(
        "--batch-max-tokens",
        type=click.IntRange(min=1),
        help="With --batch: estimated tokens per job, input (at 4 characters a token for the "
        "prompt, as the dry run) and output (default 20,000,000); a job is cut when it or "
        "--batch-max-requests is reached.",
    ),
    click.option(
        "--no-canary",
        is_flag=True,
        help="With --batch: submit the bulk at once, without first proving with a canary job "
        "of a few lines that batch lines come back with logprobs.",
    ),
    _poll_option,
    click.option(
        "--batch-settle-seconds",
        type=click.FloatRange(min=0.0),
        default=60.0,
        show_default=True,
        help="With --batch: how long a create that got no reply may take to show in the "
        "service's job list, before klstream concludes it made nothing.",
    ),
    click.option(
        "--max-rounds",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="With --batch and --lookahead above 1: rounds of jobs, each over the positions "
        "the previous left uncovered; the rest waits for --resume. --lookahead auto is 4 in "
        "batch, sampled at --temperature.",
    ),
]
"""The options of batch mode, shared by `score` and `run`."""
_results_options = [
    click.option(
        "--resume",
        is_flag=True,
        help="Continue a run: skip what is scored, retry what failed.",
    ),
    click.option("--overwrite", is_flag=True, help="Discard this Model 2's results first."),
    click.option(
        "--checkpoint-rows",
        type=click.IntRange(min=1),
        default=256,
        show_default=True,
        help="Write a checkpoint part every N results...",
    ),
    click.option(
        "--checkpoint-seconds",
        type=click.FloatRange(min=0.1),
        default=10.0,
        show_default=True,
        help="...or every T seconds.",
    ),
]
"""Where results go and what happens to the ones already there."""


def _score_flags(output_options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """The options of `score` and `run` in sections, in the spec's names where it has them;
    ``output_options`` lead the output section (the input and output of `run`)."""

    def decorate(function: Any) -> Any:
        return _apply(
            function,
            [
                cloup.option_group("Endpoint", *_endpoint_options),
                cloup.option_group("What to ask", *_ask_options),
                cloup.option_group("Cost", *_cost_options),
                cloup.option_group("Retries and concurrency", *_retry_options),
                cloup.option_group("Batch mode", *_batch_options_list),
                cloup.option_group("Input and output", *output_options, *_results_options),
            ],
        )

    return decorate


def _thinking_budget(value: str) -> ThinkingBudget:
    from klstream.backends.base import AUTO_THINKING

    word = value.lower()
    if word == AUTO_THINKING:
        return AUTO_THINKING
    if word == "none":
        return None
    try:
        return int(value)
    except ValueError as error:
        raise click.BadParameter(
            "an integer, `none` or `auto`", param_hint="--thinking-budget"
        ) from error


def _lookahead(value: str) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise click.BadParameter("a number of tokens >= 1, or `auto`", param_hint="--lookahead")
    return tokens


def _dry_run_options(params: dict[str, Any]) -> DryRunOptions | None:
    """The dry run's options, or None for a real run (refusing its options without it)."""
    from klstream.scoring.dryrun import DryRunOptions

    if not params["dry_run"]:
        for name in ("calibrate", "rpm", "tpm"):
            if params[name] is not None:
                raise click.UsageError(f"--{name} goes with --dry-run")
        return None
    return DryRunOptions(params["calibrate"] or 0, params["rpm"], params["tpm"])


def _retry_policy(params: dict[str, Any]) -> RetryPolicy:
    from klstream.backends.transport import RetryPolicy

    return RetryPolicy(max_retries=params["max_retries"])


def _endpoint(params: dict[str, Any]) -> Endpoint:
    from klstream.backends import endpoint_from_environment

    return endpoint_from_environment(
        params["backend"],
        params["project_id"],
        params["location"],
        params["base_url"],
        params["timeout"],
        params.get("dialect", "auto"),
    )


def _batch_options(params: dict[str, Any]) -> BatchOptions | None:
    from klstream.scoring.options import BatchOptions

    if not params["batch"]:
        return None
    poll_max = params["batch_poll_seconds"]
    return BatchOptions(
        bucket_name=params["bucket_name"],
        wait=not params["no_wait"],
        keep_files=params["keep_batch_files"],
        fallback_online=params["batch_fallback"] == "online",
        max_requests=params["batch_max_requests"],
        max_tokens=params["batch_max_tokens"],
        canary=not params["no_canary"],
        max_rounds=params["max_rounds"],
        poll_initial_s=min(5.0, poll_max),
        poll_max_s=poll_max,
        create_settle_s=params["batch_settle_seconds"],
    )


def _score_options(params: dict[str, Any]) -> ScoreOptions:
    from klstream.scoring.options import ScoreOptions

    if params["resume"] and params["overwrite"]:
        raise click.UsageError(
            "--resume continues the results there are and --overwrite replaces them: choose one"
        )
    return ScoreOptions(
        model2=params["model2"],
        top_logprobs=params["top_logprobs"],
        max_concurrent=params["max_concurrent"],
        policy=_retry_policy(params),
        thinking_budget=_thinking_budget(params["thinking_budget"]),
        checkpoint_rows=params["checkpoint_rows"],
        checkpoint_seconds=params["checkpoint_seconds"],
        resume=params["resume"],
        overwrite=params["overwrite"],
        method=params["method"],
        batch=_batch_options(params),
        lookahead=_lookahead(params["lookahead"]),
        decoding=params["lookahead_decoding"],
        temperature=params["temperature"],
        prices=params["prices"],
        require_model_version=params["require_model_version"],
    )


def program_words() -> list[str]:
    """How to invoke this very klstream again from the user's shell: by name when the shell
    finds this one on PATH, else by the path of the interpreter or script that is running."""
    script = Path(sys.argv[0])
    if script.name == "__main__.py":
        python = "python3" if shutil.which("python3") == sys.executable else sys.executable
        return [python, "-m", "klstream"]
    found = shutil.which(script.name)
    if found is not None and Path(found).resolve() == script.resolve():
        return [script.name]
    return [str(script.resolve())]


def resume_command(ctx: click.Context) -> str:
    """The command that continues this run: as invoked, with every option the user gave, and
    ``--resume`` in place of ``--overwrite``."""
    words = [*program_words(), ctx.info_name or ""]
    # Where the run is (arguments, required paths), then which Model 2, then how it is run.
    for param in sorted(
        ctx.command.params, key=lambda param: (not param.required, param.name == "model2")
    ):
        name = param.name or ""
        value = ctx.params.get(name)
        if name in ("resume", "overwrite", "no_wait"):
            continue
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            flag = max(param.opts, key=len)
            if getattr(param, "is_flag", False):
                words += [flag] if value else []
            else:
                words += [flag, str(value)]
    return shlex.join([*words, "--resume"])


def _warn_about_answers(capabilities: Capabilities | None) -> None:
    """What the first answer showed that the user should know (another model answered)."""
    for warning in capabilities.warnings() if capabilities is not None else []:
        click.echo(f"warning: {warning}", err=True)


def _report_score(report: ScoreReport, model2: str) -> None:
    from klstream.backends.prices import cost_line

    _warn_about_answers(report.capabilities)
    stats, calls = report.stats, report.stats.calls
    if report.batch is not None:
        _report_batch(report, model2)
        return
    rate = calls.requests / calls.elapsed if calls.elapsed else 0.0
    click.echo(
        f"score {model2}: {thousands(stats.scored)} scored, {thousands(stats.failed)} failed, "
        f"{thousands(stats.already_done)} already done, of {thousands(stats.total)} positions; "
        f"{thousands(calls.requests)} "
        f"requests ({thousands(calls.retries)} retries, {thousands(calls.rate_limited)} "
        f"rate-limited, concurrency "
        f"lowered {thousands(calls.concurrency_cuts)} times) in "
        f"{calls.elapsed:.1f}s, {rate:.1f} req/s"
    )
    click.echo(cost_line(calls.requests, stats.scored, stats.usage, report.price, report.decoding))
    if report.kl is not None:
        click.echo(f"kl: {thousands(report.kl.scored)} positions with KL -> {report.kl.path}")
    _report_served(stats.served_elsewhere, model2)
    if report.stopped_because:
        click.echo(f"stopped early: {report.stopped_because}", err=True)


def _report_served(elsewhere: Counter[str], model2: str) -> None:
    """Answers another model gave than the one asked for: a reader must not miss them."""
    if elsewhere:
        served = ", ".join(
            f"{name} ({thousands(count)})" for name, count in elsewhere.most_common()
        )
        click.echo(
            f"note: {thousands(sum(elsewhere.values()))} answers came from another model than "
            f"{model2}: "
            f"{served} (--require-model-version stops instead)",
            err=True,
        )


def _report_batch(report: ScoreReport, model2: str) -> None:
    stats, batch = report.stats, report.batch
    assert batch is not None
    jobs = ", ".join(f"{thousands(n)} {state.lower()}" for state, n in sorted(batch.jobs.items()))
    click.echo(
        f"score {model2} (batch): {thousands(stats.scored)} scored, {thousands(stats.failed)} "
        f"failed, "
        f"{thousands(stats.already_done)} already done, of {thousands(stats.total)} positions; "
        f"jobs: {jobs or 'none'}, "
        f"{thousands(batch.positions_in_jobs)} positions in jobs not collected yet; "
        f"{batch.rounds} round{'s' if batch.rounds != 1 else ''}"
    )
    if report.kl is not None:
        click.echo(f"kl: {thousands(report.kl.scored)} positions with KL -> {report.kl.path}")
    if report.stopped_because:
        click.echo(f"stopped early: {report.stopped_because}", err=True)


def _submitted_only(report: ScoreReport) -> bool:
    """`--no-wait` did what it was asked: every job submitted, nothing stopped."""
    batch = report.batch
    return batch is not None and not batch.waited and report.stopped_because is None


def _report_submitted() -> None:
    command = resume_command(click.get_current_context())
    click.echo(f"batch jobs submitted; collect their results with: {command}")


def _incomplete(report: ScoreReport) -> E.RunIncomplete:
    command = resume_command(click.get_current_context())
    return E.RunIncomplete(
        f"{thousands(report.remaining)} positions remain unscored; continue with: {command}",
        report.remaining,
    )


def _warn_about_price(model2: str, prices: Path | None) -> None:
    """One line on stderr when the entry that prices the run is old, past its announced prices,
    or for a retired model (a bad ``--prices`` file stops the run here, before any request)."""
    from datetime import date

    from klstream.backends.prices import entry_warnings, load_prices, price_for

    entry = price_for(model2, load_prices(prices))
    warnings = entry_warnings(entry, date.today()) if entry is not None else []
    if warnings:
        click.echo(
            f"warning: {'; '.join(warnings)}. `klstream prices --model {model2}` shows the entry; "
            "--prices FILE replaces it",
            err=True,
        )


@main.command()
@click.option("--model", help="Show only the entry a run with --model2 MODEL would use.")
@click.option(
    "--prices",
    "prices_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A price table over the shipped one, as `score --prices` takes it.",
)
def prices(model: str | None, prices_path: Path | None) -> None:
    """The price entries runs use: prices, the date they were read, source, age, retirement."""
    from datetime import date

    from klstream.backends.prices import (
        SHIPPED,
        describe_entry,
        entry_warnings,
        load_prices,
        price_for,
        shipped_prices,
        unpriced,
    )

    table, today = load_prices(prices_path), date.today()
    if model is None:
        for entry in table.values():
            click.echo("\n".join(describe_entry(entry, today)))
        click.echo("USD per 1,000,000 tokens; thinking is billed as output.")
        return
    found = price_for(model, table)
    if found is None:
        click.echo(unpriced(model))
        return
    origin = SHIPPED if shipped_prices().get(found.model) is found else prices_path
    click.echo(f"{model} is priced by the entry {found.model} of {origin}")
    click.echo("\n".join(describe_entry(found, today)))
    for warning in entry_warnings(found, today):
        click.echo(f"warning: {warning}")


@main.command()
@run_dir_argument
@_score_flags([])
def score(run_dir: Path, **params: Any) -> None:
    """Ask Model 2 for its top-k logprobs at every position (prefilled with Model 1's tokens).

    Ends with the KL pass, so `export` can follow at once. Examples:

    \b
      klstream score runs/demo --model2 gemini-2.5-flash --dry-run
      klstream score runs/demo --model2 gemini-2.5-flash --resume
      klstream score runs/demo --model2 toy-d0.5 --base-url http://127.0.0.1:8765
      klstream score runs/demo --model2 my-model --backend openai --base-url http://host:8000/v1
    """
    from klstream.pipeline import score as score_run
    from klstream.progress import ProgressLine
    from klstream.scoring.dryrun import dry_run, format_dry_run

    options = _score_options(params)
    _warn_about_price(options.model2, options.prices)
    dry = _dry_run_options(params)
    if dry is not None:
        endpoint = _endpoint(params) if dry.calibrate else None
        click.echo(format_dry_run(dry_run(run_dir, options, dry, endpoint)))
        return
    progress = ProgressLine(enabled=sys.stderr.isatty())
    try:
        report = score_run(run_dir, options, _endpoint(params), on_progress=progress.update)
    finally:
        progress.close()
    _report_score(report, options.model2)
    if report.remaining and _submitted_only(report):
        _report_submitted()
    elif report.remaining:
        raise _incomplete(report)


@main.command()
@cloup.option_group("What to ask", _model2_option, _top_logprobs_option, _thinking_option)
@_endpoint_groups
@cloup.option_group(
    "Batch mode",
    click.option(
        "--batch",
        is_flag=True,
        help="Also run a canary batch job of a few lines (minutes to hours on a real service).",
    ),
    click.option(
        "--batch-timeout",
        type=click.FloatRange(min=0.0, min_open=True),
        default=600.0,
        show_default=True,
        help="With --batch: seconds to wait for the canary job before cancelling it.",
    ),
    _bucket_option,
    _poll_option,
)
def check(**params: Any) -> None:
    """Can Model 2 be scored here, and how? A few tiny requests, then one row of findings.

    Exit 0 when some method works (the last line says which, with its flags), 5 when none
    does, with the cause and the fix.
    """
    from klstream.preflight import CheckOptions
    from klstream.preflight import check as check_model

    options = CheckOptions(
        model2=params["model2"],
        top_logprobs=params["top_logprobs"],
        thinking_budget=_thinking_budget(params["thinking_budget"]),
        batch=params["batch"],
        batch_timeout_s=params["batch_timeout"],
        bucket_name=params["bucket_name"],
        poll_initial_s=min(1.0, params["batch_poll_seconds"]),
        poll_max_s=params["batch_poll_seconds"],
        policy=_retry_policy(params),
    )
    report = check_model(_endpoint(params), options)
    click.echo(report.row())
    for line in report.details():
        click.echo(f"  {line}")
    if not report.scorable:
        causes = "; ".join(f"{method}: {_message(e)}" for method, e in report.causes.items())
        raise E.ModelCannotScore(
            f"{report.model2} cannot be scored on the {report.backend} backend at {report.url} "
            f"by any method klstream has. {causes}"
        )
    click.echo(_check_verdict(report))


def _check_verdict(report: CheckReport) -> str:
    """Which methods work, as the flags of `score` and `run` that select them."""

    def flags(options: dict[str, Any]) -> str:
        words = []
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            words += [flag] if value is True else [flag, "none" if value is None else str(value)]
        return " ".join(words)

    online = [flags(options) for method, options in report.methods.items() if method != "batch"]
    line = f"{report.model2} can be scored here with " + ", or ".join(online)
    if "batch" in report.methods:
        line += f"; in batch jobs with {flags(report.methods['batch'])}"
    return line


@main.command()
@cloup.option_group(
    "What to ask",
    click.option("--model", required=True, help="Model 1, e.g. gemini-2.5-flash-lite."),
    click.option(
        "--num-samples",
        type=click.IntRange(min=1),
        default=5,
        show_default=True,
        help="Responses per prompt.",
    ),
    click.option(
        "--max-tokens",
        type=click.IntRange(min=1),
        default=256,
        show_default=True,
        help="Tokens per response at most.",
    ),
    click.option(
        "--temperature",
        type=click.FloatRange(min=0.0),
        default=1.0,
        show_default=True,
        help="Sampling temperature of Model 1.",
    ),
    click.option(
        "--top-logprobs",
        type=click.IntRange(1, 20),
        default=20,
        show_default=True,
        help="Top-k logprobs recorded per token (the spec's files carry 20).",
    ),
    click.option("--seed", type=int, help="Seed of the first sample (sample j uses seed + j)."),
    _thinking_option,
)
@_endpoint_groups
@cloup.option_group(
    "Input and output",
    click.option(
        "--prompts",
        "prompts_path",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help='Prompts, one per line, or JSON Lines of strings or {"prompt": ...}.',
    ),
    click.option(
        "-o",
        "--output-dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Where the response files go: <model>_prompt_<n>.json, one per prompt.",
    ),
    click.option("--overwrite", is_flag=True, help="Sample again prompts whose file exists."),
)
def sample(prompts_path: Path, output_dir: Path, **params: Any) -> None:
    """Sample Model 1 responses with logprobs, one spec-format JSON file per prompt."""
    from klstream.input.sample import SampleOptions
    from klstream.input.sample import sample as sample_prompts

    options = SampleOptions(
        model=params["model"],
        num_samples=params["num_samples"],
        max_tokens=params["max_tokens"],
        temperature=params["temperature"],
        top_logprobs=params["top_logprobs"],
        max_concurrent=params["max_concurrent"],
        seed=params["seed"],
        thinking_budget=_thinking_budget(params["thinking_budget"]),
        policy=_retry_policy(params),
        overwrite=params["overwrite"],
    )
    report = sample_prompts(prompts_path, output_dir, options, _endpoint(params))
    _warn_about_answers(report.capabilities)
    click.echo(
        f"sample {options.model}: wrote {thousands(len(report.written))} files to {output_dir} "
        f"({thousands(report.skipped_existing)} already there); "
        f"{thousands(report.calls.requests)} requests, "
        f"{thousands(report.calls.retries)} retries"
    )
    if report.failed:
        first = next(iter(report.failed.items()))
        raise click.ClickException(
            f"{thousands(len(report.failed))} prompts failed (prompt {first[0]}: {first[1]}); run "
            f"the same "
            "command again to sample only those"
        )


@main.command(name="run")
@_score_flags(
    [
        click.option(
            "-i",
            "--input-dir",
            required=True,
            type=click.Path(path_type=Path),
            help="Model 1 response files (the spec's input format).",
        ),
        click.option(
            "-o",
            "--output-dir",
            required=True,
            type=click.Path(path_type=Path),
            help="Where the _kl.json files go; the run's Parquet workspace is its run/.",
        ),
        click.option(
            "--pattern", default="*.json", show_default=True, help="Glob for input files."
        ),
        click.option("--max-files", type=click.IntRange(min=1), help="Process at most N files."),
        click.option(
            "--no-report", is_flag=True, help="Do not write report.html beside the results."
        ),
    ]
)
def run_all(
    input_dir: Path,
    output_dir: Path,
    pattern: str,
    max_files: int | None,
    no_report: bool,
    **params: Any,
) -> None:
    """explode → score → export → report in one resumable command, with the spec's flags.

    Examples:

    \b
      klstream run -i responses/ -o results/ --model2 gemini-2.5-flash --dry-run
      klstream run -i responses/ -o results/ --model2 gemini-2.5-flash
      klstream run -i responses/ -o results/ --model2 gemini-2.5-flash --resume
    """
    from klstream.output.export import format_summary
    from klstream.pipeline import RunOptions, dry_run_inputs, run
    from klstream.progress import ProgressLine
    from klstream.scoring.dryrun import format_dry_run

    def exploded(report: ExplodeReport) -> None:
        click.echo(_exploded_line(report, report.positions_path.parent))

    options = RunOptions(
        _score_options(params), pattern=pattern, max_files=max_files, report=not no_report
    )
    _warn_about_price(options.score.model2, options.score.prices)
    dry = _dry_run_options(params)
    if dry is not None:
        endpoint = _endpoint(params) if dry.calibrate else None
        click.echo(format_dry_run(dry_run_inputs(input_dir, output_dir, options, dry, endpoint)))
        return
    progress = ProgressLine(enabled=sys.stderr.isatty())
    try:
        report = run(input_dir, output_dir, options, _endpoint(params), progress.update, exploded)
    finally:
        progress.close()
    _report_score(report.scored, options.score.model2)
    if report.exported is None and _submitted_only(report.scored):
        _report_submitted()
        return
    if report.exported is None:
        raise _incomplete(report.scored)
    click.echo(format_summary(report.exported.summary))
    click.echo(
        f"wrote {thousands(len(report.exported.files))} _kl.json files and "
        f"{report.exported.summary_path.name} to {output_dir}"
    )
    if report.report is not None:
        click.echo(_report_line(report.report))


@main.group()
def batch() -> None:
    """Show or cancel the batch jobs of a run (`score --batch`, `run --batch`)."""


def _batch_job_options(function: Any) -> Any:
    """Which run's jobs, and where the service is."""
    return _apply(function, _batch_endpoint_options)


_batch_endpoint_options = [
    click.option("--model2", help="Only this Model 2's jobs (default: every Model 2's)."),
    click.option(
        "--backend",
        type=click.Choice([name for name, spec in BACKENDS.items() if spec.batch]),
        default="gemini",
        show_default=True,
        help="Where the jobs run.",
    ),
    *_where_options,
    _timeout_option,
]


def _print_jobs(statuses: list[Any]) -> None:
    if not statuses:
        click.echo("no batch jobs")
        return
    for status in statuses:
        m = status.manifest
        state = m.state or "-"
        counts = ""
        if m.stage == "collected":
            counts = f" {thousands(m.scored)} scored, {thousands(m.failed)} failed"
        elif m.service_succeeded is not None:
            done, failed = thousands(m.service_succeeded), thousands(m.service_failed)
            counts = f" service: {done} done, {failed} failed"
        error = f" ({m.error})" if m.error else ""
        click.echo(
            f"{m.model2}  {m.display_name}{' (canary)' if m.canary else ''}  {m.stage}  {state}  "
            f"{thousands(m.positions)} positions"
            f"{counts}  {m.job_name or '-'}{error}"
        )


def _without_batch_jobs(run_dir: Path, model2: str | None) -> bool:
    """Says so where the run has no batch job (of ``model2``): then nothing asks the service,
    and no key is needed."""
    from klstream.storage.rundir import RunDir

    if RunDir(run_dir).batch_manifests(model2):
        return False
    click.echo(f"no batch jobs{f' for {model2}' if model2 else ''} in {run_dir}")
    return True


@batch.command("status")
@run_dir_argument
@_batch_job_options
@click.option("--offline", is_flag=True, help="Show the manifests without asking the service.")
def batch_status_command(run_dir: Path, offline: bool, **params: Any) -> None:
    """Each job: its stage here, its state on the service, its positions and counts."""
    from klstream.scoring.batch import batch_status

    if _without_batch_jobs(run_dir, params["model2"]):
        return
    endpoint = None if offline else _endpoint(params)
    _print_jobs(batch_status(run_dir, params["model2"], endpoint))


@batch.command("cancel")
@run_dir_argument
@_batch_job_options
def batch_cancel_command(run_dir: Path, **params: Any) -> None:
    """Cancel every job that may be queued or running; --resume later collects what they
    answered and submits the rest again."""
    from klstream.scoring.batch import batch_cancel

    if _without_batch_jobs(run_dir, params["model2"]):
        return
    cancelled = batch_cancel(run_dir, _endpoint(params), params["model2"])
    click.echo(f"cancelled {thousands(len(cancelled))} batch jobs")
    _print_jobs(cancelled)
