"""The toy backend (:mod:`klstream.backends.toy`), used through the registry as the schedulers
use a backend: its answers are the HTTP emulator's for the same requests (checked against the
emulator through the real Gemini and OpenAI backends), its faults are the emulator's raised as
typed faults that the transport retries, its hangs and latencies pass in virtual time, and its
batch jobs move one step per ``get``. Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from fakeservers import refused_url

from klstream import backends
from klstream.backends import gemini
from klstream.backends import openai as openai_backend
from klstream.backends.base import (
    Answer,
    BatchJobs,
    BatchLine,
    ClientSettings,
    Endpoint,
    PrefillRequest,
    PromptScores,
    PromptScoring,
    RemoteJob,
    Tokenized,
)
from klstream.backends.prices import Usage
from klstream.backends.toy import TOY, ToyBatchConfig, ToyService
from klstream.backends.transport import Caller, CallStats, Outcome, RetryPolicy, describe
from klstream.emulator import EmulatorServer, FaultConfig, ServiceConfig
from klstream.emulator.batch.common import EndState
from klstream.emulator.faults import SHORT_TOPK
from klstream.errors import (
    BatchCreateUnknown,
    BatchRejected,
    BatchServiceError,
    EndpointUnreachable,
    MethodUnsupported,
    ModelNotFound,
    Overloaded,
    PrefillRejected,
    RateLimited,
    RequestRejected,
    ThinkingNotDisabled,
    TransientFault,
    UnusableAnswer,
)

PROMPT = "Tell me about the sea and the lighthouse keeper."
MODEL = "toy-d0.5"
REQUEST = PrefillRequest(PROMPT, "The sea is", 5, max_tokens=2, seed=4)
NO_WAIT = RetryPolicy(max_retries=2, backoff_initial_s=0, backoff_max_s=0)
PREFILLS = ["", "The", "The sea", "The sea is blue", "The sea is blue and the cat"]


def generate(
    endpoint: Endpoint, model: str, request: PrefillRequest, thinking_budget: int | None = 0
) -> Answer:
    async def call() -> Answer:
        settings = ClientSettings(model, thinking_budget=thinking_budget)
        async with backends.open_prefill(endpoint, settings) as client:
            return await client.generate(request)

    return asyncio.run(call())


def emulator_generate(
    server: EmulatorServer, model: str, request: PrefillRequest, thinking_budget: int | None = 0
) -> Answer:
    """The HTTP emulator's answer, read by the Gemini backend over google-genai."""

    async def call() -> Answer:
        endpoint = Endpoint("gemini", "k", base_url=server.base_url)
        settings = ClientSettings(model, thinking_budget=thinking_budget)
        async with gemini.open_prefill(endpoint, settings) as client:
            return await client.generate(request)

    return asyncio.run(call())


def retried(toy: ToyService, request: PrefillRequest = REQUEST) -> Outcome:
    async def call() -> Outcome:
        endpoint = toy.endpoint()
        caller = Caller(endpoint, NO_WAIT, 4, CallStats())
        async with backends.open_prefill(endpoint, ClientSettings(MODEL)) as client:
            return await caller.generate(client, request)

    return asyncio.run(call())


def test_registered_and_resolved_like_a_real_backend(toy: ToyService) -> None:
    backend = backends.load_backend("toy")
    assert backend is TOY
    default = backends.endpoint_from_environment("toy")
    assert (default.base_url, default.url, default.api_key) == (None, "toy://default", None)
    assert generate(default, MODEL, REQUEST).steps
    named = backends.endpoint_from_environment("toy", base_url=toy.url, timeout_s=5.0)
    assert named == toy.endpoint(timeout_s=5.0)
    assert generate(named, MODEL, REQUEST) == generate(default, MODEL, REQUEST)
    assert [(r.kind, r.model, r.max_tokens, r.outcome) for r in toy.requests] == [
        ("generate", MODEL, 2, "ok")
    ]
    assert backends.batch_jobs(named, ClientSettings(MODEL), None).service == "toy"


