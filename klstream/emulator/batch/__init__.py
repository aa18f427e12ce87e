"""The emulator's batch side, in memory: Gemini's Files API and batch jobs, Vertex AI batch
prediction jobs, and the subset of Cloud Storage's JSON API that ``google-cloud-storage`` uses
for them. The routes follow what the installed SDKs send.

:class:`BatchService` is what the emulator registers; it puts together

- :mod:`~klstream.emulator.batch.files_api`: resumable upload, get, download, delete of files;
- :mod:`~klstream.emulator.batch.gemini_batches`: ``batchGenerateContent`` and ``batches``;
- :mod:`~klstream.emulator.batch.vertex_jobs`: ``batchPredictionJobs``;
- :mod:`~klstream.emulator.batch.cloud_storage`: buckets and objects;
- :mod:`~klstream.emulator.batch.jobs`: the life of a job, the same for both services
  (schedule, end states, output lines, faults);
- :mod:`~klstream.emulator.batch.common`: :class:`BatchConfig`, :class:`BatchEvent` and the
  state and helpers every part shares.
"""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from klstream.emulator.batch.cloud_storage import CloudStorage
from klstream.emulator.batch.common import (
    BatchConfig,
    BatchContext,
    BatchEvent,
    EndState,
    Handler,
)
from klstream.emulator.batch.files_api import FilesApi
from klstream.emulator.batch.gemini_batches import GeminiBatches
from klstream.emulator.batch.jobs import JobBook
from klstream.emulator.batch.vertex_jobs import VertexJobs
from klstream.emulator.protocol import ApiError

__all__ = ["BatchConfig", "BatchEvent", "BatchService", "EndState"]


class BatchService:
    """The batch side as one piece; its log and stores may be read from other threads."""

    def __init__(self, config: BatchConfig | None = None) -> None:
        self._context = BatchContext(config or BatchConfig())
        self._files = FilesApi(self._context)
        self._storage = CloudStorage(self._context)
        book = JobBook()
        self._gemini = GeminiBatches(self._context, book, self._files)
        self._vertex = VertexJobs(self._context, book, self._storage)

    @property
    def config(self) -> BatchConfig:
        """The behaviour in force (see :meth:`configure`)."""
        return self._context.config

    def configure(self, config: BatchConfig) -> None:
        """Switch behaviour for what follows; jobs already created keep their end state."""
        self._context.configure(config)

    @property
    def events(self) -> list[BatchEvent]:
        """A snapshot of the event log, oldest first."""
        return self._context.events

    def submitted_keys(self) -> Counter[str]:
        """How many created jobs were given each line key: above 1 means paid twice."""
        counts: Counter[str] = Counter()
        for event in self.events:
            if event.kind == "created":
                counts.update(event.keys)
        return counts

    def object_names(self, bucket: str) -> list[str]:
        return self._storage.object_names(bucket)

    def file_names(self) -> list[str]:
        return self._files.names()

    def register(self, app: web.Application) -> None:
        """Add the routes (before the application's catch-all) and the shutdown hook."""
        routes = [
            *self._files.routes(),
            *self._gemini.routes(),
            *self._vertex.routes(),
            *self._storage.routes(),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, _guarded(handler))
        app.on_startup.append(self._context.on_startup)
        app.on_shutdown.append(self._context.on_shutdown)


def _guarded(handler: Handler) -> Handler:
    """The handler, answering the API errors it raises in Google's error format."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()

    return guarded
