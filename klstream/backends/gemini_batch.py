"""The Gemini Developer API's batch jobs: inputs and outputs through the Files API.

The input is uploaded resumably under a name chosen in advance (so a resumed run finds it), and
the output is the job's responses file. The jobs themselves are
:class:`~klstream.backends.google_batch.GoogleBatchJobs`'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.genai import types

from klstream.backends.base import RemoteJob
from klstream.backends.google_batch import (
    JSONL_MIME_TYPE,
    GoogleBatchJobs,
    cause_status,
    retrying,
    run_ms,
    state_of,
)
from klstream.errors import AuthenticationError, BatchServiceError


class GeminiBatch(GoogleBatchJobs):
    """The Gemini Developer API: inputs and outputs through the Files API."""

    service = "gemini"

    def remote_job(self, job: types.BatchJob) -> RemoteJob:
        output = job.dest.file_name if job.dest is not None else None
        return RemoteJob(
            name=job.name or "",
            display_name=job.display_name,
            state=state_of(job),
            error=job.error.message if job.error is not None else None,
            output=output,
            run_ms=run_ms(job),
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