def test_a_service_is_reached_only_while_open() -> None:
    with ToyService() as closed:
        endpoint = closed.endpoint()
    for url in (closed.url, refused_url()):
        with pytest.raises(EndpointUnreachable, match=re.escape(url)):
            backends.endpoint_from_environment("toy", base_url=url)
    with pytest.raises(EndpointUnreachable, match=re.escape(closed.url)):
        generate(endpoint, MODEL, REQUEST)


@pytest.mark.parametrize(
    "service_config",
    [ServiceConfig(cache_min_tokens=4), ServiceConfig(cache_min_tokens=4, scaled_logprobs=True)],
    ids=["reported", "scaled"],
)
def test_prefill_answers_are_the_emulators(
    emulator: EmulatorServer, service_config: ServiceConfig
) -> None:
    """Steps, text, finish reason and usage (the implicit cache's too) equal, request after
    request."""
    cases = [
        (MODEL, 0, PrefillRequest(PROMPT, "", 5, seed=1)),
        (MODEL, 0, PrefillRequest(PROMPT, "The sea is", 20, max_tokens=4, temperature=0.7, seed=3)),
        ("toy", 0, PrefillRequest(PROMPT, "Hello world. The", 3, max_tokens=6, temperature=0)),
        ("toy-thinking", 4, PrefillRequest(PROMPT, "The", 5, max_tokens=3, seed=9)),
    ]
    emulator.set_service(service_config)
    with ToyService(service=service_config) as toy:
        for model, budget, request in cases:
            expected = emulator_generate(emulator, model, request, budget)
            assert generate(toy.endpoint(), model, request, budget) == expected
        answer = generate(toy.endpoint(), MODEL, PrefillRequest(PROMPT, "The", 5, seed=1))
        assert answer.usage.cached_tokens > 0


@pytest.mark.parametrize(
    ("model", "budget", "request_", "error"),
    [
        ("toy-thinking", None, REQUEST, ThinkingNotDisabled),
        ("toy-noprefill", 0, REQUEST, PrefillRejected),
        ("toy-nologprobs", 0, REQUEST, UnusableAnswer),
        ("gemini-2.5-flash", 0, REQUEST, ModelNotFound),
        (MODEL, 0, PrefillRequest(PROMPT, "", 25), RequestRejected),
    ],
)
def test_models_that_cannot_answer_fail_as_with_the_emulator(
    emulator: EmulatorServer,
    toy: ToyService,
    model: str,
    budget: int | None,
    request_: PrefillRequest,
    error: type[Exception],
) -> None:
    with pytest.raises(error) as over_http:
        emulator_generate(emulator, model, request_, budget)
    with pytest.raises(error) as in_process:
        generate(toy.endpoint(), model, request_, budget)
    assert type(in_process.value) is type(over_http.value)
    if error in (ThinkingNotDisabled, PrefillRejected, UnusableAnswer):
        assert str(in_process.value) == str(over_http.value)
    assert [(r.model, r.outcome) for r in toy.requests] == [(model, error.__name__)]


def test_noprefill_and_thinking_models_answer_when_they_can(toy: ToyService) -> None:
    at_start = PrefillRequest(PROMPT, "", 5)
    assert generate(toy.endpoint(), "toy-noprefill", at_start).steps
    answer = generate(toy.endpoint(), "toy-thinking", REQUEST, thinking_budget=3)
    assert (len(answer.steps), answer.usage.thoughts_tokens) == (2, 3)
    assert generate(toy.endpoint(), "toy-thinking", REQUEST).usage.thoughts_tokens == 0


@pytest.mark.parametrize(
    ("faults", "fault", "name"),
    [
        (FaultConfig(rate_429=1.0, retry_delay_s=0), RateLimited, "429"),
        (FaultConfig(rate_500=1.0), TransientFault, "500"),
        (FaultConfig(rate_503=1.0), Overloaded, "503"),
        (FaultConfig(rate_malformed=1.0), UnusableAnswer, "malformed"),
        (FaultConfig(rate_html=1.0), UnusableAnswer, "html"),
        (FaultConfig(rate_no_logprobs=1.0), UnusableAnswer, "no_logprobs"),
    ],
)
def test_each_fault_is_a_typed_fault_the_transport_retries(
    toy: ToyService, faults: FaultConfig, fault: type[Exception], name: str
) -> None:
    toy.set_faults(faults)
    with pytest.raises(fault) as raised:
        generate(toy.endpoint(), MODEL, REQUEST)
    assert type(raised.value) is fault
    outcome = retried(toy)
    assert (outcome.value, outcome.attempts) == (None, NO_WAIT.max_retries + 1)
    assert outcome.error == str(raised.value)
    assert {(r.fault, r.outcome) for r in toy.requests} == {(name, fault.__name__)}
    assert len(toy.requests) == 1 + outcome.attempts


