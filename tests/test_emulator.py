"""The Gemini emulator, exercised through the real google-genai SDK over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import google.oauth2.credentials
import pytest
from cli import invoke, start_process
from google import genai
from google.genai import errors, types

from klstream.emulator import (
    DISCONNECT,
    EmulatorServer,
    FaultConfig,
    RequestRecord,
    ToyModel,
    encode,
)
from klstream.emulator.protocol import (
    MUST_THINK_MESSAGE,
    NOPREFILL_MESSAGE,
    ROUNDS_TO_ONE,
    SENTINEL_LOGPROB,
    VERTEX_NO_LOGPROBS_MESSAGE,
)
from klstream.emulator.service import ServiceConfig
from klstream.emulator.toymodel import top_k

T = TypeVar("T")
PROMPT = "What is the capital of France?"
SCORING = types.GenerateContentConfig(
    max_output_tokens=1,
    response_logprobs=True,
    logprobs=20,
    thinking_config=types.ThinkingConfig(thinking_budget=0),
)


def contents(prompt: str, prefill: str | None = None) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": prompt}]}]
    if prefill is not None:
        turns.append({"role": "model", "parts": [{"text": prefill}]})
    return turns


class Api:
    """SDK calls against one emulator, on one event loop, with reused clients.

    Creating a genai.Client and its first session costs ~150 ms (SSL
    contexts), so clients are cached per option set.
    """

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self._runner = asyncio.Runner()
        self._clients: dict[str, genai.Client] = {}

    def client(self, **http: Any) -> genai.Client:
        """A Developer API client; ``http`` are extra ``HttpOptions`` fields."""
        return self._cached(
            f"dev{http!r}",
            lambda: genai.Client(
                api_key="test-key",
                http_options=types.HttpOptions(base_url=self.server.base_url, **http),
            ),
        )

    def vertex(self, **kwargs: Any) -> genai.Client:
        """A Vertex AI client; ``kwargs`` go to ``genai.Client``.

        AnonymousCredentials do not work: the SDK refreshes credentials that
        hold no token, and anonymous ones refuse to refresh.
        """
        return self._cached(
            f"vertex{kwargs!r}",
            lambda: genai.Client(
                vertexai=True,
                http_options=types.HttpOptions(base_url=self.server.base_url),
                **kwargs,
            ),
        )

    def _cached(self, key: str, make: Callable[[], genai.Client]) -> genai.Client:
        if key not in self._clients:
            self._clients[key] = make()
        return self._clients[key]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def generate(
        self,
        client: genai.Client | None = None,
        model: str = "toy",
        prompt: str = PROMPT,
        prefill: str | None = None,
        config: types.GenerateContentConfig = SCORING,
    ) -> types.GenerateContentResponse:
        return self.run(
            (client or self.client()).aio.models.generate_content(
                model=model, contents=contents(prompt, prefill), config=config
            )
        )

    def http(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> tuple[int, Any]:
        """A plain HTTP request, for what the SDK cannot send."""

        async def go() -> tuple[int, Any]:
            url = self.server.base_url + path
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with (
                aiohttp.ClientSession() as session,
                session.request(method, url, json=body, timeout=timeout) as resp,
            ):
                return resp.status, await resp.json()

        return self.run(go())

    def close(self) -> None:
        for client in self._clients.values():
            self.run(client.aio.aclose())
        self._runner.close()


@pytest.fixture(scope="module")
def shared_api() -> Iterator[Api]:
    with EmulatorServer() as server:
        api = Api(server)
        yield api
        api.close()


@pytest.fixture
def api(shared_api: Api) -> Api:
    """The shared emulator with faults off and an empty log."""
    shared_api.server.set_faults(FaultConfig())
    shared_api.server.reset_log()
    return shared_api


def wait_for_records(server: EmulatorServer, count: int) -> list[RequestRecord]:
    """The request log once it holds ``count`` records (handlers log when they finish)."""
    deadline = time.monotonic() + 5
    while len(server.requests) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.requests


def token_credentials() -> google.oauth2.credentials.Credentials:
    """Credentials that already hold a token, so the SDK never tries to refresh them."""
    # google-auth's constructors carry no annotations.
    return google.oauth2.credentials.Credentials(token="test-token")  # type: ignore[no-untyped-call]


def candidate_of(response: types.GenerateContentResponse) -> types.Candidate:
    """The response's first (and only) candidate."""
    assert response.candidates
    return response.candidates[0]


