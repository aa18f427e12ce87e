"""Batch jobs through google-genai's ``batches`` API: what the Gemini Developer API
(:mod:`klstream.backends.gemini_batch`) and Vertex AI (:mod:`klstream.backends.vertex_batch`)
share.

A job is created from an uploaded JSONL file of ``{"key": ..., "request":
GenerateContentRequest}`` lines, looked up by name or by its display name, and cancelled, all
through ``client.aio.batches``. A line asks exactly what the online request asks: its body is
the SDK's own serialisation of the online config
(:func:`~klstream.backends.gemini.request_template`), and an output line's answer is read as an
online answer's (:func:`~klstream.backends.gemini.parse_answer_body`).

Only operations that are safe to repeat are retried here. A create is never retried: when its
outcome is unknown it raises :class:`~klstream.errors.BatchCreateUnknown`, and the batch
scheduler looks the job up before anything is created again.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from klstream.backends.base import (
    BatchLine,
    ClientSettings,
    Endpoint,
    PrefillRequest,
    RemoteJob,
)
from klstream.backends.gemini import (
    TRANSPORT_ERRORS,
    describe,
    make_client,
    parse_answer_body,
    prefill_contents,
    request_template,
)
from klstream.backends.google_errors import RETRIED_STATUS
from klstream.errors import (
    AuthenticationError,
    BatchCreateUnknown,
    BatchRejected,
    BatchServiceError,
    ModelCannotScore,
    UnusableAnswer,
)

REJECTED_STATUS = frozenset({400, 403, 404})
"""Create answers that mean the request was refused and nothing was made."""
JSONL_MIME_TYPE = "application/jsonl"
T = TypeVar("T")


@dataclass(frozen=True)
class _Line:
    """One line of a job's output as the service wrote it: its key and the answer's JSON, or
    the error text."""

    key: str | None
    body: Any
    error: str | None
    request: Any
    """The request, where the service echoes it (Vertex AI does)."""


def _transient(error: BaseException) -> bool:
    if isinstance(error, genai_errors.APIError):
        return (error.code or 0) in RETRIED_STATUS
    return True


def cause_status(error: BaseException) -> int | None:
    """The HTTP status behind a klstream error raised by :func:`retrying`, if any."""
    cause = error.__cause__
    return cause.code if isinstance(cause, genai_errors.APIError) else None


def service_error(what: str, error: BaseException) -> Exception:
    """The klstream error for a failed service call: bad credentials end the run for good,
    anything else leaves it to be resumed."""
    if isinstance(error, genai_errors.APIError) and error.code in (401, 403):
        return AuthenticationError(f"{what}: {describe(error)}")
    return BatchServiceError(f"{what}: {describe(error)}")


async def retrying(
    what: str, operation: Callable[[], Awaitable[T]], attempts: int = 5, first_wait_s: float = 1.0
) -> T:
    """Run an operation that is safe to repeat, again after transient failures; a failure
    that stays becomes a klstream error (:func:`service_error`)."""
    wait = first_wait_s
    for attempt in range(attempts):
        try:
            return await operation()
        except TRANSPORT_ERRORS as error:
            if attempt + 1 == attempts or not _transient(error):
                raise service_error(what, error) from error
        await asyncio.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        code, status = error.get("code"), error.get("status")
        head = " ".join(str(part) for part in (code, status) if part)
        message = error.get("message") or json.dumps(error)
        return f"{head}: {message}" if head else str(message)
    return str(error)


def _parse_line(line: Any) -> _Line:
    """Read one output line: ``{"key", "response"}`` or ``{"key", "error"}`` (Gemini), or
    ``{"request", "response", "status"}`` with the input's fields echoed (Vertex AI)."""
    if not isinstance(line, dict):
        return _Line(None, None, f"output line is not a JSON object: {str(line)[:200]}", None)
    key = line.get("key")
    key = key if isinstance(key, str) else None
    request = line.get("request")
    error = line.get("error") or line.get("status")
    if error:
        return _Line(key, None, f"batch line error: {_error_text(error)}", request)
    body = line.get("response")
    if body is None:
        return _Line(key, None, "batch line has neither a response nor an error", request)
    return _Line(key, body, None, request)


def state_of(job: types.BatchJob) -> str:
    state = job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED"
    return str(state).removeprefix("JOB_STATE_")


def run_ms(job: types.BatchJob) -> float:
    if job.create_time is None or job.end_time is None:
        return 0.0
    return max((job.end_time - job.create_time).total_seconds() * 1000.0, 0.0)


