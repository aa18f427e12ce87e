"""Batch jobs through google-genai's ``batches`` API, and the Gemini Developer API's side of them.

:class:`BatchBackend` holds what both services share: a job is created from an uploaded JSONL
file of ``{"key": ..., "request": GenerateContentRequest}`` lines, looked up by name or by its
display name, and cancelled, all through ``client.aio.batches``. :class:`GeminiBatch` adds the
Files API: the input is uploaded resumably under a name chosen in advance (so a resumed run finds
it), and the output is the job's responses file. Vertex AI's side is
:mod:`klstream.backends.vertex_batch`.

Only operations that are safe to repeat are retried here. A create is never retried: when its
outcome is unknown it raises :class:`~klstream.errors.BatchCreateUnknown`, and
:mod:`klstream.scoring.batch` looks the job up before anything is created again.
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

from klstream.backends.base import Endpoint
from klstream.backends.gemini import (
    RETRIED_STATUS,
    TRANSIENT_ERRORS,
    describe,
    make_client,
)
from klstream.errors import (
    AuthenticationError,
    BatchCreateUnknown,
    BatchRejected,
    BatchServiceError,
)

END_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PARTIALLY_SUCCEEDED"})
"""Service states after which a job does nothing more (without the ``JOB_STATE_`` prefix)."""
REJECTED_STATUS = frozenset({400, 403, 404})
"""Create answers that mean the request was refused and nothing was made."""
JSONL_MIME_TYPE = "application/jsonl"
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteJob:
    """A batch job as the service last described it."""

    name: str
    display_name: str | None
    state: str
    """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``CANCELLED``, ``EXPIRED``, ...: the
    service's state without its ``JOB_STATE_`` prefix."""
    error: str | None
    output: str | None
    """Where the results are: a Files API name, or a gs:// directory."""
    succeeded: int | None = None
    failed: int | None = None
    incomplete: int | None = None
    """The service's own completion counts, where it gives them."""
    run_ms: float = 0.0
    """From creation to end (or to now), by the service's clock."""

    @property
    def ended(self) -> bool:
        return self.state in END_STATES


@dataclass(frozen=True)
class Line:
    """One line of a job's output: its key and the answer's JSON, or the error text."""

    key: str | None
    body: Any
    error: str | None
    request: Any
    """The request, where the service echoes it (Vertex AI does)."""


def _transient(error: BaseException) -> bool:
    if isinstance(error, genai_errors.APIError):
        return (error.code or 0) in RETRIED_STATUS
    return isinstance(error, TRANSIENT_ERRORS)


RETRYABLE: tuple[type[BaseException], ...] = (genai_errors.APIError, *TRANSIENT_ERRORS)
"""What :func:`retrying` looks at: everything else is a bug and propagates as it is."""


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
        except RETRYABLE as error:
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


def parse_line(line: Any) -> Line:
    """Read one output line: ``{"key", "response"}`` or ``{"key", "error"}`` (Gemini), or
    ``{"request", "response", "status"}`` with the input's fields echoed (Vertex AI)."""
    if not isinstance(line, dict):
        return Line(None, None, f"output line is not a JSON object: {str(line)[:200]}", None)
    key = line.get("key")
    key = key if isinstance(key, str) else None
    request = line.get("request")
    error = line.get("error") or line.get("status")
    if error:
        return Line(key, None, f"batch line error: {_error_text(error)}", request)
    body = line.get("response")
    if body is None:
        return Line(key, None, "batch line has neither a response nor an error", request)
    return Line(key, body, None, request)


def _state(job: types.BatchJob) -> str:
    state = job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED"
    return str(state).removeprefix("JOB_STATE_")


def _run_ms(job: types.BatchJob) -> float:
    if job.create_time is None or job.end_time is None:
        return 0.0
    return max((job.end_time - job.create_time).total_seconds() * 1000.0, 0.0)


class BatchBackend(ABC):
    """The job side shared by both services; subclasses move the files."""

    service = "gemini"
    max_requests = 50_000
    """Requests per job: bounds each job's output download and what one failed job costs."""
    max_bytes = 1_900_000_000
    """Input bytes per job, under the service's file limit."""

    def __init__(self, endpoint: Endpoint, model2: str, client: genai.Client | None = None):
        self.endpoint, self.model2 = endpoint, model2
        self.client = client or make_client(endpoint)

    def line(self, key: str, index: int, request: dict[str, Any]) -> dict[str, Any]:
        """One input line (the ``index``-th of its job); the output's lines carry the key back."""
        return {"key": key, "request": request}

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


class GeminiBatch(BatchBackend):
    """The Gemini Developer API: inputs and outputs through the Files API."""

    service = "gemini"

    def remote_job(self, job: types.BatchJob) -> RemoteJob:
        output = job.dest.file_name if job.dest is not None else None
        return RemoteJob(
            name=job.name or "",
            display_name=job.display_name,
            state=_state(job),
            error=job.error.message if job.error is not None else None,
            output=output,
            run_ms=_run_ms(job),
        )

    def remote_names(self, job_id: str, display_name: str) -> tuple[str, str | None]:
        return f"files/{display_name}", None

    async def prepare(self) -> None:
        """The Files API needs nothing set up."""

    async def _existing(self, name: str) -> types.File | None:
        try:
            return await retrying(
                f"looking up {name}", lambda: self.client.aio.files.get(name=name)
            )
        except (AuthenticationError, BatchServiceError) as error:
            if cause_status(error) in (403, 404):
                return None
            raise

    async def upload(self, local: Path, remote_input: str, display_name: str) -> None:
        size = local.stat().st_size
        existing = await self._existing(remote_input)
        if existing is not None:
            if existing.state == types.FileState.ACTIVE and existing.size_bytes == size:
                return
            await retrying(
                f"deleting {remote_input}",
                lambda: self.client.aio.files.delete(name=remote_input),
            )
        config = types.UploadFileConfig(
            name=remote_input, display_name=display_name, mime_type=JSONL_MIME_TYPE
        )
        await retrying(
            f"uploading {local.name} to {remote_input}",
            lambda: self.client.aio.files.upload(file=local, config=config),
        )

    async def download(self, job: RemoteJob, remote_output: str | None, into: Path) -> bool:
        if not job.output:
            return False
        output = job.output
        data = await retrying(
            f"downloading {output}", lambda: self.client.aio.files.download(file=output)
        )
        await asyncio.to_thread(into.write_bytes, data)
        return True

    async def remove(
        self, remote_input: str, job: RemoteJob | None, remote_output: str | None
    ) -> None:
        names = [remote_input] + ([job.output] if job is not None and job.output else [])
        for name in names:
            try:
                await retrying(f"deleting {name}", self._deleter(name))
            except (AuthenticationError, BatchServiceError) as error:
                if cause_status(error) not in (403, 404):
                    raise

    def _deleter(self, name: str) -> Callable[[], Awaitable[types.DeleteFileResponse]]:
        return lambda: self.client.aio.files.delete(name=name)