def logprobs_of(response: types.GenerateContentResponse) -> types.LogprobsResult:
    logprobs = candidate_of(response).logprobs_result
    assert logprobs is not None
    return logprobs


def chosen_of(response: types.GenerateContentResponse) -> list[types.LogprobsResultCandidate]:
    """The chosen token of every step."""
    chosen = logprobs_of(response).chosen_candidates
    assert chosen is not None
    return chosen


def top_of(response: types.GenerateContentResponse) -> list[list[types.LogprobsResultCandidate]]:
    """The top candidates of every step."""
    steps = logprobs_of(response).top_candidates
    assert steps is not None
    tops = [step.candidates for step in steps]
    assert all(top is not None for top in tops)
    return [top for top in tops if top is not None]


def usage_of(response: types.GenerateContentResponse) -> types.GenerateContentResponseUsageMetadata:
    assert response.usage_metadata is not None
    return response.usage_metadata


def assert_matches_toy_model(
    response: types.GenerateContentResponse, model: str, prompt: str, prefill: str | None
) -> None:
    expected = top_k(
        ToyModel.for_name(model).next_token_logprobs(prompt, encode(prefill or "")), 20
    )
    got = top_of(response)[0]
    assert len(got) == 20
    assert [(c.token, c.token_id, c.log_probability) for c in got] == [tuple(c) for c in expected]
    chosen = chosen_of(response)[0]
    assert chosen.log_probability == candidate_of(response).avg_logprobs
    assert chosen.token == (response.text or "")


@pytest.mark.parametrize(
    "prefill", [None, "", "The capital of", "Paris is the cap", "Ünïcødé ☃  text\n"]
)
def test_scoring_request_matches_the_toy_model(api: Api, prefill: str | None) -> None:
    response = api.generate(prefill=prefill)
    assert_matches_toy_model(response, "toy", PROMPT, prefill)
    candidate = candidate_of(response)
    assert candidate.finish_reason in (types.FinishReason.MAX_TOKENS, types.FinishReason.STOP)
    assert logprobs_of(response).log_probability_sum == candidate.avg_logprobs
    usage = usage_of(response)
    assert usage.prompt_token_count == len(encode(PROMPT)) + len(encode(prefill or ""))
    assert usage.candidates_token_count == 1
    assert usage.total_token_count == len(encode(PROMPT)) + len(encode(prefill or "")) + 1
    assert response.model_version == "toy"
    assert response.response_id
    (record,) = api.server.requests
    assert (record.path, record.model, record.status) == (
        "/v1/models/toy:generateContent",  # the SDK's default Developer API version
        "toy",
        200,
    )
    assert (record.prompt, record.prefill) == (PROMPT, prefill)


def test_vertex_path_with_project_and_location(api: Api) -> None:
    client = api.vertex(
        project="p",
        location="us-central1",
        credentials=token_credentials(),
    )
    response = api.generate(client, model="toy-d0.5", prefill="The")
    assert_matches_toy_model(response, "toy-d0.5", PROMPT, "The")
    assert logprobs_of(response).log_probability_sum is None
    assert api.server.requests[0].path == (
        "/v1beta1/projects/p/locations/us-central1/publishers/google/models/"
        "toy-d0.5:generateContent"
    )


def test_vertex_express_mode_path(api: Api) -> None:
    response = api.generate(api.vertex(api_key="k"))
    assert_matches_toy_model(response, "toy", PROMPT, None)
    assert api.server.requests[0].path == "/v1beta1/publishers/google/models/toy:generateContent"


def test_vertex_without_project_posts_to_the_bare_base_url(api: Api) -> None:
    with pytest.raises(errors.ClientError) as info:
        api.generate(api.vertex(credentials=token_credentials()))
    assert info.value.code == 404
    assert "project" in (info.value.message or "")


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_any_api_version_segment_is_routed(api: Api, version: str) -> None:
    response = api.generate(api.client(api_version=version))
    assert_matches_toy_model(response, "toy", PROMPT, None)
    assert api.server.requests[0].path == f"/{version}/models/toy:generateContent"


