"""A local HTTP server speaking the Gemini ``generateContent`` REST protocol.

It answers from the toy models of ``klstream.emulator.toymodel`` and can
inject the failures a real deployment sees (latency, 429/500/503, hangs,
malformed bodies, missing logprobs, quotas), so klstream's pipeline and its
retry logic can be exercised through the real google-genai SDK without
network access or cost. See ``klstream.emulator`` for the full description.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from klstream.emulator.toymodel import (
    Generation,
    ToyModel,
    UnknownModelError,
    encode,
)

MAX_LOGPROBS = 20
DEFAULT_MAX_OUTPUT_TOKENS = 8192
NOPREFILL_MESSAGE = "Requests ending with a model turn are not supported."

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_JSON_HEADERS = {"Content-Type": "application/json; charset=UTF-8"}


@dataclass(frozen=True)
class FaultConfig:
    """Which failures to inject; everything is off by default.

    Rates are per-request probabilities. The 429/500/503/hang/malformed rates
    are mutually exclusive outcomes of one draw, so they must sum to at most 1.
    All randomness comes from ``random.Random(seed)``.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_429: float = 0.0
    retry_delay_s: float = 1.5
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_hang: float = 0.0
    hang_seconds: float = 60.0
    rate_malformed: float = 0.0
    rate_no_logprobs: float = 0.0
    quota_per_minute: int = 0
    """Requests allowed per rolling window; 0 means unlimited."""
    quota_window_s: float = 60.0
    """Length of the quota window (tests shorten it)."""
    fail_first_n: int = 0
    """The first N requests with a given (model, body) get 503."""
    seed: int = 0

    def __post_init__(self) -> None:
        rates = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in rates.items():
            if name.startswith("rate_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
            if name != "seed" and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.exclusive_rate > 1.0 + 1e-9:
            raise ValueError("rate_429 + rate_500 + rate_503 + rate_hang + rate_malformed > 1")
        if self.quota_window_s <= 0:
            raise ValueError("quota_window_s must be > 0")

    @property
    def exclusive_rate(self) -> float:
        """Probability of one of the mutually exclusive faults."""
        return self.rate_429 + self.rate_500 + self.rate_503 + self.rate_hang + self.rate_malformed


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, as kept in the in-process log."""

    time: float
    """``time.monotonic()`` when the request arrived."""
    path: str
    model: str
    prompt: str
    prefill: str | None
    """Text of the trailing model turn, or None when there was none."""
    status: int
    fault: str | None
    """The injected fault (``"429"``, ``"quota"``, ``"hang"``, ...), if any."""


class ApiError(Exception):
    """An error answered in Google's JSON error format."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        fault: str | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fault = fault
        self.retry_delay_s = retry_delay_s

    def response(self) -> web.Response:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "status": _STATUS_NAMES[self.code],
        }
        headers = dict(_JSON_HEADERS)
        if self.retry_delay_s is not None:
            delay = f"{self.retry_delay_s:.3f}".rstrip("0").rstrip(".") + "s"
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
            ]
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_delay_s)))
        return web.Response(
            status=self.code, body=json.dumps({"error": error}).encode(), headers=headers
        )


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def normalize_keys(obj: Any) -> Any:
    """Recursively rename snake_case keys to camelCase, like proto-JSON parsing.

    The SDK serialises some nested configs by pydantic field name (e.g.
    ``thinkingConfig.thinking_budget``), and the real service accepts both.
    Applied to the top level and ``generationConfig``: the keys of contents
    (``role``, ``parts``, ``text``) are the same in both spellings.
    """
    if isinstance(obj, dict):
        return {_camel(k): normalize_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize_keys(v) for v in obj]
    return obj


@dataclass(frozen=True)
class _Call:
    """A validated generateContent request."""

    model: ToyModel
    prompt: str
    prefill: str | None
    max_tokens: int
    temperature: float
    seed: int | None
    response_logprobs: bool
    logprobs: int
    thinking_budget: int | None


def _text_of(content: Any, where: str) -> str:
    if not isinstance(content, dict) or not isinstance(content.get("parts", []), list):
        raise ApiError(400, f"Invalid value at '{where}': expected a Content object.")
    texts = [p.get("text", "") for p in content.get("parts", []) if isinstance(p, dict)]
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, f"Invalid value at '{where}.parts.text': expected a string.")
    return "".join(texts)


