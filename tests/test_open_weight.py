"""Open-weight servers' dialects: vLLM's prompt logprobs, the legacy echo, SGLang's /generate and
TGI's, each played by the emulator under its own path prefix, reached through the real openai SDK
(its plain ``post`` for the raw JSON of the non-OpenAI routes); the odd values real servers send;
usage and the served model; token ids in chat prefill.

Values are checked against the toy model's own distributions, so a dialect is right because it
gives the server's model at each position, not only because the dialects agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from cli import invoke
from inputs import Token, make_input, write_input
from test_score import FAST, key_of, resolved, score_rows, server_top

from klstream.backends.base import Endpoint
from klstream.backends.openai import api_base_url
from klstream.emulator import EmulatorServer, ToyModel, encode
from klstream.emulator.openai_routes import FINGERPRINT, render_chat
from klstream.emulator.toymodel import token_str, top_k
from klstream.errors import MethodUnsupported
from klstream.input.explode import explode
from klstream.pipeline import score as score_run
from klstream.scoring.options import ScoreOptions
from klstream.scoring.score import ScoreReport
from klstream.storage import schemas
from klstream.storage.rundir import RunDir

if TYPE_CHECKING:
    from conftest import ToyInputs

MODEL2 = "toy-d0.5"
RESPONSES = 6  # conftest's toy inputs: 3 files (prompts) of 2 responses
SERVERS = [
    pytest.param("", "vllm", True, id="vllm"),
    pytest.param("/sglang", "sglang", True, id="sglang"),
    pytest.param("/legacy", "echo", False, id="legacy-echo"),
]
"""(path prefix, the dialect auto finds there, whether its top-k lists carry token ids)."""


def base_url(server: EmulatorServer, prefix: str = "") -> str:
    """The OpenAI API of the server the emulator plays under ``prefix``."""
    return api_base_url(server.base_url + prefix + "/v1")


def score(
    run_dir: Path,
    server: EmulatorServer,
    prefix: str = "",
    model2: str = MODEL2,
    dialect: str = "auto",
    method: str = "prompt-logprobs",
    top_logprobs: int = 20,
) -> ScoreReport:
    endpoint = Endpoint(
        "openai", None, base_url=base_url(server, prefix), timeout_s=5.0, dialect=dialect
    )
    options = ScoreOptions(
        model2, top_logprobs=top_logprobs, method=method, policy=FAST, lookahead=1
    )
    return score_run(run_dir, options, endpoint)


def answered(server: EmulatorServer) -> list[str]:
    """The paths of the requests answered 200, in order."""
    return [record.path for record in server.requests if record.status == 200]


def assert_toy_values(
    run_dir: Path,
    toy_inputs: ToyInputs,
    model2: str,
    ids: bool,
    names: bool = False,
    k: int = 20,
) -> None:
    """Every position is the toy model's top-k there: its tokens (by ``token_id:N`` name with
    ``names``), its ids when the dialect gives them, its logprobs."""
    results = resolved(run_dir, model2)
    assert results.keys() == toy_inputs.positions.keys()
    for key, position in toy_inputs.positions.items():
        row = results[key]
        assert row["status"] == schemas.SCORE_OK, (key, row["error"])
        expected = server_top(model2, position, k)
        tokens = [f"token_id:{c.token_id}" if names else c.token for c in expected]
        assert row["top_tokens"] == tokens, key
        assert row["top_token_ids"] == [c.token_id if ids else None for c in expected], key
        assert row["top_logprobs"] == pytest.approx([c.logprob for c in expected], abs=1e-12)


def run_config(run_dir: Path, model2: str = MODEL2) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(
        RunDir(run_dir).run_config(model2).read_text(encoding="utf-8")
    )
    return config


# --- every dialect scores a run with the server's values ------------------------------------


@pytest.mark.parametrize(("prefix", "dialect", "ids"), SERVERS)
def test_each_dialect_is_found_and_scores_every_position_with_the_servers_values(
    run_dir: Path,
    toy_inputs: ToyInputs,
    emulator: EmulatorServer,
    prefix: str,
    dialect: str,
    ids: bool,
) -> None:
    report = score(run_dir, emulator, prefix)

    assert report.remaining == 0 and report.stopped_because is None
    assert_toy_values(run_dir, toy_inputs, MODEL2, ids)
    assert run_config(run_dir)["dialect"] == dialect
    paths = answered(emulator)
    route = {"vllm": "/v1/completions", "echo": "/v1/completions", "sglang": "/generate"}
    # One request per response in the dialect, after the one that found it.
    assert paths.count(prefix + route[dialect]) == 1 + RESPONSES
    assert paths[0] == prefix + "/v1/completions"  # the first detection request


@pytest.mark.parametrize(("prefix", "dialect"), [("", "echo"), ("/sglang", "sglang")])
def test_a_chosen_dialect_is_used_without_detection(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, prefix: str, dialect: str
) -> None:
    report = score(run_dir, emulator, prefix, dialect=dialect)

    assert report.remaining == 0
    assert_toy_values(run_dir, toy_inputs, MODEL2, dialect != "echo")
    route = prefix + ("/generate" if dialect == "sglang" else "/v1/completions")
    assert set(answered(emulator)) == {route, prefix + "/tokenize"}
    assert answered(emulator).count(route) == RESPONSES
    assert run_config(run_dir)["dialect"] == dialect


def test_the_cli_takes_a_dialect_and_refuses_one_for_a_backend_without(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    result = invoke(
        *("score", run_dir, "--model2", MODEL2, "--backend", "openai", "--dialect", "sglang"),
        *("--base-url", emulator.base_url + "/sglang", "--method", "prompt-logprobs"),
    )
    assert result.exit_code == 0, result.output
    assert run_config(run_dir)["dialect"] == "sglang"

    result = invoke(
        *("score", run_dir, "--model2", MODEL2, "--dialect", "vllm"),
        *("--base-url", emulator.base_url, "--overwrite"),
    )
    assert result.exit_code == 5
    assert "the gemini backend has no dialect 'vllm'" in result.stderr


# --- servers that cannot ------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "none_at_all"), [("/tgi", True), ("/tgi-prefill", False)])
def test_tgi_is_recognised_and_refused_saying_what_works_instead(
    run_dir: Path, emulator: EmulatorServer, prefix: str, none_at_all: bool
) -> None:
    result = invoke(
        *("score", run_dir, "--model2", MODEL2, "--backend", "openai", "--method"),
        *("prompt-logprobs", "--base-url", emulator.base_url + prefix),
    )

    assert result.exit_code == 5
    assert f"{emulator.base_url}{prefix} is HuggingFace TGI" in result.stderr
    assert "no top-n alternatives" in result.stderr and "Score by prefill" in result.stderr
    assert ("--enable-prefill-logprobs" in result.stderr) is none_at_all
    # No /v1/completions there (the emulator's log leaves such 404s out); /generate refuses
    # SGLang's request and answers TGI's.
    assert [(r.path, r.status) for r in emulator.requests] == [
        (f"{prefix}/generate", 422),
        (f"{prefix}/generate", 200),
    ]
    assert score_rows(run_dir) == []

    emulator.reset_log()
    result = invoke(
        *("score", run_dir, "--model2", MODEL2, "--backend", "openai", "--dialect", "tgi"),
        *("--method", "prompt-logprobs", "--base-url", emulator.base_url + prefix),
    )
    assert result.exit_code == 5 and "is HuggingFace TGI" in result.stderr
    assert emulator.stats()["total"] == 0


def test_a_server_without_prompt_logprobs_stops_the_run_at_once_with_the_fix(
    run_dir: Path, emulator: EmulatorServer
) -> None:
    model2 = "toy-d0.5-noprompt"
    with pytest.raises(MethodUnsupported, match="in none of the ways klstream asks for them"):
        score(run_dir, emulator, model2=model2)
    # The completion without prompt logprobs; no /generate (404s the emulator's log leaves out).
    assert [(r.path, r.status) for r in emulator.requests] == [("/v1/completions", 200)]

    emulator.reset_log()
    result = invoke(
        *("score", run_dir, "--model2", model2, "--backend", "openai", "--dialect", "vllm"),
        *("--method", "prompt-logprobs", "--base-url", emulator.base_url),
    )
    assert result.exit_code == 5
    assert "the server answered without prompt_logprobs" in result.stderr
    assert "score by prefill instead" in result.stderr
    assert answered(emulator).count("/v1/completions") == 1  # not retried: nothing to wait for
    assert all(row["status"] == schemas.SCORE_ERROR for row in score_rows(run_dir, model2))


# --- odd values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "flag", "method", "ids"),
    [
        ("", "floor9999", "prompt-logprobs", True),
        ("", "nanvals", "prompt-logprobs", True),
        ("/legacy", "floor9999", "prompt-logprobs", False),
        ("/sglang", "floatmin", "prompt-logprobs", True),
        ("/sglang", "nanvals", "prompt-logprobs", True),
        ("", "nanvals", "prefill", True),
        ("/sglang", "floatmin", "prefill", False),
    ],
)
def test_entries_without_a_usable_logprob_are_dropped_and_counted(
    run_dir: Path,
    toy_inputs: ToyInputs,
    emulator: EmulatorServer,
    prefix: str,
    flag: str,
    method: str,
    ids: bool,
) -> None:
    model2 = f"{MODEL2}-{flag}"
    report = score(run_dir, emulator, prefix, model2=model2, method=method)

    assert report.remaining == 0 and report.stopped_because is None
    names = method == "prefill" and ids  # chat by id: vLLM's token names
    assert_toy_values(run_dir, toy_inputs, model2, ids, names)
    dropped = {row["dropped_logprobs"] for row in resolved(run_dir, model2).values()}
    assert dropped == {2}  # the emulator's two fillers in every list


@pytest.mark.parametrize("prefix", ["", "/sglang"])
def test_the_actual_token_beyond_the_k_is_no_value_and_not_dropped(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, prefix: str
) -> None:
    model2 = f"{MODEL2}-kplus1"
    report = score(run_dir, emulator, prefix, model2=model2, method="prefill", top_logprobs=2)
    assert report.remaining == 0
    assert_toy_values(run_dir, toy_inputs, model2, prefix == "", names=prefix == "", k=2)
    assert {row["dropped_logprobs"] for row in resolved(run_dir, model2).values()} == {0}


# --- usage and the served model ---------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "served"), [("", True), ("/sglang", False)])
def test_prompt_logprobs_record_each_requests_usage_once_and_the_served_model(
    run_dir: Path, emulator: EmulatorServer, prefix: str, served: bool
) -> None:
    model2 = f"{MODEL2}-fingerprint"
    assert score(run_dir, emulator, prefix, model2=model2).remaining == 0

    rows = score_rows(run_dir, model2)
    scoring = [r for r in emulator.requests if r.status == 200 and r.prefill is not None]
    assert len(scoring) == RESPONSES
    prompt_tokens = sum(len(encode(render_chat(r.prompt, r.prefill))) for r in scoring)
    assert sum(row["prompt_token_count"] for row in rows) == prompt_tokens
    assert sum(row["candidates_token_count"] for row in rows) == RESPONSES
    counted = {(key_of(r)[:2]) for r in rows if r["prompt_token_count"]}
    assert len(counted) == RESPONSES  # one row per response carries its request's usage
    expected = f"{model2}@{FINGERPRINT}" if served else None
    assert {row["served_model"] for row in rows} == {expected}


def test_chat_answers_record_usage_and_the_served_model(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    assert score(run_dir, emulator, method="prefill").remaining == 0

    rows = resolved(run_dir)
    for key, position in toy_inputs.positions.items():
        row = rows[key]
        assert row["served_model"] == MODEL2
        prompt_tokens = len(encode(render_chat(position.prompt, position.prefill)))
        assert (row["prompt_token_count"], row["candidates_token_count"]) == (prompt_tokens, 1)


# --- token ids in chat prefill ------------------------------------------------------------------


def without_ids(toy_inputs: ToyInputs, tmp_path: Path) -> Path:
    """The toy inputs' first file with its tokens' ids left out, exploded into a run."""
    source = json.loads((toy_inputs.directory / "story-0.json").read_text(encoding="utf-8"))

    def without(entry: dict[str, Any]) -> tuple[str, None, float]:
        return entry["token"], None, entry["logprob"]

    responses: list[list[Token]] = [
        [(*without(step), [without(c) for c in step["top_logprobs"]]) for step in content]
        for content in (response["logprobs"]["content"] for response in source["responses"])
    ]
    inputs, run = tmp_path / "inputs-without-ids", tmp_path / "run-without-ids"
    write_input(inputs, "story-0", make_input(source["prompt"], "toy", responses))
    explode(inputs, run)
    return run


@pytest.mark.parametrize(
    ("prefix", "model2"),
    [("", f"{MODEL2}-strict"), ("/sglang", MODEL2)],
    ids=["refused", "ignored"],
)
def test_chat_falls_back_to_token_texts_where_ids_are_refused_or_ignored(
    run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer, prefix: str, model2: str
) -> None:
    assert score(run_dir, emulator, prefix, model2=model2, method="prefill").remaining == 0

    assert_toy_values(run_dir, toy_inputs, model2, ids=False)
    refused = [r for r in emulator.requests if r.status == 400]
    assert len(refused) == (1 if prefix == "" else 0)  # asked once, never again


def test_chat_asks_for_token_ids_exactly_when_model_1s_tokens_carry_them(
    tmp_path: Path, run_dir: Path, toy_inputs: ToyInputs, emulator: EmulatorServer
) -> None:
    assert score(run_dir, emulator, method="prefill").remaining == 0
    assert_toy_values(run_dir, toy_inputs, MODEL2, ids=True, names=True)

    # Without ids on Model 1's side there is nothing to match by id: a server that would refuse
    # the field is never sent it.
    emulator.reset_log()
    run = without_ids(toy_inputs, tmp_path)
    assert score(run, emulator, model2=f"{MODEL2}-strict", method="prefill").remaining == 0
    assert all(record.status == 200 for record in emulator.requests)
    for key, row in resolved(run, f"{MODEL2}-strict").items():
        assert row["top_token_ids"] == [None] * 20, key
        assert row["top_tokens"] == [c.token for c in server_top(MODEL2, toy_inputs.positions[key])]


# --- the emulator's wire formats --------------------------------------------------------------


def client(server: EmulatorServer, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(api_key="x", base_url=base_url(server, prefix), max_retries=0)


def post(server: EmulatorServer, path: str, body: dict[str, Any]) -> Any:
    """The JSON a route at the emulator's ``path`` answers, through the SDK's plain ``post``."""
    with client(server) as sdk:
        return json.loads(sdk.post(server.base_url + path, cast_to=str, body=body))


def test_the_legacy_echo_is_vllms_answer_to_lm_evaluation_harness(emulator: EmulatorServer) -> None:
    prompt = render_chat("Hi.", " The cat sat")
    ids = encode(prompt)
    with client(emulator, "/legacy") as sdk:
        completion = sdk.completions.create(
            model=MODEL2, prompt=ids, max_tokens=1, logprobs=5, echo=True, temperature=0
        )
    choice = completion.choices[0].model_dump()
    assert "prompt_logprobs" not in choice
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"][:3] == [0, 1, 2]
    assert choice["text"].startswith(prompt)
    model = ToyModel.for_name(MODEL2)
    start = len(encode(render_chat("Hi.", "")))
    for index in range(start, len(ids)):
        logprobs_here = model.next_token_logprobs("Hi.", ids[start:index])
        top = {c.token: c.logprob for c in top_k(logprobs_here, 5)}
        own = logprobs["tokens"][index]
        listed = logprobs["top_logprobs"][index]
        assert own == token_str(ids[index])
        assert logprobs["token_logprobs"][index] == pytest.approx(listed[own])
        assert {k: v for k, v in listed.items() if k in top} == pytest.approx(top)
        assert len(listed) == 5 + (own not in top)  # the actual token added beyond the k
    generated = logprobs["top_logprobs"][-1]
    assert logprobs["tokens"][-1] in generated and 5 <= len(generated) <= 6


def test_sglangs_generate_pads_the_windows_first_entry_and_puts_the_last_in_the_output(
    emulator: EmulatorServer,
) -> None:
    ids = encode(render_chat("Hi.", " The cat sat"))
    window = 10
    body = {
        "model": MODEL2,
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": window,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    }
    answer = post(emulator, "/sglang/generate", body)
    meta = answer["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 1
    own, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert len(own) == len(tops) == len(ids) - window
    assert own[0] == [None, ids[window], token_str(ids[window])]
    assert tops[0] is None
    assert [triple[1] for triple in own] == ids[window:]
    assert all(len(top) == 3 and len(top[0]) == 3 for top in tops[1:])
    assert len(meta["output_top_logprobs"]) == 1 and len(meta["output_top_logprobs"][0]) == 3

    body["return_text_in_logprobs"] = False
    plain = post(emulator, "/sglang/generate", body)
    assert {triple[2] for triple in plain["meta_info"]["input_token_logprobs"]} == {None}


@pytest.mark.parametrize(("prefix", "filled"), [("/tgi", False), ("/tgi-prefill", True)])
def test_tgis_generate_gives_prompt_tokens_their_own_logprob_only(
    emulator: EmulatorServer, prefix: str, filled: bool
) -> None:
    inputs = render_chat("Hi.", " The cat")
    parameters = {"max_new_tokens": 1, "decoder_input_details": True, "top_n_tokens": 3}
    path = f"{prefix}/generate"
    answer = post(emulator, path, {"inputs": inputs, "parameters": parameters})
    details = answer["details"]
    assert len(details["top_tokens"]) == 1 and len(details["top_tokens"][0]) == 3
    if not filled:
        assert details["prefill"] == []
        return
    ids = encode(inputs)
    assert [token["id"] for token in details["prefill"]] == ids
    assert details["prefill"][0]["logprob"] is None
    assert all(set(token) == {"id", "text", "logprob"} for token in details["prefill"])

    for body, error in (
        ({"text": inputs}, "missing field `inputs`"),
        ({"inputs": inputs, "parameters": {"top_n_tokens": 6}}, "<= 5. Given: 6"),
    ):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            post(emulator, path, body)
        assert error in str(refused.value.body)  # TGI's {"error": ..., "error_type": ...}


def test_odd_values_and_token_ids_on_the_wire(emulator: EmulatorServer) -> None:
    messages: Any = [{"role": "user", "content": "Hi."}]
    with client(emulator) as sdk:
        chat = sdk.chat.completions.with_raw_response.create(
            model=f"{MODEL2}-nanvals-fingerprint",
            messages=messages,
            max_tokens=1,
            logprobs=True,
            top_logprobs=3,
            extra_body={"return_tokens_as_token_ids": True},
        )
        with pytest.raises(openai.BadRequestError, match="return_tokens_as_token_ids"):
            sdk.chat.completions.create(
                model=f"{MODEL2}-strict",
                messages=messages,
                extra_body={"return_tokens_as_token_ids": True},
            )
        completion = sdk.completions.with_raw_response.create(
            model=f"{MODEL2}-floor9999",
            prompt="Hi there",
            max_tokens=1,
            extra_body={"prompt_logprobs": 2},
        )
        beyond = [
            sdk.chat.completions.create(
                model=f"{MODEL2}-kplus1",
                messages=messages,
                max_tokens=1,
                logprobs=True,
                top_logprobs=1,
                seed=seed,
            )
            for seed in range(8)
        ]
    sizes = set()
    for answer in beyond:
        assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content
        chosen = answer.choices[0].logprobs.content[0]
        listed = [entry.token for entry in chosen.top_logprobs]
        assert listed[1:] == ([] if listed[0] == chosen.token else [chosen.token])
        sizes.add(len(listed))
    assert sizes == {1, 2}  # the chosen token beyond the k when it ranks lower
    body = json.loads(chat.text)
    assert body["system_fingerprint"] == FINGERPRINT
    step = body["choices"][0]["logprobs"]["content"][0]
    assert step["token"].startswith("token_id:")
    assert step["bytes"] == list(step["token"].encode())
    values = [entry["logprob"] for entry in step["top_logprobs"]]
    assert len(values) == 5 and values[3] is None and math.isnan(values[4])
    entries = json.loads(completion.text)["choices"][0]["prompt_logprobs"]
    assert entries[0] is None
    assert sorted(v["logprob"] for v in entries[1].values())[:2] == [-9999.0, -9999.0]
