"""Vertex AI batch prediction jobs: ``/{version}/projects/{p}/locations/{l}/batchPredictionJobs``
create, get, list, cancel and delete.

A job reads JSONL from ``gcsSource`` URIs and writes ``predictions.jsonl`` under a new
``prediction-model-{time}`` directory of its ``gcsDestination`` prefix, both in the emulated
Cloud Storage (:mod:`klstream.emulator.batch.cloud_storage`). Locations named in
``BatchConfig.unsupported_locations`` refuse creates, as regions without batch do.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from klstream.emulator.batch.cloud_storage import CloudStorage, split_gs
from klstream.emulator.batch.common import END_STATES, BatchContext, now_iso
from klstream.emulator.batch.jobs import Job, JobBook, JobService
from klstream.emulator.protocol import ApiError

VERTEX_STATE_PREFIX = "JOB_STATE_"


class VertexJobs(JobService):
    """Vertex AI batch prediction jobs, reading and writing Cloud Storage objects."""

    vertex = True
    collection = "/{version}/projects/{project}/locations/{location}/batchPredictionJobs"
    create_path = collection
    list_field = "batchPredictionJobs"

    def __init__(self, context: BatchContext, book: JobBook, storage: CloudStorage) -> None:
        super().__init__(context, book)
        self._storage = storage

    async def _create(self, request: web.Request) -> web.Response:
        location = request.match_info["location"]
        if location in self._context.config.unsupported_locations:
            raise ApiError(
                400, f"Batch prediction jobs are not supported in location {location}. (emulated)"
            )
        body = await request.json()
        source = body.get("inputConfig") or {}
        uris = (source.get("gcsSource") or {}).get("uris") or []
        destination = ((body.get("outputConfig") or {}).get("gcsDestination") or {}).get(
            "outputUriPrefix"
        )
        if not uris or not destination:
            raise ApiError(400, "inputConfig.gcsSource.uris and an output prefix are required.")
        lines: list[dict[str, Any]] = []
        for uri in uris:
            stored = self._storage.get(*split_gs(uri))
            if stored is None:
                raise ApiError(400, f"Input {uri} not found.")
            lines += [json.loads(row) for row in stored.data.decode().splitlines() if row.strip()]
        if not self._storage.has_bucket(split_gs(destination)[0]):
            raise ApiError(400, f"Output bucket of {destination} not found.")
        return await self._create_job(
            request,
            display_name=body.get("displayName") or "",
            model=body.get("model") or "",
            lines=lines,
            source=source,
            destination=destination,
        )

    def _new_name(self, request: web.Request, number: int) -> str:
        return f"{_parent(request)}/{1_000_000 + number}"

    def _name(self, request: web.Request) -> str:
        return f"{_parent(request)}/{request.match_info['job']}"

    def _job_json(self, job: Job) -> dict[str, Any]:
        status = self._status(job)
        body: dict[str, Any] = {
            "name": job.name,
            "displayName": job.display_name,
            "model": job.model,
            "inputConfig": job.source,
            "outputConfig": {
                "predictionsFormat": "jsonl",
                "gcsDestination": {"outputUriPrefix": job.destination},
            },
            "state": VERTEX_STATE_PREFIX + status.state,
            "createTime": job.create_time,
            "updateTime": job.end_time or job.create_time,
            "completionStats": {
                "successfulCount": str(status.succeeded),
                "failedCount": str(status.failed),
                "incompleteCount": str(status.pending),
            },
        }
        if status.state != "PENDING":
            body["startTime"] = job.create_time
        if status.state in END_STATES:
            body["endTime"] = job.end_time
        if job.output_location:
            body["outputInfo"] = {"gcsOutputDirectory": job.output_location}
        if job.error:
            body["error"] = {"code": 13, "message": job.error}
        return body

    def _deleted(self, job: Job) -> dict[str, Any]:
        """The finished long-running delete operation."""
        return {"name": f"{job.name}/operations/delete", "done": True}

    def _output_line(
        self, job: Job, line: dict[str, Any], answer: dict[str, Any] | ApiError
    ) -> dict[str, Any]:
        """The input line (or just its request) with the response and a status, empty on
        success."""
        echo = self._context.config.echo_custom_fields
        echoed = line if echo else {"request": line.get("request")}
        out = {**echoed, "processed_time": now_iso()}
        if isinstance(answer, ApiError):
            out["status"] = f"{answer.code}: {answer.message}"
        else:
            out.update(response=answer, status="")
        return out

    def _store_output(self, job: Job, data: bytes) -> str | None:
        assert job.destination is not None
        bucket, prefix = split_gs(job.destination)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        directory = f"{prefix.rstrip('/')}/prediction-model-{stamp}"
        self._storage.put(bucket, f"{directory}/predictions.jsonl", data, "application/jsonl")
        return f"gs://{bucket}/{directory}"


def _parent(request: web.Request) -> str:
    """The resource name of the collection of jobs a request addresses."""
    m = request.match_info
    return f"projects/{m['project']}/locations/{m['location']}/batchPredictionJobs"