def answer_or_error(call: Callable[[], Answer]) -> Answer | str:
    try:
        return call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"


@pytest.mark.parametrize(
    "faults",
    [FaultConfig(rate_short_topk=1.0), FaultConfig(rate_503=1.0), FaultConfig(rate_429=1.0)],
    ids=["short_topk", "503", "429"],
)
def test_faults_answer_as_the_emulators_word_for_word(
    emulator: EmulatorServer, toy: ToyService, faults: FaultConfig
) -> None:
    """The toy once ignored ``rate_short_topk`` and worded its 503 otherwise."""
    emulator.set_faults(faults)
    toy.set_faults(faults)
    over_http = answer_or_error(lambda: emulator_generate(emulator, MODEL, REQUEST))
    in_process = answer_or_error(lambda: generate(toy.endpoint(), MODEL, REQUEST))
    assert in_process == over_http
    if isinstance(in_process, Answer):
        assert {len(step.top) for step in in_process.steps} == {SHORT_TOPK}


def test_the_first_copies_of_a_request_fail_then_it_is_answered(toy: ToyService) -> None:
    toy.set_faults(FaultConfig(fail_first_n=2))
    outcome = retried(toy)
    assert outcome.value == generate(toy.endpoint(), MODEL, REQUEST)
    assert outcome.attempts == 3
    assert [r.fault for r in toy.requests] == ["fail_first_n", "fail_first_n", None, None]
    with pytest.raises(Overloaded):
        generate(toy.endpoint(), MODEL, PrefillRequest(PROMPT, "The", 5))


def test_quota(toy: ToyService) -> None:
    toy.set_faults(FaultConfig(quota_per_minute=1))
    generate(toy.endpoint(), MODEL, REQUEST)
    with pytest.raises(RateLimited) as over_quota:
        generate(toy.endpoint(), MODEL, REQUEST)
    assert over_quota.value.retry_after is not None and 0 < over_quota.value.retry_after <= 60
    assert [r.fault for r in toy.requests] == [None, "quota"]
    toy.reset_log()
    assert toy.requests == []


def test_hangs_and_latency_pass_in_virtual_time(toy: ToyService) -> None:
    """A hang the timeout cuts short is the time-out at once, with the real backends' text; a
    shorter hang, a latency and a jitter delay nothing (a day of them answers at once)."""
    answer = generate(toy.endpoint(), MODEL, REQUEST)
    day = 86_400.0
    toy.set_faults(FaultConfig(rate_hang=1.0, hang_seconds=day))
    started = time.monotonic()
    with pytest.raises(TransientFault) as timed_out:
        generate(toy.endpoint(timeout_s=day), MODEL, REQUEST)
    assert str(timed_out.value) == describe(TimeoutError())
    outcome = retried(toy)
    assert (outcome.error, outcome.attempts) == (describe(TimeoutError()), NO_WAIT.max_retries + 1)
    assert generate(toy.endpoint(timeout_s=2 * day), MODEL, REQUEST) == answer
    toy.set_faults(FaultConfig(latency_ms=day * 1000, jitter_ms=day * 1000))
    assert generate(toy.endpoint(), MODEL, REQUEST) == answer
    assert time.monotonic() - started < day / 1000
    hangs = [(r.fault, r.outcome) for r in toy.requests[1:]]
    assert hangs == [("hang", "TransientFault")] * 4 + [("hang", "ok"), (None, "ok")]


def prompt_scores(
    server: AbstractAsyncContextManager[PromptScoring], response: str, top_logprobs: int
) -> tuple[Tokenized, Tokenized, PromptScores, PromptScores]:
    """The template's and the response's tokens, then the prompt logprobs of both from the
    response on, and of everything."""

    async def call() -> tuple[Tokenized, Tokenized, PromptScores, PromptScores]:
        async with server as scoring:
            template = await scoring.template_tokens(PROMPT)
            text = await scoring.text_tokens(response)
            ids = template.tokens + text.tokens
            from_response = await scoring.prompt_logprobs(ids, top_logprobs, len(template.tokens))
            return template, text, from_response, await scoring.prompt_logprobs(ids, 3, 0)

    return asyncio.run(call())