def _number(cfg: dict[str, Any], key: str, kind: type, lo: float, hi: float) -> Any:
    value = cfg.get(key)
    if value is None:
        return None
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        raise ApiError(400, f"Invalid value at 'generation_config.{key}': {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"generation_config.{key} must be in [{lo:g}, {hi:g}], got {value}.")
    return value


def _parse_contents(body: bytes) -> tuple[dict[str, Any], str, str | None]:
    """Decode the body; returns (normalised request, prompt, prefill text or None).

    The prompt is the system instruction and the user turns' text joined by
    newlines; a trailing model turn is the prefill. Raises ``ApiError`` (400).
    """
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"Invalid JSON payload received. {exc}") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "Invalid JSON payload received. Expected an object.")
    req = {_camel(k): v for k, v in raw.items()}
    req["generationConfig"] = normalize_keys(req.get("generationConfig"))
    contents = req.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise ApiError(400, f"Please use a valid role: user, model (contents[{i}]).")
    prefill = None
    if contents[-1].get("role") == "model":
        prefill = _text_of(contents[-1], f"contents[{len(contents) - 1}]")
        contents = contents[:-1]
    turns = [
        _text_of(c, f"contents[{i}]")
        for i, c in enumerate(contents)
        if c.get("role", "user") == "user"
    ]
    if not turns:
        raise ApiError(400, "* GenerateContentRequest.contents: must contain a user turn")
    if "systemInstruction" in req:
        turns.insert(0, _text_of(req["systemInstruction"], "system_instruction"))
    return req, "\n".join(turns), prefill


def _build_call(
    req: dict[str, Any], prompt: str, prefill: str | None, model_name: str, version: str
) -> _Call:
    """Resolve the model and validate ``generationConfig``; raises ``ApiError`` (400/404)."""
    try:
        model = ToyModel.for_name(model_name)
    except UnknownModelError:
        raise ApiError(
            404,
            f"models/{model_name} is not found for API version {version}, or is not "
            "supported for generateContent. The klstream emulator serves toy models: "
            "names with a 'toy' part, such as 'toy' or 'toy-d0.5'.",
        ) from None
    cfg = req.get("generationConfig") or {}
    if not isinstance(cfg, dict):
        raise ApiError(400, "Invalid value at 'generation_config': expected an object.")
    logprobs = _number(cfg, "logprobs", int, 0, MAX_LOGPROBS)
    response_logprobs = cfg.get("responseLogprobs") is True
    if logprobs and not response_logprobs:
        raise ApiError(400, "logprobs is set but responseLogprobs is not enabled.")
    thinking = cfg.get("thinkingConfig") or {}
    if not isinstance(thinking, dict):
        raise ApiError(400, "Invalid value at 'generation_config.thinking_config'.")
    max_tokens = _number(cfg, "maxOutputTokens", int, 1, 1 << 31)
    temperature = _number(cfg, "temperature", float, 0.0, 2.0)
    return _Call(
        model=model,
        prompt=prompt,
        prefill=prefill,
        max_tokens=DEFAULT_MAX_OUTPUT_TOKENS if max_tokens is None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        seed=_number(cfg, "seed", int, -(1 << 63), 1 << 63),
        response_logprobs=response_logprobs,
        logprobs=logprobs or 0,
        thinking_budget=_number(thinking, "thinkingBudget", int, -1, 1 << 31),
    )


@lru_cache(maxsize=4096)
def _prompt_token_count(prompt: str) -> int:
    return len(encode(prompt))


