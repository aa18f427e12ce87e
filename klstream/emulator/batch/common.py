"""What every part of the batch side shares: its config, its event log, one lock, the shutdown
signal, and the small helpers its routes answer with.

The Files API, Cloud Storage and both job services are handed one :class:`BatchContext`, so
that they log to one event log, cut their delays short at one shutdown, and count "the first N"
uploads and creates of :class:`BatchConfig` together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from aiohttp import web

from klstream.emulator.protocol import JSON_HEADERS, ApiError

EndState = Literal["SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"]
END_STATES: tuple[EndState, ...] = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]
"""An HTTP method, a path pattern and its handler, as each part of the batch side lists them."""

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


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
    without_logprobs: bool = False
    """Answer every line without ``logprobsResult``, as a batch service that does not carry
    logprobs through although its online requests do (what a batch run's canary is for)."""
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
class Upload:
    """A resumable upload in progress: where it goes and the bytes received so far."""

    target: dict[str, Any]
    size: int | None
    data: bytearray = field(default_factory=bytearray)


class BatchContext:
    """The state the parts of the batch side share; ``lock`` also guards each part's store,
    since the event log and the stores are read from other threads (the tests')."""

    def __init__(self, config: BatchConfig) -> None:
        self.lock = threading.Lock()
        self.config = config
        self.rng = random.Random(config.seed)
        """Line failures and output order, reseeded with each config."""
        self.creates = 0
        """Jobs created under this config: which ``end_states`` entry a new job takes, and
        whether ``lost_create_replies`` drops its reply."""
        self._upload_requests = 0
        self._events: list[BatchEvent] = []
        self._closing: asyncio.Event | None = None

    def configure(self, config: BatchConfig) -> None:
        """Switch behaviour; the config's counts of creates and uploads start again from 0."""
        with self.lock:
            self.config = config
            self.rng = random.Random(config.seed)
            self.creates = 0
            self._upload_requests = 0

    @property
    def events(self) -> list[BatchEvent]:
        """A snapshot of the event log, oldest first."""
        with self.lock:
            return list(self._events)

    def log(self, kind: str, subject: str, keys: tuple[str, ...] = ()) -> None:
        with self.lock:
            self._events.append(BatchEvent(time.monotonic(), kind, subject, keys))

    def lookup(self, table: dict[_Key, _Value], key: _Key, missing: str) -> _Value:
        """``table[key]``, read under the lock, or a 404 saying ``missing``."""
        with self.lock:
            value = table.get(key)
        if value is None:
            raise ApiError(404, missing)
        return value

    def start_upload(
        self, uploads: dict[str, Upload], target: dict[str, Any], size: str | None, subject: str
    ) -> str:
        """Open a resumable upload session in ``uploads`` and return its id."""
        upload_id = secrets.token_hex(8)
        with self.lock:
            uploads[upload_id] = Upload(target, None if size is None else int(size))
        self.log("upload_started", subject)
        return upload_id

    async def chunk_received(self, subject: str) -> None:
        """Log an upload request carrying data, and hold it as ``upload_delay_s`` says."""
        self.log("upload_chunk", subject)
        with self.lock:
            self._upload_requests += 1
            slow = self._upload_requests > self.config.upload_delay_after
        if slow:
            await self.sleep(self.config.upload_delay_s)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when the server shuts down."""
        if seconds <= 0:
            return
        if self._closing is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def on_startup(self, _app: web.Application) -> None:
        self._closing = asyncio.Event()

    async def on_shutdown(self, _app: web.Application) -> None:
        """Release delayed requests so shutdown does not wait for them."""
        if self._closing:
            self._closing.set()


def now_iso() -> str:
    """Now, in UTC, as the services write times (RFC 3339 with ``Z``)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A compact JSON answer with the headers Google's APIs send."""
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        headers={**JSON_HEADERS, **(headers or {})},
    )
