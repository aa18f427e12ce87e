"""The command line's help as a newcomer reads it: every option explained, `score` and `run` in
sections, the command list whole, and one vocabulary for where output goes."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from klstream.cli import COMMAND_SECTIONS, main


def _commands(
    group: click.Group, ctx: click.Context, path: str = "klstream"
) -> Iterator[tuple[str, click.Command]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, ctx, f"{path} {name}")


ALL_COMMANDS = list(_commands(main, click.Context(main)))


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"{path} {max(param.opts, key=len)}"
        for path, command in ALL_COMMANDS
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == []


def test_every_command_sits_in_one_section_of_the_top_level_help() -> None:
    listed = [name for names in COMMAND_SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(main.list_commands(click.Context(main)))


def test_the_top_level_help_shows_whole_descriptions() -> None:
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    for title in COMMAND_SECTIONS:
        assert f"\n{title}:\n" in result.output
    flowing = " ".join(result.output.split())
    for section in main.list_sections(click.Context(main)):
        for name, command in section.list_commands():
            summary = " ".join(command.get_short_help_str().split())
            assert len(summary) > 40, name
            assert f"{name} {summary}" in flowing


@pytest.mark.parametrize("command", ["score", "run"])
def test_score_and_run_help_come_in_sections_with_examples(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0
    headings = [
        line.rstrip(":")
        for line in result.output.splitlines()
        if line.endswith(":") and not line.startswith(" ")
    ]
    assert headings[:6] == [
        "Endpoint",
        "What to ask",
        "Cost",
        "Retries and concurrency",
        "Batch mode",
        "Input and output",
    ]
    assert f"  klstream {command} " in result.output
    endpoint = result.output.index("Endpoint:")
    assert endpoint < result.output.index("\n  --backend ") < result.output.index("What to ask:")


def _output_options(command: click.Command) -> list[click.Option]:
    return [
        param
        for param in command.params
        if isinstance(param, click.Option) and any(o.startswith("--output") for o in param.opts)
    ]


def test_output_goes_by_one_rule_minus_o_for_a_directory_or_a_file() -> None:
    """-o names where a command writes: --output-dir for a directory, --output for a file."""
    seen = {}
    for path, command in ALL_COMMANDS:
        for option in _output_options(command):
            assert "-o" in option.opts, path
            long = max(option.opts, key=len)
            is_file = isinstance(option.type, click.Path) and not option.type.dir_okay
            assert long == ("--output" if is_file else "--output-dir"), path
            seen[path] = long
    assert seen["klstream explode"] == seen["klstream export"] == "--output-dir"
    assert seen["klstream run"] == seen["klstream sample"] == "--output-dir"
    assert seen["klstream report"] == seen["klstream query"] == seen["klstream top"] == "--output"
