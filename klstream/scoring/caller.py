"""One Gemini call with klstream's retry policy and adaptive concurrency, shared by every stage.

tenacity retries 408/429/5xx, time-outs, connection errors, malformed bodies and answers without
logprobs, backing off exponentially with jitter but never sooner than the server asked
(RetryInfo's retryDelay or Retry-After). 400/401/403/404 are not retried. A 429 also halves the
concurrency (:mod:`klstream.scoring.throttle`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import tenacity
from google.genai import errors as genai_errors
from google.genai import types

from klstream.backends.gemini import (
    TRANSIENT_ERRORS,
    Answer,
    Endpoint,
    classify_api_error,
    describe,
    is_rate_limit,
    make_client,
    parse_answer,
    server_retry_delay,
)
from klstream.errors import KlstreamError
from klstream.scoring.throttle import AdaptiveLimiter


@dataclass
class CallStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    concurrency_cuts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def wait(self) -> Callable[[tenacity.RetryCallState], float]:
        backoff = tenacity.wait_exponential_jitter(
            initial=self.backoff_initial_s, max=self.backoff_max_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = server_retry_delay(error) if error else None
            return max(backoff(state), asked or 0.0)

        return wait


@dataclass(frozen=True)
class Outcome:
    """A call's end: an answer, or the error text of its last attempt."""

    answer: Answer | None
    error: str | None
    attempts: int
    latency_ms: float


class Caller:
    """Makes calls for one model through one client, counting and throttling them."""

    def __init__(
        self,
        client: Any,
        model: str,
        endpoint: Endpoint,
        policy: RetryPolicy,
        limiter: AdaptiveLimiter,
        thinking_budget: int | None,
        stats: CallStats,
    ) -> None:
        self.client, self.model, self.endpoint = client, model, endpoint
        self.policy, self.limiter, self.stats = policy, limiter, stats
        self.thinking_budget = thinking_budget

    async def _attempt(
        self, contents: list[types.ContentDict], config: types.GenerateContentConfig
    ) -> Answer:
        await self.limiter.acquire()
        try:
            self.stats.requests += 1
            response = await self.client.aio.models.generate_content(
                model=self.model, contents=contents, config=config
            )
        except genai_errors.APIError as error:
            if is_rate_limit(error):
                self.stats.rate_limited += 1
                self.limiter.on_rate_limited()
                self.stats.concurrency_cuts = self.limiter.decreases
            raise
        finally:
            await self.limiter.release()
        answer = parse_answer(response, self.thinking_budget)
        self.limiter.on_success()
        return answer

    def _should_retry(self, error: BaseException) -> bool:
        """Raises for errors that end the run (see :func:`classify_api_error`)."""
        if isinstance(error, genai_errors.APIError):
            return classify_api_error(error, self.thinking_budget) == "retry"
        return isinstance(error, TRANSIENT_ERRORS)

    def _count_retry(self, _: tenacity.RetryCallState) -> None:
        self.stats.retries += 1

    async def call(
        self, contents: list[types.ContentDict], config: types.GenerateContentConfig
    ) -> Outcome:
        """Retry until an answer or the retry budget is spent; run-ending errors propagate."""
        started = time.monotonic()
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.policy.max_retries + 1),
            wait=self.policy.wait(),
            retry=tenacity.retry_if_exception(self._should_retry),
            before_sleep=self._count_retry,
            reraise=True,
        )
        answer: Answer | None = None
        error: str | None = None
        try:
            answer = await retrying(self._attempt, contents, config)
        except TRANSIENT_ERRORS + (genai_errors.APIError,) as failure:
            error = self.endpoint.redact(describe(failure))
        except KlstreamError as fatal:
            # Run-ending errors quote the server; the key must not reach the user's terminal.
            fatal.args = (self.endpoint.redact(str(fatal)),)
            raise fatal from None
        attempts = int(retrying.statistics.get("attempt_number", 1))
        return Outcome(answer, error, attempts, (time.monotonic() - started) * 1000)


@contextlib.asynccontextmanager
async def open_caller(
    endpoint: Endpoint,
    model: str,
    policy: RetryPolicy,
    max_concurrent: int,
    thinking_budget: int | None,
    stats: CallStats,
) -> AsyncIterator[Caller]:
    """A :class:`Caller` over one HTTP session whose connection pool matches the concurrency.

    With Vertex the SDK keeps its own session, which carries the Google auth.
    """
    connector = aiohttp.TCPConnector(limit=max_concurrent, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = make_client(endpoint, session if endpoint.backend == "gemini" else None)
        yield Caller(
            client,
            model,
            endpoint,
            policy,
            AdaptiveLimiter(ceiling=max_concurrent),
            thinking_budget,
            stats,
        )
