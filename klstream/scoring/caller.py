"""One Model 2 call with klstream's retry policy and adaptive concurrency, shared by every stage
and every backend (:class:`klstream.backends.base.ModelClient`).

tenacity retries what the backend calls transient — 408/429/5xx, time-outs, dropped
connections, malformed bodies, answers without logprobs: after the delay the server asks for
(RetryInfo's retryDelay or Retry-After, with a little jitter) when it gives one, else backing off
exponentially with jitter. 400/401/403/404 are not retried. An endpoint that cannot be reached at
all (connection refused, unknown host, TLS failure) is tried twice more, then ends the run
(:class:`~klstream.errors.EndpointUnreachable`). 429s and 503s feed the adaptive concurrency
(:mod:`klstream.scoring.throttle`).

A *probe* call (the first requests of a run, before anything has succeeded) spends a short,
bounded budget instead of the full one: a broken endpoint is told apart in well under a minute,
not after each position's full retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import tenacity

from klstream.backends import open_client
from klstream.backends.base import Answer, Endpoint, ModelClient, PrefillRequest
from klstream.errors import EndpointUnreachable, KlstreamError
from klstream.scoring.throttle import AdaptiveLimiter

T = TypeVar("T")

UNREACHABLE_RETRIES = 2
"""Retries of a connection that cannot be established at all, before the run stops."""
SERVER_DELAY_JITTER = 0.2
"""A retry the server timed waits up to this fraction longer, so that the many requests it
turned away at once do not all come back at the same instant."""


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
    """How often and how long to retry a request.

    Back-offs without a server-given delay are capped low (``backoff_max_s``) and retries are
    many: the adaptive concurrency, not each request's back-off, keeps a run off an overloaded
    server, and in a storm of random rejections a long cap only makes the unlucky last positions
    wait (a 50% 503 storm took 12x a clean run's time with a 60 s cap, 4x with 5 s;
    ``bench/storm_bench.py``).
    """

    max_retries: int = 12
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 5.0
    probe_attempts: int = 6
    """Attempts at most per probe request (never more than ``max_retries + 1``)."""
    probe_budget_s: float = 30.0
    """Time the probe requests of a run may take together before the run stops."""

    def wait(
        self, server_delay: Callable[[BaseException], float | None]
    ) -> Callable[[tenacity.RetryCallState], float]:
        """The delay before a retry: what the server asked for (``server_delay`` of the error),
        when it says, else exponential back-off with jitter up to ``backoff_max_s``."""
        backoff = tenacity.wait_exponential_jitter(
            initial=self.backoff_initial_s, max=self.backoff_max_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = server_delay(error) if error else None
            if asked is not None:
                return asked * (1.0 + SERVER_DELAY_JITTER * random.random())
            return backoff(state)

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

    async def _attempt(self, operation: Callable[[], Awaitable[T]], timeout_s: float | None) -> T:
        await self.limiter.acquire()
        try:
            self.stats.requests += 1
            async with asyncio.timeout(timeout_s):
                result = await operation()
        except BaseException as error:
            if self.client.is_rate_limit(error):
                self.stats.rate_limited += 1
            if self.client.is_overloaded(error):
                self.limiter.on_rejected()
                self.stats.concurrency_cuts = self.limiter.decreases
            raise
        finally:
            self.limiter.release()
        self.limiter.on_success()
        return result

    def _should_retry(self, state: tenacity.RetryCallState) -> bool:
        """Raises for errors that end the run (the backend's ``should_retry``)."""
        error = state.outcome.exception() if state.outcome else None
        if error is None:
            return False
        if self.client.unreachable(error) is not None:
            return state.attempt_number <= UNREACHABLE_RETRIES
        return self.client.should_retry(error)

    def _count_retry(self, _: tenacity.RetryCallState) -> None:
        self.stats.retries += 1

    def _probe_stop(self, deadline: float) -> Callable[[tenacity.RetryCallState], bool]:
        """A probe stops after a few attempts or at the deadline; a 429 says the endpoint works
        and is only busy, so it keeps the ordinary budget."""
        ordinary = tenacity.stop_after_attempt(self.policy.max_retries + 1)

        def stop(state: tenacity.RetryCallState) -> bool:
            if ordinary(state):
                return True
            error = state.outcome.exception() if state.outcome else None
            if error is None or self.client.is_rate_limit(error):
                return False
            return (
                state.attempt_number >= self.policy.probe_attempts or time.monotonic() >= deadline
            )

        return stop

    async def retried(
        self, operation: Callable[[], Awaitable[T]], probe_deadline: float | None = None
    ) -> Retried[T]:
        """Run ``operation`` (one HTTP request) until it succeeds or the retry budget is spent;
        run-ending errors propagate.

        With a ``probe_deadline`` (a :func:`time.monotonic` instant) the call is a probe: at most
        ``probe_attempts`` attempts (429s aside) until the deadline, none outlasting half the
        probe budget.
        """
        started = time.monotonic()
        endpoint: Endpoint = self.client.endpoint
        policy = self.policy
        timeout_s: float | None = None
        stop: Callable[[tenacity.RetryCallState], bool]
        if probe_deadline is None:
            stop = tenacity.stop_after_attempt(policy.max_retries + 1)
        else:
            stop = self._probe_stop(probe_deadline)
            timeout_s = min(endpoint.timeout_s, policy.probe_budget_s / 2)
        retrying = tenacity.AsyncRetrying(
            stop=stop,
            wait=policy.wait(self.client.retry_delay),
            retry=self._should_retry,
            before_sleep=self._count_retry,
            reraise=True,
        )
        value: T | None = None
        error: str | None = None
        try:
            value = await retrying(self._attempt, operation, timeout_s)
        except KlstreamError as fatal:
            # Run-ending errors quote the server; the key must not reach the user's terminal.
            fatal.args = (endpoint.redact(str(fatal)),)
            raise fatal from None
        except BaseException as failure:
            if not isinstance(failure, (*self.client.failures, TimeoutError)):
                raise
            cause = self.client.unreachable(failure)
            if cause is not None:
                raise EndpointUnreachable(
                    endpoint.redact(f"cannot reach {endpoint.url}: {cause}")
                ) from None
            error = endpoint.redact(self.client.describe(failure))
        attempts = int(retrying.statistics.get("attempt_number", 1))
        return Retried(value, error, attempts, (time.monotonic() - started) * 1000)

    async def call(self, request: PrefillRequest, probe_deadline: float | None = None) -> Outcome:
        """One generation request, retried (see :meth:`retried`)."""
        result = await self.retried(lambda: self.client.generate(request), probe_deadline)
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