def openai_server(
    emulator: EmulatorServer, model: str
) -> AbstractAsyncContextManager[PromptScoring]:
    url = openai_backend.api_base_url(emulator.base_url)
    return openai_backend.open_server(Endpoint("openai", None, base_url=url), ClientSettings(model))


def test_prompt_logprobs_are_the_emulators(emulator: EmulatorServer, toy: ToyService) -> None:
    response = "The sea is blue and the cat likes the light."
    over_http = prompt_scores(openai_server(emulator, MODEL), response, 5)
    in_process = prompt_scores(
        backends.open_prompt_scoring(toy.endpoint(), ClientSettings(MODEL)), response, 5
    )
    assert in_process[:2] == over_http[:2]
    ids = in_process[0].tokens + in_process[1].tokens
    for toy_scores, http_scores in zip(in_process[2:], over_http[2:], strict=True):
        assert toy_scores.tokens == http_scores.tokens
        assert toy_scores.after is not None and http_scores.after is not None
        assert [(c.token, c.logprob) for c in toy_scores.after] == [
            (c.token, c.logprob) for c in http_scores.after
        ]
        assert toy_scores.usage == Usage(prompt_tokens=len(ids), candidates_tokens=1)
    assert len(in_process[2].tokens) == len(in_process[1].tokens)
    assert len(in_process[3].tokens) == len(ids) - 1
    assert [r.kind for r in toy.requests] == ["tokenize"] * 2 + ["prompt_logprobs"] * 2
    assert toy.requests[-1].prompt == PROMPT
    assert toy.requests[-1].prefill == response


@pytest.mark.parametrize(
    ("model", "faults", "error"),
    [
        ("toy-nologprobs", FaultConfig(), MethodUnsupported),
        (MODEL, FaultConfig(rate_short_prompt_logprobs=1.0), UnusableAnswer),
        (MODEL, FaultConfig(rate_no_logprobs=1.0), MethodUnsupported),
        (MODEL, FaultConfig(rate_500=1.0), TransientFault),
        ("toy-ctx16", FaultConfig(), RequestRejected),
        ("gpt-4o", FaultConfig(), ModelNotFound),
    ],
)
def test_prompt_logprobs_fail_as_with_the_emulator(
    emulator: EmulatorServer,
    toy: ToyService,
    model: str,
    faults: FaultConfig,
    error: type[Exception],
) -> None:
    emulator.set_faults(faults)
    toy.set_faults(faults)
    response = "The sea is blue and the cat likes the light."
    with pytest.raises(error) as over_http:
        prompt_scores(openai_server(emulator, model), response, 5)
    settings = ClientSettings(model)
    with pytest.raises(error) as in_process:
        prompt_scores(backends.open_prompt_scoring(toy.endpoint(), settings), response, 5)
    assert type(in_process.value) is type(over_http.value)
    if error in (UnusableAnswer, RequestRejected):
        assert str(in_process.value) == str(over_http.value)


def write_input(jobs: BatchJobs, path: Path, requests: dict[str, PrefillRequest]) -> Path:
    path.write_bytes(
        b"".join(
            jobs.encode_line(key, index, request)
            for index, (key, request) in enumerate(requests.items())
        )
    )
    return path


def submit(jobs: BatchJobs, local: Path, display_name: str) -> RemoteJob:
    async def call() -> RemoteJob:
        remote_input, remote_output = jobs.remote_names(display_name, display_name)
        await jobs.prepare()
        await jobs.upload(local, remote_input, display_name)
        return await jobs.create(display_name, remote_input, remote_output)

    return asyncio.run(call())


def poll(jobs: BatchJobs, name: str) -> tuple[list[str], RemoteJob]:
    """Get the job until it ends: the states seen and the job as it ended."""

    async def call() -> tuple[list[str], RemoteJob]:
        states = []
        while True:
            job = await jobs.get(name)
            assert job is not None
            states.append(job.state)
            if job.ended:
                return states, job

    return asyncio.run(call())


