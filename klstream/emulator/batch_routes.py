"""The emulator's batch side: Gemini's Files API and batch jobs, Vertex AI batch prediction jobs,
and the subset of Cloud Storage's JSON API that ``google-cloud-storage`` uses for them.

Everything lives in memory (:class:`BatchService`). The routes follow what the installed SDKs
send: google-genai uploads through ``POST /upload/{version}/files`` (resumable protocol with
``X-Goog-Upload-*`` headers), downloads through ``GET /{version}/files/{id}:download?alt=media``,
creates jobs with ``POST /{version}/models/{model}:batchGenerateContent`` (an Operation whose
``metadata`` carries the job) or ``POST /{version}/projects/{p}/locations/{l}/batchPredictionJobs``,
and gets, lists, cancels and deletes them under ``batches/`` and ``batchPredictionJobs/``.
``google-cloud-storage`` reaches the store through ``STORAGE_EMULATOR_HOST`` (or an
``api_endpoint``): buckets get/insert, object media/multipart/resumable upload, metadata, download,
list and delete.

A job's state follows :class:`BatchConfig`: pending, then running, then its end state (succeeded
unless ``end_states`` says otherwise for that job). Output lines are the toy model's answers in
random order, keyed like the input; faults: per-line failures, lost create replies (the job is
created but the reply is a 503), slow uploads, creates and downloads, and whole jobs that fail,
expire or are cancelled with part of their lines answered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Literal
from urllib.parse import quote

from aiohttp import web

from klstream.emulator.protocol import (
    JSON_HEADERS,
    ApiError,
    answer_body,
    build_call,
    parse_contents,
)

EndState = Literal["SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"]
END_STATES: tuple[EndState, ...] = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
GEMINI_STATE_PREFIX = "BATCH_STATE_"
VERTEX_STATE_PREFIX = "JOB_STATE_"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class BatchConfig:
    """How batch jobs behave; the defaults finish every job at once, successfully."""

    pending_s: float = 0.0
    """Seconds a new job stays pending."""
    running_s: float = 0.0
    """Seconds it then runs before reaching its end state."""
    end_states: tuple[EndState, ...] = ()
    """End state of the jobs in creation order; jobs beyond the tuple succeed."""
    partial_fraction: float = 0.5
    """Share of a failed or expired job's lines answered before it ended."""
    line_error_rate: float = 0.0
    """Share of lines answered with an error, the first time their key is seen only."""
    shuffle_output: bool = True
    """Write output lines out of input order, as the services may."""
    lost_create_replies: int = 0
    """The first N creates make the job but answer 503, as a reply lost on the way."""
    upload_delay_s: float = 0.0
    """Delay before answering each upload request carrying data (Files API and GCS)..."""
    upload_delay_after: int = 0
    """...once this many such requests have been answered without it."""
    create_delay_s: float = 0.0
    """Delay before a create takes effect; a client gone by then creates nothing."""
    create_reply_delay_s: float = 0.0
    """Delay between creating a job and replying."""
    download_delay_s: float = 0.0
    """Delay before the body of a file or object download."""
    echo_custom_fields: bool = True
    """Vertex AI: echo an input line's own fields (such as ``key``) in its output line; False
    leaves only the request (labels included), the response and the status."""
    unsupported_locations: frozenset[str] = frozenset()
    """Vertex AI locations answering a create with 400, as regions without batch do."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("partial_fraction", "line_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        bad = [state for state in self.end_states if state not in END_STATES]
        if bad:
            raise ValueError(f"unknown end states {bad}; choose from {END_STATES}")


@dataclass(frozen=True)
class BatchEvent:
    """Something the batch side did, for tests to wait on and count."""

    time: float
    kind: str
    """``upload_started``, ``upload_chunk``, ``uploaded``, ``create_received``, ``created``,
    ``create_abandoned``, ``create_reply_lost``, ``job_get``, ``job_list``, ``cancelled``,
    ``finished``, ``download``, ``deleted``, ``bucket_created``."""
    subject: str
    """The file, object, job name or display name concerned."""
    keys: tuple[str, ...] = ()
    """For ``created``: the keys of every line the job was given."""


@dataclass
class _File:
    name: str
    display_name: str
    mime_type: str
    data: bytes
    created: str
    generated: bool


@dataclass
class _Object:
    bucket: str
    name: str
    data: bytes
    content_type: str
    generation: int
    created: str


@dataclass
class _Upload:
    """A resumable upload in progress: where it goes and the bytes received so far."""

    kind: Literal["file", "object"]
    target: dict[str, Any]
    size: int | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Job:
    number: int
    vertex: bool
    name: str
    display_name: str
    model: str
    version: str
    lines: list[dict[str, Any]]
    source: dict[str, Any]
    """The job's input as the service echoes it (inputConfig)."""
    destination: str | None
    """Vertex: the gs:// output prefix."""
    started: float
    create_time: str
    end_state: EndState
    inline: bool = False
    reply_lost: bool = False
    """The create made this job but its reply is to be dropped (a 503)."""
    cancelled_at: float | None = None
    final_state: EndState | None = None
    end_time: str | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    output_location: str | None = None
    error: str | None = None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        headers={**JSON_HEADERS, **(headers or {})},
    )


