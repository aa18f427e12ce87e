"""The subset of Cloud Storage's JSON API that ``google-cloud-storage`` uses for batch jobs, in
memory: buckets get/insert; objects media, multipart and resumable uploads, metadata, download,
list and delete.

The client reaches it through ``STORAGE_EMULATOR_HOST`` (or an ``api_endpoint``) set to the
emulator's base URL. Vertex AI batch prediction jobs read their input and write their output here
(:mod:`klstream.emulator.batch.vertex_jobs`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import quote

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
class StoredObject:
    """One generation of an object: the only one kept, as nothing here asks for older ones."""

    bucket: str
    name: str
    data: bytes
    content_type: str
    generation: int
    created: str


def split_gs(uri: str) -> tuple[str, str]:
    """The bucket and object name of a ``gs://bucket/name`` URI."""
    if not uri.startswith("gs://"):
        raise ApiError(400, f"Not a Cloud Storage URI: {uri!r}.")
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


class CloudStorage:
    """The buckets and objects, and the routes that reach them."""

    def __init__(self, context: BatchContext) -> None:
        self._context = context
        self._buckets: dict[str, dict[str, Any]] = {}
        self._objects: dict[tuple[str, str], StoredObject] = {}
        self._uploads: dict[str, Upload] = {}

    def routes(self) -> list[Route]:
        return [
            ("GET", "/storage/v1/b/{bucket}", self._bucket_get),
            ("POST", "/storage/v1/b", self._bucket_insert),
            ("GET", "/storage/v1/b/{bucket}/o", self._object_list),
            ("GET", "/storage/v1/b/{bucket}/o/{object:.+}", self._object_get),
            ("DELETE", "/storage/v1/b/{bucket}/o/{object:.+}", self._object_delete),
            ("GET", "/download/storage/v1/b/{bucket}/o/{object:.+}", self._object_get),
            ("POST", "/upload/storage/v1/b/{bucket}/o", self._object_upload),
            ("PUT", "/upload/storage/v1/b/{bucket}/o", self._object_upload_chunk),
        ]

    def object_names(self, bucket: str) -> list[str]:
        with self._context.lock:
            return sorted(name for (b, name) in self._objects if b == bucket)

    def has_bucket(self, name: str) -> bool:
        with self._context.lock:
            return name in self._buckets

    def get(self, bucket: str, name: str) -> StoredObject | None:
        with self._context.lock:
            return self._objects.get((bucket, name))

    def put(self, bucket: str, name: str, data: bytes, content_type: str) -> StoredObject:
        """Store an object (a new generation of it) in a bucket that must exist."""
        self._bucket(bucket)
        stored = StoredObject(bucket, name, data, content_type, time.time_ns() // 1000, now_iso())
        with self._context.lock:
            self._objects[(bucket, name)] = stored
        self._context.log("uploaded", f"gs://{bucket}/{name}")
        return stored

    def _bucket(self, name: str) -> dict[str, Any]:
        missing = f"The specified bucket does not exist: {name}."
        return self._context.lookup(self._buckets, name, missing)

    async def _bucket_get(self, request: web.Request) -> web.Response:
        return json_reply(self._bucket(request.match_info["bucket"]))

    async def _bucket_insert(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("name") or ""
        resource = {
            "kind": "storage#bucket",
            "id": name,
            "name": name,
            "location": body.get("location", "US"),
            "storageClass": "STANDARD",
            "timeCreated": now_iso(),
            "metageneration": "1",
            "projectNumber": "0",
        }
        with self._context.lock:
            if name in self._buckets:
                raise ApiError(
                    409,
                    f"Your previous request to create the named bucket {name} "
                    "succeeded and you already own it.",
                )
            self._buckets[name] = resource
        self._context.log("bucket_created", name)
        return json_reply(resource)

    def _object_json(self, request: web.Request, stored: StoredObject) -> dict[str, Any]:
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
            "md5Hash": _md5(stored.data),
            **_crc32c(stored.data),
            "timeCreated": stored.created,
            "updated": stored.created,
            "mediaLink": f"{host}/download/storage/v1/b/{stored.bucket}/o/{quoted}"
            f"?generation={stored.generation}&alt=media",
        }

    def _stored_object(self, request: web.Request) -> StoredObject:
        key = (request.match_info["bucket"], request.match_info["object"])
        return self._context.lookup(self._objects, key, f"No such object: {key[0]}/{key[1]}")

    async def _object_get(self, request: web.Request) -> web.Response:
        stored = self._stored_object(request)
        if request.query.get("alt") != "media":
            return json_reply(self._object_json(request, stored))
        self._context.log("download", f"gs://{stored.bucket}/{stored.name}")
        await self._context.sleep(self._context.config.download_delay_s)
        return web.Response(
            body=stored.data,
            headers={
                "Content-Type": stored.content_type,
                "X-Goog-Hash": f"md5={_md5(stored.data)}",
                "X-Goog-Generation": str(stored.generation),
            },
        )

    async def _object_delete(self, request: web.Request) -> web.Response:
        stored = self._stored_object(request)
        with self._context.lock:
            self._objects.pop((stored.bucket, stored.name), None)
        self._context.log("deleted", f"gs://{stored.bucket}/{stored.name}")
        return web.Response(status=204)

    async def _object_list(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        self._bucket(bucket)
        prefix = request.query.get("prefix", "")
        with self._context.lock:
            stored = [o for (b, n), o in sorted(self._objects.items()) if b == bucket]
        items = [self._object_json(request, o) for o in stored if o.name.startswith(prefix)]
        return json_reply({"kind": "storage#objects", "items": items})

    async def _object_upload(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        self._bucket(bucket)
        kind = request.query.get("uploadType", "media")
        if kind == "resumable":
            meta = await request.json() if request.can_read_body else {}
            name = meta.get("name") or request.query.get("name", "")
            target = {
                "bucket": bucket,
                "name": name,
                "content_type": meta.get("contentType")
                or request.headers.get("X-Upload-Content-Type", "application/octet-stream"),
            }
            size = request.headers.get("X-Upload-Content-Length")
            upload_id = self._context.start_upload(
                self._uploads, target, size, f"gs://{bucket}/{name}"
            )
            location = (
                f"{request.scheme}://{request.host}/upload/storage/v1/b/{bucket}/o"
                f"?uploadType=resumable&upload_id={upload_id}"
            )
            return json_reply({}, headers={"Location": location})
        body = await request.read()
        await self._context.chunk_received(f"gs://{bucket}/{request.query.get('name', '')}")
        if client_gone(request):
            return web.Response(status=499)
        if kind == "multipart":
            meta, data, content_type = _multipart(request.headers["Content-Type"], body)
            name = meta.get("name") or request.query.get("name", "")
            content_type = meta.get("contentType") or content_type
        else:
            name, data = request.query.get("name", ""), body
            content_type = request.headers.get("Content-Type", "application/octet-stream")
        return json_reply(self._object_json(request, self.put(bucket, name, data, content_type)))

    async def _object_upload_chunk(self, request: web.Request) -> web.Response:
        upload_id = request.query.get("upload_id", "")
        upload = self._context.lookup(self._uploads, upload_id, "Upload session not found.")
        chunk = await request.read()
        target = upload.target
        await self._context.chunk_received(f"gs://{target['bucket']}/{target['name']}")
        if client_gone(request):
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
        with self._context.lock:
            self._uploads.pop(upload_id, None)
        stored = self.put(
            target["bucket"], target["name"], bytes(upload.data), target["content_type"]
        )
        return json_reply(self._object_json(request, stored))


def _md5(data: bytes) -> str:
    """The base64 MD5 digest, as ``md5Hash`` and the ``X-Goog-Hash`` header carry it."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


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