class GoogleBatchJobs(ABC):
    """The job side shared by both services (a :class:`~klstream.backends.base.BatchJobs`);
    subclasses move the files."""

    service = "gemini"
    regional = False
    max_requests = 50_000
    max_bytes = 1_900_000_000

    def __init__(
        self, endpoint: Endpoint, settings: ClientSettings, client: genai.Client | None = None
    ):
        self.endpoint, self.settings = endpoint, settings
        self.model2 = settings.model
        self.client = client or make_client(endpoint)
        self._templates: dict[tuple[int, int, float | None], dict[str, Any]] = {}

    def _template(self, request: PrefillRequest) -> dict[str, Any]:
        """The request body but its contents, serialised once per distinct config."""
        config = (request.top_logprobs, request.max_tokens, request.temperature)
        if config not in self._templates:
            self._templates[config] = request_template(
                self.endpoint,
                request.top_logprobs,
                self.settings.thinking_budget,
                request.temperature,
                request.max_tokens,
            )
        return self._templates[config]

    def line(self, key: str, index: int, request: dict[str, Any]) -> dict[str, Any]:
        """One input line (the ``index``-th of its job); the output's lines carry the key back."""
        return {"key": key, "request": request}

    def encode_line(self, key: str, index: int, request: PrefillRequest) -> bytes:
        body = {"contents": prefill_contents(request.prompt, request.prefill)}
        line = self.line(key, index, {**body, **self._template(request)})
        return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def line_index(self, request: Any) -> int | None:
        """The line's index where the service echoes the request instead of the key."""
        return None

    def decode_line(self, raw: bytes) -> BatchLine:
        try:
            decoded: Any = json.loads(raw)
        except json.JSONDecodeError:
            decoded = raw.decode(errors="replace")
        line = _parse_line(decoded)
        index = self.line_index(line.request)
        if line.error is not None:
            return BatchLine(line.key, index, None, line.error)
        try:
            answer = parse_answer_body(line.body, self.settings.thinking_budget)
        except (UnusableAnswer, ModelCannotScore) as unusable:
            return BatchLine(line.key, index, None, str(unusable))
        return BatchLine(line.key, index, answer, None)

    @abstractmethod
    def remote_job(self, job: types.BatchJob) -> RemoteJob:
        """The service's description of a job, in klstream's terms."""

    def _create_source(self, remote_input: str) -> str:
        return remote_input

    def _create_config(
        self, display_name: str, remote_output: str | None
    ) -> types.CreateBatchJobConfig:
        return types.CreateBatchJobConfig(display_name=display_name)

    def _rejection(self, error: genai_errors.APIError) -> BatchRejected:
        return BatchRejected(f"the service refused to create a batch job ({describe(error)})")

    async def create(
        self, display_name: str, remote_input: str, remote_output: str | None
    ) -> RemoteJob:
        """Create the job: refused (:class:`BatchRejected`), created, or unknown
        (:class:`BatchCreateUnknown`)."""
        try:
            job = await self.client.aio.batches.create(
                model=self.model2,
                src=self._create_source(remote_input),
                config=self._create_config(display_name, remote_output),
            )
        except genai_errors.APIError as error:
            if (error.code or 0) in REJECTED_STATUS:
                raise self._rejection(error) from error
            raise BatchCreateUnknown(describe(error), replied=True) from error
        except Exception as error:
            raise BatchCreateUnknown(describe(error), replied=False) from error
        return self.remote_job(job)

    def _list_config(self, display_name: str) -> types.ListBatchJobsConfig:
        return types.ListBatchJobsConfig(page_size=100)

    async def find(self, display_name: str) -> RemoteJob | None:
        """The job created under ``display_name``, if any: how a lost create is resolved."""

        async def search() -> RemoteJob | None:
            pager = await self.client.aio.batches.list(config=self._list_config(display_name))
            async for job in pager:
                if job.display_name == display_name:
                    return self.remote_job(job)
            return None

        return await retrying("listing batch jobs", search)

    async def get(self, name: str) -> RemoteJob | None:
        """The job now, or None when the service no longer knows it."""
        try:
            job = await retrying(
                f"getting batch job {name}", lambda: self.client.aio.batches.get(name=name)
            )
        except BatchServiceError as error:
            if cause_status(error) == 404:
                return None
            raise
        return self.remote_job(job)

    async def cancel(self, name: str) -> None:
        await retrying(
            f"cancelling batch job {name}", lambda: self.client.aio.batches.cancel(name=name)
        )

    @abstractmethod
    def remote_names(self, job_id: str, display_name: str) -> tuple[str, str | None]:
        """Where a job's input goes and its output comes, chosen before anything is sent."""

    @abstractmethod
    async def prepare(self) -> None:
        """Whatever must exist before the first upload (a bucket)."""

    @abstractmethod
    async def upload(self, local: Path, remote_input: str, display_name: str) -> None:
        """Put ``local`` at ``remote_input`` unless an identical upload is already there."""

    @abstractmethod
    async def download(self, job: RemoteJob, remote_output: str | None, into: Path) -> bool:
        """Write the job's output lines into ``into``; False when it has none."""

    @abstractmethod
    async def remove(
        self, remote_input: str, job: RemoteJob | None, remote_output: str | None
    ) -> None:
        """Delete the uploaded input and the job's output, where they exist."""
