"""One Model 2 call with klstream's retry policy and adaptive concurrency, shared by every stage
and every backend (:class:`klstream.backends.base.ModelClient`).

tenacity retries what the backend calls transient — 408/429/5xx, time-outs, connection errors,
malformed bodies, answers without logprobs — backing off exponentially with jitter but never
sooner than the server asked (RetryInfo's retryDelay or Retry-After). 400/401/403/404 are not
retried. A 429 also halves the concurrency (:mod:`klstream.scoring.throttle`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import tenacity

from klstream.backends import open_client
from klstream.backends.base import Answer, Endpoint, ModelClient, PrefillRequest
from klstream.errors import KlstreamError
from klstream.scoring.throttle import AdaptiveLimiter

T = TypeVar("T")


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

    def wait(
        self, server_delay: Callable[[BaseException], float | None]
    ) -> Callable[[tenacity.RetryCallState], float]:
        """Exponential back-off with jitter, never shorter than ``server_delay`` of the error."""
        backoff = tenacity.wait_exponential_jitter(
            initial=self.backoff_initial_s, max=self.backoff_max_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = server_delay(error) if error else None
            return max(backoff(state), asked or 0.0)

        return wait


@dataclass(frozen=True)
class Outcome:
    """A call's end: an answer, or the error text of its last attempt."""

    answer: Answer | None
    error: str | None
    attempts: int
    latency_ms: float


@dataclass(frozen=True)
class Retried(Generic[T]):
    """Any retried operation's end: its value, or the error text of its last attempt."""

    value: T | None
    error: str | None
    attempts: int
    latency_ms: float


class Caller:
    """Makes calls through one :class:`ModelClient`, counting and throttling them."""

    def __init__(
        self,
        client: ModelClient,
        policy: RetryPolicy,
        limiter: AdaptiveLimiter,
        stats: CallStats,
    ) -> None:
        self.client, self.policy, self.limiter, self.stats = client, policy, limiter, stats

    async def _attempt(self, operation: Callable[[], Awaitable[T]]) -> T:
        await self.limiter.acquire()
        try:
            self.stats.requests += 1
            result = await operation()
        except BaseException as error:
            if self.client.is_rate_limit(error):
                self.stats.rate_limited += 1
                self.limiter.on_rate_limited()
                self.stats.concurrency_cuts = self.limiter.decreases
            raise
        finally:
            await self.limiter.release()
        self.limiter.on_success()
        return result

    def _count_retry(self, _: tenacity.RetryCallState) -> None:
        self.stats.retries += 1

    async def retried(self, operation: Callable[[], Awaitable[T]]) -> Retried[T]:
        """Run ``operation`` (one HTTP request) until it succeeds or the retry budget is spent;
        run-ending errors propagate."""
        started = time.monotonic()
        endpoint: Endpoint = self.client.endpoint
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.policy.max_retries + 1),
            wait=self.policy.wait(self.client.retry_delay),
            retry=tenacity.retry_if_exception(self.client.should_retry),
            before_sleep=self._count_retry,
            reraise=True,
        )
        value: T | None = None
        error: str | None = None
        try:
            value = await retrying(self._attempt, operation)
        except KlstreamError as fatal:
            # Run-ending errors quote the server; the key must not reach the user's terminal.
            fatal.args = (endpoint.redact(str(fatal)),)
            raise fatal from None
        except self.client.failures as failure:
            error = endpoint.redact(self.client.describe(failure))
        attempts = int(retrying.statistics.get("attempt_number", 1))
        return Retried(value, error, attempts, (time.monotonic() - started) * 1000)

    async def call(self, request: PrefillRequest) -> Outcome:
        """One generation request, retried (see :meth:`retried`)."""
        result = await self.retried(lambda: self.client.generate(request))
        return Outcome(result.value, result.error, result.attempts, result.latency_ms)


@contextlib.asynccontextmanager
async def open_caller(
    endpoint: Endpoint,
    model: str,
    policy: RetryPolicy,
    max_concurrent: int,
    thinking_budget: int | None,
    stats: CallStats,
) -> AsyncIterator[Caller]:
    """A :class:`Caller` over the client of ``endpoint``'s backend
    (:func:`klstream.backends.open_client`)."""
    async with open_client(endpoint, model, max_concurrent, thinking_budget) as client:
        yield Caller(client, policy, AdaptiveLimiter(ceiling=max_concurrent), stats)
