"""The ``klstream`` command line: a thin layer over the library's stage functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from klstream import __version__
from klstream.errors import KlstreamError


class _Group(click.Group):
    """Turns a :class:`KlstreamError` into one clear line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KlstreamError as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="klstream")
def main() -> None:
    """Where, and by how much, do two language models' next-token distributions disagree?

    The dataflow: explode → score → kl → export; query runs SQL over any stage's output.
    """


run_dir_argument = click.argument(
    "run_dir", type=click.Path(file_okay=False, path_type=Path)
)


@main.command()
@click.argument("input_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory to create (positions.parquet, responses.parquet).")
@click.option("--pattern", default="*.json", show_default=True, help="Glob for input files.")
@click.option("--max-files", type=click.IntRange(min=1), help="Process at most N files.")
@click.option("--skip-invalid", is_flag=True,
              help="Record invalid responses in skipped.parquet and go on, instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run's positions.")
def explode(
    input_dir: Path, run_dir: Path, pattern: str, max_files: int | None,
    skip_invalid: bool, overwrite: bool,
) -> None:
    """Explode Model 1 response files into a Parquet table of token positions."""
    from klstream.explode import explode as explode_inputs

    report = explode_inputs(
        input_dir, run_dir, pattern=pattern, max_files=max_files,
        skip_invalid=skip_invalid, overwrite=overwrite,
    )
    click.echo(
        f"exploded {report.files} files: {report.responses} responses, "
        f"{report.positions} positions -> {run_dir}"
    )
    if report.responses_text_mismatch:
        click.echo(
            f"warning: {report.responses_text_mismatch} responses' tokens do not reproduce their "
            "text (tokens_match_text = false in responses.parquet); their prefills follow the "
            "tokens",
            err=True,
        )
    if report.skipped:
        click.echo(f"skipped {report.skipped} invalid responses: see {report.skipped_path}",
                   err=True)


@main.command()
@run_dir_argument
@click.option("--model2", required=True, help="Model 2 whose scores to use.")
def kl(run_dir: Path, model2: str) -> None:
    """Recompute the per-position KL table of one Model 2 from its scores."""
    from klstream.kl import compute_kl

    report = compute_kl(run_dir, model2)
    click.echo(
        f"kl: {report.scored} of {report.positions} positions scored "
        f"({report.failed} failed, {report.unscored} unscored) -> {report.path}"
    )


@main.command()
@run_dir_argument
@click.option("-o", "--output-dir", required=True, type=click.Path(path_type=Path),
              help="Where to write <stem>_kl.json files and summary.json.")
@click.option("--model2", help="Which Model 2 to export (needed when the run has several).")
def export(run_dir: Path, output_dir: Path, model2: str | None) -> None:
    """Write the spec's <stem>_kl.json files and a run summary."""
    from klstream.export import export as export_run
    from klstream.export import format_summary

    report = export_run(run_dir, output_dir, model2)
    click.echo(format_summary(report.summary))
    click.echo(f"wrote {len(report.files)} _kl.json files and {report.summary_path.name} "
               f"to {output_dir}")


@main.command()
@run_dir_argument
@click.argument("sql")
@click.option("--format", "output_format", default="table", show_default=True,
              type=click.Choice(["table", "csv", "json", "parquet"]))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result to this file instead of printing it.")
@click.option("--max-rows", default=40, show_default=True, help="Rows to print as a table.")
def query(run_dir: Path, sql: str, output_format: str, output: Path | None, max_rows: int) -> None:
    """Run SQL over the run's views: positions, responses, scores, kl, response_stats, ..."""
    from klstream.query import run_query

    click.echo(run_query(run_dir, sql, output_format, output, max_rows))  # type: ignore[arg-type]


@main.command()
@run_dir_argument
def views(run_dir: Path) -> None:
    """Print SQL that creates the run's views, for the duckdb CLI: duckdb -init FILE."""
    from klstream.rundir import views_script

    click.echo(views_script(run_dir), nl=False)