def test_sampling_is_seeded_and_retokenizes(api: Api) -> None:
    config = types.GenerateContentConfig(
        max_output_tokens=40, temperature=0.9, seed=7, response_logprobs=True, logprobs=5
    )
    first = api.generate(config=config)
    again = api.generate(config=config)
    other = api.generate(config=config.model_copy(update={"seed": 8, "temperature": 2.0}))
    assert first.text == again.text
    assert first.text != other.text

    local = ToyModel.for_name("toy").sample(PROMPT, 40, 0.9, 7, 5)
    chosen = chosen_of(first)
    assert [(c.token, c.token_id, c.log_probability) for c in chosen] == [
        tuple(s.chosen) for s in local.steps
    ]
    assert "".join(c.token or "" for c in chosen) == (first.text or "")
    assert encode(first.text or "") == [c.token_id for c in chosen if c.token_id != 0]
    assert len(top_of(first)) == len(chosen)
    assert candidate_of(first).finish_reason == local.finish_reason
    assert usage_of(first).candidates_token_count == len(chosen)


def test_temperature_zero_picks_the_top_candidate(api: Api) -> None:
    config = types.GenerateContentConfig(
        max_output_tokens=10, temperature=0.0, response_logprobs=True, logprobs=1
    )
    response = api.generate(config=config)
    for chosen, top in zip(chosen_of(response), top_of(response), strict=True):
        assert chosen == top[0]


def test_generation_continues_after_the_prefill(api: Api) -> None:
    prefill = "The capital of France is"
    config = types.GenerateContentConfig(max_output_tokens=6, temperature=0.0)
    response = api.generate(prefill=prefill, config=config)
    local = ToyModel.for_name("toy").sample(PROMPT, 6, 0.0, prefill_ids=encode(prefill))
    assert (response.text or "") == local.text
    assert candidate_of(response).logprobs_result is None  # not requested
    assert candidate_of(response).avg_logprobs is not None


def test_429_carries_retry_info(api: Api) -> None:
    api.server.set_faults(FaultConfig(rate_429=1.0, retry_delay_s=2.5))
    with pytest.raises(errors.ClientError) as info:
        api.generate()
    err = info.value
    assert (err.code, err.status) == (429, "RESOURCE_EXHAUSTED")
    (detail,) = err.details["error"]["details"]
    assert detail == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}
    assert err.response.headers["Retry-After"] == "3"
    assert api.server.stats()["by_status"] == {"429": 1}


@pytest.mark.parametrize(
    ("faults", "code", "status"),
    [(FaultConfig(rate_500=1.0), 500, "INTERNAL"), (FaultConfig(rate_503=1.0), 503, "UNAVAILABLE")],
)
def test_server_errors(api: Api, faults: FaultConfig, code: int, status: str) -> None:
    api.server.set_faults(faults)
    with pytest.raises(errors.ServerError) as info:
        api.generate()
    assert (info.value.code, info.value.status) == (code, status)


def test_fault_rates_are_seeded_fractions(api: Api) -> None:
    api.server.set_faults(FaultConfig(rate_503=0.5, seed=1))
    statuses = []
    for _ in range(40):
        try:
            api.generate()
            statuses.append(200)
        except errors.ServerError:
            statuses.append(503)
    assert 8 <= statuses.count(503) <= 32
    api.server.set_faults(FaultConfig(rate_503=0.5, seed=1))
    api.server.reset_log()
    for _ in range(40):
        with contextlib.suppress(errors.ServerError):
            api.generate()
    assert [r.status for r in api.server.requests] == statuses


def test_malformed_body(api: Api) -> None:
    api.server.set_faults(FaultConfig(rate_malformed=1.0))
    with pytest.raises(json.JSONDecodeError):
        api.generate()
    assert api.server.requests[0].status == 200
    assert api.server.requests[0].fault == "malformed"


def test_answers_without_logprobs(api: Api) -> None:
    api.server.set_faults(FaultConfig(rate_no_logprobs=1.0))
    response = api.generate()
    assert candidate_of(response).logprobs_result is None
    assert response.text
    response = api.generate(model="toy-nologprobs")
    assert candidate_of(response).logprobs_result is None