def collect(jobs: BatchJobs, job: RemoteJob, into: Path) -> list[BatchLine] | None:
    """The job's output lines decoded, or None when it has no output."""
    if not asyncio.run(jobs.download(job, None, into)):
        return None
    return [jobs.decode_line(raw) for raw in into.read_bytes().splitlines()]


REQUESTS = {
    f"key-{index}": PrefillRequest(PROMPT, prefill, 5, max_tokens=2, seed=index)
    for index, prefill in enumerate(PREFILLS)
}


def toy_jobs(toy: ToyService, model: str = MODEL, budget: int | None = 0) -> BatchJobs:
    return backends.batch_jobs(toy.endpoint(), ClientSettings(model, thinking_budget=budget), None)


def test_a_batch_job_answers_every_line_as_generate_does(toy: ToyService, tmp_path: Path) -> None:
    jobs = toy_jobs(toy)
    local = write_input(jobs, tmp_path / "input.jsonl", REQUESTS)
    created = submit(jobs, local, "klstream-job-1")
    states, ended = poll(jobs, created.name)
    assert [created.state, *states] == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert (ended.succeeded, ended.failed, ended.incomplete) == (len(REQUESTS), 0, 0)
    lines = collect(jobs, ended, tmp_path / "output.jsonl")
    assert lines is not None and sorted(str(line.key) for line in lines) == sorted(REQUESTS)
    keys = list(REQUESTS)
    for line in lines:
        assert line.key is not None and line.error is None
        assert line.index == keys.index(line.key)
        assert line.answer == generate(toy.endpoint(), MODEL, REQUESTS[line.key])
    assert toy.submitted_keys() == Counter(keys)
    assert Counter(r.kind for r in toy.requests) == {"batch": 5, "generate": 5}
    asyncio.run(jobs.remove("toy-files/klstream-job-1", ended, None))
    assert toy.file_names() == []


@pytest.mark.parametrize(
    ("model", "budget", "error"),
    [("toy-thinking", None, "thinking"), ("toy-noprefill", 0, "trailing model turn")],
)
def test_batch_lines_fail_as_online_requests_do(
    toy: ToyService, tmp_path: Path, model: str, budget: int | None, error: str
) -> None:
    jobs = toy_jobs(toy, model, budget)
    job = submit(jobs, write_input(jobs, tmp_path / "input.jsonl", REQUESTS), "klstream-job-1")
    lines = collect(jobs, poll(jobs, job.name)[1], tmp_path / "output.jsonl")
    assert lines is not None
    failed = {line.key for line in lines if line.error is not None}
    assert all(error in line.error for line in lines if line.error is not None)
    assert failed == (set(REQUESTS) if model == "toy-thinking" else set(REQUESTS) - {"key-0"})


def test_jobs_end_in_the_configured_states(toy: ToyService, tmp_path: Path) -> None:
    ends: tuple[EndState, ...] = ("FAILED", "EXPIRED", "SUCCEEDED", "CANCELLED")
    toy.set_batch(ToyBatchConfig(polls=3, end_states=ends, partial_fraction=0.4))
    jobs = toy_jobs(toy)
    local = write_input(jobs, tmp_path / "input.jsonl", REQUESTS)
    for number, end in enumerate(ends):
        states, job = poll(jobs, submit(jobs, local, f"klstream-job-{number}").name)
        assert states == ["RUNNING", "RUNNING", end]
        answered = len(REQUESTS) if end == "SUCCEEDED" else 2
        assert (job.succeeded, job.failed, job.incomplete) == (answered, 0, 5 - answered)
        assert (job.error is not None) == (end in ("FAILED", "EXPIRED"))
        lines = collect(jobs, job, tmp_path / "output.jsonl")
        assert lines is not None and len(lines) == answered
    assert [job.state for job in toy.jobs()] == list(ends)
    assert toy.submitted_keys() == Counter({key: len(ends) for key in REQUESTS})


