"""explode: each column as given, row order, errors naming file and JSON path, no partial output."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from cli import invoke
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import Token, make_input, make_response, write_input

from klstream.errors import InputError, KlstreamError, PositionsExist
from klstream.input import explode as explode_module
from klstream.input import validate as validate_module
from klstream.input.explode import explode
from klstream.storage.schemas import POSITIONS, RESPONSES, SKIPPED

HELLO: list[Token] = [
    ("Hel", 10, -0.25, [("Hel", 10, -0.25), ("Hi", 11, -2.5), ("Hel", 10, -0.25)]),
    ("lo", 12, -0.5, [("lo", 12, -0.5), ("p", 13, -1.5), ("y", 14, -3.0)]),
]


def good_input() -> dict[str, Any]:
    """Two valid responses; the malformed corpus below breaks the second one."""
    return make_input("Say hello", "model-a", [HELLO, HELLO])


def rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = pq.read_table(run_dir / name).to_pylist()
    return table


def output_bytes(run_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(run_dir.iterdir())}


def test_every_column_row_order_and_schemas(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    mismatched = make_response(
        [
            ("caf", None, -0.125, [("caf", None, -0.125)]),
            ("\ufffd", None, 0, [("\ufffd", None, 0)]),
        ],
        text="café",
        model="model-b",
    )
    write_input(inputs, "b", make_input("Say hello", "model-a", [HELLO, [], mismatched]))
    write_input(inputs, "a", make_input("Wörld?", "model-c", [[("ö", 7, -1.0, [("ö", 7, -1.0)])]]))

    report = explode(inputs, tmp_path / "run")

    positions = pq.read_table(report.positions_path)
    responses = pq.read_table(report.responses_path)
    assert positions.schema == POSITIONS
    assert responses.schema == RESPONSES
    assert positions.to_pylist() == [
        {"stem": "a", "response_index": 0, "position": 0, "token": "ö", "token_id": 7,
         "logprob": -1.0, "top_tokens": ["ö"], "top_token_ids": [7], "top_logprobs": [-1.0],
         "char_offset": 0},
        {"stem": "b", "response_index": 0, "position": 0, "token": "Hel", "token_id": 10,
         "logprob": -0.25, "top_tokens": ["Hel", "Hi", "Hel"], "top_token_ids": [10, 11, 10],
         "top_logprobs": [-0.25, -2.5, -0.25], "char_offset": 0},
        {"stem": "b", "response_index": 0, "position": 1, "token": "lo", "token_id": 12,
         "logprob": -0.5, "top_tokens": ["lo", "p", "y"], "top_token_ids": [12, 13, 14],
         "top_logprobs": [-0.5, -1.5, -3.0], "char_offset": 3},
        {"stem": "b", "response_index": 2, "position": 0, "token": "caf", "token_id": None,
         "logprob": -0.125, "top_tokens": ["caf"], "top_token_ids": [None],
         "top_logprobs": [-0.125], "char_offset": 0},
        {"stem": "b", "response_index": 2, "position": 1, "token": "\ufffd", "token_id": None,
         "logprob": 0.0, "top_tokens": ["\ufffd"], "top_token_ids": [None], "top_logprobs": [0.0],
         "char_offset": 3},
    ]  # fmt: skip
    source_a, source_b = str(inputs / "a.json"), str(inputs / "b.json")
    assert responses.to_pylist() == [
        {"stem": "a", "response_index": 0, "prompt": "Wörld?", "model1": "model-c", "text": "ö",
         "num_tokens": 1, "tokens_match_text": True, "source_path": source_a},
        {"stem": "b", "response_index": 0, "prompt": "Say hello", "model1": "model-a",
         "text": "Hello", "num_tokens": 2, "tokens_match_text": True, "source_path": source_b},
        {"stem": "b", "response_index": 1, "prompt": "Say hello", "model1": "model-a", "text": "",
         "num_tokens": 0, "tokens_match_text": True, "source_path": source_b},
        {"stem": "b", "response_index": 2, "prompt": "Say hello", "model1": "model-b",
         "text": "café", "num_tokens": 2, "tokens_match_text": False, "source_path": source_b},
    ]  # fmt: skip
    assert (report.files, report.responses, report.positions) == (2, 4, 5)
    assert (report.skipped, report.responses_text_mismatch, report.skipped_path) == (0, 1, None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock",
        "inputs.json",
        "positions.parquet",
        "responses.parquet",
    ]


def test_char_offset_is_the_prefill_length_in_characters(tmp_path: Path) -> None:
    tokens = ["日本", "語", "🙂", " ok", ""]
    response: list[Token] = [(token, None, -1.0, [(token, None, -1.0)]) for token in tokens]
    write_input(tmp_path / "in", "x", make_input("p", "m", [response]))
    report = explode(tmp_path / "in", tmp_path / "run")
    text = "".join(tokens)
    for row, token in zip(rows(tmp_path / "run", "positions.parquet"), tokens, strict=True):
        assert text[row["char_offset"] :].startswith(token)
        assert text[: row["char_offset"]] == "".join(tokens[: row["position"]])
    assert report.responses_text_mismatch == 0


def test_model_falls_back_to_the_file_model_and_null_means_absent(tmp_path: Path) -> None:
    data = make_input("p", "file-model", [make_response(HELLO, model="own-model"), HELLO])
    data["responses"][1]["model"] = None
    write_input(tmp_path / "in", "x", data)
    explode(tmp_path / "in", tmp_path / "run")
    models = [row["model1"] for row in rows(tmp_path / "run", "responses.parquet")]
    assert models == ["own-model", "file-model"]


def test_file_without_responses_is_valid(tmp_path: Path) -> None:
    write_input(tmp_path / "in", "empty", make_input("p", "m", []))
    report = explode(tmp_path / "in", tmp_path / "run")
    assert (report.files, report.responses, report.positions) == (1, 0, 0)
    assert pq.read_table(report.positions_path).schema == POSITIONS


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    text = json.dumps(good_input())
    write_input(tmp_path / "in", "bom", b"\xef\xbb\xbf" + text.encode())
    assert explode(tmp_path / "in", tmp_path / "run").positions == 4


def test_small_files_share_row_groups(tmp_path: Path) -> None:
    for index in range(30):
        write_input(tmp_path / "in", f"f{index:02d}", good_input())
    report = explode(tmp_path / "in", tmp_path / "run")
    assert report.positions == 120
    assert pq.ParquetFile(report.positions_path).metadata.num_row_groups == 1


def test_recursive_pattern_sorts_by_stem_and_ignores_directories(tmp_path: Path) -> None:
    write_input(tmp_path / "in" / "a", "zeta", good_input())
    write_input(tmp_path / "in" / "b", "alpha", good_input())
    (tmp_path / "in" / "dir.json").mkdir()
    report = explode(tmp_path / "in", tmp_path / "run", pattern="**/*.json")
    stems = [row["stem"] for row in rows(tmp_path / "run", "responses.parquet")]
    assert stems == ["alpha", "alpha", "zeta", "zeta"]
    assert report.files == 2


def test_max_files_takes_the_first_files_in_sorted_order(tmp_path: Path) -> None:
    for stem in ("c", "a", "b"):
        write_input(tmp_path / "in", stem, good_input())
    report = explode(tmp_path / "in", tmp_path / "run", max_files=2)
    assert report.files == 2
    assert {row["stem"] for row in rows(tmp_path / "run", "responses.parquet")} == {"a", "b"}


def test_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    write_input(tmp_path / "in", "x", good_input())
    explode(tmp_path / "in", tmp_path / "run")
    before = output_bytes(tmp_path / "run")
    with pytest.raises(PositionsExist, match="positions.parquet already exists"):
        explode(tmp_path / "in", tmp_path / "run")
    assert output_bytes(tmp_path / "run") == before
    refused = invoke("explode", tmp_path / "in", "-o", tmp_path / "run")
    assert refused.exit_code == 4
    assert "pass --overwrite to replace them, or pick another run dir" in refused.output

    write_input(tmp_path / "in", "y", good_input())
    assert explode(tmp_path / "in", tmp_path / "run", overwrite=True).files == 2


def test_overwrite_without_skip_invalid_removes_a_stale_skipped_file(tmp_path: Path) -> None:
    write_input(tmp_path / "in", "x", good_input())
    write_input(tmp_path / "in", "y", "not json")
    assert explode(tmp_path / "in", tmp_path / "run", skip_invalid=True).skipped == 1
    (tmp_path / "in" / "y.json").unlink()
    explode(tmp_path / "in", tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run" / "skipped.parquet").exists()


def test_an_interrupted_run_leaves_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for stem in ("a", "b"):
        write_input(tmp_path / "in", stem, good_input())
    (tmp_path / "run").mkdir()
    read_json = validate_module.read_json

    def interrupted_at_b(path: Path) -> object:
        if path.stem == "b":
            raise KeyboardInterrupt
        return read_json(path)

    monkeypatch.setattr(explode_module, "read_json", interrupted_at_b)
    with pytest.raises(KeyboardInterrupt):
        explode(tmp_path / "in", tmp_path / "run", skip_invalid=True)
    # Only the (released, empty) lock file of the directory that existed before.
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    assert (tmp_path / "run" / ".lock").read_bytes() == b""


def test_skip_invalid_with_everything_skipped_writes_empty_outputs(tmp_path: Path) -> None:
    write_input(tmp_path / "in", "x", "[]")
    report = explode(tmp_path / "in", tmp_path / "run", skip_invalid=True)
    assert (report.responses, report.positions, report.skipped) == (0, 0, 1)
    assert pq.read_table(report.positions_path).schema == POSITIONS
    assert pq.read_table(report.responses_path).schema == RESPONSES
    assert report.skipped_path is not None
    assert pq.read_table(report.skipped_path).schema == SKIPPED


@pytest.mark.parametrize(
    ("layout", "pattern", "message"),
    [
        ({}, "*.json", "(the directory is empty)"),
        ({"notes.txt": "hi"}, "*.json", "the pattern '*.json' matches no file in"),
        ({"a/x.json": "{}", "b/x.json": "{}"}, "**/*.json", "have the same stem 'x'"),
    ],
    ids=["empty-dir", "no-match", "duplicate-stem"],
)
def test_directory_problems_always_raise(
    tmp_path: Path, layout: dict[str, str], pattern: str, message: str
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, text in layout.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_text(text)
    with pytest.raises(KlstreamError) as raised:
        explode(inputs, tmp_path / "run", pattern=pattern, skip_invalid=True)
    assert message in str(raised.value)
    assert str(inputs) in str(raised.value)
    for name in layout:
        if name.endswith("x.json"):
            assert str(inputs / name) in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_a_file_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Path(os.fsdecode(os.fsencode(inputs) + b"/\xff.json")).write_text(json.dumps(good_input()))
    with pytest.raises(KlstreamError, match="is not valid UTF-8: rename it"):
        explode(inputs, tmp_path / "run")


def test_missing_input_dir_input_file_and_bad_max_files(tmp_path: Path) -> None:
    with pytest.raises(KlstreamError, match="does not exist"):
        explode(tmp_path / "nowhere", tmp_path / "run")
    write_input(tmp_path, "file", good_input())
    with pytest.raises(KlstreamError, match="is not a directory"):
        explode(tmp_path / "file.json", tmp_path / "run")
    with pytest.raises(KlstreamError, match="max_files must be at least 1, got 0"):
        explode(tmp_path, tmp_path / "run", max_files=0)


def edited(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The good input with one edit applied."""
    data = good_input()
    edit(data)
    return data


