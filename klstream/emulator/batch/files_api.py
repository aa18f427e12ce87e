"""The Gemini Files API, in memory: resumable upload, get, download and delete.

google-genai uploads through ``POST /upload/{version}/files`` (the resumable protocol, with
``X-Goog-Upload-*`` headers) and downloads through ``GET /{version}/files/{id}:download?alt=media``.
Gemini batch jobs read their input file here and write their output file back
(:mod:`klstream.emulator.batch.gemini_batches`).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from klstream.emulator.batch.common import (
    BatchContext,
    Route,
    Upload,
    json_reply,
    now_iso,
)
from klstream.emulator.protocol import ApiError, client_gone


@dataclass
class StoredFile:
    """A file as the Files API keeps it: its metadata and all of its bytes."""

    name: str
    display_name: str
    mime_type: str
    data: bytes
    created: str
    generated: bool
    """Written by a batch job rather than uploaded: such files can be downloaded."""


class FilesApi:
    """The stored files and the routes that reach them."""

    def __init__(self, context: BatchContext) -> None:
        self._context = context
        self._files: dict[str, StoredFile] = {}
        self._uploads: dict[str, Upload] = {}

    def routes(self) -> list[Route]:
        file = "/{version}/files/{file:[^/:]+}"
        return [
            ("POST", "/upload/{version}/files", self._upload_start),
            ("POST", "/upload/{version}/files/{upload_id}", self._upload_chunk),
            ("GET", f"{file}:download", self._download),
            ("GET", file, self._get),
            ("DELETE", file, self._delete),
        ]

    def names(self) -> list[str]:
        with self._context.lock:
            return sorted(self._files)

    def get(self, name: str) -> StoredFile | None:
        with self._context.lock:
            return self._files.get(name)

    def put_generated(self, name: str, data: bytes) -> None:
        """Store a batch job's output file (JSONL, named after the job)."""
        stored = StoredFile(name, name, "application/jsonl", data, now_iso(), generated=True)
        with self._context.lock:
            self._files[name] = stored

    def _file_json(self, request: web.Request, stored: StoredFile) -> dict[str, Any]:
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

    async def _upload_start(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Goog-Upload-Command", "").lower() != "start":
            raise ApiError(400, "Only the resumable upload protocol is supported here.")
        meta = (await request.json()).get("file") or {}
        name = meta.get("name") or f"files/{secrets.token_hex(6)}"
        with self._context.lock:
            if name in self._files:
                raise ApiError(409, f"File {name} already exists.")
        target = {
            "name": name,
            "display_name": meta.get("displayName", ""),
            "mime_type": request.headers.get("X-Goog-Upload-Header-Content-Type")
            or meta.get("mimeType", "application/octet-stream"),
        }
        size = request.headers.get("X-Goog-Upload-Header-Content-Length")
        upload_id = self._context.start_upload(self._uploads, target, size, name)
        version = request.match_info["version"]
        url = f"{request.scheme}://{request.host}/upload/{version}/files/{upload_id}"
        return json_reply({}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})

    async def _upload_chunk(self, request: web.Request) -> web.Response:
        upload = self._uploads.get(request.match_info["upload_id"])
        status_header = {"X-Goog-Upload-Status": "final"}
        if upload is None:
            return _error_with(ApiError(404, "Upload session not found."), status_header)
        chunk = await request.read()
        await self._context.chunk_received(upload.target["name"])
        offset = int(request.headers.get("X-Goog-Upload-Offset", "0"))
        if offset != len(upload.data):
            return _error_with(ApiError(400, "Upload offset mismatch."), status_header)
        upload.data.extend(chunk)
        command = request.headers.get("X-Goog-Upload-Command", "")
        if "finalize" not in command:
            return json_reply({}, headers={"X-Goog-Upload-Status": "active"})
        if client_gone(request):
            return web.Response(status=499)
        target = upload.target
        stored = StoredFile(
            target["name"],
            target["display_name"],
            target["mime_type"],
            bytes(upload.data),
            now_iso(),
            generated=False,
        )
        with self._context.lock:
            self._files[stored.name] = stored
            self._uploads.pop(request.match_info["upload_id"], None)
        self._context.log("uploaded", stored.name)
        return json_reply({"file": self._file_json(request, stored)}, headers=status_header)

    def _stored_file(self, request: web.Request) -> StoredFile:
        name = f"files/{request.match_info['file']}"
        return self._context.lookup(self._files, name, f"File {name} not found.")

    async def _get(self, request: web.Request) -> web.Response:
        return json_reply(self._file_json(request, self._stored_file(request)))

    async def _delete(self, request: web.Request) -> web.Response:
        stored = self._stored_file(request)
        with self._context.lock:
            self._files.pop(stored.name, None)
        self._context.log("deleted", stored.name)
        return json_reply({})

    async def _download(self, request: web.Request) -> web.Response:
        stored = self._stored_file(request)
        self._context.log("download", stored.name)
        await self._context.sleep(self._context.config.download_delay_s)
        return web.Response(body=stored.data, content_type=stored.mime_type)


def _error_with(error: ApiError, headers: dict[str, str]) -> web.Response:
    """An API error carrying extra headers (the upload protocol's status, say)."""
    response = error.response()
    response.headers.update(headers)
    return response