def _candidate_json(token: str, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": token, "tokenId": token_id, "logProbability": logprob}


def _response_body(
    call: _Call,
    gen: Generation | None,
    prefill_len: int,
    thoughts: int,
    with_logprobs: bool,
    vertex: bool,
) -> dict[str, Any]:
    """The generateContent JSON for a generation (``None``: all tokens were thoughts)."""
    steps = gen.steps if gen else []
    text = "".join(s.chosen.token for s in steps)
    candidate: dict[str, Any] = {"content": {"role": "model"}}
    if text:
        candidate["content"]["parts"] = [{"text": text}]
    candidate["finishReason"] = gen.finish_reason if gen else "MAX_TOKENS"
    if steps and with_logprobs:
        total = sum(s.chosen.logprob for s in steps)
        candidate["avgLogprobs"] = total / len(steps)
        if call.response_logprobs:
            result: dict[str, Any] = {}
            if call.logprobs:
                result["topCandidates"] = [
                    {"candidates": [_candidate_json(*c) for c in s.top]} for s in steps
                ]
            result["chosenCandidates"] = [_candidate_json(*s.chosen) for s in steps]
            if not vertex:  # "This field is not supported in Vertex AI."
                result["logProbabilitySum"] = total
            candidate["logprobsResult"] = result
    prompt_tokens = _prompt_token_count(call.prompt) + prefill_len
    usage = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": len(steps),
        "thoughtsTokenCount": thoughts,
        "totalTokenCount": prompt_tokens + len(steps) + thoughts,
    }
    body: dict[str, Any] = {
        "candidates": [candidate],
        # Proto3 JSON leaves out zero-valued fields.
        "usageMetadata": {k: v for k, v in usage.items() if v},
        "modelVersion": call.model.name,
        "responseId": secrets.token_urlsafe(15),
    }
    if vertex:
        body["createTime"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return body


class _FaultState:
    """Mutable fault bookkeeping; replaced wholesale when the config changes."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.window: deque[float] = deque()
        self.seen: Counter[bytes] = Counter()

    def check_quota(self, now: float) -> None:
        limit, span = self.config.quota_per_minute, self.config.quota_window_s
        if not limit:
            return
        while self.window and self.window[0] <= now - span:
            self.window.popleft()
        if len(self.window) >= limit:
            raise ApiError(
                429,
                f"Quota exceeded: {limit} requests per {span:g} s (emulated quota).",
                fault="quota",
                retry_delay_s=max(0.001, self.window[0] + span - now),
            )
        self.window.append(now)

    def check_fail_first(self, model: str, body: bytes) -> None:
        if not self.config.fail_first_n:
            return
        key = hashlib.blake2b(model.encode() + b"\0" + body).digest()
        self.seen[key] += 1
        if self.seen[key] <= self.config.fail_first_n:
            raise ApiError(
                503, "The model is overloaded. Please try again later.", fault="fail_first_n"
            )

    def draw_exclusive(self) -> str | None:
        """One draw deciding among 429/500/503/hang/malformed (or none)."""
        c = self.config
        if not c.exclusive_rate:
            return None
        u = self.rng.random()
        for name, rate in (
            ("429", c.rate_429),
            ("500", c.rate_500),
            ("503", c.rate_503),
            ("hang", c.rate_hang),
            ("malformed", c.rate_malformed),
        ):
            if u < rate:
                return name
            u -= rate
        return None

    def draw_no_logprobs(self) -> bool:
        rate = self.config.rate_no_logprobs
        return bool(rate) and self.rng.random() < rate


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
    ) -> None:
        self._state = _FaultState(faults or FaultConfig())
        self._request_log_path = Path(request_log) if request_log else None
        self._log_file: TextIO | None = None
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=log_limit)
        self._by_status: Counter[int] = Counter()
        self._by_fault: Counter[str] = Counter()
        self._closing: asyncio.Event | None = None

    def set_faults(self, faults: FaultConfig) -> None:
        """Switch fault config; resets the fault RNG, quota window and fail_first_n counts."""
        self._state = _FaultState(faults)

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
                "by_status": {str(k): v for k, v in sorted(self._by_status.items())},
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
        app.router.add_get("/_emulator/stats", self._stats)
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
            self._by_status[record.status] += 1
            if record.fault:
                self._by_fault[record.fault] += 1
        if self._log_file:
            self._log_file.write(json.dumps(dataclasses.asdict(record)) + "\n")

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
            config = state.config
            delay_ms = config.latency_ms
            if config.jitter_ms:
                delay_ms += state.rng.uniform(0.0, config.jitter_ms)
            if delay_ms:
                await self._sleep(delay_ms / 1000.0)
            body = await request.read()
            req, prompt, prefill = _parse_contents(body)
            call = _build_call(req, prompt, prefill, model_name, request.match_info["version"])
            response, fault = await self._answer(call, state, request, body)
        except ApiError as exc:
            response, fault = exc.response(), exc.fault
        except Exception as exc:  # a bug: still answer in the API's format
            response = ApiError(500, f"Internal error in the emulator: {exc!r}").response()
            fault = "emulator_bug"
        self._record(
            RequestRecord(
                arrived, request.path, model_name, prompt, prefill, response.status, fault
            )
        )
        return response

    async def _answer(
        self, call: _Call, state: _FaultState, request: web.Request, body: bytes
    ) -> tuple[web.Response, str | None]:
        config = state.config
        model = call.model
        if model.noprefill and call.prefill is not None:
            raise ApiError(400, NOPREFILL_MESSAGE)
        state.check_quota(time.monotonic())
        state.check_fail_first(model.name, body)
        fault = state.draw_exclusive()
        if fault == "429":
            raise ApiError(
                429,
                "Resource has been exhausted (e.g. check quota). (emulated fault)",
                fault=fault,
                retry_delay_s=config.retry_delay_s,
            )
        if fault == "500":
            raise ApiError(500, "An internal error has occurred. (emulated fault)", fault=fault)
        if fault == "503":
            raise ApiError(503, "The model is overloaded. Please try again later.", fault=fault)
        if fault == "hang":
            await self._sleep(config.hang_seconds)

        prefill_ids = encode(call.prefill) if call.prefill else []
        thoughts = 0
        if model.thinking and call.thinking_budget != 0:
            budget = call.thinking_budget
            thoughts = call.max_tokens if budget is None or budget < 0 else budget
            thoughts = min(thoughts, call.max_tokens)
        gen = None
        if call.max_tokens > thoughts:
            gen = model.sample(
                call.prompt,
                call.max_tokens - thoughts,
                call.temperature,
                call.seed,
                call.logprobs if call.response_logprobs else 0,
                prefill_ids,
            )
        with_logprobs = not model.nologprobs
        if state.draw_no_logprobs():
            with_logprobs, fault = False, fault or "no_logprobs"
        vertex = "publisher" in request.match_info
        payload = json.dumps(
            _response_body(call, gen, len(prefill_ids), thoughts, with_logprobs, vertex),
            separators=(",", ":"),
        ).encode()
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, headers=_JSON_HEADERS), fault


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
) -> None:
    """Run the emulator in the current event loop until cancelled.

    ``on_ready`` gets the base URL once the socket listens (port 0 → a free port).
    """
    runner = _runner(Emulator(faults, request_log))
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
    ) -> None:
        self.emulator = Emulator(faults, request_log)
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
