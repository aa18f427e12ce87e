"""The emulator's HTTP server: routes, the request log and counters, and ways to run it.

``Emulator`` wires the aiohttp application to the wire format
(``klstream.emulator.protocol``), the fault injection
(``klstream.emulator.faults``) and the toy models; ``serve()`` runs it in the
current event loop and ``EmulatorServer`` on a background thread. See
``klstream.emulator`` for the full description.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from aiohttp import web

from klstream.emulator.batch import BatchConfig, BatchService
from klstream.emulator.faults import SHORT_TOPK, FaultConfig, FaultState
from klstream.emulator.openai_routes import HTML_PAGE
from klstream.emulator.protocol import (
    JSON_HEADERS,
    ApiError,
    Call,
    answer_body,
    build_call,
    client_gone,
    cut_top_candidates,
    parse_contents,
    prompt_ids,
    refuse_call,
)
from klstream.emulator.servers import register_servers
from klstream.emulator.service import PrefixCache, ServiceConfig
from klstream.emulator.toymodel import encode

DISCONNECT: Final = "disconnect"
"""Status logged when the client went away (gave up, timed out, was killed) mid-request."""
RequestStatus = int | Literal["disconnect"]


@dataclass(frozen=True)
class RequestRecord:
    """One handled request, as kept in the in-process log."""

    time: float
    """``time.monotonic()`` when the request arrived."""
    path: str
    model: str
    prompt: str
    prefill: str | None
    """Text of the trailing model turn, or None when there was none."""
    status: RequestStatus
    """The HTTP status answered, or ``DISCONNECT`` when nobody was left to answer."""
    fault: str | None
    """The injected fault (``"429"``, ``"quota"``, ``"hang"``, ...), if any."""


class Emulator:
    """The emulator's state: fault config, request log and counters.

    ``app()`` builds the aiohttp application serving it. The log and counters
    may be read from other threads.
    """

    def __init__(
        self,
        faults: FaultConfig | None = None,
        request_log: str | Path | None = None,
        log_limit: int = 50_000,
        batch: BatchConfig | None = None,
        service: ServiceConfig | None = None,
    ) -> None:
        self._state = FaultState(faults or FaultConfig())
        self.set_service(service or ServiceConfig())
        self._request_log_path = Path(request_log) if request_log else None
        self._log_file: TextIO | None = None
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=log_limit)
        self._by_status: Counter[str] = Counter()
        self._by_fault: Counter[str] = Counter()
        self._closing: asyncio.Event | None = None
        self.batch = BatchService(batch)
        """Files, buckets and batch jobs (:mod:`klstream.emulator.batch`)."""

    def set_faults(self, faults: FaultConfig) -> None:
        """Switch fault config; resets the fault RNG, quota window and fail_first_n counts."""
        self._state = FaultState(faults)

    def set_service(self, service: ServiceConfig) -> None:
        """Switch the service's behaviour; empties the implicit cache."""
        self._service = service
        self._cache = PrefixCache(service)

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the log (the last ``log_limit`` requests, oldest first)."""
        with self._lock:
            return list(self._records)

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: total, by status code, by injected fault."""
        with self._lock:
            return {
                "total": sum(self._by_status.values()),
                "by_status": dict(sorted(self._by_status.items())),
                "by_fault": dict(sorted(self._by_fault.items())),
            }

    def reset_log(self) -> None:
        with self._lock:
            self._records.clear()
            self._by_status.clear()
            self._by_fault.clear()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = "/{version}"
        model = "models/{model}:generateContent"
        app.router.add_post(f"{prefix}/{model}", self._generate)
        app.router.add_post(f"{prefix}/publishers/{{publisher}}/{model}", self._generate)
        app.router.add_post(
            f"{prefix}/projects/{{project}}/locations/{{location}}/publishers/{{publisher}}/{model}",
            self._generate,
        )
        self.batch.register(app)
        app.router.add_get("/_emulator/stats", self._stats)
        register_servers(app, lambda: self._state, self._sleep, self._record_openai)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self._closing = asyncio.Event()
        if self._request_log_path:
            self._log_file = self._request_log_path.open("a", encoding="utf-8", buffering=1)

    async def _on_shutdown(self, _app: web.Application) -> None:
        """Release hanging requests so shutdown does not wait for them."""
        if self._closing:
            self._closing.set()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _not_found(self, request: web.Request) -> web.Response:
        hint = ""
        if request.path == "/":
            hint = (
                " The SDK posts to the bare base_url when vertexai=True and neither"
                " project/location nor api_key is given; pass project= and location=."
            )
        return ApiError(404, f"{request.method} {request.path} is not found.{hint}").response()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._by_status[str(record.status)] += 1
            if record.fault:
                self._by_fault[record.fault] += 1
        if self._log_file:
            self._log_file.write(json.dumps(dataclasses.asdict(record)) + "\n")

    def _record_openai(
        self,
        request: web.Request,
        arrived: float,
        model: str,
        prompt: str,
        prefill: str | None,
        response: web.Response,
        fault: str | None,
    ) -> None:
        status: RequestStatus = DISCONNECT if client_gone(request) else response.status
        self._record(RequestRecord(arrived, request.path, model, prompt, prefill, status, fault))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when the server shuts down."""
        if self._closing is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _generate(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        state = self._state
        model_name = request.match_info["model"]
        prompt, prefill, fault = "", None, None
        try:
            delay = state.latency_s()
            if delay:
                await self._sleep(delay)
            body = await request.read()
            req, prompt, prefill = parse_contents(body)
            call = build_call(req, prompt, prefill, model_name, request.match_info["version"])
            response, fault = await self._answer(call, state, request, body)
        except ApiError as exc:
            response, fault = exc.response(), exc.fault
        except ConnectionResetError:  # aiohttp's "Connection lost" while reading the body
            response = web.Response(status=499)  # never sent: the client has gone
        except Exception as exc:  # a bug: still answer in the API's format
            response = ApiError(500, f"Internal error in the emulator: {exc!r}").response()
            fault = "emulator_bug"
        status: RequestStatus = DISCONNECT if client_gone(request) else response.status
        self._record(
            RequestRecord(arrived, request.path, model_name, prompt, prefill, status, fault)
        )
        return response

    async def _answer(
        self, call: Call, state: FaultState, request: web.Request, body: bytes
    ) -> tuple[web.Response, str | None]:
        config = state.config
        model = call.model
        vertex = "publisher" in request.match_info
        refuse_call(call, vertex)
        state.check_quota(time.monotonic())
        state.check_fail_first(model.name, body)
        fault = state.draw_exclusive()
        state.raise_error_answer(fault)
        if fault == "hang":
            await self._sleep(config.hang_seconds)

        prefill_ids = encode(call.prefill) if call.prefill else []
        cached = self._cache.send(
            model.name, [*prompt_ids(call.prompt), *prefill_ids], time.monotonic()
        )
        with_logprobs = not model.nologprobs
        if state.draw_no_logprobs():
            with_logprobs, fault = False, fault or "no_logprobs"
        answer = answer_body(call, with_logprobs, vertex, self._service.scaled_logprobs, cached)
        if state.draw_short_topk():
            answer, fault = cut_top_candidates(answer, SHORT_TOPK), fault or "short_topk"
        payload = json.dumps(answer, separators=(",", ":")).encode()
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        if fault == "html":
            return web.Response(body=HTML_PAGE, content_type="text/html"), fault
        return web.Response(body=payload, headers=JSON_HEADERS), fault


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _runner(emulator: Emulator) -> web.AppRunner:
    return web.AppRunner(emulator.app(), access_log=None, shutdown_timeout=2.0)


async def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    faults: FaultConfig | None = None,
    request_log: str | Path | None = None,
    on_ready: Callable[[str], None] | None = None,
    batch: BatchConfig | None = None,
    service: ServiceConfig | None = None,
) -> None:
    """Run the emulator in the current event loop until cancelled.

    ``on_ready`` gets the base URL once the socket listens (port 0 → a free port).
    """
    runner = _runner(Emulator(faults, request_log, batch=batch, service=service))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if on_ready:
            on_ready(_url(host, runner.addresses[0][1]))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class EmulatorServer:
    """The emulator on a background thread with its own event loop, for tests and tools.

    Use as a context manager; ``base_url`` is where to point the SDK.
    """

    def __init__(
        self,
        faults: FaultConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        request_log: str | Path | None = None,
        batch: BatchConfig | None = None,
        service: ServiceConfig | None = None,
    ) -> None:
        self.emulator = Emulator(faults, request_log, batch=batch, service=service)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return _url(self.host, self.port)

    @property
    def requests(self) -> list[RequestRecord]:
        return self.emulator.requests

    def stats(self) -> dict[str, Any]:
        return self.emulator.stats()

    def reset_log(self) -> None:
        self.emulator.reset_log()

    def set_faults(self, faults: FaultConfig) -> None:
        self.emulator.set_faults(faults)

    @property
    def batch(self) -> BatchService:
        return self.emulator.batch

    def set_service(self, service: ServiceConfig) -> None:
        self.emulator.set_service(service)

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._run, name="klstream-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() if it happens before ready
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        runner = _runner(self.emulator)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
