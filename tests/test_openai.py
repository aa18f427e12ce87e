"""Model 2 on an OpenAI-compatible server: the real openai SDK over real HTTP to the emulator's
vLLM-style routes, real Parquet, real DuckDB, the CLI in process and as a killed subprocess.

Both methods are checked against the toy model's own distributions, so a value is right because
it is the server's model at that position, not only because the two methods agree.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from cli import invoke, start_process
from hypothesis import given
from hypothesis import strategies as st
from inputs import Token, TopEntry, make_input, write_input
from test_score import (
    FAST,
    assert_failure_rows,
    assert_parts_intact,
    assert_server_values,
    key_of,
    kl_rows,
    parquet_files,
    resolved,
    score_rows,
    server_top,
    wait_until,
)

from klstream.backends.base import Endpoint
from klstream.backends.openai import api_base_url, server_root
from klstream.backends.transport import RetryPolicy
from klstream.emulator import EmulatorServer, FaultConfig, ToyModel, encode
from klstream.emulator.openai_routes import render_chat
from klstream.emulator.toymodel import EOS_ID, TOKEN_IDS, top_k
from klstream.input.explode import explode
from klstream.pipeline import score as score_run
from klstream.scoring.options import ScoreOptions
from klstream.scoring.prompt_logprobs import Alignment
from klstream.scoring.score import ScoreReport
from klstream.storage import schemas
from klstream.storage.journal import replay
from klstream.storage.rundir import RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs

MODEL2 = "toy-d0.5"
RESPONSES = 6  # conftest's toy inputs: 3 files (prompts) of 2 responses


def endpoint(server: EmulatorServer, timeout_s: float = 5.0) -> Endpoint:
    return Endpoint("openai", None, base_url=api_base_url(server.base_url), timeout_s=timeout_s)


def score(
    run_dir: Path,
    server: EmulatorServer,
    method: str,
    model2: str = MODEL2,
    **options: Any,
) -> ScoreReport:
    options.setdefault("policy", FAST)
    options.setdefault("lookahead", 1)
    return score_run(run_dir, ScoreOptions(model2, method=method, **options), endpoint(server))


def paths(server: EmulatorServer) -> Counter[str]:
    """Requests answered (200) by route; a killed client's late requests are not answers."""
    return Counter(record.path for record in server.requests if record.status == 200)


def expected_top(model2: str, prompt: str, text_before: str, k: int = 20) -> list[Any]:
    """The toy model's top-k after ``text_before`` (re-tokenized), as every route computes it."""
    return top_k(ToyModel.for_name(model2).next_token_logprobs(prompt, encode(text_before)), k)


# --- the two methods give the server's values -------------------------------------------------


