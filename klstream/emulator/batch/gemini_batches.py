"""Gemini batch jobs (the Developer API's): ``POST /{version}/models/{model}:batchGenerateContent``
and ``batches`` get, list, cancel and delete.

A job is created from an uploaded JSONL file (``inputConfig.fileName``, from
:mod:`klstream.emulator.batch.files_api`) or from inline requests, and is shown as a long-running
Operation whose ``metadata`` carries it. Its answers go to a generated file
(``responsesFile``), or back in the job for inline requests (``inlinedResponses``).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import web

from klstream.emulator.batch.common import END_STATES, BatchContext
from klstream.emulator.batch.files_api import FilesApi
from klstream.emulator.batch.jobs import Job, JobBook, JobService
from klstream.emulator.protocol import ApiError

GEMINI_STATE_PREFIX = "BATCH_STATE_"


class GeminiBatches(JobService):
    """Gemini batch jobs, reading and writing files of the Files API."""

    vertex = False
    collection = "/{version}/batches"
    create_path = "/{version}/models/{model}:batchGenerateContent"
    list_field = "operations"

    def __init__(self, context: BatchContext, book: JobBook, files: FilesApi) -> None:
        super().__init__(context, book)
        self._files = files

    async def _create(self, request: web.Request) -> web.Response:
        batch = (await request.json()).get("batch") or {}
        source = batch.get("inputConfig") or {}
        if "fileName" in source:
            stored = self._files.get(source["fileName"])
            if stored is None:
                raise ApiError(400, f"Input file {source['fileName']} not found.")
            lines = [json.loads(row) for row in stored.data.decode().splitlines() if row.strip()]
            inline = False
        elif "requests" in source:
            inline = True
            lines = [
                {"key": (item.get("metadata") or {}).get("key"), **item}
                for item in (source["requests"].get("requests") or [])
            ]
            source = {"requests": {"requests": []}}
        else:
            raise ApiError(400, "inputConfig needs fileName or requests.")
        return await self._create_job(
            request,
            display_name=batch.get("displayName") or "",
            model=f"models/{request.match_info['model']}",
            lines=lines,
            source=source,
            inline=inline,
        )

    def _new_name(self, request: web.Request, number: int) -> str:
        return f"batches/emu{number:06d}{secrets.token_hex(3)}"

    def _name(self, request: web.Request) -> str:
        return f"batches/{request.match_info['job']}"

    def _job_json(self, job: Job) -> dict[str, Any]:
        status = self._status(job)
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": job.model,
            "displayName": job.display_name,
            "inputConfig": job.source,
            "createTime": job.create_time,
            "updateTime": job.end_time or job.create_time,
            "batchStats": {
                "requestCount": str(len(job.lines)),
                "successfulRequestCount": str(status.succeeded),
                "failedRequestCount": str(status.failed),
                "pendingRequestCount": str(status.pending),
            },
            "state": GEMINI_STATE_PREFIX + status.state,
            "name": job.name,
        }
        operation: dict[str, Any] = {"name": job.name, "metadata": metadata}
        if status.state in END_STATES:
            operation["done"] = True
            metadata["endTime"] = job.end_time
            if job.inline and job.output:
                metadata["output"] = {"inlinedResponses": {"inlinedResponses": job.output}}
            elif job.output_location:
                metadata["output"] = {"responsesFile": job.output_location}
            if job.error:
                operation["error"] = {"code": 13, "message": job.error}
        return operation

    def _deleted(self, job: Job) -> dict[str, Any]:
        return {}

    def _output_line(
        self, job: Job, line: dict[str, Any], answer: dict[str, Any] | ApiError
    ) -> dict[str, Any]:
        """Keyed by ``key`` in a file, by the request's ``metadata`` inline."""
        if job.inline:
            result: dict[str, Any] = {"metadata": line.get("metadata") or {}}
        else:
            result = {"key": str(line.get("key"))}
        if isinstance(answer, ApiError):
            result["error"] = {"code": answer.code, "message": answer.message}
        else:
            result["response"] = answer
        return result

    def _store_output(self, job: Job, data: bytes) -> str | None:
        """Write a file-fed job's answers to a generated file; inline answers stay in the job."""
        if job.inline:
            return None
        name = f"files/batch-{job.name.removeprefix('batches/')}"
        self._files.put_generated(name, data)
        return name
