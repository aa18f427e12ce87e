"""`klstream sample` and `klstream run` through the CLI, over real HTTP to the local emulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli import invoke

from klstream.emulator import EmulatorServer, FaultConfig
from klstream.emulator.toymodel import encode
from klstream.errors import InputError
from klstream.input.explode import explode
from klstream.input.sample import read_prompts


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer(FaultConfig()) as running:
        yield running


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "Tell me about owls.\n\nWhy is the sea salty?\nA poem, please.\n", encoding="utf-8"
    )
    return path


def test_sample_writes_the_spec_input_format(
    server: EmulatorServer, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "responses"
    result = invoke(
        "sample",
        "--prompts",
        str(prompts),
        "--model",
        "toy",
        "-o",
        str(out),
        "--num-samples",
        "2",
        "--max-tokens",
        "12",
        "--seed",
        "3",
        "--base-url",
        server.base_url,
    )
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == [f"toy_prompt_{i}.json" for i in range(3)]
    document = json.loads(files[1].read_text(encoding="utf-8"))
    assert document["prompt"] == "Why is the sea salty?"
    assert document["model"] == "toy"
    assert len(document["responses"]) == 2
    for response in document["responses"]:
        content = response["logprobs"]["content"]
        assert 1 <= len(content) <= 12
        assert "".join(t["token"] for t in content) == response["text"]
        for token in content:
            assert len(token["top_logprobs"]) == 20
            assert token["logprob"] <= 0 and isinstance(token["token_id"], int)
    report = explode(out, tmp_path / "run")
    assert report.responses == 6 and report.responses_text_mismatch == 0


def test_sample_is_reproducible_with_a_seed_and_skips_done_prompts(
    server: EmulatorServer, prompts: Path, tmp_path: Path
) -> None:
    args = [
        "sample",
        "--prompts",
        str(prompts),
        "--model",
        "toy",
        "--num-samples",
        "2",
        "--max-tokens",
        "10",
        "--seed",
        "5",
        "--base-url",
        server.base_url,
    ]
    assert invoke(*args, "-o", str(tmp_path / "a")).exit_code == 0
    assert invoke(*args, "-o", str(tmp_path / "b")).exit_code == 0
    for name in ("toy_prompt_0.json", "toy_prompt_2.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    server.reset_log()
    again = invoke(*args, "-o", str(tmp_path / "a"))
    assert "wrote 0 files" in again.output and "3 already there" in again.output
    assert server.requests == []


def test_sample_reads_jsonl_prompts_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "one\\ntwo"}\n"three"\n', encoding="utf-8")
    assert read_prompts(good) == ["one\ntwo", "three"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl: line 2.prompt: expected a non-empty"):
        read_prompts(bad)


def test_run_is_the_one_shot_pipeline_and_resumes(
    server: EmulatorServer, prompts: Path, tmp_path: Path
) -> None:
    responses, out = tmp_path / "responses", tmp_path / "kl"
    assert (
        invoke(
            "sample",
            "--prompts",
            str(prompts),
            "--model",
            "toy",
            "-o",
            str(responses),
            "--num-samples",
            "2",
            "--max-tokens",
            "8",
            "--seed",
            "1",
            "--base-url",
            server.base_url,
        ).exit_code
        == 0
    )
    args = [
        "run",
        "--input-dir",
        str(responses),
        "--output-dir",
        str(out),
        "--model2",
        "toy",
        "--project-id",
        "unused",
        "--location",
        "global",
        "--top-logprobs",
        "20",
        "--pattern",
        "*.json",
        "--max-concurrent",
        "8",
        "--max-files",
        "2",
        "--base-url",
        server.base_url,
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*_kl.json")) == [
        "toy_prompt_0_kl.json",
        "toy_prompt_1_kl.json",
    ]
    kl = pq.read_table(out / "run" / "kl" / "toy.parquet").to_pylist()
    assert kl and all(row["kl_floor"] < 1e-9 for row in kl)  # the same model twice

    refused = invoke(*args)
    assert refused.exit_code == 4 and "--resume" in refused.output
    server.reset_log()
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert server.requests == []  # nothing left to ask


def test_score_prefill_is_model1_tokens_before_the_position(
    server: EmulatorServer, prompts: Path, tmp_path: Path
) -> None:
    responses = tmp_path / "responses"
    invoke(
        "sample",
        "--prompts",
        str(prompts),
        "--model",
        "toy",
        "-o",
        str(responses),
        "--num-samples",
        "1",
        "--max-tokens",
        "6",
        "--seed",
        "2",
        "--base-url",
        server.base_url,
    )
    run_dir = tmp_path / "run"
    explode(responses, run_dir)
    server.reset_log()
    result = invoke(
        "score", run_dir, "--model2", "toy-d1", "--base-url", server.base_url, "--lookahead", "1"
    )
    assert result.exit_code == 0, result.output
    positions = pq.read_table(run_dir / "positions.parquet").to_pylist()
    asked = {(r.prompt, r.prefill or "") for r in server.requests}
    assert len(server.requests) == len(positions)
    prompts_by_stem = {
        r["stem"]: r["prompt"] for r in pq.read_table(run_dir / "responses.parquet").to_pylist()
    }
    for pos in positions:
        before = "".join(
            p["token"]
            for p in positions
            if (p["stem"], p["response_index"]) == (pos["stem"], pos["response_index"])
            and p["position"] < pos["position"]
        )
        assert (prompts_by_stem[pos["stem"]], before) in asked
        assert encode(before) == [
            p["token_id"]
            for p in positions
            if (p["stem"], p["response_index"]) == (pos["stem"], pos["response_index"])
            and p["position"] < pos["position"]
        ]