def test_hang_times_out_on_the_client(api: Api) -> None:
    api.server.set_faults(FaultConfig(rate_hang=1.0, hang_seconds=1.0))
    start = time.monotonic()
    with pytest.raises((asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        api.generate(api.client(timeout=200))
    assert time.monotonic() - start < 0.9
    # The server answers once the hang is over (keeps the next test's log clean).
    assert wait_for_records(api.server, 1)[0].fault == "hang"


@pytest.mark.parametrize(
    ("faults", "by_fault"),
    [
        (FaultConfig(latency_ms=300), {}),
        (FaultConfig(rate_hang=1.0, hang_seconds=0.3), {"hang": 1}),
    ],
    ids=["before-the-body-is-read", "after-the-body-is-read"],
)
def test_a_client_giving_up_mid_request_is_logged_as_a_disconnect(
    api: Api, faults: FaultConfig, by_fault: dict[str, int]
) -> None:
    api.server.set_faults(faults)
    with pytest.raises(TimeoutError):
        api.http("POST", "/v1beta/models/toy:generateContent", {"contents": contents(PROMPT)}, 0.05)
    (record,) = wait_for_records(api.server, 1)
    assert (record.status, record.model) == (DISCONNECT, "toy")
    assert api.server.stats() == {
        "total": 1,
        "by_status": {"disconnect": 1},
        "by_fault": by_fault,
    }


def test_latency_and_jitter(api: Api) -> None:
    api.server.set_faults(FaultConfig(latency_ms=150, jitter_ms=50))
    start = time.monotonic()
    api.generate()
    assert 0.15 <= time.monotonic() - start < 1.0


def test_quota_per_window(api: Api) -> None:
    api.server.set_faults(FaultConfig(quota_per_minute=3))
    for _ in range(3):
        api.generate()
    with pytest.raises(errors.ClientError) as info:
        api.generate()
    assert info.value.code == 429
    delay = info.value.details["error"]["details"][0]["retryDelay"]
    assert 55 < float(delay.removesuffix("s")) <= 60
    assert api.server.stats()["by_fault"] == {"quota": 1}

    api.server.set_faults(FaultConfig(quota_per_minute=2, quota_window_s=0.3))
    api.generate()
    api.generate()
    with pytest.raises(errors.ClientError):
        api.generate()
    time.sleep(0.35)
    api.generate()


def test_fail_first_n_per_distinct_request(api: Api) -> None:
    api.server.set_faults(FaultConfig(fail_first_n=2))
    for _ in range(2):
        with pytest.raises(errors.ServerError):
            api.generate()
    api.generate()
    with pytest.raises(errors.ServerError):
        api.generate(prefill="The")

    # A client retrying 503s gets through deterministically.
    api.server.set_faults(FaultConfig(fail_first_n=2))
    api.server.reset_log()
    retry = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.02)
    response = api.generate(api.client(retry_options=retry))
    assert_matches_toy_model(response, "toy", PROMPT, None)
    assert [r.status for r in api.server.requests] == [503, 503, 200]


def test_thinking_model_spends_the_budget_on_thoughts(api: Api) -> None:
    config = types.GenerateContentConfig(max_output_tokens=8, response_logprobs=True, logprobs=5)
    response = api.generate(model="toy-thinking", config=config)
    candidate = candidate_of(response)
    assert candidate.finish_reason == types.FinishReason.MAX_TOKENS
    assert response.text is None
    assert candidate.logprobs_result is None
    assert usage_of(response).thoughts_token_count == 8
    assert usage_of(response).candidates_token_count is None

    partial = config.model_copy(update={"thinking_config": types.ThinkingConfig(thinking_budget=3)})
    response = api.generate(model="toy-thinking", config=partial)
    usage = usage_of(response)
    assert usage.thoughts_token_count == 3
    answer_tokens = usage.candidates_token_count or 0
    assert 1 <= answer_tokens <= 5
    # The thought tokens are listed first among the logprobs, and their text is a thought part.
    chosen = chosen_of(response)
    assert len(chosen) == 3 + answer_tokens
    parts = candidate_of(response).content.parts or []  # type: ignore[union-attr]
    assert [bool(part.thought) for part in parts] == [True, False]
    assert parts[0].text == "".join(c.token or "" for c in chosen[:3])
    assert response.text == "".join(c.token or "" for c in chosen[3:])


def test_thinking_model_with_budget_zero_answers(api: Api) -> None:
    response = api.generate(model="toy-thinking", prefill="The")
    assert_matches_toy_model(response, "toy-thinking", PROMPT, "The")
    assert usage_of(response).thoughts_token_count is None


@pytest.mark.parametrize("key", ["thinkingBudget", "thinking_budget"])
def test_thinking_budget_in_either_case(api: Api, key: str) -> None:
    body = {
        "contents": contents(PROMPT),
        "generation_config": {
            "max_output_tokens": 1,
            "response_logprobs": True,
            "logprobs": 3,
            "thinking_config": {key: 0},
        },
    }
    status, payload = api.http("POST", "/v1beta/models/toy-thinking:generateContent", body)
    assert status == 200
    assert len(payload["candidates"][0]["logprobsResult"]["topCandidates"][0]["candidates"]) == 3


def test_noprefill_model_rejects_a_trailing_model_turn(api: Api) -> None:
    with pytest.raises(errors.ClientError) as info:
        api.generate(model="toy-noprefill", prefill="The")
    assert (info.value.code, info.value.status) == (400, "INVALID_ARGUMENT")
    assert (
        info.value.message
        == NOPREFILL_MESSAGE
        == ("Requests ending with a model turn are not supported.")
    )
    assert api.server.requests[0].prefill == "The"
    api.generate(model="toy-noprefill")


def test_same_model_under_two_names_answers_identically(api: Api) -> None:
    a = api.generate(model="toy", prefill="The")
    b = api.generate(model="gemini-toy", prefill="The")
    assert top_of(a)[0] == top_of(b)[0]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (types.GenerateContentConfig(response_logprobs=True, logprobs=21), "logprobs"),
        (types.GenerateContentConfig(response_logprobs=True, logprobs=-1), "logprobs"),
        (types.GenerateContentConfig(logprobs=5), "responseLogprobs"),
        (types.GenerateContentConfig(temperature=3.0), "temperature"),
    ],
)
def test_invalid_arguments(api: Api, config: types.GenerateContentConfig, fragment: str) -> None:
    with pytest.raises(errors.ClientError) as info:
        api.generate(config=config)
    assert (info.value.code, info.value.status) == (400, "INVALID_ARGUMENT")
    assert fragment in (info.value.message or "")


