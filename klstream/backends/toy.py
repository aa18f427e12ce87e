"""The toy backend: the emulator's toy models (:mod:`klstream.emulator`) behind the same
capability interfaces as the real backends, in this process, with no HTTP.

It exists so that scheduler, checkpoint and resume tests run in process, fast and without
sleeps; the HTTP emulator stays for wire formats and for faults on the wire. An answer is the
one the HTTP emulator gives for the same request (the same toy model call,
:func:`~klstream.emulator.protocol.toy_answer`). Faults come from the emulator's
:class:`~klstream.emulator.FaultConfig`, drawn in the emulator's order, and are raised as the
typed faults a real backend raises for the emulator's answers. Batch jobs move one step per
``get``, not by a clock.

Time on the wire is virtual: nothing here sleeps. ``latency_ms`` and ``jitter_ms`` pass at
once (the jitter is still drawn, so the faults after it are the emulator's), and a ``hang``
of ``hang_seconds`` at or beyond the endpoint's timeout raises at once the time-out a real
backend raises when the timeout passes; a shorter hang is answered as usual. Only the quota
window keeps to the clock, as the retries that wait it out do.

A test picks a service by its address: ``with ToyService(faults) as service:`` registers a
service under a fresh name, and ``service.endpoint()`` (``toy://NAME``) points a run at it.
The test then reads its request log (``requests``), switches its faults (``set_faults``),
service behaviour (``set_service``) and batch behaviour (``set_batch``), lists its jobs
(``jobs``) and counts the keys they were given (``submitted_keys``). Without a base URL, or
with ``toy://default``, a run goes to one fault-free service shared by the whole process. No
key is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from klstream.backends.base import (
    END_STATES,
    Answer,
    Backend,
    BatchJobs,
    BatchLine,
    Candidate,
    ClientSettings,
    Endpoint,
    Generated,
    PrefillRequest,
    PromptScores,
    PromptToken,
    RemoteJob,
    Tokenized,
    Where,
)
from klstream.backends.dialects import lacks
from klstream.backends.gemini import parse_answer_body
from klstream.backends.google_errors import ServiceError, status_fault
from klstream.backends.prices import Usage
from klstream.emulator import openai_routes
from klstream.emulator.batch.common import END_STATES as CONFIGURABLE_END_STATES
from klstream.emulator.batch.common import EndState
from klstream.emulator.faults import SHORT_TOPK, FaultConfig, FaultState
from klstream.emulator.openai_routes import PromptSplit, max_model_len, render_chat
from klstream.emulator.protocol import (
    STATUS_NAMES,
    ApiError,
    Call,
    answer_body,
    build_call,
    cut_top_candidates,
    prompt_ids,
    refuse_call,
)
from klstream.emulator.service import PrefixCache, ServiceConfig
from klstream.emulator.toymodel import decode, encode, top_k
from klstream.errors import (
    TIMED_OUT,
    BatchCreateUnknown,
    BatchRejected,
    BatchServiceError,
    CallFault,
    EndpointError,
    EndpointUnreachable,
    KlstreamError,
    TransientFault,
    UnusableAnswer,
)

SCHEME = "toy://"
DEFAULT_NAME = "default"
DEFAULT_URL = SCHEME + DEFAULT_NAME
"""The process-wide fault-free service, which a run without a base URL uses."""
GEMINI_VERSION = "v1beta"
"""The API version that calls are validated as (the emulator's 404 names it)."""
LOG_LIMIT = 50_000
"""Requests the log keeps, the latest, as the HTTP emulator's does."""
RequestKind = Literal["generate", "tokenize", "prompt_logprobs", "batch"]

_NOT_JSON = {
    "malformed": "answer body is not JSON: the body was cut short (emulated fault)",
    "html": "answer body is not JSON (text/html): a gateway's error page (emulated fault)",
}
"""What a client makes of the emulator's unreadable 200 answers, by fault name."""
_JOB_ERRORS = {
    "FAILED": "The batch job failed. (emulated)",
    "EXPIRED": "The batch job did not finish in time and expired. (emulated)",
}

_SERVICES: dict[str, ToyService] = {}
"""The live services by name: where ``toy://NAME`` leads."""
_SERIALS = itertools.count(1)


@dataclass(frozen=True)
class ToyRequest:
    """One request the toy service handled, as its log keeps it."""

    kind: RequestKind
    model: str
    prompt: str
    prefill: str | None
    """The prefill (generation), or the response's text after the chat template (prompt
    logprobs); None when there is none."""
    max_tokens: int | None
    """Answer tokens asked for, thinking budget aside (generation and batch lines)."""
    fault: str | None
    """The injected fault, named as the HTTP emulator logs it (``"429"``, ``"quota"``,
    ``"fail_first_n"``, ``"hang"``, ``"no_logprobs"``, ...), or ``"short_prompt_logprobs"``
    and ``"line_error"`` (a batch line's failure)."""
    outcome: str
    """``"ok"``, or the name of the error the request raised (``"RateLimited"``, ...)."""


@dataclass(frozen=True)
class ToyBatchConfig:
    """How a toy service's batch jobs behave: the emulator's
    :class:`~klstream.emulator.BatchConfig`, counted in ``get`` calls instead of seconds.
    The defaults run every job to success on its second ``get``."""

    polls: int = 2
    """The ``get`` that ends a job; those before it find it running."""
    end_states: tuple[EndState, ...] = ()
    """End state of the jobs in creation order (since :meth:`ToyService.set_batch`); jobs
    beyond the tuple succeed."""
    partial_fraction: float = 0.5
    """Share of a job's lines answered when it fails, expires or is cancelled while running."""
    line_error_rate: float = 0.0
    """Share of lines answered with an error, the first time their key is seen only."""
    lost_create_replies: int = 0
    """The first N creates make the job, then raise
    :class:`~klstream.errors.BatchCreateUnknown`, as if the reply had been lost."""
    seed: int = 0
    """Seeds the line errors and the order of output lines."""

    def __post_init__(self) -> None:
        if self.polls < 1:
            raise ValueError(f"polls must be >= 1, got {self.polls}")
        for name in ("partial_fraction", "line_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        bad = [state for state in self.end_states if state not in CONFIGURABLE_END_STATES]
        if bad:
            raise ValueError(f"unknown end states {bad}; choose from {CONFIGURABLE_END_STATES}")


@dataclass
class _Attempt:
    """What a request met on its way, for its log record."""

    fault: str | None = None


@dataclass
class _Job:
    number: int
    name: str
    display_name: str
    model: str
    lines: list[dict[str, Any]]
    end_state: EndState
    state: str = "PENDING"
    gets: int = 0
    error: str | None = None
    output: str | None = None
    answered: int = 0
    failed: int = 0

    @property
    def ended(self) -> bool:
        return self.state in END_STATES

    def remote(self) -> RemoteJob:
        return RemoteJob(
            self.name,
            self.display_name,
            self.state,
            self.error,
            self.output,
            succeeded=self.answered - self.failed,
            failed=self.failed,
            incomplete=len(self.lines) - self.answered,
        )


def _fault_of(
    error: ApiError, kind: RequestKind, model: str, thinking_budget: int | None
) -> Exception:
    """What a real backend raises for one of the emulator's error answers: for generation,
    what the Gemini backend makes of it (the same
    :func:`~klstream.backends.google_errors.status_fault`); for the vLLM-style requests, the
    OpenAI backend's wording. A typed fault, or a run-ending error when no request can
    succeed."""
    name = STATUS_NAMES[error.code]
    gemini = kind in ("generate", "batch")
    text = f"{error.code} {name}: {error.message}" if gemini else f"{error.code}: {error.message}"
    answer = ServiceError(error.code, name, error.message, text, error.retry_delay_s)
    try:
        return status_fault(answer, thinking_budget, model)
    except KlstreamError as fatal:
        return fatal


def _readable(fault: str | None) -> None:
    """Raise what a client makes of a 200 answer it cannot read (cut short, an HTML page)."""
    unreadable = _NOT_JSON.get(fault or "")
    if unreadable is not None:
        raise UnusableAnswer(unreadable)


def _canonical(kind: RequestKind, **fields: Any) -> bytes:
    """A request's bytes for ``fail_first_n``: equal requests, equal bytes."""
    return json.dumps({"kind": kind, **fields}, sort_keys=True).encode()


def _json_line(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _generation_config(request: PrefillRequest, thinking_budget: int | None) -> dict[str, Any]:
    """The ``generationConfig`` the Gemini backend sends: the answer's tokens plus a positive
    thinking budget (thought tokens count against ``maxOutputTokens``)."""
    thinking = thinking_budget if thinking_budget is not None and thinking_budget > 0 else 0
    config = {
        "maxOutputTokens": request.max_tokens + thinking,
        "responseLogprobs": True,
        "logprobs": request.top_logprobs,
        "temperature": request.temperature,
        "seed": request.seed,
        "thinkingConfig": None if thinking_budget is None else {"thinkingBudget": thinking_budget},
    }
    return {key: value for key, value in config.items() if value is not None}


def _call(model: str, request: PrefillRequest, config: dict[str, Any]) -> Call:
    """The emulator's validated call for ``request``, refused as the emulator refuses it (its
    400s and 404s as ``ApiError``)."""
    prefill = request.prefill or None
    call = build_call({"generationConfig": config}, request.prompt, prefill, model, GEMINI_VERSION)
    refuse_call(call, vertex=False)
    return call


def _answer(
    call: Call, scaled_logprobs: bool, cached: int, with_logprobs: bool, short_topk: bool = False
) -> Answer:
    """The toy model's answer to ``call``: the emulator's answer body (its top-k lists cut to
    :data:`~klstream.emulator.faults.SHORT_TOPK` with ``short_topk``), read as the Gemini
    backend reads it."""
    body = answer_body(call, with_logprobs, False, scaled_logprobs, cached)
    if short_topk:
        body = cut_top_candidates(body, SHORT_TOPK)
    return parse_answer_body(body, call.thinking_budget)


def _answer_from_json(raw: Any) -> Answer:
    """An answer as :meth:`ToyBatchJobs.encode_line`'s jobs write it; raises ``KeyError``,
    ``TypeError`` or ``ValueError`` when it is not one."""
    steps = [
        Generated(
            Candidate(**step["chosen"]),
            [Candidate(**candidate) for candidate in step["top"]],
            bool(step["chosen_reported"]),
            int(step["dropped"]),
        )
        for step in raw["steps"]
    ]
    usage = Usage(**raw["usage"])
    return Answer(steps, str(raw["text"]), raw["finish_reason"], usage, raw["served_model"])


def _input_line(row: bytes) -> dict[str, Any]:
    """One line of a job's input; a line that is not a JSON object is kept as an empty one,
    which is answered with an error."""
    try:
        line = json.loads(row)
    except ValueError:
        return {}
    return line if isinstance(line, dict) else {}


class ToyService:
    """The emulated service in this process: faults, implicit cache, request log, files and
    batch jobs. Registered under its name while open (a context manager), so that
    ``toy://NAME`` endpoints reach it."""

    def __init__(
        self,
        faults: FaultConfig | None = None,
        *,
        service: ServiceConfig | None = None,
        batch: ToyBatchConfig | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or f"service-{next(_SERIALS)}"
        if self.name in _SERVICES:
            raise ValueError(f"a toy service called {self.name!r} is open already")
        self.set_faults(faults or FaultConfig())
        self.set_service(service or ServiceConfig())
        self.set_batch(batch or ToyBatchConfig())
        self._log: deque[ToyRequest] = deque(maxlen=LOG_LIMIT)
        self._files: dict[str, bytes] = {}
        self._jobs: dict[str, _Job] = {}
        self._job_numbers = itertools.count(1)
        self._submitted: Counter[str] = Counter()
        self._failed_keys: set[str] = set()
        _SERVICES[self.name] = self

    @property
    def url(self) -> str:
        return SCHEME + self.name

    def endpoint(self, timeout_s: float = 60.0) -> Endpoint:
        """Where a run reaches this service."""
        return Endpoint("toy", base_url=self.url, timeout_s=timeout_s, default_url=DEFAULT_URL)

    def close(self) -> None:
        """Unregister: endpoints naming this service no longer reach it."""
        if _SERVICES.get(self.name) is self:
            del _SERVICES[self.name]

    def __enter__(self) -> ToyService:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def set_faults(self, faults: FaultConfig) -> None:
        """Switch faults; resets their randomness, the quota window and the fail_first_n
        counts."""
        self._state = FaultState(faults)

    def set_service(self, service: ServiceConfig) -> None:
        """Switch the service's behaviour; empties the implicit cache."""
        self._service = service
        self._cache = PrefixCache(service)

    def set_batch(self, batch: ToyBatchConfig) -> None:
        """Switch how batch jobs behave from here on. Jobs already created keep their end
        state; ``end_states`` and ``lost_create_replies`` count creates from here."""
        self._batch = batch
        self._batch_rng = random.Random(batch.seed)
        self._creates = 0

    @property
    def requests(self) -> list[ToyRequest]:
        """The log, oldest first (the latest ``LOG_LIMIT`` requests)."""
        return list(self._log)

    def reset_log(self) -> None:
        self._log.clear()

    def submitted_keys(self) -> Counter[str]:
        """How many created jobs were given each line key: above 1 means paid twice."""
        return Counter(self._submitted)

    def file_names(self) -> list[str]:
        """The files held: uploaded inputs and the jobs' outputs."""
        return sorted(self._files)

    def jobs(self) -> list[RemoteJob]:
        """Every job created and not forgotten, oldest first, as it is (looking does not move
        it): what the service holds, for a test to match against what a run recorded."""
        return [job.remote() for job in self._jobs.values()]

    def forget_job(self, name: str) -> None:
        """Drop a job, as a service that deletes old jobs does: ``get`` then finds nothing."""
        self._jobs.pop(name, None)

    @contextlib.contextmanager
    def _request(
        self,
        kind: RequestKind,
        model: str,
        prompt: str,
        prefill: str | None,
        max_tokens: int | None = None,
        thinking_budget: int | None = None,
    ) -> Iterator[_Attempt]:
        """One request's bookkeeping: the emulator's error answers become what a real backend
        raises for them, and the request is logged however it ends."""
        attempt = _Attempt()
        outcome = "ok"
        try:
            yield attempt
        except ApiError as error:
            attempt.fault = attempt.fault or error.fault
            fault = _fault_of(error, kind, model, thinking_budget)
            outcome = type(fault).__name__
            raise fault from None
        except BaseException as error:
            outcome = type(error).__name__
            raise
        finally:
            record = ToyRequest(kind, model, prompt, prefill, max_tokens, attempt.fault, outcome)
            self._log.append(record)

    async def _arrive(self) -> FaultState:
        """The fault state a request meets (a later switch leaves it alone). The latency passes
        in virtual time, the jitter drawn as the emulator draws it; the one yield lets the
        other requests in flight be sent meanwhile, as on a wire."""
        state = self._state
        state.latency_s()
        await asyncio.sleep(0)
        return state

    @staticmethod
    def _admit(
        attempt: _Attempt, state: FaultState, model: str, body: bytes, timeout_s: float
    ) -> None:
        """The emulator's faults ahead of an answer, in its order: the quota, the first copies
        of a request, then one draw among the exclusive faults (kept in ``attempt``). A hang
        the request's timeout would cut short is that time-out, at once; a shorter one is
        answered."""
        state.check_quota(time.monotonic())
        state.check_fail_first(model, body)
        fault = attempt.fault = state.draw_exclusive()
        state.raise_error_answer(fault)
        if fault == "hang" and state.config.hang_seconds >= timeout_s:
            raise TransientFault(TIMED_OUT)

    async def generate(
        self, settings: ClientSettings, request: PrefillRequest, timeout_s: float
    ) -> Answer:
        """Answer as the HTTP emulator's Gemini route answers the Gemini backend."""
        with self._request(
            "generate",
            settings.model,
            request.prompt,
            request.prefill,
            request.max_tokens,
            settings.thinking_budget,
        ) as attempt:
            state = await self._arrive()
            config = _generation_config(request, settings.thinking_budget)
            call = _call(settings.model, request, config)
            body = _canonical("generate", prompt=call.prompt, prefill=call.prefill, config=config)
            self._admit(attempt, state, call.model.name, body, timeout_s)
            input_ids = [*prompt_ids(call.prompt), *encode(call.prefill or "")]
            cached = self._cache.send(call.model.name, input_ids, time.monotonic())
            dropped = state.draw_no_logprobs()
            if dropped:
                attempt.fault = attempt.fault or "no_logprobs"
            short = state.draw_short_topk()
            if short:
                attempt.fault = attempt.fault or "short_topk"
            _readable(attempt.fault)
            with_logprobs = not (call.model.nologprobs or dropped)
            return _answer(call, self._service.scaled_logprobs, cached, with_logprobs, short)

    async def _tokenize(self, model: str, prompt: str, text: str, timeout_s: float) -> Tokenized:
        """vLLM's ``/tokenize`` of ``text`` as the emulator answers it; ``prompt`` is what the
        log shows."""
        with self._request("tokenize", model, prompt, None) as attempt:
            state = await self._arrive()
            body = _canonical("tokenize", text=text)
            self._admit(attempt, state, model, body, timeout_s)
            limit = max_model_len(openai_routes.served_model(model).name)
            _readable(attempt.fault)
            return Tokenized(encode(text), limit)

    async def template_tokens(self, model: str, prompt: str, timeout_s: float) -> Tokenized:
        """The toy chat template's tokens for ``prompt``, up to where the answer starts."""
        return await self._tokenize(model, prompt, render_chat(prompt, ""), timeout_s)

    async def text_tokens(self, model: str, text: str, timeout_s: float) -> Tokenized:
        return await self._tokenize(model, text, text, timeout_s)

    async def prompt_logprobs(
        self, model_name: str, ids: list[int], top_logprobs: int, start: int, timeout_s: float
    ) -> PromptScores:
        """What the OpenAI backend reads from the emulator's ``/v1/completions`` with
        ``prompt_logprobs``: the top-k at every prompt token from ``start`` on, and after the
        last (which the one generated token is drawn from)."""
        split = PromptSplit.of(ids)
        response = decode(ids[split.start :]) if split.start else None
        with self._request(
            "prompt_logprobs", model_name, split.prompt or decode(ids), response
        ) as attempt:
            state = await self._arrive()
            body = _canonical("prompt_logprobs", ids=ids, top_logprobs=top_logprobs)
            self._admit(attempt, state, model_name, body, timeout_s)
            model = openai_routes.served_model(model_name)
            openai_routes.check_context(model.name, len(ids), 1)
            short = not model.nologprobs and state.draw_short_prompt_logprobs()
            if short:
                attempt.fault = attempt.fault or "short_prompt_logprobs"
            dropped = state.draw_no_logprobs()
            if dropped:
                attempt.fault = attempt.fault or "no_logprobs"
            _readable(attempt.fault)
            if model.nologprobs or dropped:
                raise lacks("prompt_logprobs", "vLLM")
            if short:
                raise UnusableAnswer(
                    f"prompt_logprobs has {len(ids) // 2} entries for a prompt of {len(ids)} tokens"
                )
            tokens = []
            for index in range(max(start, 1), len(ids)):
                entry = openai_routes.prompt_logprobs_entry(
                    model.next_token_logprobs(*split.context(ids, index)), ids[index], top_logprobs
                )
                ranked = [
                    Candidate(value["decoded_token"], int(key), value["logprob"])
                    for key, value in entry.items()
                ]
                own = next(c for c in ranked if c.token_id == ids[index])
                tokens.append(PromptToken(own, ranked[:top_logprobs]))
            last = model.next_token_logprobs(*split.context(ids, len(ids)))
            after = [Candidate(*c) for c in top_k(last, top_logprobs)]
            return PromptScores(tokens, after, Usage(prompt_tokens=len(ids), candidates_tokens=1))

    def store_file(self, name: str, data: bytes) -> None:
        """Keep an upload; a file of the same size already there is kept, as the Gemini
        backend keeps it."""
        existing = self._files.get(name)
        if existing is None or len(existing) != len(data):
            self._files[name] = data

    def read_file(self, name: str) -> bytes:
        data = self._files.get(name)
        if data is None:
            raise BatchServiceError(f"downloading {name}: 404: not found")
        return data

    def remove_files(self, *names: str) -> None:
        for name in names:
            self._files.pop(name, None)

    def create_job(self, model: str, display_name: str, remote_input: str) -> RemoteJob:
        """A new job over an uploaded input, pending; its reply may be lost
        (``lost_create_replies``)."""
        data = self._files.get(remote_input)
        if data is None:
            raise BatchRejected(
                f"the service refused to create a batch job (400: input file {remote_input} "
                "not found)"
            )
        index, number = self._creates, next(self._job_numbers)
        self._creates += 1
        states = self._batch.end_states
        job = _Job(
            number,
            f"toy-batches/{number}",
            display_name,
            model,
            [_input_line(row) for row in data.splitlines() if row.strip()],
            states[index] if index < len(states) else "SUCCEEDED",
        )
        self._jobs[job.name] = job
        self._submitted.update(str(line.get("key")) for line in job.lines)
        if index < self._batch.lost_create_replies:
            raise BatchCreateUnknown(
                "503: The service is currently unavailable. (emulated lost reply)", replied=True
            )
        return job.remote()

    def find_job(self, display_name: str) -> RemoteJob | None:
        """The latest job created under ``display_name``, as it is (looking does not move
        it)."""
        jobs = [job for job in self._jobs.values() if job.display_name == display_name]
        return max(jobs, key=lambda job: job.number).remote() if jobs else None

    def get_job(self, name: str) -> RemoteJob | None:
        """The job after one more step: running from its first ``get``, ended on the
        ``polls``-th."""
        job = self._jobs.get(name)
        if job is None:
            return None
        if not job.ended:
            job.gets += 1
            if job.gets >= self._batch.polls:
                succeeded = job.end_state == "SUCCEEDED"
                self._finish(job, job.end_state, 1.0 if succeeded else self._batch.partial_fraction)
            else:
                job.state = "RUNNING"
        return job.remote()

    def cancel_job(self, name: str) -> None:
        """End the job now, with part of its lines answered if it was running."""
        job = self._jobs.get(name)
        if job is None:
            raise BatchServiceError(f"cancelling batch job {name}: 404: not found")
        if not job.ended:
            running = job.state == "RUNNING"
            self._finish(job, "CANCELLED", self._batch.partial_fraction if running else 0.0)

    def _finish(self, job: _Job, state: str, fraction: float) -> None:
        """End the job, answering the first ``fraction`` of its lines into its output file."""
        output = [
            self._answer_line(job, line) for line in job.lines[: int(len(job.lines) * fraction)]
        ]
        self._batch_rng.shuffle(output)
        job.state, job.error = state, _JOB_ERRORS.get(state)
        job.answered, job.failed = len(output), sum("error" in line for line in output)
        if output:
            job.output = f"toy-files/output-{job.number}"
            self._files[job.output] = b"".join(_json_line(line) for line in output)

    def _answer_line(self, job: _Job, line: dict[str, Any]) -> dict[str, Any]:
        """One output line: the input line's key and index, with its answer, as ``generate``
        gives it without the online faults and the implicit cache, or its error."""
        out = {"key": line.get("key"), "index": line.get("index")}
        try:
            request = PrefillRequest(**line["request"])
            thinking_budget = line["thinking_budget"]
        except (KeyError, TypeError):
            return {**out, "error": "400: the input line is not a toy batch request"}
        try:
            with self._request(
                "batch",
                job.model,
                request.prompt,
                request.prefill,
                request.max_tokens,
                thinking_budget,
            ) as attempt:
                key = str(out["key"])
                if key not in self._failed_keys and (
                    self._batch_rng.random() < self._batch.line_error_rate
                ):
                    self._failed_keys.add(key)
                    attempt.fault = "line_error"
                    raise ApiError(500, "An internal error has occurred. (emulated line failure)")
                call = _call(job.model, request, _generation_config(request, thinking_budget))
                answer = _answer(call, self._service.scaled_logprobs, 0, not call.model.nologprobs)
        except (EndpointError, CallFault) as error:
            return {**out, "error": str(error)}
        return {**out, "answer": dataclasses.asdict(answer)}


class ToyClient:
    """One model on a toy service: generation with logprobs (a
    :class:`~klstream.backends.base.Prefill`) and prompt logprobs (a
    :class:`~klstream.backends.base.PromptScoring`), with its endpoint's request timeout."""

    dialect: str | None = None
    """The toy service gives prompt logprobs one way only."""

    def __init__(self, toy: ToyService, settings: ClientSettings, timeout_s: float) -> None:
        self.toy, self.settings, self.timeout_s = toy, settings, timeout_s

    async def generate(self, request: PrefillRequest) -> Answer:
        return await self.toy.generate(self.settings, request, self.timeout_s)

    async def template_tokens(self, prompt: str) -> Tokenized:
        return await self.toy.template_tokens(self.settings.model, prompt, self.timeout_s)

    async def text_tokens(self, text: str) -> Tokenized:
        return await self.toy.text_tokens(self.settings.model, text, self.timeout_s)

    async def prompt_logprobs(
        self, prompt_ids: list[int], top_logprobs: int, start: int
    ) -> PromptScores:
        model = self.settings.model
        return await self.toy.prompt_logprobs(
            model, prompt_ids, top_logprobs, start, self.timeout_s
        )


class ToyBatchJobs:
    """Batch jobs on a toy service for one model (a
    :class:`~klstream.backends.base.BatchJobs`). An input line holds the request's fields and
    the thinking budget; an output line holds the key and index back with the answer's
    fields or an error."""

    service = "toy"
    regional = False
    max_requests = 50_000
    max_bytes = 1 << 30

    def __init__(self, toy: ToyService, settings: ClientSettings) -> None:
        self.toy, self.settings = toy, settings

    def encode_line(self, key: str, index: int, request: PrefillRequest) -> bytes:
        return _json_line(
            {
                "key": key,
                "index": index,
                "request": dataclasses.asdict(request),
                "thinking_budget": self.settings.thinking_budget,
            }
        )

    def decode_line(self, raw: bytes) -> BatchLine:
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            return BatchLine(None, None, None, f"output line is not a JSON object: {raw[:200]!r}")
        key, index = line.get("key"), line.get("index")
        key = key if isinstance(key, str) else None
        index = index if type(index) is int else None
        if "error" in line:
            return BatchLine(key, index, None, f"batch line error: {line['error']}")
        try:
            answer = _answer_from_json(line["answer"])
        except (KeyError, TypeError, ValueError):
            return BatchLine(key, index, None, f"batch line without an answer: {str(line)[:200]}")
        return BatchLine(key, index, answer, None)

    def remote_names(self, job_id: str, display_name: str) -> tuple[str, str | None]:
        return f"toy-files/{display_name}", None

    async def prepare(self) -> None:
        """Nothing to set up."""

    async def upload(self, local: Path, remote_input: str, display_name: str) -> None:
        self.toy.store_file(remote_input, await asyncio.to_thread(local.read_bytes))

    async def create(
        self, display_name: str, remote_input: str, remote_output: str | None
    ) -> RemoteJob:
        return self.toy.create_job(self.settings.model, display_name, remote_input)

    async def find(self, display_name: str) -> RemoteJob | None:
        return self.toy.find_job(display_name)

    async def get(self, name: str) -> RemoteJob | None:
        return self.toy.get_job(name)

    async def cancel(self, name: str) -> None:
        self.toy.cancel_job(name)

    async def download(self, job: RemoteJob, remote_output: str | None, into: Path) -> bool:
        if not job.output:
            return False
        await asyncio.to_thread(into.write_bytes, self.toy.read_file(job.output))
        return True

    async def remove(
        self, remote_input: str, job: RemoteJob | None, remote_output: str | None
    ) -> None:
        outputs = [job.output] if job is not None and job.output else []
        self.toy.remove_files(remote_input, *outputs)


def service_at(base_url: str | None) -> ToyService:
    """The service a base URL names; None or ``toy://default``: the process-wide fault-free
    one, made on first use."""
    if base_url is None or base_url == DEFAULT_URL:
        return _SERVICES.get(DEFAULT_NAME) or ToyService(name=DEFAULT_NAME)
    service = _SERVICES.get(base_url.removeprefix(SCHEME)) if base_url.startswith(SCHEME) else None
    if service is None:
        raise EndpointUnreachable(
            f"no toy service at {base_url} in this process; a test opens one with ToyService() "
            "and points the run at its endpoint()"
        )
    return service


def toy_endpoint(where: Where) -> Endpoint:
    """The toy service at ``where.base_url`` (``toy://NAME``), or the default one."""
    service_at(where.base_url)
    return Endpoint(
        "toy",
        location=where.location,
        base_url=where.base_url,
        timeout_s=where.timeout_s,
        default_url=DEFAULT_URL,
    )


@contextlib.asynccontextmanager
async def open_client(endpoint: Endpoint, settings: ClientSettings) -> AsyncIterator[ToyClient]:
    """The model on the endpoint's service; there is nothing to open or close."""
    yield ToyClient(service_at(endpoint.base_url), settings, endpoint.timeout_s)


def toy_batch_jobs(endpoint: Endpoint, settings: ClientSettings, bucket: str | None) -> BatchJobs:
    """Batch jobs on the endpoint's service, whose files need no bucket."""
    return ToyBatchJobs(service_at(endpoint.base_url), settings)


TOY = Backend(
    "toy", toy_endpoint, prefill=open_client, prompt_scoring=open_client, batch_jobs=toy_batch_jobs
)