def _split_gs(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise ApiError(400, f"Not a Cloud Storage URI: {uri!r}.")
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


def _model_id(model: str) -> str:
    return model.rsplit("/", 1)[-1]


class BatchService:
    """The in-memory state behind the batch routes; its log may be read from other threads."""

    def __init__(self, config: BatchConfig | None = None) -> None:
        self.config = config or BatchConfig()
        self._lock = threading.Lock()
        self._events: list[BatchEvent] = []
        self._files: dict[str, _File] = {}
        self._buckets: dict[str, dict[str, Any]] = {}
        self._objects: dict[tuple[str, str], _Object] = {}
        self._uploads: dict[str, _Upload] = {}
        self._jobs: dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self._rng = random.Random(self.config.seed)
        self._failed_keys: set[str] = set()
        self._creates = 0
        self._upload_requests = 0
        self._closing: asyncio.Event | None = None

    def configure(self, config: BatchConfig) -> None:
        """Switch behaviour for what follows; jobs already created keep their end state."""
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)
            self._creates = 0
            self._upload_requests = 0

    @property
    def events(self) -> list[BatchEvent]:
        with self._lock:
            return list(self._events)

    def submitted_keys(self) -> Counter[str]:
        """How many created jobs were given each line key: above 1 means paid twice."""
        counts: Counter[str] = Counter()
        for event in self.events:
            if event.kind == "created":
                counts.update(event.keys)
        return counts

    def object_names(self, bucket: str) -> list[str]:
        with self._lock:
            return sorted(name for (b, name) in self._objects if b == bucket)

    def file_names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def register(self, app: web.Application) -> None:
        """Add the routes (before the application's catch-all) and the shutdown hook."""
        add = app.router.add_route
        v = "/{version}"
        vertex_jobs = f"{v}/projects/{{project}}/locations/{{location}}/batchPredictionJobs"
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/upload/{version}/files", self._file_upload_start),
            ("POST", "/upload/{version}/files/{upload_id}", self._file_upload_chunk),
            ("GET", f"{v}/files/{{file:[^/:]+}}:download", self._file_download),
            ("GET", f"{v}/files/{{file:[^/:]+}}", self._file_get),
            ("DELETE", f"{v}/files/{{file:[^/:]+}}", self._file_delete),
            ("POST", f"{v}/models/{{model}}:batchGenerateContent", self._gemini_create),
            ("GET", f"{v}/batches", self._gemini_list),
            ("GET", f"{v}/batches/{{job:[^/:]+}}", self._gemini_get),
            ("POST", f"{v}/batches/{{job:[^/:]+}}:cancel", self._gemini_cancel),
            ("DELETE", f"{v}/batches/{{job:[^/:]+}}", self._gemini_delete),
            ("POST", vertex_jobs, self._vertex_create),
            ("GET", vertex_jobs, self._vertex_list),
            ("GET", f"{vertex_jobs}/{{job:[^/:]+}}", self._vertex_get),
            ("POST", f"{vertex_jobs}/{{job:[^/:]+}}:cancel", self._vertex_cancel),
            ("DELETE", f"{vertex_jobs}/{{job:[^/:]+}}", self._vertex_delete),
            ("GET", "/storage/v1/b/{bucket}", self._bucket_get),
            ("POST", "/storage/v1/b", self._bucket_insert),
            ("GET", "/storage/v1/b/{bucket}/o", self._object_list),
            ("GET", "/storage/v1/b/{bucket}/o/{object:.+}", self._object_get),
            ("DELETE", "/storage/v1/b/{bucket}/o/{object:.+}", self._object_delete),
            ("GET", "/download/storage/v1/b/{bucket}/o/{object:.+}", self._object_get),
            ("POST", "/upload/storage/v1/b/{bucket}/o", self._object_upload),
            ("PUT", "/upload/storage/v1/b/{bucket}/o", self._object_upload_chunk),
        ]
        for method, path, handler in routes:
            add(method, path, self._guarded(handler))
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_startup(self, _app: web.Application) -> None:
        self._closing = asyncio.Event()

    async def _on_shutdown(self, _app: web.Application) -> None:
        if self._closing:
            self._closing.set()

    @staticmethod
    def _guarded(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ApiError as error:
                return error.response()

        return guarded

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._closing is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _upload_delay(self) -> None:
        with self._lock:
            self._upload_requests += 1
            slow = self._upload_requests > self.config.upload_delay_after
        if slow:
            await self._sleep(self.config.upload_delay_s)

    def _log(self, kind: str, subject: str, keys: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._events.append(BatchEvent(time.monotonic(), kind, subject, keys))

    # ---- Files API -------------------------------------------------------------------------

    def _file_json(self, request: web.Request, stored: _File) -> dict[str, Any]:
        version = request.match_info.get("version", "v1beta")
        body: dict[str, Any] = {
            "name": stored.name,
            "displayName": stored.display_name,
            "mimeType": stored.mime_type,
            "sizeBytes": str(len(stored.data)),
            "createTime": stored.created,
            "updateTime": stored.created,
            "sha256Hash": base64.b64encode(hashlib.sha256(stored.data).digest()).decode(),
            "uri": f"{request.scheme}://{request.host}/{version}/{stored.name}",
            "state": "ACTIVE",
            "source": "GENERATED" if stored.generated else "UPLOADED",
        }
        if stored.generated:
            body["downloadUri"] = f"{body['uri']}:download?alt=media"
        return body

    async def _file_upload_start(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Goog-Upload-Command", "").lower() != "start":
            raise ApiError(400, "Only the resumable upload protocol is supported here.")
        meta = (await request.json()).get("file") or {}
        name = meta.get("name") or f"files/{secrets.token_hex(6)}"
        with self._lock:
            if name in self._files:
                raise ApiError(409, f"File {name} already exists.")
        size = request.headers.get("X-Goog-Upload-Header-Content-Length")
        upload_id = secrets.token_hex(8)
        target = {
            "name": name,
            "display_name": meta.get("displayName", ""),
            "mime_type": request.headers.get("X-Goog-Upload-Header-Content-Type")
            or meta.get("mimeType", "application/octet-stream"),
        }
        with self._lock:
            self._uploads[upload_id] = _Upload("file", target, None if size is None else int(size))
        self._log("upload_started", name)
        version = request.match_info["version"]
        url = f"{request.scheme}://{request.host}/upload/{version}/files/{upload_id}"
        return _json({}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})

    async def _file_upload_chunk(self, request: web.Request) -> web.Response:
        upload = self._uploads.get(request.match_info["upload_id"])
        status_header = {"X-Goog-Upload-Status": "final"}
        if upload is None:
            return _error_with(ApiError(404, "Upload session not found."), status_header)
        chunk = await request.read()
        self._log("upload_chunk", upload.target["name"])
        await self._upload_delay()
        offset = int(request.headers.get("X-Goog-Upload-Offset", "0"))
        if offset != len(upload.data):
            return _error_with(ApiError(400, "Upload offset mismatch."), status_header)
        upload.data.extend(chunk)
        command = request.headers.get("X-Goog-Upload-Command", "")
        if "finalize" not in command:
            return _json({}, headers={"X-Goog-Upload-Status": "active"})
        if _client_gone(request):
            return web.Response(status=499)
        target = upload.target
        stored = _File(
            target["name"],
            target["display_name"],
            target["mime_type"],
            bytes(upload.data),
            _now_iso(),
            generated=False,
        )
        with self._lock:
            self._files[stored.name] = stored
            self._uploads.pop(request.match_info["upload_id"], None)
        self._log("uploaded", stored.name)
        return _json({"file": self._file_json(request, stored)}, headers=status_header)

    def _stored_file(self, request: web.Request) -> _File:
        name = f"files/{request.match_info['file']}"
        with self._lock:
            stored = self._files.get(name)
        if stored is None:
            raise ApiError(404, f"File {name} not found.")
        return stored

    async def _file_get(self, request: web.Request) -> web.Response:
        return _json(self._file_json(request, self._stored_file(request)))

    async def _file_delete(self, request: web.Request) -> web.Response:
        stored = self._stored_file(request)
        with self._lock:
            self._files.pop(stored.name, None)
        self._log("deleted", stored.name)
        return _json({})

    async def _file_download(self, request: web.Request) -> web.Response:
        stored = self._stored_file(request)
        self._log("download", stored.name)
        await self._sleep(self.config.download_delay_s)
        return web.Response(body=stored.data, content_type=stored.mime_type)

    # ---- jobs, common --------------------------------------------------------------------

    async def _create_goes_ahead(self, request: web.Request, display_name: str) -> bool:
        """Whether the client is still there after the create delay (else nothing is made)."""
        self._log("create_received", display_name)
        await self._sleep(self.config.create_delay_s)
        if _client_gone(request):
            self._log("create_abandoned", display_name)
            return False
        return True

    def _new_job(self, vertex: bool, **fields: Any) -> _Job:
        with self._lock:
            number = next(self._ids)
            index = self._creates
            self._creates += 1
            states = self.config.end_states
            end_state: EndState = states[index] if index < len(states) else "SUCCEEDED"
            lost = index < self.config.lost_create_replies
        if vertex:
            name = (
                f"projects/{fields.pop('project')}/locations/{fields.pop('location')}/"
                f"batchPredictionJobs/{1_000_000 + number}"
            )
        else:
            name = f"batches/emu{number:06d}{secrets.token_hex(3)}"
        job = _Job(
            number=number,
            vertex=vertex,
            name=name,
            started=time.monotonic(),
            create_time=_now_iso(),
            end_state=end_state,
            **fields,
        )
        with self._lock:
            self._jobs[name] = job
        job.reply_lost = lost
        self._log("created", job.display_name, tuple(str(line.get("key")) for line in job.lines))
        return job

    async def _after_create(self, job: _Job) -> None:
        await self._sleep(self.config.create_reply_delay_s)
        if job.reply_lost:
            self._log("create_reply_lost", job.display_name)
            raise ApiError(503, "The service is currently unavailable. (emulated lost reply)")

    def _state(self, job: _Job) -> str:
        """The job's state now; reaching the end writes its output once."""
        config = self.config
        now = time.monotonic()
        if job.final_state is None:
            if job.cancelled_at is not None:
                self._finish(job, "CANCELLED", self._progress(job, job.cancelled_at))
            elif now >= job.started + config.pending_s + config.running_s:
                fraction = 1.0 if job.end_state == "SUCCEEDED" else config.partial_fraction
                self._finish(job, job.end_state, fraction)
        if job.final_state is not None:
            return job.final_state
        return "PENDING" if now < job.started + config.pending_s else "RUNNING"

    def _progress(self, job: _Job, at: float) -> float:
        running = at - job.started - self.config.pending_s
        if running <= 0:
            return 0.0
        return min(1.0, running / self.config.running_s) if self.config.running_s else 1.0

    def _finish(self, job: _Job, state: EndState, fraction: float) -> None:
        answered = job.lines[: int(len(job.lines) * fraction)]
        output = [self._answer_line(job, line) for line in answered]
        if self.config.shuffle_output:
            self._rng.shuffle(output)
        job.output = output
        job.final_state = state
        job.end_time = _now_iso()
        if state == "FAILED":
            job.error = "The batch job failed. (emulated)"
        elif state == "EXPIRED":
            job.error = "The batch job did not finish in time and expired. (emulated)"
        if output:
            self._write_output(job)
        self._log("finished", job.display_name)

    def _answer_line(self, job: _Job, line: dict[str, Any]) -> dict[str, Any]:
        key = str(line.get("key"))
        request = line.get("request")
        error: ApiError | None = None
        body: dict[str, Any] | None = None
        with self._lock:
            fail = key not in self._failed_keys and self._rng.random() < self.config.line_error_rate
            if fail:
                self._failed_keys.add(key)
        if fail:
            error = ApiError(500, "An internal error has occurred. (emulated line failure)")
        else:
            try:
                req, prompt, prefill = parse_contents(json.dumps(request).encode())
                call = build_call(req, prompt, prefill, _model_id(job.model), job.version)
                if call.model.noprefill and call.prefill is not None:
                    raise ApiError(400, "Requests ending with a model turn are not supported.")
                body = answer_body(call, not call.model.nologprobs, job.vertex)
            except ApiError as api_error:
                error = api_error
        if job.vertex:
            echoed = line if self.config.echo_custom_fields else {"request": request}
            out = {**echoed, "processed_time": _now_iso()}
            if body is not None:
                out.update(response=body, status="")
            else:
                assert error is not None
                out["status"] = f"{error.code}: {error.message}"
            return out
        if job.inline:
            result: dict[str, Any] = {"metadata": line.get("metadata") or {}}
        else:
            result = {"key": key}
        if body is not None:
            result["response"] = body
        else:
            assert error is not None
            result["error"] = {"code": error.code, "message": error.message}
        return result

    def _write_output(self, job: _Job) -> None:
        data = "".join(json.dumps(line) + "\n" for line in job.output).encode()
        if job.vertex:
            assert job.destination is not None
            bucket, prefix = _split_gs(job.destination)
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            directory = f"{prefix.rstrip('/')}/prediction-model-{stamp}"
            self._put_object(bucket, f"{directory}/predictions.jsonl", data, "application/jsonl")
            job.output_location = f"gs://{bucket}/{directory}"
        elif not job.inline:
            name = f"files/batch-{job.name.removeprefix('batches/')}"
            with self._lock:
                self._files[name] = _File(
                    name, name, "application/jsonl", data, _now_iso(), generated=True
                )
            job.output_location = name

    def _find_job(self, name: str) -> _Job:
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            raise ApiError(404, f"Batch job {name} not found.")
        return job

    def _cancel(self, job: _Job) -> None:
        if self._state(job) in END_STATES:
            raise ApiError(400, f"Batch job {job.name} has already finished.")
        job.cancelled_at = time.monotonic()
        self._log("cancelled", job.display_name)

    def _delete(self, job: _Job) -> None:
        with self._lock:
            self._jobs.pop(job.name, None)
        self._log("deleted", job.name)

    def _counts(self, job: _Job, state: str) -> tuple[int, int, int]:
        """Lines succeeded, failed and not done, as the services report them."""
        if state not in END_STATES:
            done = int(len(job.lines) * self._progress(job, time.monotonic()))
            return done, 0, len(job.lines) - done
        failed = sum(1 for line in job.output if "error" in line or line.get("status"))
        return len(job.output) - failed, failed, len(job.lines) - len(job.output)

    # ---- Gemini batches ------------------------------------------------------------------

    def _operation(self, job: _Job) -> dict[str, Any]:
        state = self._state(job)
        succeeded, failed, pending = self._counts(job, state)
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": job.model,
            "displayName": job.display_name,
            "inputConfig": job.source,
            "createTime": job.create_time,
            "updateTime": job.end_time or job.create_time,
            "batchStats": {
                "requestCount": str(len(job.lines)),
                "successfulRequestCount": str(succeeded),
                "failedRequestCount": str(failed),
                "pendingRequestCount": str(pending),
            },
            "state": GEMINI_STATE_PREFIX + state,
            "name": job.name,
        }
        operation: dict[str, Any] = {"name": job.name, "metadata": metadata}
        if state in END_STATES:
            operation["done"] = True
            metadata["endTime"] = job.end_time
            if job.inline and job.output:
                metadata["output"] = {"inlinedResponses": {"inlinedResponses": job.output}}
            elif job.output_location:
                metadata["output"] = {"responsesFile": job.output_location}
            if job.error:
                operation["error"] = {"code": 13, "message": job.error}
        return operation

    async def _gemini_create(self, request: web.Request) -> web.Response:
        batch = (await request.json()).get("batch") or {}
        display_name = batch.get("displayName") or ""
        source = batch.get("inputConfig") or {}
        if "fileName" in source:
            with self._lock:
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
        if not await self._create_goes_ahead(request, display_name):
            return web.Response(status=499)
        job = self._new_job(
            False,
            display_name=display_name,
            model=f"models/{request.match_info['model']}",
            version=request.match_info["version"],
            lines=lines,
            source=source,
            destination=None,
            inline=inline,
        )
        await self._after_create(job)
        return _json(self._operation(job))

    async def _gemini_get(self, request: web.Request) -> web.Response:
        job = self._find_job(f"batches/{request.match_info['job']}")
        self._log("job_get", job.display_name)
        return _json(self._operation(job))

    async def _gemini_list(self, request: web.Request) -> web.Response:
        jobs = self._page(request, vertex=False)
        self._log("job_list", "")
        body: dict[str, Any] = {"operations": [self._operation(job) for job in jobs[0]]}
        if jobs[1]:
            body["nextPageToken"] = jobs[1]
        return _json(body)

    async def _gemini_cancel(self, request: web.Request) -> web.Response:
        self._cancel(self._find_job(f"batches/{request.match_info['job']}"))
        return _json({})

    async def _gemini_delete(self, request: web.Request) -> web.Response:
        self._delete(self._find_job(f"batches/{request.match_info['job']}"))
        return _json({})

    def _page(self, request: web.Request, vertex: bool) -> tuple[list[_Job], str | None]:
        size = int(request.query.get("pageSize", "50"))
        start = int(request.query.get("pageToken", "0") or "0")
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.vertex == vertex]
        jobs.sort(key=lambda job: -job.number)
        page = jobs[start : start + size]
        more = start + size < len(jobs)
        return page, str(start + size) if more else None

    # ---- Vertex AI batch prediction ------------------------------------------------------

    def _vertex_json(self, job: _Job) -> dict[str, Any]:
        state = self._state(job)
        succeeded, failed, pending = self._counts(job, state)
        body: dict[str, Any] = {
            "name": job.name,
            "displayName": job.display_name,
            "model": job.model,
            "inputConfig": job.source,
            "outputConfig": {
                "predictionsFormat": "jsonl",
                "gcsDestination": {"outputUriPrefix": job.destination},
            },
            "state": VERTEX_STATE_PREFIX + state,
            "createTime": job.create_time,
            "updateTime": job.end_time or job.create_time,
            "completionStats": {
                "successfulCount": str(succeeded),
                "failedCount": str(failed),
                "incompleteCount": str(pending),
            },
        }
        if state != "PENDING":
            body["startTime"] = job.create_time
        if state in END_STATES:
            body["endTime"] = job.end_time
        if job.output_location:
            body["outputInfo"] = {"gcsOutputDirectory": job.output_location}
        if job.error:
            body["error"] = {"code": 13, "message": job.error}
        return body

    async def _vertex_create(self, request: web.Request) -> web.Response:
        location = request.match_info["location"]
        if location in self.config.unsupported_locations:
            raise ApiError(
                400, f"Batch prediction jobs are not supported in location {location}. (emulated)"
            )
        body = await request.json()
        display_name = body.get("displayName") or ""
        source = body.get("inputConfig") or {}
        uris = (source.get("gcsSource") or {}).get("uris") or []
        destination = ((body.get("outputConfig") or {}).get("gcsDestination") or {}).get(
            "outputUriPrefix"
        )
        if not uris or not destination:
            raise ApiError(400, "inputConfig.gcsSource.uris and an output prefix are required.")
        lines: list[dict[str, Any]] = []
        for uri in uris:
            with self._lock:
                stored = self._objects.get(_split_gs(uri))
            if stored is None:
                raise ApiError(400, f"Input {uri} not found.")
            lines += [json.loads(row) for row in stored.data.decode().splitlines() if row.strip()]
        if _split_gs(destination)[0] not in self._buckets:
            raise ApiError(400, f"Output bucket of {destination} not found.")
        if not await self._create_goes_ahead(request, display_name):
            return web.Response(status=499)
        job = self._new_job(
            True,
            project=request.match_info["project"],
            location=location,
            display_name=display_name,
            model=body.get("model") or "",
            version=request.match_info["version"],
            lines=lines,
            source=source,
            destination=destination,
        )
        await self._after_create(job)
        return _json(self._vertex_json(job))

    def _vertex_name(self, request: web.Request) -> str:
        m = request.match_info
        return f"projects/{m['project']}/locations/{m['location']}/batchPredictionJobs/{m['job']}"

    async def _vertex_get(self, request: web.Request) -> web.Response:
        job = self._find_job(self._vertex_name(request))
        self._log("job_get", job.display_name)
        return _json(self._vertex_json(job))

    async def _vertex_list(self, request: web.Request) -> web.Response:
        jobs, token = self._page(request, vertex=True)
        self._log("job_list", "")
        body: dict[str, Any] = {"batchPredictionJobs": [self._vertex_json(job) for job in jobs]}
        if token:
            body["nextPageToken"] = token
        return _json(body)

    async def _vertex_cancel(self, request: web.Request) -> web.Response:
        self._cancel(self._find_job(self._vertex_name(request)))
        return _json({})

    async def _vertex_delete(self, request: web.Request) -> web.Response:
        self._delete(self._find_job(self._vertex_name(request)))
        return _json({"name": f"{self._vertex_name(request)}/operations/delete", "done": True})

    # ---- Cloud Storage -------------------------------------------------------------------

    def _bucket(self, name: str) -> dict[str, Any]:
        with self._lock:
            bucket = self._buckets.get(name)
        if bucket is None:
            raise ApiError(404, f"The specified bucket does not exist: {name}.")
        return bucket

    async def _bucket_get(self, request: web.Request) -> web.Response:
        return _json(self._bucket(request.match_info["bucket"]))

    async def _bucket_insert(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("name") or ""
        resource = {
            "kind": "storage#bucket",
            "id": name,
            "name": name,
            "location": body.get("location", "US"),
            "storageClass": "STANDARD",
            "timeCreated": _now_iso(),
            "metageneration": "1",
            "projectNumber": "0",
        }
        with self._lock:
            if name in self._buckets:
                raise ApiError(
                    409,
                    f"Your previous request to create the named bucket {name} "
                    "succeeded and you already own it.",
                )
            self._buckets[name] = resource
        self._log("bucket_created", name)
        return _json(resource)

    def _object_json(self, request: web.Request, stored: _Object) -> dict[str, Any]:
        quoted = quote(stored.name, safe="")
        host = f"{request.scheme}://{request.host}"
        return {
            "kind": "storage#object",
            "id": f"{stored.bucket}/{stored.name}/{stored.generation}",
            "name": stored.name,
            "bucket": stored.bucket,
            "generation": str(stored.generation),
            "metageneration": "1",
            "contentType": stored.content_type,
            "size": str(len(stored.data)),
            "md5Hash": base64.b64encode(hashlib.md5(stored.data).digest()).decode(),
            **_crc32c(stored.data),
            "timeCreated": stored.created,
            "updated": stored.created,
            "mediaLink": f"{host}/download/storage/v1/b/{stored.bucket}/o/{quoted}"
            f"?generation={stored.generation}&alt=media",
        }

    def _put_object(self, bucket: str, name: str, data: bytes, content_type: str) -> _Object:
        self._bucket(bucket)
        stored = _Object(bucket, name, data, content_type, time.time_ns() // 1000, _now_iso())
        with self._lock:
            self._objects[(bucket, name)] = stored
        self._log("uploaded", f"gs://{bucket}/{name}")
        return stored

    def _stored_object(self, request: web.Request) -> _Object:
        key = (request.match_info["bucket"], request.match_info["object"])
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            raise ApiError(404, f"No such object: {key[0]}/{key[1]}")
        return stored

    async def _object_get(self, request: web.Request) -> web.Response:
        stored = self._stored_object(request)
        if request.query.get("alt") != "media":
            return _json(self._object_json(request, stored))
        self._log("download", f"gs://{stored.bucket}/{stored.name}")
        await self._sleep(self.config.download_delay_s)
        md5 = base64.b64encode(hashlib.md5(stored.data).digest()).decode()
        return web.Response(
            body=stored.data,
            headers={
                "Content-Type": stored.content_type,
                "X-Goog-Hash": f"md5={md5}",
                "X-Goog-Generation": str(stored.generation),
            },
        )

    async def _object_delete(self, request: web.Request) -> web.Response:
        stored = self._stored_object(request)
        with self._lock:
            self._objects.pop((stored.bucket, stored.name), None)
        self._log("deleted", f"gs://{stored.bucket}/{stored.name}")
        return web.Response(status=204)

    async def _object_list(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        self._bucket(bucket)
        prefix = request.query.get("prefix", "")
        with self._lock:
            stored = [o for (b, n), o in sorted(self._objects.items()) if b == bucket]
        items = [self._object_json(request, o) for o in stored if o.name.startswith(prefix)]
        return _json({"kind": "storage#objects", "items": items})

    async def _object_upload(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        self._bucket(bucket)
        kind = request.query.get("uploadType", "media")
        if kind == "resumable":
            meta = await request.json() if request.can_read_body else {}
            name = meta.get("name") or request.query.get("name", "")
            upload_id = secrets.token_hex(8)
            target = {
                "bucket": bucket,
                "name": name,
                "content_type": meta.get("contentType")
                or request.headers.get("X-Upload-Content-Type", "application/octet-stream"),
            }
            size = request.headers.get("X-Upload-Content-Length")
            with self._lock:
                self._uploads[upload_id] = _Upload(
                    "object", target, None if size is None else int(size)
                )
            self._log("upload_started", f"gs://{bucket}/{name}")
            location = (
                f"{request.scheme}://{request.host}/upload/storage/v1/b/{bucket}/o"
                f"?uploadType=resumable&upload_id={upload_id}"
            )
            return _json({}, headers={"Location": location})
        body = await request.read()
        self._log("upload_chunk", f"gs://{bucket}/{request.query.get('name', '')}")
        await self._upload_delay()
        if _client_gone(request):
            return web.Response(status=499)
        if kind == "multipart":
            meta, data, content_type = _multipart(request.headers["Content-Type"], body)
            name = meta.get("name") or request.query.get("name", "")
            content_type = meta.get("contentType") or content_type
        else:
            name, data = request.query.get("name", ""), body
            content_type = request.headers.get("Content-Type", "application/octet-stream")
        return _json(self._object_json(request, self._put_object(bucket, name, data, content_type)))

    async def _object_upload_chunk(self, request: web.Request) -> web.Response:
        upload_id = request.query.get("upload_id", "")
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise ApiError(404, "Upload session not found.")
        chunk = await request.read()
        target = upload.target
        self._log("upload_chunk", f"gs://{target['bucket']}/{target['name']}")
        await self._upload_delay()
        if _client_gone(request):
            return web.Response(status=499)
        content_range = request.headers.get("Content-Range", "")
        total_text = content_range.rpartition("/")[2]
        total = int(total_text) if total_text.isdigit() else upload.size
        if chunk:
            start = int(content_range.split()[1].split("-")[0])
            del upload.data[start:]
            upload.data.extend(chunk)
        if total is None or len(upload.data) < total:
            headers = {"Range": f"bytes=0-{len(upload.data) - 1}"} if upload.data else {}
            return web.Response(status=308, headers=headers)
        with self._lock:
            self._uploads.pop(upload_id, None)
        stored = self._put_object(
            target["bucket"], target["name"], bytes(upload.data), target["content_type"]
        )
        return _json(self._object_json(request, stored))


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes, str]:
    """The metadata and the data of a ``multipart/related`` upload."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = [part for part in message.iter_parts()]
    if len(parts) != 2:
        raise ApiError(400, "A multipart upload needs a metadata part and a data part.")
    meta, data = (part.get_payload(decode=True) for part in parts)
    if not isinstance(meta, bytes) or not isinstance(data, bytes):
        raise ApiError(400, "A multipart upload's parts must carry bytes.")
    return json.loads(meta or b"{}"), data, parts[1].get_content_type()


def _crc32c(data: bytes) -> dict[str, str]:
    """The object's ``crc32c`` field, which google-cloud-storage checks after a resumable upload.
    Its checksum package comes with that client, so it is there whenever the field is wanted."""
    try:
        import google_crc32c
    except ImportError:
        return {}
    digest = google_crc32c.value(data).to_bytes(4, "big")
    return {"crc32c": base64.b64encode(digest).decode()}


def _error_with(error: ApiError, headers: dict[str, str]) -> web.Response:
    """An API error carrying extra headers (the upload protocol's status, say)."""
    response = error.response()
    response.headers.update(headers)
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