def test_unknown_model_is_not_found(api: Api) -> None:
    with pytest.raises(errors.ClientError) as info:
        api.generate(model="gemini-2.5-flash")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    assert "models/gemini-2.5-flash is not found" in (info.value.message or "")


def test_raw_protocol_errors(api: Api) -> None:
    status, body = api.http("POST", "/v1beta/models/toy:generateContent", {"contents": []})
    assert (status, body["error"]["status"]) == (400, "INVALID_ARGUMENT")
    status, body = api.http("POST", "/v1beta/models/toy:countTokens", {})
    assert (status, body["error"]["code"]) == (404, 404)


def test_system_instruction_is_part_of_the_prompt(api: Api) -> None:
    config = SCORING.model_copy(update={"system_instruction": "Be brief."})
    response = api.generate(config=config)
    assert_matches_toy_model(response, "toy", f"Be brief.\n{PROMPT}", None)
    assert api.server.requests[0].prompt == f"Be brief.\n{PROMPT}"


def test_stats_endpoint_and_request_log_file(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    with EmulatorServer(request_log=log) as srv:
        api = Api(srv)
        try:
            api.generate(prefill="The")
            with pytest.raises(errors.ClientError):
                api.generate(model="nope")
            status, stats = api.http("GET", "/_emulator/stats")
        finally:
            api.close()
        assert status == 200
        assert (
            stats == srv.stats() == {"total": 2, "by_status": {"200": 1, "404": 1}, "by_fault": {}}
        )
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["model"], x["prefill"], x["status"]) for x in lines] == [
        ("toy", "The", 200),
        ("nope", None, 404),
    ]


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if match := re.search(pattern, line):
            return match
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line matching {pattern!r}")