def test_failed_lines_are_answered_when_submitted_again(toy: ToyService, tmp_path: Path) -> None:
    toy.set_batch(ToyBatchConfig(polls=1, line_error_rate=1.0))
    jobs = toy_jobs(toy)
    local = write_input(jobs, tmp_path / "input.jsonl", REQUESTS)
    for number, failed in enumerate((len(REQUESTS), 0)):
        states, job = poll(jobs, submit(jobs, local, f"klstream-job-{number}").name)
        assert states == ["SUCCEEDED"] and job.failed == failed
        lines = collect(jobs, job, tmp_path / "output.jsonl")
        assert lines is not None and sum(line.error is not None for line in lines) == failed
    assert [r.fault for r in toy.requests] == ["line_error"] * 5 + [None] * 5
    assert toy.submitted_keys() == Counter({key: 2 for key in REQUESTS})


def test_a_create_whose_reply_is_lost_is_found(toy: ToyService, tmp_path: Path) -> None:
    toy.set_batch(ToyBatchConfig(lost_create_replies=1))
    jobs = toy_jobs(toy)
    local = write_input(jobs, tmp_path / "input.jsonl", REQUESTS)
    with pytest.raises(BatchCreateUnknown) as lost:
        submit(jobs, local, "klstream-job-1")
    assert lost.value.replied
    found = asyncio.run(jobs.find("klstream-job-1"))
    assert found is not None and found.state == "PENDING"
    assert toy.jobs() == [found]
    assert asyncio.run(jobs.find("klstream-job-2")) is None
    assert poll(jobs, found.name)[0] == ["RUNNING", "SUCCEEDED"]
    assert toy.submitted_keys() == Counter(REQUESTS.keys())
    assert submit(jobs, local, "klstream-job-2").state == "PENDING"


def test_cancel_forget_and_refusals(toy: ToyService, tmp_path: Path) -> None:
    """A job cancelled while pending answers nothing, one cancelled while running part of its
    lines; a job the service forgot is gone; a create without its input is refused."""
    jobs = toy_jobs(toy)
    local = write_input(jobs, tmp_path / "input.jsonl", REQUESTS)
    pending = submit(jobs, local, "klstream-job-1")
    asyncio.run(jobs.cancel(pending.name))
    cancelled = get(jobs, pending.name)
    assert (cancelled.state, cancelled.incomplete) == ("CANCELLED", len(REQUESTS))
    assert collect(jobs, cancelled, tmp_path / "output.jsonl") is None
    running = submit(jobs, local, "klstream-job-2")
    assert get(jobs, running.name).state == "RUNNING"
    asyncio.run(jobs.cancel(running.name))
    cancelled = get(jobs, running.name)
    assert (cancelled.state, cancelled.succeeded, cancelled.incomplete) == ("CANCELLED", 2, 3)
    toy.forget_job(running.name)
    assert asyncio.run(jobs.get(running.name)) is None
    with pytest.raises(BatchServiceError):
        asyncio.run(jobs.cancel(running.name))
    with pytest.raises(BatchRejected, match="toy-files/nothing"):
        asyncio.run(jobs.create("nothing", "toy-files/nothing", None))


def get(jobs: BatchJobs, name: str) -> RemoteJob:
    job = asyncio.run(jobs.get(name))
    assert job is not None
    return job


def test_uploads_are_idempotent(toy: ToyService, tmp_path: Path) -> None:
    jobs = toy_jobs(toy)
    local = tmp_path / "input.jsonl"

    def upload(data: bytes) -> bytes:
        local.write_bytes(data)
        asyncio.run(jobs.upload(local, "toy-files/job", "job"))
        return toy.read_file("toy-files/job")

    assert upload(b"first\n") == b"first\n"
    assert upload(b"again\n") == b"first\n"
    assert upload(b"longer\n") == b"longer\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"key": "k", "index": 3}',
        b'{"key": "k", "index": 3, "answer": {"steps": 7}}',
        b'{"key": "k", "index": 3, "answer": {"steps": [{"chosen": 1}]}}',
        b'{"key": "k", "index": 3, "error": "500: it broke"}',
    ],
)
def test_malformed_output_lines_are_errors(toy: ToyService, raw: bytes) -> None:
    line = toy_jobs(toy).decode_line(raw)
    assert line.answer is None and line.error
    if raw.startswith(b'{"key"'):
        assert (line.key, line.index) == ("k", 3)