def second_response(data: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = data["responses"][1]
    return response


def second_position(data: dict[str, Any]) -> dict[str, Any]:
    position: dict[str, Any] = second_response(data)["logprobs"]["content"][1]
    return position


def third_alternative(data: dict[str, Any]) -> dict[str, Any]:
    alternative: dict[str, Any] = second_position(data)["top_logprobs"][2]
    return alternative


def without_file_model(data: dict[str, Any]) -> None:
    del data["model"]
    data["responses"][0]["model"] = "model-a"


@dataclass(frozen=True)
class Malformed:
    kind: str
    content: dict[str, Any] | str | bytes
    json_path: str
    reason: str
    response_index: int | None
    """The response skipped under skip_invalid; None when the whole file is skipped."""


POSITION = "$.responses[1].logprobs.content[1]"
ALTERNATIVE = f"{POSITION}.top_logprobs[2]"

MALFORMED = [
    Malformed(
        "invalid-json",
        '{"prompt": "p" "responses": []}',
        "$",
        "invalid JSON: Expecting ',' delimiter at line 1 column 16",
        None,
    ),
    Malformed("empty-file", "", "$", "invalid JSON: the file is empty", None),
    Malformed(
        "integer-too-long-to-parse",
        '{"prompt": ' + "1" * 5000 + "}",
        "$",
        "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion",
        None,
    ),
    Malformed("nested-too-deeply", "[" * 100_000, "$", "invalid JSON: nested too deeply", None),
    Malformed(
        "not-utf8",
        b'{"prompt": "\xff"}',
        "$",
        "not valid UTF-8: byte 0xff at offset 12 (invalid start byte)",
        None,
    ),
    Malformed(
        "top-level-list", "[1]", "$", "expected a JSON object at the top level, got a list", None
    ),
    Malformed(
        "missing-prompt",
        edited(lambda d: d.pop("prompt")),
        "$.prompt",
        "missing required key 'prompt'",
        None,
    ),
    Malformed(
        "prompt-not-string",
        edited(lambda d: d.update(prompt=42)),
        "$.prompt",
        "expected a string, got 42",
        None,
    ),
    Malformed(
        "prompt-lone-surrogate",
        json.dumps(edited(lambda d: d.update(prompt="\ud800!"))),
        "$.prompt",
        'expected valid Unicode text, got "\\ud800!", which holds a lone UTF-16 surrogate',
        None,
    ),
    Malformed(
        "file-model-not-string",
        edited(lambda d: d.update(model=["m"])),
        "$.model",
        "expected a string, got a list",
        None,
    ),
    Malformed(
        "missing-responses",
        edited(lambda d: d.pop("responses")),
        "$.responses",
        "missing required key 'responses'",
        None,
    ),
    Malformed(
        "responses-not-list",
        edited(lambda d: d.update(responses={"0": {}})),
        "$.responses",
        "expected a list, got an object",
        None,
    ),
    Malformed(
        "response-not-object",
        edited(lambda d: d["responses"].__setitem__(1, "oops")),
        "$.responses[1]",
        'expected an object, got "oops"',
        1,
    ),
    Malformed(
        "missing-text",
        edited(lambda d: second_response(d).pop("text")),
        "$.responses[1].text",
        "missing required key 'text'",
        1,
    ),
    Malformed(
        "text-not-string",
        edited(lambda d: second_response(d).update(text=None)),
        "$.responses[1].text",
        "expected a string, got null",
        1,
    ),
    Malformed(
        "no-model-anywhere",
        edited(without_file_model),
        "$.responses[1].model",
        "missing required key 'model': neither the response nor the file names its model",
        1,
    ),
    Malformed(
        "response-model-not-string",
        edited(lambda d: second_response(d).update(model=7)),
        "$.responses[1].model",
        "expected a string, got 7",
        1,
    ),
    Malformed(
        "missing-logprobs",
        edited(lambda d: second_response(d).pop("logprobs")),
        "$.responses[1].logprobs",
        "missing required key 'logprobs'",
        1,
    ),
    Malformed(
        "logprobs-not-object",
        edited(lambda d: second_response(d).update(logprobs=[])),
        "$.responses[1].logprobs",
        "expected an object, got an empty list",
        1,
    ),
    Malformed(
        "missing-content",
        edited(lambda d: second_response(d)["logprobs"].pop("content")),
        "$.responses[1].logprobs.content",
        "missing required key 'content'",
        1,
    ),
    Malformed(
        "content-not-list",
        edited(lambda d: second_response(d)["logprobs"].update(content="x")),
        "$.responses[1].logprobs.content",
        'expected a list, got "x"',
        1,
    ),
    Malformed(
        "token-entry-not-object",
        edited(lambda d: second_response(d)["logprobs"]["content"].__setitem__(1, 5)),
        POSITION,
        "expected an object, got 5",
        1,
    ),
    Malformed(
        "missing-token",
        edited(lambda d: second_position(d).pop("token")),
        f"{POSITION}.token",
        "missing required key 'token'",
        1,
    ),
    Malformed(
        "token-not-string",
        edited(lambda d: second_position(d).update(token=12)),
        f"{POSITION}.token",
        "expected a string, got 12",
        1,
    ),
    Malformed(
        "token-lone-surrogate",
        json.dumps(edited(lambda d: second_position(d).update(token="\ud83d"))),
        f"{POSITION}.token",
        'expected valid Unicode text, got "\\ud83d", which holds a lone UTF-16 surrogate',
        1,
    ),
    Malformed(
        "missing-logprob",
        edited(lambda d: second_position(d).pop("logprob")),
        f"{POSITION}.logprob",
        "missing required key 'logprob'",
        1,
    ),
    Malformed(
        "logprob-string",
        edited(lambda d: second_position(d).update(logprob="-0.5")),
        f"{POSITION}.logprob",
        'expected a number, got "-0.5"',
        1,
    ),
    Malformed(
        "logprob-bool",
        edited(lambda d: second_position(d).update(logprob=True)),
        f"{POSITION}.logprob",
        "expected a number, got true",
        1,
    ),
    Malformed(
        "logprob-positive",
        edited(lambda d: second_position(d).update(logprob=0.5)),
        f"{POSITION}.logprob",
        "expected a finite number <= 0, got 0.5",
        1,
    ),
    Malformed(
        "logprob-nan",
        edited(lambda d: second_position(d).update(logprob=float("nan"))),
        f"{POSITION}.logprob",
        "expected a finite number <= 0, got NaN",
        1,
    ),
    Malformed(
        "logprob-infinity",
        edited(lambda d: second_position(d).update(logprob=float("inf"))),
        f"{POSITION}.logprob",
        "expected a finite number <= 0, got Infinity",
        1,
    ),
    Malformed(
        "logprob-minus-infinity",
        edited(lambda d: second_position(d).update(logprob=float("-inf"))),
        f"{POSITION}.logprob",
        "expected a finite number <= 0, got -Infinity",
        1,
    ),
    Malformed(
        "logprob-overflowing-integer",
        edited(lambda d: second_position(d).update(logprob=-(10**400))),
        f"{POSITION}.logprob",
        f"expected a finite number <= 0, got -1{'0' * 58}...",
        1,
    ),
    Malformed(
        "token-id-float",
        edited(lambda d: second_position(d).update(token_id=3.0)),
        f"{POSITION}.token_id",
        "expected an integer or null, got 3.0",
        1,
    ),
    Malformed(
        "token-id-bool",
        edited(lambda d: second_position(d).update(token_id=False)),
        f"{POSITION}.token_id",
        "expected an integer or null, got false",
        1,
    ),
    Malformed(
        "token-id-string",
        edited(lambda d: second_position(d).update(token_id="12")),
        f"{POSITION}.token_id",
        'expected an integer or null, got "12"',
        1,
    ),
    Malformed(
        "token-id-beyond-int64",
        edited(lambda d: second_position(d).update(token_id=2**63)),
        f"{POSITION}.token_id",
        f"expected an integer that fits in 64 bits, got {2**63}",
        1,
    ),
    Malformed(
        "missing-top-logprobs",
        edited(lambda d: second_position(d).pop("top_logprobs")),
        f"{POSITION}.top_logprobs",
        "missing required key 'top_logprobs'",
        1,
    ),
    Malformed(
        "top-logprobs-not-list",
        edited(lambda d: second_position(d).update(top_logprobs={"token": "x"})),
        f"{POSITION}.top_logprobs",
        "expected a non-empty list, got an object",
        1,
    ),
    Malformed(
        "top-logprobs-empty",
        edited(lambda d: second_position(d).update(top_logprobs=[])),
        f"{POSITION}.top_logprobs",
        "expected a non-empty list, got an empty list",
        1,
    ),
    Malformed(
        "alternative-not-object",
        edited(lambda d: second_position(d)["top_logprobs"].__setitem__(2, None)),
        ALTERNATIVE,
        "expected an object, got null",
        1,
    ),
    Malformed(
        "alternative-missing-token",
        edited(lambda d: third_alternative(d).pop("token")),
        f"{ALTERNATIVE}.token",
        "missing required key 'token'",
        1,
    ),
    Malformed(
        "alternative-token-lone-surrogate",
        json.dumps(edited(lambda d: third_alternative(d).update(token="a\udc00"))),
        f"{ALTERNATIVE}.token",
        'expected valid Unicode text, got "a\\udc00", which holds a lone UTF-16 surrogate',
        1,
    ),
    Malformed(
        "alternative-missing-logprob",
        edited(lambda d: third_alternative(d).pop("logprob")),
        f"{ALTERNATIVE}.logprob",
        "missing required key 'logprob'",
        1,
    ),
    Malformed(
        "alternative-logprob-positive",
        edited(lambda d: third_alternative(d).update(logprob=0.5)),
        f"{ALTERNATIVE}.logprob",
        "expected a finite number <= 0, got 0.5",
        1,
    ),
    Malformed(
        "alternative-logprob-nan",
        edited(lambda d: third_alternative(d).update(logprob=float("nan"))),
        f"{ALTERNATIVE}.logprob",
        "expected a finite number <= 0, got NaN",
        1,
    ),
    Malformed(
        "alternative-token-id-float",
        edited(lambda d: third_alternative(d).update(token_id=1.5)),
        f"{ALTERNATIVE}.token_id",
        "expected an integer or null, got 1.5",
        1,
    ),
]
MALFORMED_IDS = [case.kind for case in MALFORMED]


def write_corpus_case(inputs: Path, case: Malformed) -> Path:
    """A good file ``a_good`` beside the malformed ``b_bad``."""
    write_input(inputs, "a_good", good_input())
    content = copy.deepcopy(case.content) if isinstance(case.content, dict) else case.content
    return write_input(inputs, "b_bad", content)


@pytest.mark.parametrize("case", MALFORMED, ids=MALFORMED_IDS)
def test_malformed_input_raises_and_leaves_no_output(tmp_path: Path, case: Malformed) -> None:
    bad_path = write_corpus_case(tmp_path / "in", case)
    with pytest.raises(InputError) as raised:
        explode(tmp_path / "in", tmp_path / "run")
    error = raised.value
    assert (error.source, error.json_path) == (str(bad_path), case.json_path)
    assert case.reason in error.reason
    assert str(error).startswith(f"{bad_path}: {case.json_path}: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", MALFORMED, ids=MALFORMED_IDS)
def test_failing_overwrite_keeps_the_previous_run(tmp_path: Path, case: Malformed) -> None:
    run_dir = tmp_path / "run"
    write_input(tmp_path / "in", "a_good", good_input())
    explode(tmp_path / "in", run_dir, skip_invalid=True)
    before = output_bytes(run_dir)
    write_corpus_case(tmp_path / "in", case)
    with pytest.raises(InputError):
        explode(tmp_path / "in", run_dir, overwrite=True)
    assert output_bytes(run_dir) == before


@pytest.mark.parametrize("case", MALFORMED, ids=MALFORMED_IDS)
def test_skip_invalid_records_the_problem_and_keeps_the_rest(
    tmp_path: Path, case: Malformed
) -> None:
    bad_path = write_corpus_case(tmp_path / "in", case)
    report = explode(tmp_path / "in", tmp_path / "run", skip_invalid=True)

    skipped = rows(tmp_path / "run", "skipped.parquet")
    assert len(skipped) == 1
    assert case.reason in skipped[0].pop("reason")
    assert skipped[0] == {
        "source_path": str(bad_path),
        "stem": "b_bad",
        "response_index": case.response_index,
        "json_path": case.json_path,
    }
    kept = [
        (row["stem"], row["response_index"]) for row in rows(tmp_path / "run", "responses.parquet")
    ]
    expected = [("a_good", 0), ("a_good", 1)] + ([("b_bad", 0)] if case.response_index == 1 else [])
    assert kept == expected
    assert report.skipped == 1
    assert report.positions == 2 * len(expected)
    assert {row["stem"] for row in rows(tmp_path / "run", "positions.parquet")} == {
        stem for stem, _ in expected
    }


def test_the_corpus_covers_distinct_json_paths_and_reasons() -> None:
    assert len({(case.json_path, case.reason) for case in MALFORMED}) == len(MALFORMED)


token_text = st.text(st.characters(codec="utf-8"), max_size=5)
token_ids = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
logprobs = st.floats(max_value=0.0, allow_nan=False, allow_infinity=False) | st.integers(-50, 0)
alternatives = st.lists(st.tuples(token_text, token_ids, logprobs), min_size=1, max_size=20)
token_lists = st.lists(st.tuples(token_text, token_ids, logprobs, alternatives), max_size=6)
responses = st.tuples(token_lists, st.none() | token_text, st.none() | token_text)
files = st.lists(st.tuples(token_text, st.lists(responses, max_size=3)), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(files)
def test_round_trip_reproduces_every_value(generated: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as temp:
        inputs, run_dir = Path(temp) / "in", Path(temp) / "run"
        expected_positions, expected_responses = [], []
        for file_index, (prompt, file_responses) in enumerate(generated):
            stem = f"f{file_index}"
            built = [make_response(t, text=text, model=model) for t, text, model in file_responses]
            write_input(inputs, stem, make_input(prompt, "file-model", built))
            for response_index, (tokens, text, model) in enumerate(file_responses):
                joined = "".join(token[0] for token in tokens)
                expected_responses.append(
                    (stem, response_index, prompt, "file-model" if model is None else model,
                     joined if text is None else text,
                     len(tokens), text is None or text == joined)
                )  # fmt: skip
                for position, (token, token_id, logprob, top) in enumerate(tokens):
                    expected_positions.append(
                        (stem, response_index, position, token, token_id, logprob,
                         [t[0] for t in top], [t[1] for t in top], [t[2] for t in top],
                         len("".join(t[0] for t in tokens[:position])))
                    )  # fmt: skip

        report = explode(inputs, run_dir)

        positions = [tuple(row.values()) for row in rows(run_dir, "positions.parquet")]
        responses_read = [tuple(row.values())[:7] for row in rows(run_dir, "responses.parquet")]
        assert positions == expected_positions
        assert responses_read == expected_responses
        assert report.positions == len(expected_positions)


def test_overwrite_refuses_other_inputs_when_model2_results_exist(tmp_path: Path) -> None:
    """Replacing positions under existing scores with other inputs' would mismatch every key
    silently; exploding the same inputs again (to rebuild damaged positions) keeps them."""
    inputs = tmp_path / "in"
    write_input(inputs, "a", make_input("p", "m", [[("x", 1, -0.1, [("x", 1, -0.1)])]]))
    run_dir = tmp_path / "run"
    explode(inputs, run_dir)
    (run_dir / "scores" / "some-model").mkdir(parents=True)
    (run_dir / "scores" / "some-model" / "part-1.parquet").write_bytes(b"")
    before = (run_dir / "positions.parquet").read_bytes()
    (run_dir / "positions.parquet").write_bytes(before[: len(before) // 2])
    explode(inputs, run_dir, overwrite=True)
    assert (run_dir / "positions.parquet").read_bytes() == before
    assert (run_dir / "scores" / "some-model" / "part-1.parquet").exists()

    write_input(inputs, "b", make_input("q", "m", [[("y", 2, -0.2, [("y", 2, -0.2)])]]))
    with pytest.raises(KlstreamError, match="holds Model 2 results"):
        explode(inputs, run_dir, overwrite=True)
    assert (run_dir / "positions.parquet").read_bytes() == before