def test_emulate_command_serves_until_sigterm() -> None:
    proc = start_process("emulate", "--port", "0", "--latency-ms", "1", PYTHONUNBUFFERED="1")
    try:
        url = _wait_for_line(proc, r"klstream emulator listening on (http://\S+)", 20).group(1)
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=url))

        async def one() -> types.GenerateContentResponse:
            async with client.aio as aclient:
                return await aclient.models.generate_content(
                    model="toy", contents=contents(PROMPT), config=SCORING
                )

        response = asyncio.run(one())
        assert len(top_of(response)[0]) == 20
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_emulate_command_help_and_validation() -> None:
    result = invoke("emulate", "--help")
    assert result.exit_code == 0
    assert "without spending money" in " ".join(result.output.split())
    result = invoke("emulate", "--rate-429", "1.5")
    assert result.exit_code == 2
    assert "rate_429" in result.output


# --- the service's behaviour: implicit cache, logprobs whatever the temperature -------------


def test_the_implicit_cache_reports_a_repeated_long_prefix_as_cached(api: Api) -> None:
    api.server.set_service(ServiceConfig(cache_min_tokens=8, cache_ttl_s=60.0))
    try:
        prompt_tokens = len(encode(PROMPT))
        first = usage_of(api.generate(prefill="The capital of"))
        assert first.cached_content_token_count is None
        # The same prompt and a longer prefill: the earlier request's whole input is cached.
        longer = usage_of(api.generate(prefill="The capital of France is Paris"))
        assert longer.cached_content_token_count == prompt_tokens + len(encode("The capital of"))
        assert longer.prompt_token_count == prompt_tokens + len(
            encode("The capital of France is Paris")
        )
        # Another model has its own cache; a prefix shorter than the minimum is not reported.
        other = usage_of(api.generate(model="toy-d0.5", prefill="The capital of"))
        assert other.cached_content_token_count is None
        short = usage_of(api.generate(prompt="Hi", prefill="x"))
        assert short.cached_content_token_count is None
        assert usage_of(api.generate(prompt="Hi", prefill="x")).cached_content_token_count is None
    finally:
        api.server.set_service(ServiceConfig())


def test_a_prefix_leaves_the_cache_after_its_ttl(api: Api) -> None:
    api.server.set_service(ServiceConfig(cache_min_tokens=4, cache_ttl_s=0.2))
    try:
        api.generate(prefill="The capital of")
        assert usage_of(api.generate(prefill="The capital of")).cached_content_token_count
        time.sleep(0.3)
        assert usage_of(api.generate(prefill="The capital")).cached_content_token_count is None
    finally:
        api.server.set_service(ServiceConfig())


def test_logprobs_are_the_temperature_1_ones_at_any_temperature(api: Api) -> None:
    reference = top_of(api.generate(prefill="The"))[0]
    for temperature in (0.0, 0.3, 1.7):
        config = SCORING.model_copy(update={"temperature": temperature, "max_output_tokens": 1})
        assert top_of(api.generate(prefill="The", config=config))[0] == reference


def test_the_scaled_logprobs_switch_reports_the_distribution_sampled_from(api: Api) -> None:
    api.server.set_service(ServiceConfig(scaled_logprobs=True))
    try:
        plain = top_of(api.generate(prefill="The"))[0]
        expected = top_k(ToyModel.for_name("toy").next_token_logprobs(PROMPT, encode("The")), 20)
        assert [(c.token_id, c.log_probability) for c in plain] == [
            (c.token_id, c.logprob) for c in expected
        ]
        greedy = SCORING.model_copy(update={"temperature": 0.0})
        (only,) = top_of(api.generate(prefill="The", config=greedy))[0]
        assert (only.token_id, only.log_probability) == (expected[0].token_id, 0.0)
        sharp = SCORING.model_copy(update={"temperature": 0.5})
        sharpest = top_of(api.generate(prefill="The", config=sharp))[0][0].log_probability
        assert sharpest is not None and sharpest > expected[0].logprob
    finally:
        api.server.set_service(ServiceConfig())


# --- profiles of what real services do (README, "Gemini as of 2026-12-07") --------------------