def test_prompt_logprobs_gives_every_position_with_one_request_per_response(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    report = score(run_dir, emulator, "prompt-logprobs")

    assert report.remaining == 0 and report.stopped_because is None
    assert_server_values(run_dir, MODEL2, toy_inputs)
    # One completion per response and one that finds the dialect; the chat template once per
    # prompt, the text once per response.
    assert paths(emulator) == {"/v1/completions": 1 + RESPONSES, "/tokenize": 3 + RESPONSES}
    assert report.stats.calls.requests == 3 + 2 * RESPONSES
    assert {row["status"] for row in kl_rows(run_dir).values()} == {schemas.KL_STATUS_SCORED}


def test_prefill_with_lookahead_gives_one_token_values_with_fewer_requests(
    tmp_path: Path, run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    """Chat logprobs carry a top-k per generated token, so lookahead steps apply here too."""
    one_token = tmp_path / "one-token"
    explode(toy_inputs.directory, one_token)
    assert score(one_token, emulator, "prefill").remaining == 0
    emulator.reset_log()
    assert score(run_dir, emulator, "prefill", lookahead=4).remaining == 0

    assert paths(emulator)["/v1/chat/completions"] < len(toy_inputs.positions)
    single, ahead = resolved(one_token), resolved(run_dir)
    assert single.keys() == ahead.keys() == toy_inputs.positions.keys()
    for key in single:
        for column in ("top_tokens", "top_logprobs"):
            assert ahead[key][column] == single[key][column], key


def test_prefill_and_prompt_logprobs_agree_on_every_top_k_and_kl(
    tmp_path: Path, run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    by_prefill = tmp_path / "by-prefill"
    explode(toy_inputs.directory, by_prefill)
    assert score(by_prefill, emulator, "prefill").remaining == 0
    assert score(run_dir, emulator, "prompt-logprobs").remaining == 0

    assert paths(emulator)["/v1/chat/completions"] == len(toy_inputs.positions)
    prefill, prompt = resolved(by_prefill), resolved(run_dir)
    assert prefill.keys() == prompt.keys() == toy_inputs.positions.keys()
    for key, position in toy_inputs.positions.items():
        expected = server_top(MODEL2, position)
        for row in (prefill[key], prompt[key]):
            assert row["top_token_ids"] == [c.token_id for c in expected], key
            assert row["top_logprobs"] == pytest.approx([c.logprob for c in expected], abs=1e-12)
        assert prompt[key]["top_tokens"] == [c.token for c in expected], key
        # Model 1's tokens carry ids, so chat logprobs are asked for by id (vLLM's names).
        assert prefill[key]["top_tokens"] == [f"token_id:{c.token_id}" for c in expected], key
    kl_prefill, kl_prompt = kl_rows(by_prefill), kl_rows(run_dir)
    for key in toy_inputs.positions:
        for column in ("kl_floor", "kl_lower", "logratio", "entropy2", "coverage2"):
            assert kl_prompt[key][column] == pytest.approx(
                kl_prefill[key][column], rel=1e-9, abs=1e-12
            ), (key, column)


# --- Model 1 tokenized differently ----------------------------------------------------------


def split_token(token: str) -> tuple[str, str] | None:
    """A split of ``token`` into two toy tokens, if it has one (``" the"`` → ``" th"``, ``"e"``)."""
    head, tail = token[:-1], token[-1]
    if len(token) >= 3 and head in TOKEN_IDS and tail in TOKEN_IDS:
        return head, tail
    return None


def test_tokens_split_differently_are_flagged_and_never_given_another_positions_values(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompt = "Describe the river and the city."
    generation = ToyModel.for_name("toy").sample(prompt, 40, seed=7, top_k_logprobs=5)
    steps = [s for s in generation.steps if s.chosen.token_id != EOS_ID]
    split: list[Token] = []  # response 0: two words split in two tokens each, with ids
    flagged: set[int] = set()
    for step in steps:
        pieces = split_token(step.chosen.token) if len(flagged) < 4 else None
        top: list[TopEntry] = [(c.token, c.token_id, c.logprob) for c in step.top]
        for piece in pieces or (step.chosen.token,):
            if pieces:
                flagged.add(len(split))
            split.append((piece, TOKEN_IDS[piece], step.chosen.logprob, top))
    assert len(flagged) == 4
    without_ids: list[Token] = [  # response 1: the same text, tokens without ids
        (s.chosen.token, None, s.chosen.logprob, [(c.token, None, c.logprob) for c in s.top])
        for s in steps
    ]
    inputs, run = tmp_path / "inputs", tmp_path / "run"
    write_input(inputs, "split", make_input(prompt, "toy", [split, without_ids]))
    explode(inputs, run)

    report = score(run, emulator, "prompt-logprobs")
    assert report.remaining == len(flagged) and report.stopped_because is None
    rows = resolved(run)
    for response, tokens in ((0, split), (1, without_ids)):
        for position, token in enumerate(tokens):
            row = rows[("split", response, position)]
            if response == 0 and position in flagged:
                assert_failure_rows([row], "Model 2's tokenizer splits this text differently")
                assert repr(token[0]) in row["error"]
                continue
            text_before = "".join(t[0] for t in tokens[:position])
            expected = expected_top(MODEL2, prompt, text_before)
            assert row["status"] == schemas.SCORE_OK, row["error"]
            assert row["top_tokens"] == [c.token for c in expected], (response, position)
            assert row["top_logprobs"] == pytest.approx([c.logprob for c in expected], abs=1e-12)
    kl = kl_rows(run)
    assert {p for (_, r, p), row in kl.items() if row["status"] == "error"} == flagged

    # The prefill method fills exactly the flagged positions.
    emulator.reset_log()
    report = score(run, emulator, "prefill", resume=True)
    assert report.remaining == 0
    assert paths(emulator) == {"/v1/chat/completions": len(flagged)}
    assert {row["status"] for row in kl_rows(run).values()} == {schemas.KL_STATUS_SCORED}


def test_an_end_of_sequence_token_gets_the_distribution_after_the_response(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompt = "Say something short."
    tokens: list[Token] = [
        (word, TOKEN_IDS[word], -1.0, [(word, TOKEN_IDS[word], -1.0)])
        for word in ("The", " cat", ".")
    ]
    ending: Token = ("", EOS_ID, -0.5, [("", EOS_ID, -0.5)])
    inputs, run = tmp_path / "inputs", tmp_path / "run"
    write_input(inputs, "eos", make_input(prompt, "toy", [[*tokens, ending, ending]]))
    explode(inputs, run)

    report = score(run, emulator, "prompt-logprobs")
    rows = resolved(run)
    after = rows[("eos", 0, 3)]
    assert after["status"] == schemas.SCORE_OK
    expected = expected_top(MODEL2, prompt, "The cat.")
    assert after["top_tokens"] == [c.token for c in expected]
    assert after["top_logprobs"] == pytest.approx([c.logprob for c in expected], abs=1e-12)
    assert_failure_rows([rows[("eos", 0, 4)]], "Model 1's token here has no text")
    assert report.remaining == 1


# --- kill -9, then --resume ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt-logprobs", "prefill"])
def test_sigkill_then_resume_completes_with_each_method_asking_only_what_is_missing(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, method: str
) -> None:
    emulator.set_faults(FaultConfig(latency_ms=150 if method == "prompt-logprobs" else 20))
    command = [
        *("score", run_dir, "--model2", MODEL2, "--backend", "openai"),
        *("--base-url", emulator.base_url, "--method", method, "--checkpoint-rows", "5"),
        *("--max-concurrent", "2" if method == "prefill" else "1", "--lookahead", "1"),
    ]
    process = start_process(*command)
    wait_until(process, lambda: len(parquet_files(run_dir)) >= 2)
    process.kill()
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"ended before the kill: {stderr}"
    assert_parts_intact(run_dir)
    flushed = {key_of(r) for r in score_rows(run_dir) if r["status"] == schemas.SCORE_OK}
    assert 0 < len(flushed) < len(toy_inputs.positions)
    # Answers journaled after the last part are the resumed run's too: it asks for neither.
    journaled = replay(RunDir(run_dir), MODEL2).records
    flushed |= {key_of(r) for a in journaled for r in a if r["status"] == schemas.SCORE_OK}

    emulator.set_faults(FaultConfig())
    emulator.reset_log()
    result = invoke(*command, "--resume", "--max-concurrent", "8")
    assert result.exit_code == 0, result.output
    missing = toy_inputs.positions.keys() - flushed
    if method == "prefill":
        assert paths(emulator)["/v1/chat/completions"] == len(missing)
    else:
        open_responses = {(stem, index) for stem, index, _ in missing}
        assert paths(emulator)["/v1/completions"] == 1 + len(open_responses)  # and the dialect's
    ok_rows = Counter(key_of(r) for r in score_rows(run_dir) if r["status"] == schemas.SCORE_OK)
    assert ok_rows.keys() == toy_inputs.positions.keys() and set(ok_rows.values()) == {1}
    final = resolved(run_dir)
    for key, position in toy_inputs.positions.items():
        expected = server_top(MODEL2, position)
        assert final[key]["top_token_ids"] == [c.token_id for c in expected], key


# --- bad answers and errors ------------------------------------------------------------------

BAD_ANSWERS = [
    pytest.param(
        FaultConfig(rate_short_prompt_logprobs=1.0),
        "prompt_logprobs has",
        id="fewer-entries-than-tokens",
    ),
    pytest.param(
        FaultConfig(rate_html=1.0),
        "answer body is not JSON: '<!DOCTYPE html>",
        id="html",
    ),
    pytest.param(FaultConfig(rate_500=1.0), "500: Internal server error", id="500"),
    pytest.param(FaultConfig(rate_503=1.0), "503: The server is overloaded", id="503"),
    pytest.param(FaultConfig(rate_malformed=1.0), "answer body", id="malformed"),
]


@pytest.mark.parametrize(("faults", "error"), BAD_ANSWERS)
def test_bad_answers_are_retried_then_recorded_as_failures_with_the_reason(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, faults: FaultConfig, error: str
) -> None:
    emulator.set_faults(faults)
    report = score(run_dir, emulator, "prompt-logprobs", policy=RetryPolicy(1, 0.01, 0.02))

    assert report.stopped_because is not None
    assert re.match(
        rf"the first request to {re.escape(emulator.base_url)}/v1 failed "
        rf"\(\d+ attempts in \d+ s\); the last said: {re.escape(error)}",
        report.stopped_because,
    ), report.stopped_because
    rows = score_rows(run_dir)
    assert {(stem, index) for stem, index, _ in map(key_of, rows)} == {("story-0", 0)}
    assert len(rows) == sum(1 for key in toy_inputs.positions if key[:2] == ("story-0", 0))
    assert_failure_rows(rows, error)
    assert {row["attempts"] for row in rows} == {2}
    assert report.remaining == len(toy_inputs.positions)

    emulator.set_faults(FaultConfig())
    assert score(run_dir, emulator, "prompt-logprobs", resume=True).remaining == 0
    assert_server_values(run_dir, MODEL2, toy_inputs)


def test_a_response_longer_than_the_context_fails_alone_with_a_clear_error(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompt = "Count."
    words: list[Token] = [
        (word, TOKEN_IDS[word], -1.0, [(word, TOKEN_IDS[word], -1.0)]) for word in (" the", " cat")
    ]
    responses: list[list[Token]] = [[words[i % 2] for i in range(n)] for n in (5, 60, 5)]
    inputs, run = tmp_path / "inputs", tmp_path / "run"
    write_input(inputs, "lengths", make_input(prompt, "toy", responses))
    explode(inputs, run)

    report = score(run, emulator, "prompt-logprobs", model2="toy-d0.5-ctx40")

    assert report.stopped_because is None
    assert report.stats.scored == 10 and report.remaining == 60
    failed = [r for r in score_rows(run, "toy-d0.5-ctx40") if r["status"] == schemas.SCORE_ERROR]
    assert {key_of(r)[1] for r in failed} == {1}
    assert_failure_rows(failed, "the prompt's")
    assert "60 do not fit the server's context of 40 tokens" in failed[0]["error"]
    assert paths(emulator)["/v1/completions"] == 1 + 2


def test_a_server_that_cannot_continue_a_message_stops_prefill_at_once(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    result = invoke(
        *("score", run_dir, "--model2", "toy-noprefill", "--backend", "openai"),
        *("--base-url", emulator.base_url),
    )
    assert result.exit_code == 5
    assert "continue_final_message" in result.stderr
    assert emulator.stats()["total"] <= 3


def test_the_cli_explains_what_each_method_and_backend_needs(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    result = invoke(
        *("score", run_dir, "--model2", MODEL2, "--base-url", emulator.base_url),
        *("--method", "prompt-logprobs"),
    )
    assert result.exit_code == 5
    assert "OpenAI-compatible servers such as vLLM" in result.stderr
    assert "--backend openai" in result.stderr

    result = invoke("score", run_dir, "--model2", MODEL2, "--backend", "openai")
    assert result.exit_code == 5
    assert "OPENAI_BASE_URL" in result.stderr and "pass --base-url" in result.stderr
    assert emulator.stats()["total"] == 0


# --- sample and run without Gemini --------------------------------------------------------------


def test_sample_and_run_an_open_weight_experiment_through_openai_only(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about owls.\nWhy is the sea salty?\n", encoding="utf-8")
    sampled: dict[str, Path] = {}
    for backend in ("gemini", "openai"):
        sampled[backend] = tmp_path / f"responses-{backend}"
        result = invoke(
            *("sample", "--prompts", prompts, "--model", "toy", "-o", sampled[backend]),
            *("--num-samples", "2", "--max-tokens", "15", "--seed", "4", "--top-logprobs", "5"),
            *("--backend", backend, "--base-url", emulator.base_url),
        )
        assert result.exit_code == 0, result.output
    for name in ("toy_prompt_0.json", "toy_prompt_1.json"):
        gemini = json.loads((sampled["gemini"] / name).read_text(encoding="utf-8"))
        chat = json.loads((sampled["openai"] / name).read_text(encoding="utf-8"))
        for one, other in zip(gemini["responses"], chat["responses"], strict=True):
            assert other["text"] == one["text"]
            for step, same in zip(
                one["logprobs"]["content"], other["logprobs"]["content"], strict=True
            ):
                assert (same["token"], same["logprob"]) == (step["token"], step["logprob"])
                assert same["token_id"] is None
                assert [c["token"] for c in same["top_logprobs"]] == [
                    c["token"] for c in step["top_logprobs"]
                ]

    output = tmp_path / "kl"
    result = invoke(
        *("run", "--input-dir", sampled["openai"], "--output-dir", output, "--model2", MODEL2),
        *("--backend", "openai", "--base-url", emulator.base_url, "--method", "prompt-logprobs"),
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in output.glob("*_kl.json")) == [
        "toy_prompt_0_kl.json",
        "toy_prompt_1_kl.json",
    ]
    assert paths(emulator)["/v1/completions"] == 1 + 4


# --- the emulator's OpenAI routes through the SDK -------------------------------------------------


def test_the_emulator_speaks_vllms_prompt_logprobs_tokenize_and_chat_prefill(
    emulator: EmulatorServer,
) -> None:
    async def exchange() -> None:
        async with openai.AsyncOpenAI(
            api_key="x", base_url=api_base_url(emulator.base_url), max_retries=0
        ) as client:
            url = server_root(str(client.base_url)) + "/tokenize"
            template = json.loads(
                await client.post(
                    url,
                    cast_to=str,
                    body={"model": MODEL2, "messages": [{"role": "user", "content": "Hi."}]},
                )
            )
            assert template["tokens"] == encode(render_chat("Hi.", ""))
            assert template["count"] == len(template["tokens"])
            assert template["max_model_len"] == 32768
            response = encode(" The cat")
            completion = await client.completions.create(
                model=MODEL2,
                prompt=template["tokens"] + response,
                max_tokens=1,
                logprobs=3,
                echo=True,
                extra_body={"prompt_logprobs": 3},
            )
            choice = completion.choices[0].model_dump()
            entries = choice["prompt_logprobs"]
            assert entries[0] is None and len(entries) == len(template["tokens"]) + 2
            start = len(template["tokens"])
            for index, own in ((start, response[0]), (start + 1, response[1])):
                ranked = expected_top(MODEL2, "Hi.", " The" if index > start else "", 3)
                entry = {int(k): v for k, v in entries[index].items()}
                assert [entry[c.token_id]["rank"] for c in ranked] == [1, 2, 3]
                assert [entry[c.token_id]["decoded_token"] for c in ranked] == [
                    c.token for c in ranked
                ]
                assert own in entry
            assert choice["text"].startswith(render_chat("Hi.", " The cat"))
            assert choice["logprobs"]["token_logprobs"][0] is None
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == start + 2

            with pytest.raises(openai.BadRequestError, match="continue_final_message"):
                await client.chat.completions.create(
                    model=MODEL2,
                    messages=[
                        {"role": "user", "content": "Hi."},
                        {"role": "assistant", "content": " The"},
                    ],
                    extra_body={"continue_final_message": True},
                )
            with pytest.raises(openai.BadRequestError, match="maximum context length is 8"):
                await client.completions.create(model="toy-ctx8", prompt="a b c d e f g h")

    asyncio.run(exchange())
    emulator.set_faults(FaultConfig(rate_429=1.0, retry_delay_s=0.25))

    async def rate_limited() -> None:
        async with openai.AsyncOpenAI(
            api_key="x", base_url=api_base_url(emulator.base_url), max_retries=0
        ) as client:
            with pytest.raises(openai.RateLimitError) as raised:
                await client.completions.create(model=MODEL2, prompt="Hi")
            assert raised.value.response.headers["retry-after-ms"] == "250"

    asyncio.run(rate_limited())


def test_base_urls_get_the_api_path_and_tokenize_lives_at_the_root() -> None:
    assert api_base_url("http://gpu:8000") == "http://gpu:8000/v1"
    assert api_base_url("http://gpu:8000/v1/") == "http://gpu:8000/v1"
    assert api_base_url("https://gateway.example/api/v1") == "https://gateway.example/api/v1"
    assert server_root("http://gpu:8000/v1") == "http://gpu:8000"


# --- alignment by characters ------------------------------------------------------------------

PIECES = st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=12)


def cut(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts} - {0, len(text)}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(PIECES, st.lists(st.integers(min_value=0), max_size=12))
def test_alignment_pairs_exactly_the_tokens_with_the_same_characters(
    model1: list[str], cuts: list[int]
) -> None:
    text = "".join(model1)
    model2 = cut(text, cuts)
    alignment = Alignment.of(text, model1, model2)

    spans2 = {}
    offset = 0
    for index, token in enumerate(model2):
        spans2[(offset, offset + len(token))] = index
        offset += len(token)
    offset = 0
    for position, token in enumerate(model1):
        span = (offset, offset + len(token))
        assert alignment.match[position] == spans2.get(span, -1), (position, span)
        offset += len(token)


def test_the_html_fault_answers_the_gemini_routes_with_a_page_too(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    emulator.set_faults(FaultConfig(rate_html=1.0))
    gemini = Endpoint("gemini", "test-key", base_url=emulator.base_url, timeout_s=5.0)
    report = score_run(run_dir, ScoreOptions(MODEL2, policy=RetryPolicy(0, 0.01, 0.02)), gemini)

    assert report.stopped_because is not None
    assert "answer body is not JSON" in report.stopped_because
    assert emulator.stats()["by_fault"] == {"html": 2}
