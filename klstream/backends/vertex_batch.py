"""Vertex AI batch prediction: JSONL in a Cloud Storage bucket, jobs through google-genai.

Inputs go to ``gs://BUCKET/klstream/<job>/input.jsonl`` and Vertex AI writes its predictions
under ``gs://BUCKET/klstream/<job>/output/``. The bucket (``--bucket-name``, default
``<project>-klstream-batch``) is created when missing. Cloud Storage is reached with
``google-cloud-storage`` (the ``vertex-batch`` extra), whose calls block and so run in worker
threads. It honours ``STORAGE_EMULATOR_HOST``; when Model 2's base URL is a local server such as
``klstream emulate`` and that variable is unset, the same server is used as the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from klstream.backends.base import ClientSettings, Endpoint, RemoteJob
from klstream.backends.gemini import LOOPBACK_HOSTS, describe
from klstream.backends.google_batch import (
    JSONL_MIME_TYPE,
    GoogleBatchJobs,
    run_ms,
    state_of,
)
from klstream.errors import BatchRejected, BatchUnavailable

STORAGE_EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
LINE_INDEX_LABEL = "klstream_line"
"""The request label that numbers a line within its job (label values must be short, lowercase
and plain, which keys are not)."""
_REGION_PROBLEM = re.compile(r"location|region|not supported|unsupported", re.IGNORECASE)


def default_bucket(project: str) -> str:
    return f"{project}-klstream-batch"


def _split(uri: str) -> tuple[str, str]:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


class VertexBatch(GoogleBatchJobs):
    """Vertex AI batch prediction jobs reading and writing JSONL in Cloud Storage."""

    service = "vertex"
    regional = True
    max_bytes = 1_000_000_000

    def __init__(
        self,
        endpoint: Endpoint,
        settings: ClientSettings,
        bucket_name: str | None = None,
        client: genai.Client | None = None,
    ) -> None:
        super().__init__(endpoint, settings, client)
        self.bucket_name = bucket_name or default_bucket(endpoint.project or "")
        self._storage: Any = None

    def storage(self) -> Any:
        """The Cloud Storage client, made on first use."""
        if self._storage is not None:
            return self._storage
        try:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage
        except ImportError as error:
            raise BatchUnavailable(
                "Vertex AI batch mode needs google-cloud-storage, which is not installed; "
                "install klstream with its vertex-batch extra: pip install 'klstream[vertex-batch]'"
            ) from error
        base_url = self.endpoint.base_url
        local = base_url is not None and urlparse(base_url).hostname in LOOPBACK_HOSTS
        if local and not os.environ.get(STORAGE_EMULATOR_VARIABLE):
            self._storage = storage.Client(
                project=self.endpoint.project,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": base_url},
            )
        else:
            self._storage = storage.Client(project=self.endpoint.project)
        return self._storage

    def line(self, key: str, index: int, request: dict[str, Any]) -> dict[str, Any]:
        """The line also carries its index as a request label: Vertex AI echoes the request
        with each prediction, labels included, whatever it does with other fields."""
        labelled = {**request, "labels": {LINE_INDEX_LABEL: str(index)}}
        return {"key": key, "request": labelled}

    def line_index(self, request: Any) -> int | None:
        """Vertex AI echoes each line's request, labels included: the line's index."""
        labels = request.get("labels") if isinstance(request, dict) else None
        value = labels.get(LINE_INDEX_LABEL) if isinstance(labels, dict) else None
        return int(value) if isinstance(value, str) and value.isdigit() else None

    def remote_names(self, job_id: str, display_name: str) -> tuple[str, str | None]:
        prefix = f"gs://{self.bucket_name}/klstream/{job_id}"
        return f"{prefix}/input.jsonl", f"{prefix}/output"

    def remote_job(self, job: types.BatchJob) -> RemoteJob:
        stats = job.completion_stats
        return RemoteJob(
            name=job.name or "",
            display_name=job.display_name,
            state=state_of(job),
            error=job.error.message if job.error is not None else None,
            output=job.output_info.gcs_output_directory if job.output_info is not None else None,
            succeeded=stats.successful_count if stats is not None else None,
            failed=stats.failed_count if stats is not None else None,
            incomplete=stats.incomplete_count if stats is not None else None,
            run_ms=run_ms(job),
        )

    def _create_config(
        self, display_name: str, remote_output: str | None
    ) -> types.CreateBatchJobConfig:
        return types.CreateBatchJobConfig(display_name=display_name, dest=remote_output)

    def _list_config(self, display_name: str) -> types.ListBatchJobsConfig:
        return types.ListBatchJobsConfig(page_size=100, filter=f'display_name="{display_name}"')

    def _rejection(self, error: genai_errors.APIError) -> BatchRejected:
        if _REGION_PROBLEM.search(error.message or ""):
            return BatchUnavailable(
                f"Vertex AI batch prediction is not available in location "
                f"{self.endpoint.location!r} ({describe(error)})"
            )
        return super()._rejection(error)

    async def prepare(self) -> None:
        def ensure_bucket() -> None:
            from google.api_core.exceptions import Conflict

            client = self.storage()
            if client.lookup_bucket(self.bucket_name) is not None:
                return
            location = None if self.endpoint.location == "global" else self.endpoint.location
            # Made meanwhile: an upload will say if it is not ours to write.
            with contextlib.suppress(Conflict):
                client.create_bucket(self.bucket_name, location=location)

        await asyncio.to_thread(ensure_bucket)

    async def upload(self, local: Path, remote_input: str, display_name: str) -> None:
        def put() -> None:
            bucket, name = _split(remote_input)
            blob = self.storage().bucket(bucket).get_blob(name)
            if blob is not None and blob.size == local.stat().st_size:
                return
            blob = self.storage().bucket(bucket).blob(name)
            blob.upload_from_filename(str(local), content_type=JSONL_MIME_TYPE)

        await asyncio.to_thread(put)

    def _output_blobs(self, job: RemoteJob, remote_output: str | None) -> list[Any]:
        location = job.output or remote_output
        if not location:
            return []
        bucket, prefix = _split(location)
        blobs = self.storage().list_blobs(bucket, prefix=prefix.rstrip("/") + "/")
        return [blob for blob in blobs if blob.name.endswith(".jsonl")]

    async def download(self, job: RemoteJob, remote_output: str | None, into: Path) -> bool:
        def fetch() -> bool:
            blobs = self._output_blobs(job, remote_output)
            with into.open("wb") as sink:
                for blob in blobs:
                    blob.download_to_file(sink)
            return bool(blobs)

        return await asyncio.to_thread(fetch)

    async def remove(
        self, remote_input: str, job: RemoteJob | None, remote_output: str | None
    ) -> None:
        def delete() -> None:
            from google.api_core.exceptions import NotFound

            bucket, name = _split(remote_input)
            blobs = [self.storage().bucket(bucket).blob(name)]
            if remote_output:
                out_bucket, prefix = _split(remote_output)
                blobs += list(self.storage().list_blobs(out_bucket, prefix=prefix + "/"))
            for blob in blobs:
                with contextlib.suppress(NotFound):
                    blob.delete()

        await asyncio.to_thread(delete)