def test_a_logprobsoff_model_refuses_logprobs_in_each_routes_own_words(api: Api) -> None:
    with pytest.raises(errors.ClientError) as developer:
        api.generate(model="toy-logprobsoff")
    assert (developer.value.code, developer.value.status) == (400, "INVALID_ARGUMENT")
    assert developer.value.message == "Logprobs is not enabled for models/toy-logprobsoff"
    vertex = api.vertex(project="p", location="us-central1", credentials=token_credentials())
    with pytest.raises(errors.ClientError) as on_vertex:
        api.generate(vertex, model="toy-logprobsoff")
    assert on_vertex.value.message == VERTEX_NO_LOGPROBS_MESSAGE
    assert (on_vertex.value.message or "").startswith(
        "Unable to submit request because Logprobs is not supported for this model. Learn more: "
    )
    plain = api.generate(model="toy-logprobsoff", config=types.GenerateContentConfig())
    assert plain.text is not None


def test_a_mustthink_model_refuses_budgets_below_its_minimum(api: Api) -> None:
    def with_budget(budget: int) -> types.GenerateContentConfig:
        thinking = types.ThinkingConfig(thinking_budget=budget)
        return SCORING.model_copy(update={"thinking_config": thinking, "max_output_tokens": 129})

    with pytest.raises(errors.ClientError) as zero:
        api.generate(model="toy-mustthink128", config=with_budget(0))
    assert zero.value.message == MUST_THINK_MESSAGE
    assert MUST_THINK_MESSAGE == "Budget 0 is invalid. This model only works in thinking mode."
    with pytest.raises(errors.ClientError) as below:
        api.generate(model="toy-mustthink128", config=with_budget(64))
    assert below.value.message == "The thinking budget (64) is invalid."
    response = api.generate(model="toy-mustthink128", prefill="The", config=with_budget(128))
    assert usage_of(response).thoughts_token_count == 128
    assert chosen_of(response)[128].token == response.text


def certain_prefill(prompt: str) -> str:
    """A prefill after which the toy's most likely token is within ``ROUNDS_TO_ONE`` of
    certain."""
    for seed in range(100):
        steps = ToyModel.for_name("toy").sample(prompt, 100, 1.0, seed, 1).steps
        for index, step in enumerate(steps):
            if step.top[0].logprob > -ROUNDS_TO_ONE:
                return "".join(step.chosen.token for step in steps[:index])
    raise AssertionError("the toy is never that certain after this prompt")


def test_sentinels_fill_the_list_after_a_near_certain_token(api: Api) -> None:
    prefill = certain_prefill(PROMPT)
    expected = top_k(ToyModel.for_name("toy").next_token_logprobs(PROMPT, encode(prefill)), 20)
    response = api.generate(model="toy-sentinels", prefill=prefill)
    (top,) = top_of(response)
    assert (top[0].token_id, top[0].log_probability) == (expected[0].token_id, 0.0)
    assert [c.log_probability for c in top[1:]] == [SENTINEL_LOGPROB] * 19
    assert not {c.token_id for c in top[1:]} & {c.token_id for c in expected}
    assert top_of(api.generate(model="toy-sentinels", prefill="The"))[0][0].log_probability != 0


def test_padded_lists_hold_the_true_top_k_and_two_sentinels(api: Api) -> None:
    plain = top_of(api.generate(prefill="The"))[0]
    padded = top_of(api.generate(model="toy-padded", prefill="The"))[0]
    assert padded[:20] == plain
    assert [c.log_probability for c in padded[20:]] == [SENTINEL_LOGPROB] * 2


def test_a_rerouted_model_answers_as_another_and_says_so(api: Api) -> None:
    response = api.generate(model="toy-d2-rerouted", prefill="The")
    assert response.model_version == "toy"
    assert_matches_toy_model(response, "toy", PROMPT, "The")


def test_a_retired_model_is_not_found(api: Api) -> None:
    with pytest.raises(errors.ClientError) as info:
        api.generate(model="gemini-2.0-flash-toy-retired")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    assert info.value.message == (
        "models/gemini-2.0-flash-toy-retired is not found for API version v1, or is not "
        "supported for generateContent."
    )


def test_the_implicit_cache_minimum_is_the_current_docs_2048() -> None:
    assert ServiceConfig().cache_min_tokens == 2048
    help_text = invoke("emulate", "--help").output
    assert "--cache-min-tokens INTEGER" in help_text and "[default: 2048]" in help_text
